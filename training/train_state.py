"""Save and restore the full training state (optimizer, scheduler, RNG) without pickle.

Tensors go to ``<stem>_state.safetensors``; everything else (hyper-parameters, scheduler
counters, epoch, best metric) to ``<stem>_state.json``. Together with the model checkpoint
this lets ``--resume`` continue a run exactly where its last finished epoch left it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from facemodels.atomic import save_safetensors_atomically, write_text_atomically
from facemodels.checkpoint import CheckpointError

__all__ = ["load_train_state", "save_train_state"]


def _paths(stem: Path) -> tuple[Path, Path]:
    return stem.with_name(stem.name + "_state.safetensors"), stem.with_name(stem.name + "_state.json")


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"__tensor__": value.tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return torch.tensor(value["__tensor__"], dtype=getattr(torch, value["dtype"]))
        if "__float__" in value:
            return float(value["__float__"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def save_train_state(
    stem: Path,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None = None,
    info: dict[str, Any],
) -> None:
    """Write the optimizer/scheduler/RNG state next to the model checkpoint ``stem``."""
    tensors: dict[str, torch.Tensor] = {
        "rng.torch": torch.get_rng_state(),
        "rng.generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    opt = optimizer.state_dict()
    scalar_state: dict[str, dict[str, Any]] = {}
    for pid, pstate in opt["state"].items():
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                tensors[f"optimizer.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalar_state.setdefault(str(pid), {})[k] = _jsonable(v)
    meta = {
        "info": info,
        "optimizer": {"param_groups": opt["param_groups"], "scalar_state": scalar_state},
        "scheduler": _jsonable(scheduler.state_dict()) if scheduler is not None else None,
        "scaler": _jsonable(scaler.state_dict()) if scaler is not None else None,
    }
    tpath, jpath = _paths(stem)
    tpath.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomically(tpath, tensors)
    write_text_atomically(jpath, json.dumps(_jsonable(meta), indent=1))


def load_train_state(
    stem: Path,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Any]:
    """Restore what :func:`save_train_state` wrote; return its ``info`` dict."""
    tpath, jpath = _paths(stem)
    for p in (tpath, jpath):
        if not p.is_file():
            raise CheckpointError(f"training state not found: {p}")
    try:
        tensors = load_file(str(tpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"training state {tpath} is corrupt: {e}") from e
    try:
        meta = _from_json(json.loads(jpath.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"training state {jpath} is not valid JSON: {e}") from e
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = t
    for pid, values in meta["optimizer"]["scalar_state"].items():
        state.setdefault(int(pid), {}).update(values)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"training state {tpath} does not fit this optimizer: {e}") from e
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and meta["scaler"] is not None:
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.generator"])
    if torch.cuda.is_available():
        cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    return meta["info"]
