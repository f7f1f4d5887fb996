"""Which checkpoints the service serves, under which names. Reads cards only, loads no weights.

Classifiers, in this order (a name is taken once, by the first that claims it):

1. ``default``: ``FER_CLASSIFIER_CHECKPOINT``.
2. ``ensemble``: ``FER_ENSEMBLE_CHECKPOINT``, when set.
3. every entry of ``FER_MODELS`` (name -> checkpoint), when set.
4. with ``FER_USE_SHIPPED_EXTRAS``: every classifier checkpoint in the default classifier's
   folder (``<name>.safetensors`` with its ``<name>.json`` card) under its file stem, so
   ``checkpoints/vgg19.safetensors`` is ``model=vgg19`` and a shipped ``ensemble.safetensors``
   is ``model=ensemble``.

A file is loaded once: configuring the same checkpoint twice (1-3) is an error, and a file
found in the folder that is already served (the default classifier itself, say) is skipped.
A frontaliser checkpoint (card arch ``frontalizer``, or any architecture that the model
registry files under a task other than classification) is not a classifier: it is never
served as one, and the frontaliser keeps its own setting (``FER_FRONTALIZER_CHECKPOINT``, else
``frontalizer.safetensors`` in that folder).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facemodels.checkpoint import card_path, load_card, weights_path
from facemodels.models import list_models
from service.config import MODEL_NAME, RESERVED_MODEL_NAMES, Settings

__all__ = ["ModelSpec", "classifier_specs", "detector_int8_path", "frontalizer_path", "is_classifier_card",
           "served_frontalizer_checkpoint"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A classifier to load: its served name, its checkpoint and its role (``/models``, metrics)."""

    name: str
    path: Path
    role: str


def is_classifier_card(card: Mapping[str, Any]) -> bool:
    """False for a frontaliser's card, or one whose arch the registry files under another task.

    An architecture the registry does not know counts as a classifier, so loading it fails
    with :class:`~facemodels.checkpoint.CheckpointError` naming the card rather than the file
    being skipped without a word.
    """
    arch = str(card.get("arch"))
    if arch == "frontalizer":
        return False
    return not (arch in list_models(task=None) and arch not in list_models())


def _is_model_card(card: Path) -> bool:
    """A JSON object with an ``arch`` (a checkpoint card), not some other JSON beside weights.

    Unreadable JSON still counts as a card, so that loading it fails naming the file.
    """
    try:
        data = json.loads(card.read_text())
    except (OSError, ValueError):
        return True
    return isinstance(data, dict) and "arch" in data


def frontalizer_path(settings: Settings) -> Path | None:
    """``FER_FRONTALIZER_CHECKPOINT``, else a shipped ``frontalizer.safetensors`` beside the
    classifier when ``use_shipped_extras`` (a container that bakes checkpoints into
    /opt/fer/checkpoints finds it there, like a checkout finds ``checkpoints/``)."""
    if settings.frontalizer_checkpoint is not None:
        return Path(settings.frontalizer_checkpoint)
    shipped = Path(settings.classifier_checkpoint).parent / "frontalizer.safetensors"
    return shipped if settings.use_shipped_extras and shipped.is_file() else None


def served_frontalizer_checkpoint(settings: Settings) -> Path | None:
    """The frontaliser checkpoint the service loads: :func:`frontalizer_path` under
    ``FER_FRONTALIZER=auto``, none under ``warp`` or ``off`` (a warning names what is ignored)."""
    if settings.frontalizer == "auto":
        return frontalizer_path(settings)
    if settings.frontalizer_checkpoint is not None:
        log.warning("FER_FRONTALIZER=%s: FER_FRONTALIZER_CHECKPOINT %s is not loaded",
                    settings.frontalizer, settings.frontalizer_checkpoint)
    return None


def detector_int8_path(settings: Settings) -> Path | None:
    """``FER_DETECTOR_INT8_GRAPH``, else a ``detector.int8.onnx`` beside the classifier checkpoint
    (the shipped ``checkpoints/`` has one; so does a container that bakes them in), else ``None``.
    Whether it may run is :func:`facemodels.face.detector_int8.usable_int8_graph`'s to say."""
    if settings.detector_int8_graph is not None:
        return Path(settings.detector_int8_graph)
    shipped = Path(settings.classifier_checkpoint).parent / "detector.int8.onnx"
    return shipped if shipped.is_file() else None


def _same_file(path: Path) -> Path:
    """The key two spellings of one checkpoint share (``x``, ``x.json``, ``./x.safetensors``)."""
    return weights_path(path).resolve()


def classifier_specs(settings: Settings) -> list[ModelSpec]:
    """The classifiers to load, ``default`` first (see the module docstring for the rules).

    Raises:
        ValueError: two settings name the same checkpoint file.
        CheckpointError: a card in the folder is unreadable (it names the file).
    """
    default = Path(settings.classifier_checkpoint)
    specs = [ModelSpec("default", default, "default")]
    if settings.ensemble_checkpoint is not None:
        specs.append(ModelSpec("ensemble", Path(settings.ensemble_checkpoint), "ensemble"))
    specs += [ModelSpec(name, Path(path), "classifier") for name, path in settings.models.items()]
    served: dict[Path, str] = {}
    for spec in specs:
        key = _same_file(spec.path)
        if key in served:
            raise ValueError(f"model {spec.name!r} and model {served[key]!r} are the same checkpoint "
                             f"{weights_path(spec.path)}; it is loaded once, so configure it under one name")
        served[key] = spec.name
    if settings.use_shipped_extras:
        specs += _discover(default.parent, served, {s.name for s in specs}, frontalizer_path(settings))
    return specs


def is_training_run(folder: Path) -> bool:
    """Whether ``folder`` is a ``fer-train`` run folder (its ``best``/``last`` checkpoints sit
    beside training state), where discovery would serve the same model several times."""
    return (folder / "args.json").is_file() and (folder / "last_state.json").is_file()


def _discover(folder: Path, served: dict[Path, str], names: set[str],
              frontalizer: Path | None) -> list[ModelSpec]:
    """Classifier checkpoints in ``folder`` not already served, named by their file stem."""
    found: list[ModelSpec] = []
    if is_training_run(folder):
        log.info("%s is a training run folder: serving only the configured checkpoints from it "
                 "(FER_MODELS names more)", folder)
        return found
    not_classifiers = {_same_file(frontalizer)} if frontalizer is not None else set()
    for weights in sorted(folder.glob("*.safetensors")):
        name, key = weights.stem, _same_file(weights)
        if key in served or key in not_classifiers:
            continue
        if not card_path(weights).is_file():
            log.warning("not serving %s: it has no %s card beside it", weights, card_path(weights).name)
            continue
        if not _is_model_card(card_path(weights)):
            log.info("not serving %s: %s is not a model card", weights, card_path(weights).name)
            continue
        if not is_classifier_card(load_card(weights)):
            log.info("not serving %s as a classifier: its card's arch is not a classifier", weights)
            continue
        if name in names:
            log.info("not serving %s as model=%s: that name is already configured", weights, name)
            continue
        if name in RESERVED_MODEL_NAMES - {"ensemble"} or not MODEL_NAME.fullmatch(name):
            log.warning("not serving %s: %r cannot be a model name (reserved, or not 1-64 letters, "
                        "digits, '.', '_' or '-')", weights, name)
            continue
        found.append(ModelSpec(name, weights, "ensemble" if name == "ensemble" else "classifier"))
        names.add(name)
        served[key] = name
    return found
