"""Warp-only frontaliser: a 3D mean face, a weak-perspective pose from five landmarks, no learning.

The baseline the GAN frontaliser has to beat (after Hassner et al., "Effective face
frontalization in unconstrained images", CVPR 2015; docs/frontalizer.md, "Warp-only baseline",
describes the method): :class:`MeshWarp` fits the mesh (:mod:`~facemodels.frontalizer.mesh`) to
each face's landmarks (:mod:`~facemodels.frontalizer.weak_pose`), samples the input at every
output pixel's projected 3D point (:mod:`~facemodels.frontalizer.raster`), and where that point
is hidden at the fitted yaw takes the input at its mirror point instead. Everything is
numpy/torch on the CPU, batched; no training code is imported. This module is the public entry:
it re-exports the mesh, pose and raster names.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from facemodels.frontalizer.mesh import (
    EYE_CONTOURS,
    LANDMARK_VERTICES,
    MOUTH_CORNER_VERTICES,
    NOSE_TIP_VERTEX,
    FaceMesh,
    load_face_mesh,
    template_y_scale,
)
from facemodels.frontalizer.raster import FrontalRaster, _visibility, rasterize_frontal
from facemodels.frontalizer.weak_pose import WeakPerspectivePose, fit_pose

__all__ = [
    "DEFAULT_SIZE",
    "EYE_CONTOURS",
    "LANDMARK_VERTICES",
    "MOUTH_CORNER_VERTICES",
    "NOSE_TIP_VERTEX",
    "FaceMesh",
    "FrontalRaster",
    "MeshWarp",
    "WarpFields",
    "WarpOutput",
    "WeakPerspectivePose",
    "fit_pose",
    "load_face_mesh",
    "rasterize_frontal",
    "sample_input",
    "template_y_scale",
]

#: Output side by default: the frontaliser framing's side (the GAN's ``default_cfg().image_size``,
#: not imported here so the warp does not load the GAN).
DEFAULT_SIZE = 64
#: Visibility is computed per yaw rounded to this many degrees (and cached).
VIS_YAW_QUANTUM = 0.5


@dataclass(frozen=True)
class WarpOutput:
    """What :meth:`MeshWarp.warp` computed: the faces and how."""

    faces: Tensor  # uint8 (N, S, S) or (N, S, S, C)
    pose: WeakPerspectivePose
    own_weight: Tensor  # float (N, S, S): w, the share of the own sample inside the mask (1 outside)
    visibility: Tensor  # float (N, S, S): v_own


@dataclass(frozen=True)
class WarpFields:
    """Everything :meth:`MeshWarp.warp` needs per face besides the image (:meth:`MeshWarp.fields`).

    Exposed so that a learned refiner (:mod:`facemodels.frontalizer.refiner`) can nudge the
    sampling grids and re-sample the *input* rather than the warped output.
    """

    pose: WeakPerspectivePose
    grid: Tensor  # float32 (N, 3S, S, 2): input pixel (x, y) per output pixel: own, mirror, background rows
    own_weight: Tensor  # float (N, S, S): w, the share of the own sample inside the mask (1 outside)
    visibility: Tensor  # float (N, S, S): v_own
    factor: np.ndarray  # int (N,): the input is area-shrunk by this before sampling

    def __len__(self) -> int:
        return len(self.factor)


def _normalised(grid: Tensor, h: int, w: int) -> Tensor:
    """Pixel-centre coordinates ``(x, y)`` -> ``grid_sample``'s [-1, 1] (``align_corners=False``)."""
    scale = torch.tensor([2.0 / w, 2.0 / h], dtype=grid.dtype, device=grid.device)
    return (grid + 0.5) * scale - 1.0


def sample_input(src: Tensor, grid: Tensor, factor: np.ndarray) -> Tensor:
    """Bilinear samples of float images ``src`` ``(N, C, H, W)`` at input pixels ``grid``
    ``(N, R, S, 2)`` -> ``(N, C, R, S)``; a face with ``factor`` k > 1 is area-shrunk by k first
    (like :func:`facemodels.face.align.warp_face`). Differentiable in ``src`` and ``grid``."""
    factor = np.asarray(factor)
    groups = np.unique(factor)
    outs, order = [], []
    for k in groups:
        rows = np.nonzero(factor == k)[0]
        pick = torch.from_numpy(rows)
        img, g = (src, grid) if len(groups) == 1 else (src[pick], grid[pick])
        if k > 1:
            img = F.avg_pool2d(img, int(k), ceil_mode=True)
            g = (g + 0.5) / int(k) - 0.5
        outs.append(F.grid_sample(img, _normalised(g, img.shape[2], img.shape[3]), mode="bilinear",
                                  padding_mode="border", align_corners=False))
        order.append(rows)
    if len(outs) == 1:
        return outs[0]
    inverse = torch.from_numpy(np.argsort(np.concatenate(order)))
    return torch.cat(outs)[inverse]


class MeshWarp:
    """Warp-only frontaliser into the frontaliser's ``size`` x ``size`` FER framing.

    ``MeshWarp().frontalize(images, landmarks)``: uint8 faces ``(N, H, W)`` (or ``(N, H, W, C)``)
    with the detector's five landmarks ``(N, 5, 2)`` in their pixels -> uint8 ``(N, S, S)``
    frontal faces (numpy in, numpy out; a tensor in, a CPU tensor out). It runs on the CPU. The
    raster is made on first use and the visibility once per yaw (in :data:`VIS_YAW_QUANTUM`
    steps), then cached. Images of one call share a size: a crop per face, or the same photo
    repeated for several faces.
    """

    def __init__(self, size: int | None = None, *, mesh: FaceMesh | None = None) -> None:
        self.size = int(size if size is not None else DEFAULT_SIZE)
        base = mesh if mesh is not None else load_face_mesh()
        self.y_scale = template_y_scale(base)
        self.mesh = base.scaled(sy=self.y_scale)
        self.model_points = self.mesh.landmarks5()
        self._raster: FrontalRaster | None = None
        self._vis: dict[int, np.ndarray] = {}

    @property
    def raster(self) -> FrontalRaster:
        if self._raster is None:
            self._raster = rasterize_frontal(self.mesh, self.size)
        return self._raster

    def fit(self, landmarks: np.ndarray, *, yaw: np.ndarray | None = None) -> WeakPerspectivePose:
        """The weak-perspective pose of each face (see :func:`fit_pose`)."""
        return fit_pose(landmarks, self.model_points, yaw=yaw)

    def visibility(self, yaw: np.ndarray | float) -> np.ndarray:
        """Soft visibility ``(N, S, S)`` of every output pixel's point at each yaw (degrees)."""
        yaws = np.atleast_1d(np.asarray(yaw, dtype=np.float64))
        keys = np.round(yaws / VIS_YAW_QUANTUM).astype(int)
        for k in np.unique(keys):
            if int(k) not in self._vis:
                self._vis[int(k)] = _visibility(self.raster, k * VIS_YAW_QUANTUM)
        return np.stack([self._vis[int(k)] for k in keys])

    def grids(self, pose: WeakPerspectivePose) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Input pixel ``(x, y)`` to sample per output pixel ``(N, S, S, 2)``: own point, mirror
        point, and the 2D alignment used outside the mask."""
        r, s = self.raster, self.size
        pts = r.points.reshape(-1, 3).astype(np.float64)
        own = pose.project(pts).reshape(len(pose), s, s, 2)
        mirror = pose.project(pts * np.array([-1.0, 1.0, 1.0])).reshape(len(pose), s, s, 2)
        ys, xs = np.mgrid[:s, :s]
        flat = np.stack([(xs.ravel() - r.centre[0]) / r.scale, -(ys.ravel() - r.centre[1]) / r.scale,
                         np.zeros(s * s)], 1)  # the z = 0 plane, facing the camera
        plane = WeakPerspectivePose(yaw=np.zeros(len(pose)), roll=pose.roll, scale=pose.scale,
                                    t=pose.t, rms=pose.rms)
        background = plane.project(flat).reshape(len(pose), s, s, 2)
        return own, mirror, background

    def fields(self, landmarks: np.ndarray, *, yaw: np.ndarray | None = None) -> WarpFields:
        """Pose, sampling grids and mirror weights for faces with these ``(N, 5, 2)`` landmarks."""
        pose = self.fit(landmarks, yaw=yaw)
        own, mirror, background = self.grids(pose)
        vis = self.visibility(pose.yaw)
        vis_m = self.visibility(-pose.yaw)  # the mirror point at yaw = the own point at -yaw
        weight = 1.0 - (1.0 - vis) * vis_m
        weight = np.where(self.raster.mask, weight, 1.0).astype(np.float32)
        grid = torch.from_numpy(np.concatenate([own, mirror, background], 1).astype(np.float32))
        # shrink heavily downscaled faces first (area averaging), like facemodels.face.align.warp_face
        factor = np.maximum(1, np.floor(pose.scale / self.raster.scale)).astype(int)
        return WarpFields(pose=pose, grid=grid, own_weight=torch.from_numpy(weight),
                          visibility=torch.from_numpy(vis), factor=factor)

    def blend(self, samples: Tensor, own_weight: Tensor) -> Tensor:
        """Samples ``(N, C, 3S, S)`` (own, mirror, background rows) -> the warped faces ``(N, C, S, S)``:
        own and mirror mixed by ``own_weight`` inside the feathered face mask, background outside."""
        s = self.size
        own_px, mirror_px, bg_px = samples[:, :, :s], samples[:, :, s:2 * s], samples[:, :, 2 * s:]
        wt = own_weight[:, None]
        alpha = torch.from_numpy(self.raster.alpha).to(samples.device)[None, None]
        face = wt * own_px + (1 - wt) * mirror_px
        return alpha * face + (1 - alpha) * bg_px

    def warp(self, images: np.ndarray | Tensor, landmarks: np.ndarray,
             *, yaw: np.ndarray | None = None) -> WarpOutput:
        """Frontalise and report the pose and the mirror weights (see :meth:`frontalize`)."""
        x = torch.as_tensor(images).cpu()
        if x.dtype != torch.uint8 or x.ndim not in (3, 4):
            raise ValueError("expected uint8 (N, H, W) or (N, H, W, C) images, "
                             f"got {x.dtype} {tuple(x.shape)}")
        lm = np.asarray(landmarks, dtype=np.float64)
        if lm.shape != (x.shape[0], 5, 2):
            raise ValueError(f"expected ({x.shape[0]}, 5, 2) landmarks, got {lm.shape}")
        gray = x.ndim == 3
        x = x.unsqueeze(-1) if gray else x
        n, ch = x.shape[0], x.shape[3]
        s = self.size
        if n == 0:
            z = np.zeros(0)
            return WarpOutput(faces=torch.empty((0, s, s) if gray else (0, s, s, ch), dtype=torch.uint8),
                              pose=WeakPerspectivePose(z, z, z, np.zeros((0, 2)), z),
                              own_weight=torch.empty(0, s, s), visibility=torch.empty(0, s, s))
        fields = self.fields(lm, yaw=yaw)
        out = sample_input(x.permute(0, 3, 1, 2).float(), fields.grid, fields.factor)
        result = self.blend(out, fields.own_weight).round().clamp(0, 255).to(torch.uint8)
        result = result.permute(0, 2, 3, 1)
        if gray:
            result = result[..., 0]
        return WarpOutput(faces=result.contiguous(), pose=fields.pose, own_weight=fields.own_weight,
                          visibility=fields.visibility)

    def frontalize(self, images: np.ndarray | Tensor, landmarks: np.ndarray) -> np.ndarray | Tensor:
        """uint8 faces ``(N, H, W)`` + their five landmarks ``(N, 5, 2)`` -> uint8 ``(N, S, S)``.

        The output is in the frontaliser's framing (the FER framing at ``S``; resize to 48 for
        the expression classifiers). Returns numpy for numpy input, else a tensor.
        """
        faces = self.warp(images, landmarks).faces
        return faces.numpy() if isinstance(images, np.ndarray) else faces
