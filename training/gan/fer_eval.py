"""Expression preservation and accuracy per yaw on FER2013 faces, with and without frontalising.

Each 48x48 face is upscaled x4 into a 320 px canvas (as ``benchmarks/framing.py`` does) so our
RetinaFace detector finds its five landmarks; they give the yaw estimate
(:func:`facemodels.face.pose.estimate_yaw`) and the pose-aware framing of the frontaliser input.
Faces the detector misses are resized as they are (the FER framing is the yaw-0 framing) and
reported in their own bin. The frontalised 64x64 face is resized to 48 and classified.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from facemodels.face.pose import estimate_yaw
from facemodels.frontalizer.model import Frontalizer, fer_crop_to_input, frontalize_faces
from facemodels.frontalizer.yaw import YawRange
from facemodels.predict import predict_probs

__all__ = ["HELPS_RULE", "YAW_BINS", "FerFrontaliser", "FerResult", "evaluate_fer", "gan_fer_frontaliser",
           "mcnemar_helps_p", "yaw_ranges"]

#: ``(faces uint8 (N, 48, 48), their landmarks or None, out_size)`` -> ``(what the frontaliser
#: got, uint8 (N, S, S); its frontal faces, uint8 (N, out_size, out_size))``.
FerFrontaliser = Callable[[Tensor, list[np.ndarray | None], int], tuple[Tensor, Tensor]]

log = logging.getLogger(__name__)

#: |yaw| bin edges in degrees; the last bin is open-ended.
YAW_BINS: tuple[float, ...] = (0.0, 15.0, 30.0, 45.0)
NO_FACE = "no face found"
HELPS_RULE = "McNemar one-sided p < 0.05"


def mcnemar_helps_p(fixed: int, broke: int) -> float:
    """One-sided exact McNemar test: P(at least ``fixed`` of the ``fixed + broke`` discordant
    faces fall on the fixed side if each side were equally likely)."""
    n = fixed + broke
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(fixed, n + 1)) / 2**n


def yaw_ranges(edges: Sequence[float] = YAW_BINS) -> list[YawRange]:
    """The |yaw| bins between consecutive ``edges``, the last one open-ended."""
    return [YawRange(lo, hi) for lo, hi in itertools.pairwise([*edges, math.inf])]


@dataclass
class FerResult:
    """Predictions on the same faces: original crops vs frontalised."""

    labels: Tensor
    pred_orig: Tensor
    pred_front: Tensor
    yaw: np.ndarray  # NaN where no face was found
    inputs: Tensor  # uint8 (N, S, S): what the frontaliser got
    frontalised: Tensor  # uint8 (N, 48, 48)

    def bin_masks(self) -> list[tuple[str, np.ndarray]]:
        """``(name, mask)`` for all faces, each |yaw| bin and the faces with no detection."""
        absyaw = np.abs(self.yaw)
        masks = [("all", np.ones(len(self.labels), bool))]
        for r in yaw_ranges():
            masks.append((r.label, (absyaw >= r.lo) & (absyaw < r.hi)))
        masks.append((NO_FACE, np.isnan(self.yaw)))
        return masks

    def correct(self) -> tuple[np.ndarray, np.ndarray]:
        """Per face: whether the original and the frontalised prediction are right."""
        return (self.pred_orig == self.labels).numpy(), (self.pred_front == self.labels).numpy()

    def rows(self) -> list[tuple[str, int, float, float]]:
        """``(bin, n, acc original, acc frontalised)`` for all faces, each yaw bin and misses."""
        ok_o, ok_f = self.correct()
        return [(name, int(m.sum()), float(ok_o[m].mean()) if m.any() else float("nan"),
                 float(ok_f[m].mean()) if m.any() else float("nan")) for name, m in self.bin_masks()]

    def discordant(self) -> dict[str, tuple[int, int, float]]:
        """Per bin: faces frontalising fixed, faces it broke, and the one-sided exact McNemar p
        that it helps (small p: more fixed than broken beyond chance)."""
        ok_o, ok_f = self.correct()
        out = {}
        for name, m in self.bin_masks():
            fixed, broke = int((~ok_o & ok_f)[m].sum()), int((ok_o & ~ok_f)[m].sum())
            out[name] = (fixed, broke, mcnemar_helps_p(fixed, broke))
        return out

    def helps(self, alpha: float = 0.05) -> list[YawRange]:
        """Yaw bins where frontalising raised accuracy with McNemar p < ``alpha``."""
        discordant = self.discordant()
        return [r for r in yaw_ranges()
                if (d := discordant[r.label])[0] > d[1] and d[2] < alpha]

    @property
    def agreement(self) -> float:
        return float((self.pred_orig == self.pred_front).float().mean())

    def agreement_below(self, max_abs_yaw: float) -> tuple[float, int]:
        """Agreement original vs frontalised over the faces found with ``|yaw| < max_abs_yaw``,
        and how many those are (NaN agreement when none)."""
        mask = torch.from_numpy(np.abs(self.yaw) < max_abs_yaw)  # NaN (no face) compares False
        n = int(mask.sum())
        agree = (self.pred_orig == self.pred_front)[mask]
        return (float(agree.float().mean()) if n else float("nan")), n

    def summary(self) -> dict[str, Any]:
        """The JSON of one frontaliser's FER run: agreement (all faces and ``|yaw| < 15``),
        accuracy per bin with McNemar counts, and ``frontalize_helps`` (what the service's
        ``auto`` policy reads from a checkpoint card)."""
        discordant = self.discordant()
        bins = {name: {"n": k, "acc": a, "acc_frontalised": b, "fixed": discordant[name][0],
                       "broke": discordant[name][1], "mcnemar_p": discordant[name][2]}
                for name, k, a, b in self.rows()}
        agree15, n15 = self.agreement_below(YAW_BINS[1])
        return {"agreement": self.agreement, "agreement_abs_yaw_lt_15": agree15, "n_abs_yaw_lt_15": n15,
                "bins": bins, "frontalize_helps": [r.to_json() for r in self.helps()],
                "helps_rule": HELPS_RULE}


def gan_fer_frontaliser(model: Frontalizer) -> FerFrontaliser:
    """The GAN on FER faces: the pose-aware framing of each face (a resize where no landmarks)."""

    def run(faces: Tensor, landmarks: list[np.ndarray | None], out_size: int) -> tuple[Tensor, Tensor]:
        size = model.cfg.image_size
        inputs = np.stack([
            fer_crop_to_input(f, size=size, landmarks=lm,
                              yaw=float(estimate_yaw(lm)) if lm is not None else None)
            for f, lm in zip(faces.numpy(), landmarks, strict=True)])
        x = torch.from_numpy(inputs)
        return x, frontalize_faces(model, x, out_size=out_size)

    return run


def evaluate_fer(frontalizer: Frontalizer | FerFrontaliser, classifier: nn.Module, faces: Tensor,
                 labels: Tensor, landmarks: list[np.ndarray | None]) -> FerResult:
    """Classify ``faces`` (uint8 ``(N, 48, 48)``) directly and after frontalising.

    ``frontalizer`` is the GAN (:func:`gan_fer_frontaliser`) or any :data:`FerFrontaliser`
    (the warp-only baseline, :mod:`training.gan.warp_eval`).
    """
    run = gan_fer_frontaliser(frontalizer) if isinstance(frontalizer, Frontalizer) else frontalizer
    yaw = np.array([estimate_yaw(lm) if lm is not None else np.nan for lm in landmarks], dtype=np.float64)
    inputs, front = run(faces, landmarks, classifier.cfg.image_size)
    pred_o = predict_probs(classifier, faces).argmax(1)
    pred_f = predict_probs(classifier, front).argmax(1)
    return FerResult(labels=labels.cpu(), pred_orig=pred_o, pred_front=pred_f, yaw=yaw,
                     inputs=inputs, frontalised=front)
