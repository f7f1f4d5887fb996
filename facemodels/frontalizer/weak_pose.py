"""The warp-only frontaliser's camera: a weak-perspective pose (yaw, roll, scale, translation;
no pitch) of the mesh's five points fitted to the detector's five landmarks by least squares,
a closed-form 2D similarity per yaw and a grid search over the yaw, for all faces at once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["YAW_FINE_STEP", "YAW_LIMIT", "YAW_STEP", "WeakPerspectivePose", "fit_pose"]

#: Yaw search: limit, coarse step and fine step, degrees.
YAW_LIMIT, YAW_STEP, YAW_FINE_STEP = 90.0, 1.0, 0.02


@dataclass(frozen=True)
class WeakPerspectivePose:
    """Per face ``(N,)`` arrays: ``p = scale·R2(roll)·(x', -y') + t``, ``x' = x·cos(yaw) + z·sin(yaw)``.

    ``yaw`` in degrees, positive when the nose points to the image's right (as
    :func:`facemodels.face.pose.estimate_yaw`); ``roll`` in degrees in the image plane, positive
    from +x towards +y (clockwise on screen); ``scale`` image pixels per mesh unit; ``t``
    ``(N, 2)`` where the mesh origin lands; ``rms`` the landmark residual in pixels.
    """

    yaw: np.ndarray
    roll: np.ndarray
    scale: np.ndarray
    t: np.ndarray
    rms: np.ndarray

    def __len__(self) -> int:
        return len(self.yaw)

    def project(self, points: np.ndarray) -> np.ndarray:
        """Mesh points ``(P, 3)`` or ``(N, P, 3)`` -> image points ``(N, P, 2)``."""
        pts = np.broadcast_to(np.asarray(points, dtype=np.float64), (len(self), *np.shape(points)[-2:]))
        y, r = np.radians(self.yaw)[:, None], np.radians(self.roll)[:, None]
        qx = pts[..., 0] * np.cos(y) + pts[..., 2] * np.sin(y)
        qy = -pts[..., 1]
        a, b = self.scale[:, None] * np.cos(r), self.scale[:, None] * np.sin(r)
        return np.stack([a * qx - b * qy + self.t[:, :1], b * qx + a * qy + self.t[:, 1:]], -1)


def _similarity_fit(q: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, ...]:
    """Closed-form 2D similarity from ``q`` ``(N, K, 5, 2)`` onto ``p`` ``(N, 5, 2)``, per ``(N, K)``.

    Returns ``a = s·cos(roll)``, ``b = s·sin(roll)``, the translation ``(N, K, 2)`` and the
    sum of squared residuals.
    """
    qm, pm = q.mean(-2, keepdims=True), p.mean(-2, keepdims=True)
    qc, pc = q - qm, (p - pm)[:, None]
    qq = (qc**2).sum((-1, -2))
    a = (qc * pc).sum((-1, -2)) / qq
    b = (qc[..., 0] * pc[..., 1] - qc[..., 1] * pc[..., 0]).sum(-1) / qq
    res = (pc**2).sum((-1, -2)) - (a**2 + b**2) * qq
    qm = qm[..., 0, :]
    t = pm[:, None, 0, :] - np.stack([a * qm[..., 0] - b * qm[..., 1], b * qm[..., 0] + a * qm[..., 1]], -1)
    return a, b, t, np.maximum(res, 0.0)


def _yaw_candidates_fit(model: np.ndarray, p: np.ndarray, yaws: np.ndarray) -> tuple[np.ndarray, ...]:
    """Similarity fits of the model turned by each candidate yaw ``(N, K)``."""
    rad = np.radians(yaws)[..., None]
    qx = model[:, 0] * np.cos(rad) + model[:, 2] * np.sin(rad)  # (N, K, 5)
    qy = np.broadcast_to(-model[:, 1], qx.shape)
    return _similarity_fit(np.stack([qx, qy], -1), p)


def fit_pose(landmarks: np.ndarray, model_points: np.ndarray, *, yaw: np.ndarray | None = None,
             yaw_limit: float = YAW_LIMIT) -> WeakPerspectivePose:
    """Least-squares weak-perspective pose of ``model_points`` ``(5, 3)`` onto five landmarks.

    Args:
        landmarks: ``(N, 5, 2)`` (or ``(5, 2)``) image points in the detector's order.
        model_points: the mesh's five points (:meth:`FaceMesh.landmarks5`, as calibrated).
        yaw: fix the yaw (degrees, ``(N,)``) and fit only scale, roll and translation.
        yaw_limit: search ``[-yaw_limit, yaw_limit]``.

    Raises:
        ValueError: on non-finite or degenerate (all in one point) landmarks.
    """
    p = np.asarray(landmarks, dtype=np.float64)
    if p.ndim == 2:
        p = p[None]
    if p.ndim != 3 or p.shape[1:] != (5, 2):
        raise ValueError(f"expected (N, 5, 2) landmarks, got {np.shape(landmarks)}")
    if not np.isfinite(p).all():
        raise ValueError("landmarks must be finite (drop faces the detector missed)")
    if (((p - p.mean(1, keepdims=True)) ** 2).sum((1, 2)) < 1e-9).any():
        raise ValueError("degenerate landmarks: all five points coincide")
    model = np.asarray(model_points, dtype=np.float64)
    n = len(p)
    if yaw is not None:
        best = np.broadcast_to(np.asarray(yaw, dtype=np.float64), (n,))[:, None]
    else:
        coarse = np.arange(-yaw_limit, yaw_limit + YAW_STEP / 2, YAW_STEP)
        res = _yaw_candidates_fit(model, p, np.broadcast_to(coarse, (n, len(coarse))))[3]
        centre = coarse[res.argmin(1)][:, None]
        fine = np.arange(-YAW_STEP, YAW_STEP + YAW_FINE_STEP / 2, YAW_FINE_STEP)
        best = np.clip(centre + fine, -yaw_limit, yaw_limit)
    a, b, t, res = _yaw_candidates_fit(model, p, best)
    k = res.argmin(1)
    rows = np.arange(n)
    a, b, t, res = a[rows, k], b[rows, k], t[rows, k], res[rows, k]
    return WeakPerspectivePose(yaw=best[rows, k].copy(), roll=np.degrees(np.arctan2(b, a)),
                               scale=np.hypot(a, b), t=t, rms=np.sqrt(res / 5))
