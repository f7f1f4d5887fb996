"""The warp-only frontaliser's output side: the frontal mesh rasterised once (z-buffer) into the
``size`` x ``size`` FER framing (per pixel the 3D point it shows, its normal, the face mask with
the eye holes filled), and the soft visibility of those points when the face is turned by a yaw
(back-facing, or behind another part of the face by a splatted z-buffer of the turned mesh)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from facemodels.face.align import template_for
from facemodels.frontalizer.mesh import FaceMesh, _frontal_uv

__all__ = ["FEATHER_PX", "FrontalRaster", "rasterize_frontal"]

#: A point is fully visible when its turned normal's z is at least this (soft below).
NORMAL_RAMP = 0.2
#: Occlusion test: depth slack (output pixels) before a point counts as hidden, and the ramp.
DEPTH_SLACK, DEPTH_RAMP = 1.0, 2.0
#: Surface samples for the occlusion z-buffer: at most this far apart (output pixels).
OCCLUDER_SPACING = 0.5
#: The face mask is feathered over this many output pixels.
FEATHER_PX = 2.0


@dataclass(frozen=True, eq=False)
class FrontalRaster:
    """The frontal mesh as seen in the ``size`` x ``size`` output (pixel centres at integers).

    Attributes:
        points: ``(S, S, 3)`` float32 mesh point shown at each pixel (0 outside the mask; eye
            holes filled by interpolation).
        normals: ``(S, S, 3)`` float32 unit surface normals there.
        mask: ``(S, S)`` bool, the face (mesh coverage with its holes filled).
        alpha: ``(S, S)`` float32, the mask feathered over :data:`FEATHER_PX` pixels.
        scale: output pixels per mesh unit; ``centre``: where the mesh origin lands ``(x, y)``.
        occluders: ``(M, 3)`` float32 dense surface samples for the occlusion test.
    """

    size: int
    points: np.ndarray
    normals: np.ndarray
    mask: np.ndarray
    alpha: np.ndarray
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
    return FrontalRaster(size=size, points=point, normals=normal, mask=mask, alpha=alpha, scale=scale,
                         centre=centre, occluders=_occluder_samples(v, tri, scale))


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
