"""int8 vs float32 classifier in ONNX Runtime: PublicTest accuracy and ms/face, in one run.

Exports the checkpoint to float32 ONNX (the service's exporter), quantises it with
``training.quantize`` (static QDQ, per-channel int8 weights, calibrated on FER2013 *Training*
faces only), then prints ONE markdown table: PublicTest 1-crop and 10-crop accuracy of each
graph, and ms/face at batch 1 and batch 32 on one thread (the two graphs alternate round by
round, so both see the same machine load; the median round is reported).

    python benchmarks/int8.py --checkpoint checkpoints/default --calibration 500
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from facemodels.checkpoint import load_checkpoint  # noqa: E402
from facemodels.onnx_export import (  # noqa: E402
    CLASSIFIER_INPUT,
    CLASSIFIER_OUTPUT,
    create_session,
    export_classifier,
)
from facemodels.predict import predict_probs_onnx  # noqa: E402
from facemodels.preprocess import eval_views  # noqa: E402
from training.data.fer2013 import load_fer2013  # noqa: E402
from training.quantize import calibration_faces, quantize_classifier  # noqa: E402

#: The issue's rule: serve int8 by default only if accuracy drops by at most this (points).
MAX_DROP_POINTS = 0.3


def _ms_per_face(session, views: torch.Tensor, batch: int, faces: int) -> float:
    """Wall ms per face running ``faces`` centre-crop views through ``session`` at ``batch``."""
    x = views[:faces].numpy()
    started = time.perf_counter()
    for i in range(0, faces, batch):
        session.run([CLASSIFIER_OUTPUT], {CLASSIFIER_INPUT: x[i:i + batch]})
    return (time.perf_counter() - started) * 1000 / faces


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "default")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "fer2013")
    p.add_argument("--calibration", type=int, default=500, help="FER2013 Training faces")
    p.add_argument("--method", choices=("minmax", "percentile", "entropy"), default="minmax")
    p.add_argument("--rounds", type=int, default=7, help="timing rounds per graph (median reported)")
    p.add_argument("--faces", type=int, default=320, help="faces timed per round and batch size")
    p.add_argument("--keep", type=Path, default=None, help="folder to keep fp32.onnx and int8.onnx in")
    args = p.parse_args()
    torch.set_num_threads(1)

    model, _ = load_checkpoint(args.checkpoint)
    cfg = model.cfg
    test = load_fer2013(args.data).split("PublicTest")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        fp32, int8 = folder / "fp32.onnx", folder / "int8.onnx"
        export_classifier(model, fp32)
        calib = calibration_faces(args.data, args.calibration)
        info = quantize_classifier(fp32, int8, calib, cfg, method=args.method)
        mb = {n: f.stat().st_size / 2**20 for n, f in (("fp32", fp32), ("int8", int8))}
        print(f"quantised in {info['seconds']:.1f} s: {info['calibration_faces']} Training faces x 10 crops, "
              f"{args.method}, {info['qdq_nodes']} Q/DQ nodes; fp32 {mb['fp32']:.2f} MB, "
              f"int8 {mb['int8']:.2f} MB", file=sys.stderr)
        sessions = {"fp32": create_session(fp32, threads=1), "int8": create_session(int8, threads=1)}

        acc: dict[str, dict[bool, float]] = {}
        for name, session in sessions.items():
            acc[name] = {}
            for tta in (False, True):
                probs = predict_probs_onnx(session, test.images, cfg, tta=tta)
                acc[name][tta] = (probs.argmax(1) == test.labels).float().mean().item() * 100

        views = eval_views(test.images[: args.faces], cfg, tta=False)[0].contiguous()
        times: dict[str, dict[int, list[float]]] = {n: {1: [], 32: []} for n in sessions}
        for session in sessions.values():  # warm-up
            _ms_per_face(session, views, 32, 64)
        for _ in range(args.rounds):
            for batch in (1, 32):
                for name, session in sessions.items():
                    times[name][batch].append(_ms_per_face(session, views, batch, args.faces))
    med = {n: {b: statistics.median(t) for b, t in bt.items()} for n, bt in times.items()}

    print(f"PublicTest: {len(test.labels)} faces; ms/face: one thread, median of {args.rounds} rounds of "
          f"{args.faces} faces, fp32 and int8 alternating\n")
    print("| graph | 1-crop acc % | 10-crop acc % | ms/face batch 1 | ms/face batch 32 |")
    print("|---|---|---|---|---|")
    for name in sessions:
        print(f"| ORT {name} | {acc[name][False]:.2f} | {acc[name][True]:.2f} | "
              f"{med[name][1]:.3f} | {med[name][32]:.3f} |")
    d1, d10 = (acc["int8"][t] - acc["fp32"][t] for t in (False, True))
    print(f"| int8 - fp32 (points) | {d1:+.2f} | {d10:+.2f} | | |")
    print(f"| fp32 / int8 time | | | {med['fp32'][1] / med['int8'][1]:.2f}x | "
          f"{med['fp32'][32] / med['int8'][32]:.2f}x |")
    ok = min(d1, d10) >= -MAX_DROP_POINTS
    print(f"\nrule (drop <= {MAX_DROP_POINTS} points on 1-crop and 10-crop): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
