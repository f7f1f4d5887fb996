"""Checkpoints: safetensors weights plus a JSON card. Loading never unpickles anything.

A checkpoint named ``runs/x/best`` is two files: ``best.safetensors`` (tensors only) and
``best.json`` (the card). The card records the architecture and the keyword arguments needed
to rebuild it, its :class:`ModelCfg`, the training arguments, metrics (each naming the split
it was measured on), a fingerprint of the data and the code version.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from facemodels import __version__
from facemodels.atomic import save_safetensors_atomically, write_text_atomically
from facemodels.models import ModelCfg, create_model

__all__ = [
    "CheckpointError",
    "card_path",
    "code_version",
    "init_from_checkpoint",
    "load_card",
    "load_checkpoint",
    "save_checkpoint",
    "update_card",
    "weights_path",
]

log = logging.getLogger(__name__)
CARD_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, or disagrees with its card."""


def weights_path(path: str | Path) -> Path:
    p = Path(path)
    return p if p.suffix == ".safetensors" else p.with_name(p.name.removesuffix(".json") + ".safetensors")


def card_path(path: str | Path) -> Path:
    return weights_path(path).with_suffix(".json")


def code_version() -> str:
    """Package version plus the git commit when run from a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    arch: str,
    model_kwargs: dict[str, Any] | None = None,
    train_args: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    data_fingerprint: str | None = None,
    extra: dict[str, Any] | None = None,
    half: bool = False,
) -> Path:
    """Write ``<path>.safetensors`` and ``<path>.json`` atomically; return the weights path.

    Args:
        arch: registry name the model was built with.
        model_kwargs: extra keyword arguments ``create_model`` needs to rebuild it.
        metrics: e.g. ``{"PublicTest": {"acc": 0.71, "acc_tta": 0.72}}``; key by split name.
        half: store floating-point tensors as float16 (halves the file).
    """
    wpath, cpath = weights_path(path), card_path(path)
    wpath.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in model.state_dict().items():
        t = v.detach().to("cpu")
        if half and t.is_floating_point():
            t = t.half()
        state[k] = t.contiguous()
    cfg: ModelCfg = model.cfg
    card = {
        "format": CARD_FORMAT,
        "arch": arch,
        "model_kwargs": model_kwargs or {},
        "cfg": cfg.to_dict(),
        "num_params": sum(p.numel() for p in model.parameters()),
        "train_args": train_args or {},
        "metrics": metrics or {},
        "data_fingerprint": data_fingerprint,
        "code_version": code_version(),
        "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "weights_file": wpath.name,
        "dtype": "float16" if half else "float32",
        **(extra or {}),
    }
    save_safetensors_atomically(wpath, state, metadata={"arch": arch})
    write_text_atomically(cpath, json.dumps(card, indent=2, sort_keys=False) + "\n")
    return wpath


def load_card(path: str | Path) -> dict[str, Any]:
    """Read and check a checkpoint's JSON card."""
    cpath = card_path(path)
    if not cpath.is_file():
        raise CheckpointError(f"checkpoint card not found: {cpath}")
    try:
        card = json.loads(cpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint card {cpath} is not valid JSON: {e}") from e
    for key in ("arch", "cfg"):
        if key not in card:
            raise CheckpointError(f"checkpoint card {cpath} has no {key!r} entry")
    return card


def update_card(path: str | Path, **updates: Any) -> dict[str, Any]:
    """Rewrite top-level entries of a checkpoint's card (e.g. new ``metrics``); weights untouched."""
    card = load_card(path)
    card.update(updates)
    cpath = card_path(path)
    write_text_atomically(cpath, json.dumps(card, indent=2) + "\n")
    return card


def load_checkpoint(
    path: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from its card and load the safetensors weights into it (eval mode).

    Raises:
        CheckpointError: naming the file, if either file is missing or corrupt, or if the
            weights do not fit the architecture and ModelCfg that the card describes.
    """
    wpath = weights_path(path)
    card = load_card(path)
    if not wpath.is_file():
        raise CheckpointError(f"checkpoint weights not found: {wpath}")
    try:
        cfg = ModelCfg.from_dict(card["cfg"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint card {card_path(path)} has a bad cfg: {e}") from e
    try:
        model = create_model(
            card["arch"], num_classes=cfg.num_classes, cfg=cfg, **card.get("model_kwargs", {})
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint card {card_path(path)}: cannot build model: {e}") from e
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint weights {wpath} are corrupt or unreadable: {e}") from e
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or bad_shape:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected),
                                ("wrong shape", bad_shape))
            if keys
        )
        raise CheckpointError(
            f"checkpoint weights {wpath} do not match arch {card['arch']!r} in its card ({detail})"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    model.to(device).eval()
    log.debug("loaded %s (%s)", wpath, card["arch"])
    return model, card


#: Name prefix of the classification head in every zoo model (its final ``nn.Linear``).
_HEAD = "fc."


def init_from_checkpoint(
    model: nn.Module,
    path: str | Path,
    arch: str,
    class_aliases: Mapping[str, str] | None = None,
) -> int:
    """Initialise ``model`` from checkpoint ``path`` to fine-tune it; return the tensors copied.

    The backbone (every same-named, same-shaped tensor outside the ``fc`` head) is copied. The
    head is copied row by row, by class name: the row of each of ``model``'s classes comes from
    the checkpoint's class of the same name, or of the name ``class_aliases`` gives it (CK+'s
    ``"sadness"`` is FER2013's ``"sad"``). A class with no counterpart (CK+'s ``"contempt"``)
    keeps its fresh row. A head tensor counts as copied when any of its rows is.

    Raises:
        ValueError: if the checkpoint is of another architecture than ``arch``.
    """
    source, card = load_checkpoint(path)
    if card["arch"] != arch:
        raise ValueError(f"init checkpoint {path} is a {card['arch']}, not a {arch}")
    own = model.state_dict()
    theirs = source.state_dict()
    shared = {k: v.to(own[k].dtype) for k, v in theirs.items()
              if k in own and own[k].shape == v.shape and not k.startswith(_HEAD)}
    rows = _head_rows(model.cfg.class_names, source.cfg.class_names, class_aliases or {})
    for key in (k for k in own if k.startswith(_HEAD) and k in theirs):
        if not rows or own[key].shape[1:] != theirs[key].shape[1:]:
            continue
        head = own[key].clone()
        for mine, their in rows.items():
            head[mine] = theirs[key][their].to(head.dtype)
        shared[key] = head
    model.load_state_dict(shared, strict=False)
    fresh = [name for i, name in enumerate(model.cfg.class_names) if i not in rows]
    log.info("initialised %d of %d tensors from %s%s", len(shared), len(own), path,
             f"; head rows of {fresh} left fresh (no such class there)" if fresh else "")
    return len(shared)


def _head_rows(
    mine: Sequence[str], theirs: Sequence[str], aliases: Mapping[str, str]
) -> dict[int, int]:
    """Map each of our class indices to the source's index of the same (or aliased) class."""
    return {i: theirs.index(aliases.get(name, name)) for i, name in enumerate(mine)
            if aliases.get(name, name) in theirs}
