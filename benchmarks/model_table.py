"""The results table: one row per checkpoint, every number measured by this command.

For each checkpoint: parameters, GFLOPs per face (2 x multiply-adds), CPU ms per face at batch 1
and 32 (fp32, channels_last, median of repeats), FER2013 PublicTest accuracy 1-crop and 10-crop,
and the epochs, wall time and device recorded in its card. Prints a Markdown table.
Architectures named with --untrained get a row of their own with the size and speed columns
(speed does not depend on the weights) and no accuracy, so the table lists the whole zoo.

    python benchmarks/model_table.py checkpoints/default runs/*/best --untrained vgg19 resnet34

With ``--save-probs DIR`` each checkpoint's PublicTest probabilities (1-crop and 10-crop) are
also written to ``DIR/<name>.safetensors`` (:mod:`training.member_probs`), so ensembles of
models whose weights are not kept can be scored later with ``benchmarks/ensemble_table.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from facemodels.checkpoint import load_checkpoint, weights_path  # noqa: E402
from facemodels.models import create_model  # noqa: E402
from facemodels.models.complexity import count_flops, count_params, measure_latency  # noqa: E402
from training.data.dataset import FaceDataset  # noqa: E402
from training.data.fer2013 import load_fer2013  # noqa: E402
from training.engine import evaluate  # noqa: E402
from training.member_probs import MemberProbs, save_member_probs  # noqa: E402


def size_and_speed(model: torch.nn.Module, *, repeats: int) -> str:
    """The params | GFLOPs | ms/face b1 | ms/face b32 cells (fp32, channels_last)."""
    gflops = count_flops(model) / 1e9
    ms1 = measure_latency(model, 1, repeats=repeats * 4, warmup=5, channels_last=True)
    ms32 = measure_latency(model, 32, repeats=repeats, warmup=2, channels_last=True)
    return f"{count_params(model) / 1e6:.2f}M | {gflops:.3f} | {ms1:.2f} | {ms32:.2f}"


def member_name(path: Path) -> str:
    """``runs/vgg19_kd/best`` -> ``vgg19_kd``; ``checkpoints/default.json`` -> ``default``."""
    stem = weights_path(path).stem
    return path.parent.name if stem in ("best", "last", "last_ema") else stem


def row(path: Path, data: FaceDataset, *, repeats: int, probs_dir: Path | None = None) -> str:
    model, card = load_checkpoint(path)
    speed = size_and_speed(model, repeats=repeats)
    one_crop = evaluate(model, data.images, data.labels)
    ten_crop = evaluate(model, data.images, data.labels, tta=True)
    one, ten = one_crop.accuracy, ten_crop.accuracy
    if probs_dir is not None:
        name = member_name(path)
        save_member_probs(probs_dir / f"{name}.safetensors", MemberProbs(
            name=name, split="PublicTest", data_fingerprint=data.fingerprint, labels=data.labels,
            probs_1crop=one_crop.probs, probs_10crop=ten_crop.probs, checkpoint=str(path)))
    epochs = card.get("epochs_trained", "-")
    wall = card.get("wall_time_s")
    wall_s = f"{wall / 60:.0f} min" if isinstance(wall, (int, float)) else "-"
    return (f"| {path} | {card['arch']} | {speed} | {one * 100:.2f} | {ten * 100:.2f} | {epochs} | "
            f"{wall_s} | {card.get('device', '-')} |")


def untrained_row(arch: str, *, repeats: int) -> str:
    """Size and CPU speed of a registered architecture that has no trained checkpoint here."""
    speed = size_and_speed(create_model(arch).eval(), repeats=repeats)
    return f"| (not trained) | {arch} | {speed} | - | - | - | - | - |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", type=Path)
    p.add_argument("--untrained", nargs="*", default=[], metavar="ARCH",
                   help="registered architectures to list with size and speed only")
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/fer2013"))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--save-probs", type=Path, metavar="DIR",
                   help="also write each checkpoint's PublicTest probabilities to DIR/<name>.safetensors")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_fer2013(args.data).split("PublicTest")
    print(f"FER2013 PublicTest ({len(data)} faces); CPU latency with {torch.get_num_threads()} threads\n")
    print("| checkpoint | arch | params | GFLOPs/face | ms/face b1 | ms/face b32 | PublicTest 1-crop % "
          "| PublicTest 10-crop % | epochs | wall time | device |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path in args.checkpoints:
        print(row(path, data, repeats=args.repeats, probs_dir=args.save_probs), flush=True)
    for arch in args.untrained:
        print(untrained_row(arch, repeats=args.repeats), flush=True)


if __name__ == "__main__":
    main()
