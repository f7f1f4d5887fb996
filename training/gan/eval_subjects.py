"""What ``fer-train eval-frontalizer`` evaluates: warp-only, and a checkpoint beside it.

The checkpoint's card decides (``arch``): a ``frontal_refiner`` runs on the mesh warp's output
through :func:`facemodels.frontalizer.refiner.frontalize` (the service's inference path), on the
same faces and landmarks as warp-only (:class:`training.gan.warp_eval.WarpFrontaliser`); a
``frontalizer`` (the old DR-GAN) takes the pose-framed crops. ``--warp-only`` evaluates warp-only
alone. Every run measures warp-only, so raw, warp-only and the checkpoint share faces and pairs.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from facemodels.checkpoint import load_card, load_checkpoint
from facemodels.frontalizer.model import Frontalizer, default_cfg, frontalize_faces
from facemodels.frontalizer.refiner import REFINER_ARCH, FrontalRefiner, load_refiner
from facemodels.frontalizer.warp import MeshWarp
from training.data._cache import default_cache_dir
from training.data.cfp import CfpDataset, load_cfp
from training.gan.fer_eval import FerFrontaliser, gan_fer_frontaliser
from training.gan.refiner_data import cached_cfp_landmarks
from training.gan.warp_eval import WarpFrontaliser, pose_fit_summary

__all__ = ["WARP_OUTPUT", "Candidate", "CfpFrontaliser", "Subject", "setup_subject"]

log = logging.getLogger(__name__)
#: CFP crops -> uint8 ``(N, S, S)`` frontal faces in the same framing.
CfpFrontaliser = Callable[[CfpDataset], Tensor]
WARP_OUTPUT = Path("runs/warp_only_eval.json")


@dataclass
class Candidate:
    """One frontaliser row: its JSON key, its label and its two adapters."""

    key: str
    label: str
    cfp_run: CfpFrontaliser
    fer_run: FerFrontaliser


@dataclass
class Subject:
    """The evaluation's frontalisers (warp-only first) and what the setup measured."""

    frontaliser: str  # "warp-only" or the checkpoint's arch
    title: str
    candidates: list[Candidate]
    cfp_all: CfpDataset  # every CFP id, framed at the frontalisers' input size
    cfp: CfpDataset  # the evaluation ids 451-500
    cfp_landmarks: dict[str, np.ndarray]  # CFP path -> 5 landmarks in its crop (shared by the warps)
    sheet: Path
    fer_sheet: Path
    output: Path
    results: dict[str, Any]
    rows: list[tuple[str, str, dict[str, str], str]]  # (metric, raw, {key: value}, n)
    card: dict[str, Any] | None = None
    cache_dir: Path = field(default_factory=default_cache_dir)

    @property
    def checkpoint_key(self) -> str | None:
        """The key of the checkpoint's row (``None`` with ``--warp-only``)."""
        return self.candidates[-1].key if len(self.candidates) > 1 else None

    def add_landmarks(self, data: CfpDataset, get_detector: Callable[[], Any]) -> np.ndarray:
        """Detector landmarks of ``data``'s crops (cached), made known to the warps."""
        lm = cached_cfp_landmarks(data, get_detector, self.cache_dir)
        self.cfp_landmarks.update(zip(data.paths, lm, strict=True))
        return lm


def setup_subject(args: argparse.Namespace, device: torch.device, get_detector: Callable[[], Any]) -> Subject:
    """Load what ``args`` asks for; frame CFP at its size; detect the CFP eval landmarks; fit the warp."""
    if args.warp_only and args.update_card:
        raise ValueError("--update-card stores metrics in a checkpoint's card; --warp-only has none")
    card = None if args.warp_only else load_card(args.checkpoint)
    arch = "warp-only" if card is None else str(card["arch"])
    refiner: FrontalRefiner | None = None
    gan: Frontalizer | None = None
    if arch == REFINER_ARCH:
        refiner = load_refiner(str(args.checkpoint), device=device)
        size = refiner.cfg.image_size
    elif arch == "frontalizer":
        gan, card = load_checkpoint(args.checkpoint, device=device)
        size = gan.cfg.image_size
    elif arch == "warp-only":
        size = default_cfg().image_size
    else:
        raise ValueError(f"{args.checkpoint} is a {arch!r}, not a frontalizer or a {REFINER_ARCH}")
    cfp_all = load_cfp(args.data, size=size, cache_dir=args.cache_dir)
    cfp = cfp_all.split("eval")
    if len(cfp) == 0:
        raise ValueError(f"{args.data}: no evaluation ids (451-500)")
    cache = args.cache_dir or default_cache_dir()
    warp = MeshWarp(size)
    lm_by_path: dict[str, np.ndarray] = {}
    subject_kw: dict[str, Any] = {"cfp_all": cfp_all, "cfp": cfp, "cfp_landmarks": lm_by_path,
                                  "cache_dir": cache}
    landmarks = cached_cfp_landmarks(cfp, get_detector, cache)
    lm_by_path.update(zip(cfp.paths, landmarks, strict=True))
    found = int(np.isfinite(landmarks).all((1, 2)).sum())
    wf = WarpFrontaliser(warp, lm_by_path)
    fit = pose_fit_summary(warp, cfp, landmarks)
    rows: list[tuple[str, str, dict[str, str], str]] = [
        ("CFP 451-500 photos with landmarks", "", {"warp-only": f"{found}"}, str(len(cfp)))]
    for cls, v in fit.items():
        spread = f"{v['yaw_p5']:.0f}/{v['yaw_median']:.0f}/{v['yaw_p95']:.0f}"
        n = f"{v['found']}/{v['n']}"
        rows.append((f"warp fit {cls} yaw p5/median/p95", "", {"warp-only": spread}, n))
        rms = f"{v['rms_over_eye_mouth_median']:.3f}"
        rows.append((f"warp fit {cls} rms / eye-mouth", "", {"warp-only": rms}, n))
    candidates = [Candidate("warp-only", "warp-only", wf.cfp, wf.fer)]
    results: dict[str, Any] = {
        "frontaliser": arch, "warp": {"size": size, "mesh_y_scale": warp.y_scale, "pose_fit": fit,
                                      "cfp_landmarks_found": found, "cfp_photos": len(cfp)}}
    if arch == "warp-only":
        return Subject(frontaliser=arch, title="Warp-only baseline (facemodels.frontalizer.warp)",
                       candidates=candidates, sheet=args.sheet or Path("docs/frontalizer_warp_samples.png"),
                       fer_sheet=args.fer_sheet or Path("docs/frontalizer_warp_fer_samples.png"),
                       output=WARP_OUTPUT, results=results, rows=rows, **subject_kw)
    assert card is not None
    steps = card.get("steps_trained")
    results |= {"checkpoint": str(args.checkpoint), "steps_trained": steps}
    output = Path(str(args.checkpoint) + "_eval.json")
    if refiner is not None:
        rf = WarpFrontaliser(warp, lm_by_path, refiner=refiner)
        candidates.append(Candidate("refiner", "refiner GAN", rf.cfp, rf.fer))
        return Subject(frontaliser=arch, title=f"Warp refiner {args.checkpoint} ({steps} steps) vs warp-only",
                       candidates=candidates,
                       sheet=args.sheet or Path("docs/frontalizer_refiner_samples.png"),
                       fer_sheet=args.fer_sheet or Path("docs/frontalizer_refiner_fer_samples.png"),
                       output=output, results=results, rows=rows, card=card, **subject_kw)
    assert gan is not None
    drgan = gan

    def cfp_run(d: CfpDataset) -> Tensor:
        return frontalize_faces(drgan, d.images, out_size=size)

    with torch.inference_mode():
        pose_pred = gan.pose_logits(gan.preprocess(cfp.images)).argmax(1).cpu()
    pose_acc = float((pose_pred == cfp.pose).float().mean())
    results["cfp_pose_accuracy"] = pose_acc
    rows.insert(0, ("CFP 451-500 D_p pose accuracy", f"{pose_acc:.4f}", {}, str(len(cfp))))
    candidates.append(Candidate("drgan", "DR-GAN checkpoint", cfp_run, gan_fer_frontaliser(gan)))
    return Subject(frontaliser=arch, title=f"Frontaliser {args.checkpoint} ({steps} steps) vs warp-only",
                   candidates=candidates, sheet=args.sheet or Path("docs/frontalizer_samples.png"),
                   fer_sheet=args.fer_sheet or Path("docs/frontalizer_fer_samples.png"),
                   output=output, results=results, rows=rows, card=card, **subject_kw)
