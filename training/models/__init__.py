"""The model zoo: create every model by name through the registry."""

from training.models._registry import create_model, is_model, list_models, register_model
from training.models.cfg import ModelCfg

__all__ = ["ModelCfg", "create_model", "is_model", "list_models", "register_model"]
