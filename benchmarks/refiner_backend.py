"""The frontaliser refiner on PyTorch vs ONNX Runtime: ms per face, one thread, in one run.

Loads a ``frontal_refiner`` checkpoint, exports its network with the service's exporter
(:func:`facemodels.onnx_export.export_refiner`) and times, at batch 1 and 16:

* ``network``: the refiner's network alone (:meth:`FrontalRefiner.heads` against the ONNX
  Runtime session) on the net inputs of real faces;
* ``warp + refine``: the whole served call, :func:`facemodels.frontalizer.refiner.frontalize`
  on uint8 crops and landmarks (pose fit, the warp's sampling in PyTorch, the network, the
  re-sampling), what ``WarpFrontalizerModel`` runs per batch.

The faces are CFP photos (frontal and profile, gray, 250x250, landmarks from the detector) when
``--cfp`` exists, else the test fixture photo turned and scaled. The backends alternate round by
round, so both see the same machine load; the median round is reported. Prints ONE markdown table.

    python benchmarks/refiner_backend.py ~/.cache/fer-service/runs/refiner64/last
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from facemodels.cache import default_cache_root  # noqa: E402
from facemodels.face.detector import RetinaFaceDetector  # noqa: E402
from facemodels.face.retinaface_convert import ensure_detector_weights  # noqa: E402
from facemodels.frontalizer.refiner import FrontalRefiner, frontalize, load_refiner, onnx_heads  # noqa: E402
from facemodels.frontalizer.warp import MeshWarp  # noqa: E402
from facemodels.onnx_export import create_session, export_refiner  # noqa: E402

BATCHES = (1, 16)


def _faces(cfp: Path, detector: RetinaFaceDetector, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` gray 250x250 photos with one detected face each, and its landmarks."""
    paths = [p for pair in zip(sorted(cfp.glob("Data/Images/*/frontal/01.jpg")),
                               sorted(cfp.glob("Data/Images/*/profile/01.jpg")), strict=False) for p in pair]
    if paths:
        grays = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2GRAY) for p in paths[:2 * n]]
        grays = [cv2.resize(g, (250, 250), interpolation=cv2.INTER_AREA) for g in grays]
    else:
        photo = cv2.imread(str(ROOT / "tests" / "fixtures" / "astronaut.jpg"), cv2.IMREAD_GRAYSCALE)
        grays = [cv2.warpAffine(photo, cv2.getRotationMatrix2D((160, 160), a, s), (320, 320),
                                borderMode=cv2.BORDER_REFLECT)
                 for a, s in ((0, 1.0), (20, 1.3), (-15, 0.8), (5, 0.6), (10, 1.1), (-5, 0.9))]
    images, landmarks = [], []
    for g in grays:
        dets = detector.detect([cv2.cvtColor(g, cv2.COLOR_GRAY2RGB)])[0]
        if dets:
            images.append(g)
            landmarks.append(np.asarray(dets[0].landmarks, dtype=np.float64))
    reps = -(-n // len(images))  # repeat the few fixture faces up to n
    return np.stack(images * reps)[:n], np.stack(landmarks * reps)[:n]


def _net_inputs(refiner: FrontalRefiner, images: np.ndarray, landmarks: np.ndarray) -> torch.Tensor:
    """The five channels the network reads for these faces (as :meth:`FrontalRefiner.refine`)."""
    captured: list[torch.Tensor] = []

    def spy(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        captured.append(x.clone())
        return refiner.heads(x)

    warp = MeshWarp(refiner.cfg.image_size)
    with torch.inference_mode():
        refiner.refine(torch.from_numpy(images)[:, None].float(), warp.fields(landmarks), warp, heads=spy)
    return captured[0]


def _ms_per_face(fn: Callable[[int, int], object], faces: int, batch: int) -> float:
    started = time.perf_counter()
    for i in range(0, faces, batch):
        fn(i, i + batch)
    return (time.perf_counter() - started) * 1000 / faces


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="a frontal_refiner checkpoint")
    p.add_argument("--cfp", type=Path, default=ROOT.parent / "shared" / "data" / "cfp")
    p.add_argument("--faces", type=int, default=64, help="faces timed per round and batch size")
    p.add_argument("--rounds", type=int, default=7, help="timing rounds per backend (median reported)")
    args = p.parse_args()
    torch.set_num_threads(1)

    refiner = load_refiner(str(args.checkpoint)).eval()
    detector = RetinaFaceDetector(ensure_detector_weights(default_cache_root()))
    images, landmarks = _faces(args.cfp, detector, args.faces)
    x = _net_inputs(refiner, images, landmarks)
    warp = MeshWarp(refiner.cfg.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        info = export_refiner(refiner, Path(tmp) / "refiner.onnx")
        session = create_session(Path(tmp) / "refiner.onnx", threads=1)
    heads = {"torch": refiner.heads, "onnx": onnx_heads(session)}
    import onnxruntime

    print(f"{len(images)} faces from {'CFP' if args.cfp.is_dir() else 'the fixture photo'}; export "
          f"{info['seconds']:.1f} s, max |ORT - torch| {info['max_abs_diff']:.1e}; "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}", file=sys.stderr)

    def net(backend: str) -> Callable[[int, int], object]:
        return lambda a, b: heads[backend](x[a:b])

    def served(backend: str) -> Callable[[int, int], object]:
        h = None if backend == "torch" else heads["onnx"]
        return lambda a, b: frontalize(images[a:b], landmarks[a:b], refiner, warp=warp, heads=h)

    times: dict[tuple[str, str, int], list[float]] = {}
    with torch.inference_mode():
        for rnd in range(args.rounds + 1):  # round 0 warms up and is dropped
            for batch in BATCHES:
                for backend in ("torch", "onnx") if rnd % 2 == 0 else ("onnx", "torch"):
                    for what, fn in (("network", net), ("warp + refine", served)):
                        ms = _ms_per_face(fn(backend), len(images), batch)
                        if rnd:
                            times.setdefault((backend, what, batch), []).append(ms)
    med = {k: statistics.median(v) for k, v in times.items()}
    print("| backend | batch | network ms/face | warp + refine ms/face |")
    print("|---|---|---|---|")
    for batch in BATCHES:
        for backend in ("torch", "onnx"):
            print(f"| {backend} | {batch} | {med[backend, 'network', batch]:.3f} | "
                  f"{med[backend, 'warp + refine', batch]:.3f} |")
        ratio = {w: med["torch", w, batch] / med["onnx", w, batch] for w in ("network", "warp + refine")}
        print(f"| torch / onnx | {batch} | {ratio['network']:.2f}x | {ratio['warp + refine']:.2f}x |")


if __name__ == "__main__":
    main()
