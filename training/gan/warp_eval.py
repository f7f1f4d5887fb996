"""The warp-only baseline (:class:`facemodels.frontalizer.warp.MeshWarp`) in the frontaliser evaluation.

``fer-train eval-frontalizer --warp-only`` measures the mesh warp with the GAN's metrics, on the
same inputs the GAN gets:

* CFP: the 64x64 crops of :func:`training.data.cfp.load_cfp` (pose framing from the fiducials).
  Their five landmarks come from the serving detector run on the full photo (as the service
  would), mapped into the crop by the same framing matrix. Crops without a detection pass
  through unchanged (counted in the JSON).
* FER2013: each 48x48 face with the landmarks :func:`training.data.aligned_views.detect_face_landmarks`
  found (as for the GAN); faces without landmarks are resized to the output size unchanged.

The output (64x64, the FER framing) is resized to 48 for the classifier exactly as the GAN's.

With a ``frontal_refiner`` checkpoint (:mod:`facemodels.frontalizer.refiner`) the same adapter
runs the warp -> refine step on the same faces and landmarks, through the inference entry the
service uses (:func:`facemodels.frontalizer.refiner.frontalize`, which is warp-only when given
no refiner), so warp-only and the refiner are measured on identical inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from facemodels.frontalizer.model import default_cfg, fer_crop_to_input, to_uint8
from facemodels.frontalizer.refiner import FrontalRefiner, frontalize
from facemodels.frontalizer.warp import MeshWarp
from facemodels.preprocess import normalize
from training.data.cfp import CfpDataset, cfp_fiducials_path, cfp_framing_matrix, read_fiducials

__all__ = ["WarpFrontaliser", "cfp_crop_landmarks", "pose_fit_summary"]


def cfp_crop_landmarks(data: CfpDataset, detector: Any) -> np.ndarray:
    """Five landmarks per crop of ``data`` ``(N, 5, 2)``, in crop pixels; NaN where none was found.

    The detector runs on the full photo; the points are mapped by the crop's framing matrix
    (:func:`training.data.cfp.cfp_framing_matrix`, as :func:`~training.data.cfp.load_cfp` crops).
    """
    root = Path(data.source)
    out = np.full((len(data), 5, 2), np.nan)
    for i, rel in enumerate(data.paths):
        image = cv2.imread(str(root / rel))
        if image is None:
            continue
        dets = detector.detect([cv2.cvtColor(image, cv2.COLOR_BGR2RGB)])[0]
        if not dets:
            continue
        fid = read_fiducials(cfp_fiducials_path(root, rel))
        matrix = cfp_framing_matrix(fid, int(data.pose[i]), size=data.size)
        out[i] = np.asarray(dets[0].landmarks, dtype=np.float64) @ matrix[:, :2].T + matrix[:, 2]
    return out


class WarpFrontaliser:
    """:class:`MeshWarp` (optionally refined) behind the evaluation's two interfaces (CFP crops
    and FER faces).

    Args:
        warp: the warp (its ``size`` should be the CFP crop size, 64).
        cfp_landmarks: ``{CFP image path: (5, 2) landmarks in its crop}`` (missing or NaN: none).
        refiner: a trained ``frontal_refiner`` run on the warp (``None``: warp-only).
    """

    def __init__(self, warp: MeshWarp, cfp_landmarks: dict[str, np.ndarray] | None = None, *,
                 refiner: FrontalRefiner | None = None) -> None:
        if refiner is not None and refiner.cfg.image_size != warp.size:
            raise ValueError(f"the refiner takes {refiner.cfg.image_size}px, the warp outputs {warp.size}px")
        self.warp = warp
        self.refiner = refiner
        self.cfp_landmarks = cfp_landmarks or {}
        self.cfg = default_cfg(warp.size)  # the frontaliser's input and output scaling

    def _warp_some(self, faces: np.ndarray, landmarks: np.ndarray, fallback: np.ndarray) -> np.ndarray:
        has = np.isfinite(landmarks).all((1, 2))
        out = fallback.copy()
        if has.any():
            out[has] = frontalize(np.ascontiguousarray(faces[has]), landmarks[has], self.refiner,
                                  warp=self.warp)
        return out

    def cfp(self, data: CfpDataset) -> Tensor:
        """uint8 ``(N, S, S)``: each crop frontalised (unchanged where no landmarks)."""
        if data.size != self.warp.size:
            raise ValueError(f"CFP crops are {data.size}px, the warp outputs {self.warp.size}px")
        lm = np.stack([self.cfp_landmarks.get(p, np.full((5, 2), np.nan)) for p in data.paths]) \
            if len(data) else np.zeros((0, 5, 2))
        faces = data.images.numpy()
        return torch.from_numpy(self._warp_some(faces, lm, faces))

    def fer(self, faces: Tensor, landmarks: list[np.ndarray | None], out_size: int) -> tuple[Tensor, Tensor]:
        """A :data:`~training.gan.fer_eval.FerFrontaliser`: 48x48 faces -> frontalised, resized to
        ``out_size`` (faces without landmarks: only resized to ``S`` and back)."""
        s = self.warp.size
        arr = faces.numpy()
        lm = np.stack([np.asarray(p, dtype=np.float64) if p is not None else np.full((5, 2), np.nan)
                       for p in landmarks]) if len(landmarks) else np.zeros((0, 5, 2))
        resized = np.stack([fer_crop_to_input(f, size=s) for f in arr]) \
            if len(arr) else np.zeros((0, s, s), np.uint8)
        out = torch.from_numpy(self._warp_some(arr, lm, resized))
        front = to_uint8(normalize(out, self.cfg), size=out_size)  # resized as the GAN's output
        return torch.from_numpy(resized), front


def pose_fit_summary(warp: MeshWarp, data: CfpDataset, landmarks: np.ndarray) -> dict[str, dict[str, float]]:
    """Per CFP pose class: fitted yaw percentiles and the fit's RMS residual over the eye-mouth
    distance (how well the mesh's five points explain the detector's)."""
    out = {}
    for cls, name in enumerate(("frontal", "left_profile", "right_profile")):
        lm = landmarks[(data.pose == cls).numpy()]
        found = lm[np.isfinite(lm).all((1, 2))]
        if not len(found):
            continue
        pose = warp.fit(found)
        h = np.linalg.norm(found[:, :2].mean(1) - found[:, 3:].mean(1), axis=1)
        p5, p50, p95 = np.percentile(pose.yaw, [5, 50, 95])
        out[name] = {"n": len(lm), "found": len(found), "yaw_p5": p5, "yaw_median": p50, "yaw_p95": p95,
                     "rms_over_eye_mouth_median": float(np.median(pose.rms / h))}
    return out
