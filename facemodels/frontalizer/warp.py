"""Warp-only frontaliser: a 3D mean face, a weak-perspective pose from five landmarks, no learning.

The baseline the GAN frontaliser has to beat (issue #12, section 1), after Hassner et al.,
"Effective face frontalization in unconstrained images" (CVPR 2015), with a weak-perspective
camera fitted to the detector's five landmarks instead of a calibrated one:

1. **Mesh** (:func:`load_face_mesh`): MediaPipe's canonical face mesh (vendored in ``assets/``,
   Apache-2.0). Our five landmarks map to vertices (:data:`LANDMARK_VERTICES`): each eye centre
   is the mean of its 16 eye-contour vertices, the nose tip is vertex 1, the mouth corners are
   61 and 291. The mesh is longer from eyes to mouth than our detector sees faces, so it is
   scaled vertically by :func:`template_y_scale` (0.918): the factor that makes its frontal
   five points fit the FER template (:data:`facemodels.face.align.FER_TEMPLATE_48`, the
   detector's median landmarks on FER2013 faces) best.
2. **Pose** (:func:`fit_pose`): ``p = s·R2(roll)·(x', -y') + t`` with ``x' = x·cos(yaw) +
   z·sin(yaw)``, least squares over the five points. For a given yaw the rest (scale, roll,
   translation) is a closed-form 2D similarity; yaw is searched on a 1° grid over ±90° and
   refined on a 0.02° grid, for all faces at once. No pitch: fitted to CFP frontal photos it
   spread over -10° to +24° (5th-95th percentile), so with five points it is not separable
   from face shape.
3. **Output** (:func:`rasterize_frontal`): the frontal mesh rasterised once (z-buffer) into the
   ``size`` x ``size`` output, placed so that its five points fit the FER template scaled to
   ``size``: the frontaliser's yaw-0 framing, which the classifiers take after a resize to 48.
   Per pixel: the 3D point it shows, its normal, the face mask (eye holes filled) and its
   mirror pixel.
4. **Per face** (:meth:`MeshWarp.frontalize`): project every output pixel's 3D point through
   the fitted pose and ``grid_sample`` the input there. A point the camera does not see at the
   fitted yaw (back-facing, or behind another part of the face, by a splatted z-buffer of the
   turned mesh) takes the input at its mirror point instead (soft symmetry):
   ``w = 1 - (1 - v_own)·v_mirror`` of the own sample, ``v`` the soft visibility. Outside the
   face mask the output is the input aligned in 2D (the same scale, roll and translation, no
   yaw), blended over a 2-pixel feather. At yaw 0 the projection is the 2D alignment itself, so
   a frontal face passes through unchanged up to resampling.

Everything is numpy/torch on the CPU, batched; no training code is imported.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from facemodels.face.align import FER_TEMPLATE_48, template_for
from facemodels.frontalizer.model import default_cfg

__all__ = [
    "EYE_CONTOURS",
    "LANDMARK_VERTICES",
    "MOUTH_CORNER_VERTICES",
    "NOSE_TIP_VERTEX",
    "FaceMesh",
    "FrontalRaster",
    "MeshWarp",
    "WarpOutput",
    "WeakPerspectivePose",
    "fit_pose",
    "load_face_mesh",
    "rasterize_frontal",
    "template_y_scale",
]

MESH_ASSET = "canonical_face_model.obj"
#: Eye-contour vertices (MediaPipe Face Mesh order), image-left eye first (the subject's right
#: eye, ``x < 0``), as the detector orders its landmarks. The two lists are mirror images.
EYE_CONTOURS: tuple[tuple[int, ...], tuple[int, ...]] = (
    (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246),
    (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466),
)
#: Vertex 1 fits the detector's nose tip (the template's nose height); vertex 4, the frontmost
#: vertex, sits 0.1 eye-mouth distances higher.
NOSE_TIP_VERTEX = 1
MOUTH_CORNER_VERTICES = (61, 291)
#: Per detector landmark, the vertices whose mean it is.
LANDMARK_VERTICES: tuple[tuple[int, ...], ...] = (
    EYE_CONTOURS[0], EYE_CONTOURS[1], (NOSE_TIP_VERTEX,),
    (MOUTH_CORNER_VERTICES[0],), (MOUTH_CORNER_VERTICES[1],),
)

#: Yaw search: limit, coarse step and fine step, degrees.
YAW_LIMIT, YAW_STEP, YAW_FINE_STEP = 90.0, 1.0, 0.02
#: Visibility is computed per yaw rounded to this many degrees (and cached).
VIS_YAW_QUANTUM = 0.5
#: A point is fully visible when its turned normal's z is at least this (soft below).
NORMAL_RAMP = 0.2
#: Occlusion test: depth slack (output pixels) before a point counts as hidden, and the ramp.
DEPTH_SLACK, DEPTH_RAMP = 1.0, 2.0
#: Surface samples for the occlusion z-buffer: at most this far apart (output pixels).
OCCLUDER_SPACING = 0.5
#: The face mask is feathered over this many output pixels.
FEATHER_PX = 2.0


# --------------------------------------------------------------------------- mesh


@dataclass(frozen=True, eq=False)
class FaceMesh:
    """A triangle mesh: ``vertices`` ``(V, 3)`` (+x image right, +y up, +z towards the viewer)
    and ``triangles`` ``(T, 3)`` 0-based vertex indices."""

    vertices: np.ndarray
    triangles: np.ndarray

    def landmarks5(self) -> np.ndarray:
        """``(5, 3)`` model points in the detector's landmark order."""
        return np.stack([self.vertices[list(idx)].mean(0) for idx in LANDMARK_VERTICES])

    def mirror_index(self) -> np.ndarray:
        """For each vertex, the vertex at its mirror position (``x -> -x``)."""
        mirrored = self.vertices * np.array([-1.0, 1.0, 1.0])
        d = ((self.vertices[None] - mirrored[:, None]) ** 2).sum(-1)
        return d.argmin(1)

    def scaled(self, sx: float = 1.0, sy: float = 1.0, sz: float = 1.0) -> FaceMesh:
        return FaceMesh(self.vertices * np.array([sx, sy, sz]), self.triangles)


def _read_obj(text: str) -> FaceMesh:
    verts, tris = [], []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "v":
            verts.append([float(v) for v in parts[1:4]])
        elif parts[0] == "f":
            if len(parts) != 4:
                raise ValueError(f"only triangles are supported, got {line!r}")
            tris.append([int(p.split("/")[0]) - 1 for p in parts[1:4]])
    vertices, triangles = np.array(verts, dtype=np.float64), np.array(tris, dtype=np.int64)
    if vertices.ndim != 2 or len(vertices) == 0 or len(triangles) == 0:
        raise ValueError("mesh has no vertices or no triangles")
    if triangles.min() < 0 or triangles.max() >= len(vertices):
        raise ValueError("mesh triangle refers to a missing vertex")
    return FaceMesh(vertices, triangles)


@functools.lru_cache(maxsize=4)
def load_face_mesh(path: str | Path | None = None) -> FaceMesh:
    """The canonical face mesh (default: the vendored MediaPipe mesh), as stored."""
    if path is None:
        text = resources.files("facemodels.frontalizer").joinpath("assets", MESH_ASSET).read_text()
    else:
        text = Path(path).read_text()
    return _read_obj(text)


def _frontal_uv(points: np.ndarray) -> np.ndarray:
    """Frontal orthographic projection with the image's y axis (down)."""
    return np.stack([points[..., 0], -points[..., 1]], -1)


def template_y_scale(mesh: FaceMesh) -> float:
    """Vertical scale that makes the mesh's frontal five points fit the FER template best.

    Least squares, x and y separately (``T_x = a·x + b``, ``T_y = c·(-y) + d``); returns ``c / a``.
    """
    q = _frontal_uv(mesh.landmarks5())
    ones = np.ones(5)
    a = np.linalg.lstsq(np.c_[q[:, 0], ones], FER_TEMPLATE_48[:, 0], rcond=None)[0][0]
    c = np.linalg.lstsq(np.c_[q[:, 1], ones], FER_TEMPLATE_48[:, 1], rcond=None)[0][0]
    return float(c / a)


# --------------------------------------------------------------------------- pose


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


# --------------------------------------------------------------------------- frontal raster


@dataclass(frozen=True, eq=False)
class FrontalRaster:
    """The frontal mesh as seen in the ``size`` x ``size`` output (pixel centres at integers).

    Attributes:
        points: ``(S, S, 3)`` float32 mesh point shown at each pixel (0 outside the mask; eye
            holes filled by interpolation).
        normals: ``(S, S, 3)`` float32 unit surface normals there.
        mask: ``(S, S)`` bool, the face (mesh coverage with its holes filled).
        alpha: ``(S, S)`` float32, the mask feathered over :data:`FEATHER_PX` pixels.
        mirror_pixel: ``(S, S, 2)`` float32 ``(x, y)`` of each pixel's mirror point.
        scale: output pixels per mesh unit; ``centre``: where the mesh origin lands ``(x, y)``.
        occluders: ``(M, 3)`` float32 dense surface samples for the occlusion test.
    """

    size: int
    points: np.ndarray
    normals: np.ndarray
    mask: np.ndarray
    alpha: np.ndarray
    mirror_pixel: np.ndarray
    scale: float
    centre: np.ndarray
    occluders: np.ndarray


def _vertex_normals(v: np.ndarray, tri: np.ndarray) -> np.ndarray:
    fn = np.cross(v[tri[:, 1]] - v[tri[:, 0]], v[tri[:, 2]] - v[tri[:, 0]])  # 2 x area
    if fn[:, 2].sum() < 0:  # orient towards the viewer
        fn = -fn
    vn = np.zeros_like(v)
    for k in range(3):
        np.add.at(vn, tri[:, k], fn)
    return vn / np.linalg.norm(vn, axis=1, keepdims=True).clip(1e-12)


def _fill_holes(values: np.ndarray, known: np.ndarray, holes: np.ndarray, iters: int = 400) -> np.ndarray:
    """Harmonic fill of ``values`` (H, W, C) on ``holes`` from the ``known`` pixels around them."""
    out = values.copy()
    if not holes.any():
        return out
    ring = known & (cv2.dilate(holes.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0)
    out[holes] = values[ring].mean(0)
    kernel = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], np.float32) / 4
    for _ in range(iters):
        smooth = cv2.filter2D(out, -1, kernel, borderType=cv2.BORDER_REPLICATE)
        out[holes] = smooth[holes]
    return out


def _occluder_samples(v: np.ndarray, tri: np.ndarray, px_per_unit: float) -> np.ndarray:
    """Barycentric lattice points on every triangle, at most :data:`OCCLUDER_SPACING` px apart."""
    corners = v[tri]  # (T, 3, 3)
    edges = np.linalg.norm(corners - np.roll(corners, 1, axis=1), axis=2).max(1) * px_per_unit
    m = np.maximum(1, np.ceil(edges / OCCLUDER_SPACING)).astype(int)
    out = []
    for mm in np.unique(m):
        i, j = np.meshgrid(np.arange(mm + 1), np.arange(mm + 1), indexing="ij")
        keep = i + j <= mm
        bary = np.stack([mm - i[keep] - j[keep], i[keep], j[keep]], 1) / mm  # (L, 3)
        out.append(np.einsum("lk,tkc->tlc", bary, corners[m == mm]).reshape(-1, 3))
    return np.unique(np.concatenate(out).round(6), axis=0).astype(np.float32)


def rasterize_frontal(mesh: FaceMesh, size: int) -> FrontalRaster:
    """Rasterise ``mesh`` (already calibrated) frontally into the FER framing at ``size``.

    The placement (scale and shift, no rotation) fits the mesh's five frontal points to the FER
    template scaled to ``size`` by least squares.
    """
    v, tri = mesh.vertices, mesh.triangles
    q5, tmpl = _frontal_uv(mesh.landmarks5()), template_for(size)
    qc = q5 - q5.mean(0)
    scale = float((qc * (tmpl - tmpl.mean(0))).sum() / (qc**2).sum())
    centre = tmpl.mean(0) - scale * q5.mean(0)
    uv = scale * _frontal_uv(v) + centre  # (V, 2) output pixels
    normals = _vertex_normals(v, tri)

    ys, xs = np.mgrid[:size, :size]
    pix = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)  # (P, 2)
    best_z = np.full(len(pix), -np.inf)
    point = np.zeros((len(pix), 3))
    normal = np.zeros((len(pix), 3))
    for s in range(0, len(tri), 128):
        t = tri[s:s + 128]
        a, b, c = uv[t[:, 0]], uv[t[:, 1]], uv[t[:, 2]]  # (B, 2)
        v0, v1 = b - a, c - a
        den = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
        ok = np.abs(den) > 1e-9
        t, a, v0, v1, den = t[ok], a[ok], v0[ok], v1[ok], den[ok]
        v2 = pix[None] - a[:, None]  # (B, P, 2)
        l1 = (v2[..., 0] * v1[:, None, 1] - v1[:, None, 0] * v2[..., 1]) / den[:, None]
        l2 = (v0[:, None, 0] * v2[..., 1] - v2[..., 0] * v0[:, None, 1]) / den[:, None]
        l0 = 1 - l1 - l2
        bary = np.stack([l0, l1, l2], -1)  # (B, P, 3)
        inside = (bary >= -1e-9).all(-1)
        z = (bary * v[t][:, None, :, 2]).sum(-1)
        z = np.where(inside, z, -np.inf)
        k = z.argmax(0)
        zk = z[k, np.arange(len(pix))]
        better = zk > best_z
        if better.any():
            cols = np.nonzero(better)[0]
            bk, tk = bary[k[cols], cols], t[k[cols]]
            best_z[cols] = zk[cols]
            point[cols] = np.einsum("pk,pkc->pc", bk, v[tk])
            normal[cols] = np.einsum("pk,pkc->pc", bk, normals[tk])
    covered = np.isfinite(best_z).reshape(size, size)
    outside = covered.astype(np.uint8).copy()
    flood = np.zeros((size + 2, size + 2), np.uint8)
    cv2.floodFill(outside, flood, (0, 0), 2)  # the corner is background: the face is centred
    mask = outside != 2
    holes = mask & ~covered
    point = _fill_holes(point.reshape(size, size, 3).astype(np.float32), covered, holes)
    normal = _fill_holes(normal.reshape(size, size, 3).astype(np.float32), covered, holes)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True).clip(1e-12)
    point[~mask], normal[~mask] = 0.0, 0.0
    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    alpha = np.clip(dist / FEATHER_PX, 0.0, 1.0).astype(np.float32)
    mirror = np.stack([2 * centre[0] - xs, ys.astype(np.float64)], -1).astype(np.float32)
    return FrontalRaster(size=size, points=point, normals=normal, mask=mask, alpha=alpha,
                         mirror_pixel=mirror, scale=scale, centre=centre,
                         occluders=_occluder_samples(v, tri, scale))


# --------------------------------------------------------------------------- visibility


def _turn(points: np.ndarray, yaw_deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(yaw_deg)), math.sin(math.radians(yaw_deg))
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    return np.stack([x * c + z * s, y, -x * s + z * c], -1)


def _visibility(raster: FrontalRaster, yaw: float) -> np.ndarray:
    """Soft visibility ``(S, S)`` in [0, 1] of each output pixel's point at ``yaw`` (0 outside)."""
    px = raster.scale
    occ = _turn(raster.occluders, yaw) * px
    pts = _turn(raster.points[raster.mask], yaw) * px
    nz = _turn(raster.normals[raster.mask], yaw)[:, 2]
    lo = np.floor(np.minimum(occ[:, :2].min(0), pts[:, :2].min(0))) - 1
    shape = (np.ceil(np.maximum(occ[:, :2].max(0), pts[:, :2].max(0)) - lo) + 2).astype(int)
    ob = np.floor(occ[:, :2] - lo).astype(np.int64)
    zbuf = torch.full((int(shape[0] * shape[1]),), -torch.inf, dtype=torch.float32).scatter_reduce(
        0, torch.from_numpy(ob[:, 1] * shape[0] + ob[:, 0]), torch.from_numpy(occ[:, 2].astype(np.float32)),
        reduce="amax").numpy()
    pb = np.floor(pts[:, :2] - lo).astype(np.int64)
    gap = zbuf[pb[:, 1] * shape[0] + pb[:, 0]] - pts[:, 2]  # how far the front-most surface is ahead
    # on a steep surface the depth varies by |tan| per pixel inside one bin: allow for it
    slope = np.sqrt(np.clip(1 - nz**2, 0, 1)) / np.clip(nz, 0.1, None)
    slack = DEPTH_SLACK + 1.5 * np.minimum(slope, 5.0)
    v_depth = np.clip(1 - (gap - slack) / DEPTH_RAMP, 0, 1)
    v_normal = np.clip(nz / NORMAL_RAMP, 0, 1)
    out = np.zeros(raster.mask.shape, np.float32)
    out[raster.mask] = v_depth * v_normal
    # a 3x3 mean over the face's own pixels softens the edges of hidden regions
    inside = raster.mask.astype(np.float32)
    out = cv2.blur(out, (3, 3), borderType=cv2.BORDER_CONSTANT) / cv2.blur(
        inside, (3, 3), borderType=cv2.BORDER_CONSTANT).clip(1e-6)
    return np.where(raster.mask, out, 0.0).astype(np.float32)


# --------------------------------------------------------------------------- the warp


@dataclass(frozen=True)
class WarpOutput:
    """What :meth:`MeshWarp.warp` computed: the faces and how."""

    faces: Tensor  # uint8 (N, S, S) or (N, S, S, C)
    pose: WeakPerspectivePose
    own_weight: Tensor  # float (N, S, S): w, the share of the own sample inside the mask (1 outside)
    visibility: Tensor  # float (N, S, S): v_own


def _normalised(grid: Tensor, h: int, w: int) -> Tensor:
    """Pixel-centre coordinates ``(x, y)`` -> ``grid_sample``'s [-1, 1] (``align_corners=False``)."""
    scale = torch.tensor([2.0 / w, 2.0 / h], dtype=grid.dtype)
    return (grid + 0.5) * scale - 1.0


class MeshWarp:
    """Warp-only frontaliser into the frontaliser's ``size`` x ``size`` FER framing.

    ``MeshWarp().frontalize(images, landmarks)``: uint8 faces ``(N, H, W)`` (or ``(N, H, W, C)``)
    with the detector's five landmarks ``(N, 5, 2)`` in their pixels -> uint8 ``(N, S, S)``
    frontal faces (numpy in, numpy out; a tensor in, a CPU tensor out). It runs on the CPU. The
    raster is made on first use (about 0.5 s) and the visibility once per yaw (0.5° steps, about
    10 ms each); after that about 1 ms per face on one thread. Images of one call share a size:
    a crop per face, or the same photo repeated for several faces.
    """

    def __init__(self, size: int | None = None, *, mesh: FaceMesh | None = None) -> None:
        self.size = int(size if size is not None else default_cfg().image_size)
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
        pose = self.fit(lm, yaw=yaw)
        own, mirror, background = self.grids(pose)
        vis = self.visibility(pose.yaw)
        vis_m = self.visibility(-pose.yaw)  # the mirror point at yaw = the own point at -yaw
        weight = 1.0 - (1.0 - vis) * vis_m
        weight = np.where(self.raster.mask, weight, 1.0).astype(np.float32)
        grid = torch.from_numpy(np.concatenate([own, mirror, background], 1).astype(np.float32))
        src = x.permute(0, 3, 1, 2).float()
        # shrink heavily downscaled faces first (area averaging), like facemodels.face.align.warp_face
        factor = np.maximum(1, np.floor(pose.scale / self.raster.scale)).astype(int)
        out = torch.empty(n, ch, 3 * s, s)
        for k in np.unique(factor):
            idx = torch.from_numpy(np.nonzero(factor == k)[0])
            img, g = src[idx], grid[idx]
            if k > 1:
                img = F.avg_pool2d(img, int(k), ceil_mode=True)
                g = (g + 0.5) / int(k) - 0.5
            out[idx] = F.grid_sample(img, _normalised(g, img.shape[2], img.shape[3]), mode="bilinear",
                                     padding_mode="border", align_corners=False)
        own_px, mirror_px, bg_px = out[:, :, :s], out[:, :, s:2 * s], out[:, :, 2 * s:]
        wt = torch.from_numpy(weight)[:, None]
        alpha = torch.from_numpy(self.raster.alpha)[None, None]
        face = wt * own_px + (1 - wt) * mirror_px
        result = (alpha * face + (1 - alpha) * bg_px).round().clamp(0, 255).to(torch.uint8)
        result = result.permute(0, 2, 3, 1)
        if gray:
            result = result[..., 0]
        return WarpOutput(faces=result.contiguous(), pose=pose, own_weight=torch.from_numpy(weight),
                          visibility=torch.from_numpy(vis))

    def frontalize(self, images: np.ndarray | Tensor, landmarks: np.ndarray) -> np.ndarray | Tensor:
        """uint8 faces ``(N, H, W)`` + their five landmarks ``(N, 5, 2)`` -> uint8 ``(N, S, S)``.

        The output is in the frontaliser's framing (the FER framing at ``S``; resize to 48 for
        the expression classifiers). Returns numpy for numpy input, else a tensor.
        """
        faces = self.warp(images, landmarks).faces
        return faces.numpy() if isinstance(images, np.ndarray) else faces
