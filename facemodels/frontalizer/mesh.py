"""The warp-only frontaliser's 3D face: MediaPipe's canonical face mesh (vendored in ``assets/``,
Apache-2.0), which of its vertices our detector's five landmarks are, and the vertical scale
that makes its frontal five points fit the FER template (:func:`template_y_scale`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from facemodels.face.align import FER_TEMPLATE_48

__all__ = [
    "EYE_CONTOURS",
    "LANDMARK_VERTICES",
    "MESH_ASSET",
    "MOUTH_CORNER_VERTICES",
    "NOSE_TIP_VERTEX",
    "FaceMesh",
    "load_face_mesh",
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
