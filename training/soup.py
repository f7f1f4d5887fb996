"""``fer-train soup``: average the weights of fine-tunes of one model into one model.

Fine-tunes that start from the same checkpoint (same architecture, same initial weights) tend
to stay in one basin of the loss, so the element-wise mean of their weights is itself a good
model: a "model soup" (Wortsman et al., ICML 2022). Unlike an ensemble it costs one forward
pass a face. Every floating-point entry of the state dict is averaged, BatchNorm running
statistics included; integer buffers are taken from the first ingredient.

``--recipe uniform`` averages every ingredient. ``--recipe greedy`` ranks the ingredients by
their own PublicTest accuracy and adds each, best first, only if the soup's accuracy does not
drop, so a fine-tune that left the basin is left out. Both select on PublicTest, the selection
split; PrivateTest stays untouched.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from facemodels.checkpoint import CheckpointError, load_card, load_checkpoint, save_checkpoint, weights_path
from facemodels.device import resolve_device
from facemodels.onnx_export import sha256_file
from training.data.fer2013 import DEFAULT_DATA, SELECTION_SPLIT, load_fer2013, selection_split
from training.engine import evaluate

__all__ = ["average_state_dicts", "get_soup_parser", "ingredient_record", "soup_main"]

log = logging.getLogger(__name__)

#: What ``--select`` ranks and accepts ingredients by.
SELECT_METRICS = {"acc": "1-crop", "acc_tta": "10-crop"}


def get_soup_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Average the weights of fine-tunes of one model (a model soup), "
                    f"selected on {SELECTION_SPLIT}", add_help=add_help)
    p.add_argument("ingredients", nargs="+", type=Path,
                   help="checkpoints of one architecture, fine-tuned from the same weights")
    p.add_argument("--output", type=Path, required=True, help="checkpoint stem to write")
    p.add_argument("--recipe", choices=("uniform", "greedy"), default="greedy",
                   help="uniform: average all; greedy: add best-first while accuracy does not drop")
    p.add_argument("--select", choices=tuple(SELECT_METRICS), default="acc_tta",
                   help="accuracy that ranks and accepts ingredients (acc_tta: 10-crop)")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--half", action="store_true", help="store weights as fp16")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = default")
    return p


def average_state_dicts(states: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Element-wise mean (in float32) of floating-point entries; other entries from the first."""
    if not states:
        raise ValueError("nothing to average")
    first = states[0]
    out: dict[str, Tensor] = {}
    for key, value in first.items():
        if value.is_floating_point():
            mean = torch.stack([s[key].float() for s in states]).mean(0)
            out[key] = mean.to(value.dtype)
        else:
            out[key] = value.clone()
    return out


def ingredient_record(path: Path) -> dict[str, Any]:
    """What the soup's card keeps of an ingredient: its training arguments, metrics and hash.

    An ingredient's path may later hold other weights (``checkpoints/default`` after the soup
    replaces it), so the card keeps the lineage itself, not just the path.
    """
    card = load_card(path)
    return {"path": str(path), "weights_sha256": sha256_file(weights_path(path)),
            **{k: card.get(k) for k in ("train_args", "metrics", "saved_at", "code_version")}}


def _float_copy(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of the state dict, floating-point entries in float32."""
    return {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
            for k, v in model.state_dict().items()}


def _load_ingredients(paths: Sequence[Path], device: torch.device
                      ) -> tuple[nn.Module, dict[str, Any], list[dict[str, Tensor]]]:
    """The first model (to hold the soup), its card, and every ingredient's float32 state dict.

    Raises:
        CheckpointError: naming the file whose architecture, model arguments or preprocessing
            differ from the first ingredient's, since their weights cannot be averaged.
    """
    model, card = load_checkpoint(paths[0], device=device)
    states = [_float_copy(model)]  # a copy: scoring loads other weights into ``model``
    for path in paths[1:]:
        other, other_card = load_checkpoint(path, device=device)
        for field in ("arch", "model_kwargs", "cfg"):
            if other_card.get(field) != card.get(field):
                raise CheckpointError(
                    f"{weights_path(path)}: its {field} differs from {weights_path(paths[0])}'s; "
                    "a soup needs one architecture with one preprocessing")
        states.append(_float_copy(other))
    return model, card, states


def soup_main(args: argparse.Namespace) -> dict[str, Any]:
    """Build the soup, log each step, save it with a card listing its ingredients."""
    if len(set(args.ingredients)) != len(args.ingredients):
        raise ValueError("an ingredient is listed twice")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    val = selection_split(load_fer2013(args.data, cache_dir=args.cache_dir))
    model, card, states = _load_ingredients(args.ingredients, device)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}  # the model's own (fp32 on CPU)

    def score(state: dict[str, Tensor]) -> dict[str, float]:
        model.load_state_dict({k: v.to(dtypes[k]) for k, v in state.items()})
        return {"acc": evaluate(model, val.images, val.labels).accuracy,
                "acc_tta": evaluate(model, val.images, val.labels, tta=True).accuracy}

    own = []
    for path, state in zip(args.ingredients, states, strict=True):
        own.append(score(state))
        log.info("ingredient %s: %s %.2f %% / %.2f %% (1-crop / 10-crop)", path, SELECTION_SPLIT,
                 100 * own[-1]["acc"], 100 * own[-1]["acc_tta"])
    key = args.select
    order = sorted(range(len(states)), key=lambda i: own[i][key], reverse=True)
    if args.recipe == "uniform":
        kept = order
        result = score(average_state_dicts(states))
    else:
        kept, result = [order[0]], own[order[0]]
        for i in order[1:]:
            trial = score(average_state_dicts([states[j] for j in [*kept, i]]))
            accepted = trial[key] >= result[key]
            log.info("%s %s: soup of %d would score %.2f %% / %.2f %%", "add" if accepted else "skip",
                     args.ingredients[i], len(kept) + 1, 100 * trial["acc"], 100 * trial["acc_tta"])
            if accepted:
                kept, result = [*kept, i], trial
    kept_paths = [str(args.ingredients[i]) for i in kept]
    model.load_state_dict({k: v.to(dtypes[k])
                           for k, v in average_state_dicts([states[i] for i in kept]).items()})
    log.info("soup of %d (%s): %s %.2f %% / %.2f %% (1-crop / 10-crop)", len(kept), args.recipe,
             SELECTION_SPLIT, 100 * result["acc"], 100 * result["acc_tta"])
    metrics = {SELECTION_SPLIT: {
        **result, "recipe": args.recipe, "select": key,
        "ingredient_acc": {str(p): m for p, m in zip(args.ingredients, own, strict=True)},
        "note": f"ingredients chosen on {SELECTION_SPLIT}; report another split for unbiased accuracy",
    }}
    save_checkpoint(args.output, model, arch=card["arch"], model_kwargs=card.get("model_kwargs"),
                    train_args={"soup": kept_paths, "recipe": args.recipe, "select": key,
                                "data": str(args.data)},
                    metrics=metrics, data_fingerprint=card.get("data_fingerprint"), half=args.half,
                    extra={"soup_of": kept_paths,
                           "ingredients": [ingredient_record(args.ingredients[i]) for i in kept]})
    return {"output": str(args.output), "kept": kept_paths, **result}
