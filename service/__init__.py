"""FastAPI inference service for facial expression recognition."""
