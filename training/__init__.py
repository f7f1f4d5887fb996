"""Training package: FER2013/CK+ data, the model zoo, the trainer, evaluation and the GAN frontaliser."""

__version__ = "0.1.0"
