"""What a checkpoint needs to run on a face, shared by training and the service.

The model registry and :class:`~facemodels.models.ModelCfg`, checkpoint I/O with its card,
preprocessing and prediction, face detection, alignment, pose and framing, and the
frontaliser's inference model. It imports neither ``training`` nor ``service``.
"""

__version__ = "0.1.0"
