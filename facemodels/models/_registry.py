"""Model registry: every architecture is created by name through ``create_model``.

Builders are small functions decorated with ``@register_model``; each returns an
``nn.Module`` whose ``cfg`` attribute is its :class:`ModelCfg`. A builder registered with
``@register_model(task="frontalize")`` (or any task other than ``"classify"``) can be created
and loaded from checkpoints like any model, but :func:`list_models` lists only classifiers
unless asked for that task, so the classifier zoo's contract tests stay about classifiers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from facemodels.classes import NUM_CLASSES

__all__ = ["create_model", "list_models", "register_model"]

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_TASKS: dict[str, str] = {}
F = TypeVar("F", bound=Callable[..., nn.Module])
CLASSIFY = "classify"


def register_model(fn: F | None = None, *, task: str = CLASSIFY) -> Any:
    """Register ``fn`` under its function name (names must be unique).

    Use bare (``@register_model``) for classifiers, or ``@register_model(task="...")``.
    """

    def register(f: F) -> F:
        name = f.__name__
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is registered twice")
        _BUILDERS[name] = f
        _TASKS[name] = task
        return f

    return register(fn) if fn is not None else register


def list_models(*, include_ensemble: bool = True, task: str | None = CLASSIFY) -> list[str]:
    """Sorted names of the registered models of ``task`` (``None``: every task)."""
    _import_zoo()
    names = sorted(n for n in _BUILDERS if task is None or _TASKS[n] == task)
    return names if include_ensemble else [n for n in names if n != "ensemble"]


def create_model(name: str, num_classes: int = NUM_CLASSES, **kwargs) -> nn.Module:
    """Build the model registered as ``name``.

    Raises:
        KeyError: ``name`` is not registered (the message lists what is).
    """
    _import_zoo()
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(_BUILDERS))}") from None
    model = builder(num_classes=num_classes, **kwargs)
    if not hasattr(model, "cfg"):
        raise TypeError(f"builder {name!r} returned a model without a .cfg ModelCfg")
    return model


def _import_zoo() -> None:
    """Import the architecture modules so their builders register themselves."""
    from facemodels.frontalizer import model, refiner  # noqa: F401
    from facemodels.models import cnn, compact, ensemble, resnet, vgg  # noqa: F401
