"""Temporal smoothing of video timelines: flicker and accuracy with and without the EMA.

Measures the per-track exponential moving average that ``POST /predict/video`` and ``WS /stream``
apply (:class:`facemodels.face.tracking.EmaSmoother`, imported, not copied) at several time
constants, on face sequences sampled at ``--fps`` (5 by default, the video route's default).

Which sequences. CK+ records each expression from neutral to apex, but ``../shared/data/ckplus48``
keeps only the last three frames of each of its 327 sequences (``S<subject>_<seq>_<frame>.png``,
three consecutive frame numbers, all near the apex); the script checks this and prints it. With
no onset frames there, the sequences are built from FER2013 PublicTest faces instead: each one is
``--lead`` frames of a neutral-labelled face (the "before"), then ``--frames`` frames of the
target face (the "apex" segment, labelled with the face's FER2013 label), every frame the face
redrawn with small random jitter (shift, scale, rotation, brightness, contrast, pixel noise), as
alignment and camera noise move a real face between frames. Each frame is classified with the
checkpoint's own 1-crop preprocessing (:func:`facemodels.predict.predict_probs`, the path the
service's classifier runs). The three real CK+ frames of each sequence give one more reference
line: how often the raw label changes between real consecutive frames.

The table, per time constant (0 = smoothing off):

- flicker: changes of the dominant (argmax of the smoothed probabilities) between consecutive
  frames, from the last lead-in frame to the end (so the one change the switch calls for counts
  at every time constant), per frame and per second; and per second over the last ``--tail``
  frames alone (settled);
- accuracy: dominant == label over all apex-segment frames (the switch from the lead-in
  included) and over its last ``--tail`` frames (settled);
- latency: frames from the switch until the dominant first equals the label, over the sequences
  whose raw per-frame majority over the apex segment is the label and whose label is not
  neutral (mean, p90, and how many never get there within the segment).

    python benchmarks/smoothing.py                       # 1000 sequences, 94 s on a busy 2-core box
    python benchmarks/smoothing.py --sequences 3000 --taus 0 0.5 1

Prints one table. Not a test.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from facemodels.checkpoint import load_checkpoint  # noqa: E402
from facemodels.face.tracking import EmaSmoother  # noqa: E402
from facemodels.predict import predict_probs  # noqa: E402
from training.data.ckplus import load_ckplus, parse_ck_name, to_fer_labels  # noqa: E402
from training.data.fer2013 import load_fer2013  # noqa: E402

log = logging.getLogger("smoothing")


def ckplus_sequences(paths: list[str]) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """CK+48 images grouped by (subject, sequence): ``[(frame number, index), ...]`` by frame."""
    seqs: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, rel in enumerate(paths):
        subject, sequence, frame = parse_ck_name(rel)
        seqs.setdefault((subject, sequence), []).append((frame, i))
    return {k: sorted(v) for k, v in seqs.items()}


def jitter(face: np.ndarray, rng: np.random.Generator, *, shift: float, scale: float, rot: float,
           light: float, noise: float) -> np.ndarray:
    """One frame of ``face`` (uint8 HxW): random similarity warp, gain/offset and pixel noise."""
    h, w = face.shape
    s = 1.0 + rng.normal(0.0, scale)
    m = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), float(rng.normal(0.0, rot)), s)
    m[:, 2] += rng.normal(0.0, shift, size=2)
    out = cv2.warpAffine(face, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    gain = 1.0 + rng.normal(0.0, light)
    offset = rng.normal(0.0, 255 * light)
    out = out.astype(np.float32) * gain + offset + rng.normal(0.0, noise, size=out.shape)
    return np.clip(out, 0, 255).round().astype(np.uint8)


def changes(labels: np.ndarray) -> int:
    """Changes of value between consecutive entries."""
    return int(np.count_nonzero(labels[1:] != labels[:-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints/default")
    p.add_argument("--fer", type=Path, default=ROOT.parent / "shared/data/fer2013")
    p.add_argument("--ckplus", type=Path, default=ROOT.parent / "shared/data/ckplus48")
    p.add_argument("--sequences", type=int, default=1000, help="target faces (PublicTest, random)")
    p.add_argument("--frames", type=int, default=30, help="frames of the apex segment")
    p.add_argument("--lead", type=int, default=10, help="frames of the neutral lead-in")
    p.add_argument("--tail", type=int, default=10, help="last frames counted as settled")
    p.add_argument("--fps", type=float, default=5.0, help="sampling rate of the sequences")
    p.add_argument("--taus", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0, 2.0],
                   help="EMA time constants in seconds (0 = off; the service's default is 0.5)")
    p.add_argument("--shift", type=float, default=1.0, help="px s.d. of the shift (48 px face)")
    p.add_argument("--scale", type=float, default=0.03, help="s.d. of the relative scale")
    p.add_argument("--rot", type=float, default=3.0, help="degrees s.d. of the rotation")
    p.add_argument("--light", type=float, default=0.05, help="s.d. of gain and offset (x 255)")
    p.add_argument("--noise", type=float, default=4.0, help="grey levels s.d. of pixel noise")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    rng = np.random.default_rng(args.seed)
    model, _ = load_checkpoint(args.checkpoint)
    names = model.cfg.class_names
    neutral = names.index("neutral")

    # CK+48: does it keep the frames of a sequence?
    full = load_ckplus(args.ckplus)
    seqs = ckplus_sequences(list(full.paths))
    lengths = Counter(len(v) for v in seqs.values())
    consecutive = sum(1 for v in seqs.values() if np.all(np.diff([f for f, _ in v]) == 1))
    ck = to_fer_labels(full)  # contempt dropped: no FER2013 class
    ck_raw = predict_probs(model, ck.images).argmax(1).numpy()
    ck_seqs = ckplus_sequences(list(ck.paths))
    ck_pairs = sum(len(v) - 1 for v in ck_seqs.values())
    ck_flips = sum(changes(ck_raw[[i for _, i in v]]) for v in ck_seqs.values())

    # FER2013 jitter sequences.
    test = load_fer2013(args.fer).split("PublicTest")
    faces, labels = test.images.numpy(), test.labels.numpy()
    if tuple(test.class_names) != tuple(names):
        raise SystemExit(f"class order differs: data {test.class_names}, model {names}")
    neutrals = np.flatnonzero(labels == neutral)
    targets = rng.choice(len(faces), size=min(args.sequences, len(faces)), replace=False)
    leads = rng.choice(neutrals, size=len(targets))
    leads = np.where(leads == targets, rng.choice(neutrals, size=len(targets)), leads)
    jit = dict(shift=args.shift, scale=args.scale, rot=args.rot, light=args.light, noise=args.noise)
    n_frames = args.lead + args.frames
    frames = np.stack([
        jitter(faces[leads[s]] if k < args.lead else faces[targets[s]], rng, **jit)
        for s in range(len(targets)) for k in range(n_frames)])
    t0 = time.perf_counter()
    probs = predict_probs(model, torch.from_numpy(frames)).numpy().reshape(len(targets), n_frames, -1)
    classify_s = time.perf_counter() - t0
    clean = predict_probs(model, torch.from_numpy(faces[targets])).argmax(1).numpy()
    y = labels[targets]

    raw_apex = probs[:, args.lead:].argmax(2)
    majority = np.array([np.bincount(r, minlength=len(names)).argmax() for r in raw_apex])
    latency_set = np.flatnonzero((majority == y) & (y != neutral))

    rows = []
    for tau in args.taus:
        smoother = EmaSmoother(tau)
        dominant = np.empty((len(targets), n_frames), dtype=np.int64)
        for s in range(len(targets)):
            for k in range(n_frames):
                dominant[s, k] = int(np.argmax(smoother.update(s, k / args.fps, probs[s, k])))
            smoother.forget(s)
        apex = dominant[:, args.lead:]
        # From the last lead-in frame on, so the switch itself counts alike at every tau.
        flips = sum(changes(a) for a in dominant[:, args.lead - 1:])
        pairs = len(targets) * args.frames
        settled = sum(changes(a) for a in apex[:, -args.tail:]) / (len(targets) * (args.tail - 1))
        reached = [np.flatnonzero(apex[s] == y[s]) for s in latency_set]
        lat = np.array([r[0] for r in reached if len(r)], dtype=np.float64)
        rows.append({
            "tau": tau, "flicker": flips / pairs, "flicker_s": flips / pairs * args.fps,
            "settled_s": settled * args.fps,
            "acc": float(np.mean(apex == y[:, None])),
            "acc_tail": float(np.mean(apex[:, -args.tail:] == y[:, None])),
            "lat_mean": float(lat.mean()) if len(lat) else math.nan,
            "lat_p90": float(np.percentile(lat, 90)) if len(lat) else math.nan,
            "never": len(reached) - len(lat)})

    ckpt = args.checkpoint.resolve()
    shown = ckpt.relative_to(ROOT) if ckpt.is_relative_to(ROOT) else ckpt
    print(f"\nCK+48 ({args.ckplus}): {sum(lengths.values())} sequences, frames kept per sequence "
          f"{dict(sorted(lengths.items()))}, {consecutive} with consecutive frame numbers: only the "
          f"last frames (apex), no neutral onset. Raw label changes between those real consecutive "
          f"frames: {ck_flips}/{ck_pairs} pairs ({ck_flips / max(ck_pairs, 1):.3f}), six FER classes.")
    print(f"Sequences built from FER2013 PublicTest instead: {len(targets)} random faces, each "
          f"{args.lead} frames of a neutral-labelled face then {args.frames} of the face, all jittered "
          f"per frame (shift {args.shift} px, scale {args.scale}, rotation {args.rot} deg, light "
          f"{args.light}, noise {args.noise}; s.d.), at {args.fps:g} fps; {frames.shape[0]} frames "
          f"classified by {shown} "
          f"in {classify_s:.1f} s ({args.threads} thread, 1-crop). Accuracy of the same faces "
          f"unjittered: {np.mean(clean == y):.4f}. Latency over the {len(latency_set)} non-neutral "
          f"faces whose raw majority label is right. Smoothing: facemodels.face.tracking.EmaSmoother.")
    print(f"| EMA tau s | flicker /frame | flicker /s | flicker /s, last {args.tail} | accuracy, all "
          f"apex frames | accuracy, last {args.tail} | latency mean frames | latency p90 frames | "
          "never reached |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tau']:g}{' (off)' if r['tau'] == 0 else ''} | {r['flicker']:.4f} | "
              f"{r['flicker_s']:.3f} | {r['settled_s']:.3f} | {r['acc']:.4f} | {r['acc_tail']:.4f} | "
              f"{r['lat_mean']:.2f} | {r['lat_p90']:.1f} | {r['never']} |")
    base = rows[0]
    for r in rows[1:]:
        ratio = r["flicker"] / max(base["flicker"], 1e-12)
        print(f"tau {r['tau']:g} / tau {base['tau']:g}: flicker {ratio:.2f}x, "
              f"accuracy {100 * (r['acc'] - base['acc']):+.2f} pt (all), "
              f"{100 * (r['acc_tail'] - base['acc_tail']):+.2f} pt (last {args.tail}), latency "
              f"{r['lat_mean'] - base['lat_mean']:+.2f} frames")
    print(f"(run took {time.monotonic() - started:.0f} s on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
