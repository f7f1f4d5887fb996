"""Inference stages of the service: detection, alignment, batching and prediction."""
