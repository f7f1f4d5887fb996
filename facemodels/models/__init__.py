"""The model zoo: create every model by name through the registry."""

from facemodels.models._registry import create_model, list_models, register_model
from facemodels.models.cfg import ModelCfg

__all__ = ["ModelCfg", "create_model", "list_models", "register_model"]
