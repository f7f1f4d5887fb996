"""Train/serve framing check: detect -> align -> classify against direct 48x48 classification.

Each FER2013 face is upscaled and pasted into a larger canvas, like a face in a photo. The
service's pipeline (RetinaFace, 5-point alignment to the FER template, classifier) runs on the
canvas, and its accuracy is compared with classifying the original 48x48 crop directly. A big
gap means the alignment template does not reproduce the training framing (train/serve skew).

    python benchmarks/framing.py --checkpoint checkpoints/default runs/other/best
    python benchmarks/framing.py --fit-template --limit 2000      # re-measure the template
    python benchmarks/framing.py --dataset ckplus                 # zero-shot on CK+ (cross-domain)

With ``--dataset ckplus`` every CK+48 image of the six classes FER2013 shares (contempt has no
counterpart) is classified zero-shot by the FER2013 model; CK+ has no neutral frames, so the
table adds rows where the argmax ignores the neutral output.

Prints one table. Not a test.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from facemodels.checkpoint import load_checkpoint  # noqa: E402
from facemodels.face.align import FER_TEMPLATE_48, align_face  # noqa: E402
from facemodels.face.detector import RetinaFaceDetector  # noqa: E402
from facemodels.predict import predict_probs  # noqa: E402
from training.data.ckplus import load_ckplus, to_fer_labels  # noqa: E402
from training.data.fer2013 import load_fer2013  # noqa: E402
from training.runtime import cache_root  # noqa: E402

log = logging.getLogger("framing")


def to_canvas(face: np.ndarray, *, scale: int, canvas: int, rng: np.random.Generator) -> tuple[
        np.ndarray, tuple[int, int]]:
    """Upscale a 48x48 gray face and paste it at a random spot in a mid-grey RGB canvas."""
    big = cv2.resize(face, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    side = big.shape[0]
    top, left = (int(v) for v in rng.integers(0, canvas - side + 1, size=2))
    img = np.full((canvas, canvas), 128, dtype=np.uint8)
    img[top:top + side, left:left + side] = big
    return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB), (top, left)


def detect_all(detector: RetinaFaceDetector, canvases: list[np.ndarray], batch: int) -> list:
    out = []
    for i in range(0, len(canvases), batch):
        out.extend(detector.detect(canvases[i:i + batch]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("fer2013", "ckplus"), default="fer2013",
                   help="fer2013: PublicTest faces; ckplus: all CK+48 faces of the six shared classes")
    p.add_argument("--data", default=None, help="dataset folder (default ../shared/data/<dataset>)")
    p.add_argument("--checkpoint", type=Path, nargs="+", default=[ROOT / "checkpoints/default"],
                   help="one or more classifiers, compared on the same detections")
    p.add_argument("--limit", type=int, default=0, help="first N images of the split (0 = all)")
    p.add_argument("--scale", type=int, default=4, help="upscaling of the 48x48 face")
    p.add_argument("--canvas", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--fit-template", action="store_true",
                   help="measure median landmark positions on Training faces and print them")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rng = np.random.default_rng(0)
    detector = RetinaFaceDetector.from_cache(cache_root(), score_threshold=0.5, max_side=args.canvas)
    if args.dataset == "ckplus":
        split = to_fer_labels(load_ckplus(args.data or ROOT.parent / "shared/data/ckplus48"))
    else:
        data = load_fer2013(args.data or ROOT.parent / "shared/data/fer2013")
        split = data.split("Training" if args.fit_template else "PublicTest")
    n = len(split) if args.limit <= 0 else min(args.limit, len(split))
    faces = split.images[:n].numpy()
    placed = [to_canvas(f, scale=args.scale, canvas=args.canvas, rng=rng) for f in faces]
    t0 = time.perf_counter()
    dets = detect_all(detector, [c for c, _ in placed], args.batch)
    det_s = time.perf_counter() - t0
    found = [i for i, d in enumerate(dets) if d]
    if args.fit_template:
        pts = np.stack([
            (np.asarray(dets[i][0].landmarks) - np.array(placed[i][1][::-1])) / args.scale
            for i in found])
        med = np.median(pts, axis=0)
        print(f"faces found {len(found)}/{n}; median landmarks in 48x48 coordinates:")
        print(np.array2string(med.round(2), separator=", "))
        print("current template:\n" + np.array2string(FER_TEMPLATE_48, separator=", "))
        return
    labels = split.labels[:n]
    found_t = torch.zeros(n, dtype=torch.bool)
    found_t[found] = True
    allm = torch.ones(n, dtype=torch.bool)
    acc = lambda pred, mask: (pred[mask] == labels[mask]).float().mean().item()  # noqa: E731
    names = ["direct 48x48 (all)", "pipeline (all; miss = wrong-ish grey crop)",
             "direct 48x48 (faces found)", "pipeline (faces found)",
             "gap on faces found (direct - pipeline)", "agreement pipeline vs direct"]
    if args.dataset == "ckplus":
        names += ["direct (all), argmax without neutral", "pipeline (all), argmax without neutral"]
    columns = []
    for path in args.checkpoint:
        model, _ = load_checkpoint(path)
        direct_p = predict_probs(model, torch.from_numpy(faces))
        direct = direct_p.argmax(1)
        crops = np.stack([
            align_face(placed[i][0], np.asarray(dets[i][0].landmarks), size=model.cfg.image_size)
            if dets[i] else np.full((model.cfg.image_size,) * 2, 128, np.uint8)
            for i in range(n)])
        piped_p = predict_probs(model, torch.from_numpy(crops))
        piped = piped_p.argmax(1)
        columns.append([acc(direct, allm), acc(piped, allm), acc(direct, found_t),
                        acc(piped, found_t), acc(direct, found_t) - acc(piped, found_t),
                        (piped == direct).float().mean().item()])
        if args.dataset == "ckplus":
            neutral = model.cfg.class_names.index("neutral")
            columns[-1] += [acc(direct_p.index_fill(1, torch.tensor([neutral]), -1).argmax(1), allm),
                            acc(piped_p.index_fill(1, torch.tensor([neutral]), -1).argmax(1), allm)]
    where = "CK+48, six FER2013 classes" if args.dataset == "ckplus" else "FER2013 PublicTest"
    print(f"\nFraming check on {where}, {n} faces x{args.scale} in {args.canvas}px "
          f"canvases; detected {len(found)}/{n} ({det_s / n * 1000:.1f} ms/img); 1-crop accuracy")
    heads = [str(path) for path in args.checkpoint]
    width = max(12, *(len(h) + 2 for h in heads))
    print(f"{'':44}" + "".join(f"{h:>{width}}" for h in heads))
    for i, name in enumerate(names):
        print(f"{name:44}" + "".join(f"{col[i]:>{width}.4f}" for col in columns))

if __name__ == "__main__":
    main()
