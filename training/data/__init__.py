"""Datasets (FER2013, CK+48, CFP) and the batched tensor transforms."""
