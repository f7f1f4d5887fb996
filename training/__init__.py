"""Training package: FER2013/CK+ data, the trainer, evaluation, ensembles and the GAN frontaliser.

It produces the checkpoints that :mod:`facemodels` loads; the service never imports it.
"""
