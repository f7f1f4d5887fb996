"""Face recall and ms/image of the served detector at long sides 320, 480 and 640, fp32 and int8.

The detector is the service's: ``RetinaFaceDetector`` on the ONNX Runtime backend, one intra-op
thread, the service's detection threshold and minimum face size (``Settings()`` defaults). The
int8 graph is made here by ``training.quantize_detector`` as ``fer-train quantize-detector`` makes
it (static QDQ, MinMax calibration on ``--calibration`` CFP photos of the *training* ids 001-450,
letterboxed to 640x480 and fed at each long side in turn), or read from ``--int8-graph``.
Photo sets, all built deterministically:

* **CFP** frontal and profile photos of ids 451-500, each letterboxed to 640x480 (as
  ``profile_pipeline.py`` and ``load.py`` serve them). A face is found when a detection's box
  contains the centroid of the photo's 30 fiducials.
* **group**: ``--groups`` 1280x720 canvases, each with 6-20 faces cut from CFP frontal photos of
  ids 451-500 around their fiducials and pasted (soft elliptical edge) at face heights drawn
  uniformly from 20-80 px on a smooth random-colour background, JPEG quality 90. A face's
  height is that of its ground-truth box, which comes from the fiducials with offsets measured
  against this detector's own boxes on 200 full-resolution CFP frontal photos (see
  :func:`face_box`): brows to chin, plus a margin. A face is found when a
  detection contains its box centre and is 0.5-2x its height, one detection per face (greedy,
  highest score first); every other detection is a false positive.
* **FER**: ``--fer`` PublicTest faces (48x48 grey crops, a seeded draw), upsampled and
  letterboxed to 640x480 (480x480 face, grey to RGB), and as 48x48 photos (below every long
  side, so the same at each). A face is found when a detection contains the crop's centre.

Every photo runs through every detector in turn (the starting detector rotates), batch 1, so all
see the same machine load; ms is the mean wall time of ``detect()`` (resize, network, NMS). The
adaptive rows are computed from the same runs: 320 first, and 640 (its time added) only for
photos where 320 found nothing (``none``), or found no face whose box is at least ``--close-up``
of the photo's long side tall (``no close-up``: a close-up photo is taken to hold no small faces).
Prints ONE markdown table. Not a test.

    python benchmarks/detect_resolution.py                   # ~4 min on one busy core
    python benchmarks/detect_resolution.py --fer 200 --groups 20 --calibration 60   # quick
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from facemodels.face.detector import Detection, RetinaFaceDetector  # noqa: E402
from service.config import Settings  # noqa: E402
from training.data.cfp import EVAL_IDS, read_fiducials  # noqa: E402
from training.data.fer2013 import load_fer2013  # noqa: E402
from training.quantize_detector import (  # noqa: E402
    calibration_inputs,
    calibration_photos,
    load_int8_detector,
    quantize_detector,
)

MAX_SIDES = (320, 480, 640)
SIZE_BINS = ((0, 32, "<32"), (32, 48, "32-48"), (48, 64, "48-64"), (64, 1e9, ">=64"))
#: Ground-truth face box from the fiducials, in units of H = chin y - mean eyebrow y: centred on
#: the nose tip, from 0.17 H above the brows to 0.02 H above the chin, 1.04 H wide (the medians of
#: this detector's boxes on 200 CFP frontal photos of ids 451-500 at full resolution).
BOX_TOP, BOX_BOTTOM, BOX_WIDTH = -0.17, -0.02, 1.04


@dataclass
class Sample:
    """A photo and its faces: a point each detection must contain, and (group) the face height."""

    image: np.ndarray
    points: list[tuple[float, float]]
    heights: list[float] | None = None


@dataclass
class Outcome:
    """Per photo of one set under one detector: faces found (per face), false positives, ms."""

    found: list[list[bool]] = field(default_factory=list)
    fps: list[int] = field(default_factory=list)
    ms: list[float] = field(default_factory=list)
    largest: list[float] = field(default_factory=list)  # tallest box / the photo's long side


def letterbox(rgb: np.ndarray, width: int = 640, height: int = 480) -> tuple[np.ndarray, float, int, int]:
    """``rgb`` scaled to fit ``width`` x ``height`` on black, centred; with (scale, left, top)."""
    scale = min(width / rgb.shape[1], height / rgb.shape[0])
    w, h = round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)
    canvas = np.zeros((height, width, 3), np.uint8)
    top, left = (height - h) // 2, (width - w) // 2
    canvas[top:top + h, left:left + w] = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
    return canvas, scale, left, top


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SystemExit(f"cannot decode {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def cfp_items(cfp: Path, kind: str) -> list[tuple[Path, np.ndarray]]:
    """(photo, fiducials) of every ``kind`` photo of the evaluation ids."""
    data = cfp / "Data"
    return [(img, read_fiducials(data / "Fiducials" / f"{pid:03d}" / kind / f"{img.stem}.txt"))
            for pid in EVAL_IDS for img in sorted((data / "Images" / f"{pid:03d}" / kind).glob("*.jpg"))]


def cfp_samples(cfp: Path, kind: str) -> list[Sample]:
    out = []
    for path, fid in cfp_items(cfp, kind):
        image, scale, left, top = letterbox(read_rgb(path))
        cx, cy = fid.mean(0)
        out.append(Sample(image, [(left + cx * scale, top + cy * scale)]))
    return out


def face_box(fid: np.ndarray) -> tuple[float, float, float]:
    """(centre x, centre y, height) of the ground-truth face box of a frontal photo."""
    brow, chin = fid[9:12, 1].mean(), fid[8, 1]
    h = chin - brow
    top, bottom = brow + BOX_TOP * h, chin + BOX_BOTTOM * h
    return float(fid[21, 0]), float((top + bottom) / 2), float(bottom - top)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth, muted random colours (no faces) with mild noise."""
    low = rng.uniform(60, 200, (5, 9, 3)).astype(np.float32)
    low = (low + low.mean(axis=2, keepdims=True)) / 2  # half desaturated
    bg = cv2.GaussianBlur(cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC), (0, 0), 25)
    return np.clip(bg + rng.normal(0, 4, bg.shape), 0, 255).astype(np.float32)


def group_sample(items: list[tuple[Path, np.ndarray]], rng: np.random.Generator, *,
                 width: int = 1280, height: int = 720) -> Sample:
    """A canvas with 6-20 of ``items`` pasted at face heights of 20-80 px, without overlaps."""
    canvas = _background(rng, width, height)
    points: list[tuple[float, float]] = []
    heights: list[float] = []
    taken: list[tuple[int, int, int]] = []  # (x, y, side) of pasted patches
    for k in rng.choice(len(items), size=int(rng.integers(6, 21)), replace=False):
        path, fid = items[int(k)]
        target = float(rng.uniform(20, 80))
        side = round(2 * target)  # the patch is twice the face height: face plus context
        for _ in range(500):
            x, y = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
            if all(x + side <= u or u + s <= x or y + side <= v or v + s <= y for u, v, s in taken):
                break
        else:
            continue
        cx, cy, h = face_box(fid)
        photo = read_rgb(path)
        # A context square of side 2h around the box centre; where it leaves the photo, the
        # background shows (photo and inside-mask padded alike, then cut and scaled together).
        pad = int(np.ceil(h)) + 2
        inside = np.ones(photo.shape[:2], np.uint8)
        x0, y0, n = round(cx - h) + pad, round(cy - h) + pad, round(2 * h)
        crop, valid = (cv2.copyMakeBorder(a, pad, pad, pad, pad, cv2.BORDER_CONSTANT)[y0:y0 + n, x0:x0 + n]
                       for a in (photo, inside))
        interp = cv2.INTER_AREA if n > side else cv2.INTER_CUBIC
        patch = cv2.resize(crop, (side, side), interpolation=interp).astype(np.float32)
        mask = cv2.resize(valid.astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
        oval = np.zeros((side, side), np.float32)
        cv2.ellipse(oval, (side // 2, side // 2), (int(side * 0.42), int(side * 0.46)), 0, 0, 360, 1.0, -1)
        mask = cv2.GaussianBlur(cv2.erode(mask, None) * oval, (0, 0), side / 14)[..., None]
        region = canvas[y:y + side, x:x + side]
        canvas[y:y + side, x:x + side] = mask * patch + (1 - mask) * region
        taken.append((x, y, side))
        points.append((x + side / 2, y + side / 2))
        heights.append(side / 2)
    ok, buf = cv2.imencode(".jpg", canvas.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return Sample(cv2.imdecode(buf, cv2.IMREAD_COLOR), points, heights)  # still RGB (order kept)


def fer_samples(root: Path, n: int) -> tuple[list[Sample], list[Sample]]:
    """``n`` PublicTest faces: letterboxed to 640x480, and as 48x48 photos."""
    faces = load_fer2013(root).split("PublicTest").images.numpy()
    pick = np.sort(np.random.default_rng(0).choice(len(faces), size=min(n, len(faces)), replace=False))
    boxed, native = [], []
    for face in faces[pick]:
        rgb = np.repeat(face[..., None], 3, axis=2)
        image, scale, left, top = letterbox(rgb)
        boxed.append(Sample(image, [(left + 24 * scale, top + 24 * scale)]))
        native.append(Sample(np.ascontiguousarray(rgb), [(24.0, 24.0)]))
    return boxed, native


def match(dets: list[Detection], sample: Sample) -> tuple[list[bool], int]:
    """Faces found and false positives (unmatched detections), greedy by score."""
    found = [False] * len(sample.points)
    fps = 0
    for d in dets:  # highest score first
        x1, y1, x2, y2 = d.box
        best, best_dist = None, float("inf")
        for i, (px, py) in enumerate(sample.points):
            if found[i] or not (x1 <= px <= x2 and y1 <= py <= y2):
                continue
            if sample.heights is not None and not 0.5 <= (y2 - y1) / sample.heights[i] <= 2.0:
                continue
            dist = np.hypot((x1 + x2) / 2 - px, (y1 + y2) / 2 - py)
            if dist < best_dist:
                best, best_dist = i, dist
        if best is None:
            fps += 1
        else:
            found[best] = True
    return found, fps


def run_set(samples: list[Sample], detectors: dict[str, RetinaFaceDetector]) -> dict[str, Outcome]:
    """Every sample through every detector, the starting detector rotating photo by photo."""
    names = list(detectors)
    out = {n: Outcome() for n in names}
    for k, sample in enumerate(samples):
        for j in range(len(names)):
            name = names[(k + j) % len(names)]
            started = time.perf_counter()
            dets = detectors[name].detect([sample.image])[0]
            ms = (time.perf_counter() - started) * 1000
            found, fps = match(dets, sample)
            o = out[name]
            o.found.append(found)
            o.fps.append(fps)
            o.ms.append(ms)
            o.largest.append(max((d.box[3] - d.box[1] for d in dets), default=0.0) / max(sample.image.shape))
    return out


def adaptive(low: Outcome, high: Outcome, close_up: float) -> Outcome:
    """``low`` first; ``high`` (its time added) where no face of ``low`` is over ``close_up`` of
    the photo's long side tall (``close_up=0``: where ``low`` found nothing)."""
    out = Outcome()
    for i, largest in enumerate(low.largest):
        keep = largest > close_up
        src = low if keep else high
        out.found.append(src.found[i])
        out.fps.append(src.fps[i])
        out.ms.append(low.ms[i] + (0.0 if keep else high.ms[i]))
        out.largest.append(src.largest[i])
    return out


def recall(o: Outcome, heights: list[list[float]] | None = None, lo: float = 0, hi: float = 1e9) -> str:
    hits = [f for i, fs in enumerate(o.found) for j, f in enumerate(fs)
            if heights is None or lo <= heights[i][j] < hi]
    return f"{np.mean(hits):.3f}" if hits else "-"


def build_int8(cfp: Path, n: int, folder: Path, fp32: RetinaFaceDetector, cache_dir: Path) -> Path:
    """The int8 graph as ``fer-train quantize-detector`` makes it (calibrated at 320, 480, 640)."""
    inputs = calibration_inputs(calibration_photos(cfp, n), weights=fp32.weights, cache_dir=cache_dir,
                                sides=MAX_SIDES)
    graph = fp32.onnx_path
    assert graph is not None
    out = folder / "detector.int8.onnx"
    info = quantize_detector(graph, out, inputs)
    print(f"int8 detector: {info['qdq_nodes']} Q/DQ nodes, {info['float_nodes']} float nodes, "
          f"{out.stat().st_size / 2**20:.2f} MB (fp32 {graph.stat().st_size / 2**20:.2f} MB), "
          f"{n} calibration photos, {info['seconds']:.1f} s", file=sys.stderr)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = ROOT.parent / "shared" / "data"
    p.add_argument("--cfp", type=Path, default=data / "cfp")
    p.add_argument("--fer-data", type=Path, default=data / "fer2013")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/fer-bench-cache"))
    p.add_argument("--limit", type=int, default=0,
                   help="CFP photos per pose (0: all, 500 frontal and 200 profile)")
    p.add_argument("--groups", type=int, default=100, help="synthetic group photos")
    p.add_argument("--fer", type=int, default=1500, help="FER2013 PublicTest faces")
    p.add_argument("--calibration", type=int, default=150, help="CFP training-id photos for int8")
    p.add_argument("--close-up", type=float, default=0.2,
                   help="adaptive: skip the 640 rerun when 320 found a face this share of the long side tall")
    p.add_argument("--no-int8", action="store_true")
    p.add_argument("--int8-graph", type=Path, default=None,
                   help="run this int8 graph (e.g. checkpoints/detector.int8.onnx) instead of making one")
    p.add_argument("--keep", type=Path, default=None, help="folder to keep the int8 graph in")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    started = time.perf_counter()
    settings = Settings()
    opts = dict(threads=1, score_threshold=settings.detection_threshold, min_face_size=settings.min_face_size)

    def fp32_at(side: int) -> RetinaFaceDetector:
        return RetinaFaceDetector.from_cache(args.cache_dir, backend="onnx", max_side=side, **opts)

    detectors = {("fp32", s): fp32_at(s) for s in MAX_SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_int8:
            graph = args.int8_graph or build_int8(args.cfp, args.calibration, args.keep or Path(tmp),
                                                  detectors["fp32", MAX_SIDES[-1]], args.cache_dir)
            for s in MAX_SIDES:
                detectors["int8", s] = load_int8_detector(graph, cache_dir=args.cache_dir, max_side=s, **opts)
        cut = slice(None, args.limit or None)
        items = cfp_items(args.cfp, "frontal")
        rng = np.random.default_rng(0)
        sets = {kind: cfp_samples(args.cfp, kind)[cut] for kind in ("frontal", "profile")}
        sets["group"] = [group_sample(items, rng) for _ in range(args.groups)]
        sets["fer"], sets["fer48"] = fer_samples(args.fer_data, args.fer)
        print(f"photos ready after {time.perf_counter() - started:.0f} s", file=sys.stderr)
        keyed = {f"{g} {s}": d for (g, s), d in detectors.items()}
        results = {name: run_set(samples, keyed) for name, samples in sets.items() if name != "fer48"}
        graphs = sorted({g for g, _ in detectors}, key=lambda g: g != "fp32")
        lowest = {f"{g} {MAX_SIDES[0]}": detectors[g, MAX_SIDES[0]] for g in graphs}
        results["fer48"] = run_set(sets["fer48"], lowest)  # below every long side: one run per graph
    heights = [s.heights or [] for s in sets["group"]]
    n_bin = [sum(lo <= h < hi for hs in heights for h in hs) for lo, hi, _ in SIZE_BINS]
    rows = [(f"{g} {s}", g, str(s)) for g in graphs for s in MAX_SIDES]
    schemes = {"none": 0.0, "no close-up": args.close_up}
    rows += [(f"{g} {rule}", g, f"{MAX_SIDES[0]}, {MAX_SIDES[-1]} if {rule}")
             for g in graphs for rule in schemes]
    for g in graphs:
        for name in sets:
            if name != "fer48":
                low, high = results[name][f"{g} {MAX_SIDES[0]}"], results[name][f"{g} {MAX_SIDES[-1]}"]
                for rule, close_up in schemes.items():
                    results[name][f"{g} {rule}"] = adaptive(low, high, close_up)

    n = {k: len(v) for k, v in sets.items()}
    print(f"\nRetinaFace-MNet0.25, ONNX Runtime, 1 thread, threshold {settings.detection_threshold}, "
          f"min face {settings.min_face_size} px. CFP ids 451-500 letterboxed to 640x480 "
          f"({n['frontal']} frontal, {n['profile']} profile); {n['group']} synthetic 1280x720 group photos "
          f"({sum(n_bin)} faces); {n['fer']} FER2013 PublicTest faces. Recall = share of faces found; "
          f"ms = mean ms/image. Adaptive: {MAX_SIDES[0]} first, then {MAX_SIDES[-1]} where it found nothing "
          f"(none) or no face {args.close_up:g} of the long side tall (no close-up).\n")
    head = ["detector", "long side", "CFP frontal", "CFP profile", "CFP ms",
            *[f"group {label} ({c})" for (_, _, label), c in zip(SIZE_BINS, n_bin, strict=True)],
            "group all", "group FP/img", "group ms", "FER in 640x480", "FER ms", "FER 48x48"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for key, graph_name, side in rows:
        fr, pr, gr, fe = (results[s][key] for s in ("frontal", "profile", "group", "fer"))
        cells = [graph_name, side, recall(fr), recall(pr),
                 f"{np.mean(fr.ms + pr.ms):.2f}",
                 *[recall(gr, heights, lo, hi) for lo, hi, _ in SIZE_BINS],
                 recall(gr), f"{np.mean(gr.fps):.3f}", f"{np.mean(gr.ms):.2f}",
                 recall(fe), f"{np.mean(fe.ms):.2f}",
                 recall(results["fer48"][f"{graph_name} {MAX_SIDES[0]}"])]
        print("| " + " | ".join(cells) + " |")
    print(f"\ntotal {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
