"""The refiner's data: faces with five landmarks, cached detections, and the three streams.

Issue #12, section 2. Every face is a 64x64 uint8 *source* with the serving detector's five
landmarks in its pixels (FER2013's 48x48 faces are padded to 64 by edge replication, which
samples exactly like the 48x48 face with border padding):

* **CFP** ids 001-450 only (never 451-500): 64x64 crops of :func:`training.data.cfp.load_cfp`,
  landmarks from the detector on the full photo (:func:`training.gan.warp_eval.cfp_crop_landmarks`).
  Ids 426-450 (``val_ids``) are held out of training for checkpoint selection.
* **FER2013 Training** only (never PublicTest): a seeded sample, landmarks from
  :func:`training.data.aligned_views.detect_face_landmarks`; the near-frontal ones
  (``|estimate_yaw| < near_frontal_yaw``) are used, a seeded few held out for selection.

Detections are cached as ``.npz`` under the datasets cache (CFP about 3 min for 6,300 photos,
FER2013 about 27 ms a face, both on one busy thread; measured 2026-12-02), FER incrementally.

The streams (:class:`RefinerStreams`): 1. rotate-and-render (:class:`RotateRenderer`): a frontal
face textured onto a randomly perturbed mean mesh, turned to a random yaw, re-framed, with
landmark jitter and photometric change; its target is the original, 2D-aligned into the output
framing (:func:`aligned_targets`). 2. real CFP profiles (no pixel target). 3. near-frontal faces
as they are (target: themselves, aligned).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from facemodels.atomic import save_npz_atomically
from facemodels.face.pose import estimate_yaw, flip_pose
from facemodels.face.pose_framing import FaceAnchors, pose_framing_matrix
from facemodels.frontalizer.warp import MeshWarp, sample_input
from training.data.aligned_views import detect_face_landmarks
from training.data.cfp import CfpDataset
from training.gan.warp_eval import cfp_crop_landmarks

__all__ = [
    "FacePool",
    "RefinerData",
    "RefinerStreams",
    "RenderConfig",
    "RotateRenderer",
    "StreamBatch",
    "ValSet",
    "aligned_targets",
    "build_refiner_data",
    "cached_cfp_landmarks",
    "cached_fer_landmarks",
    "flip_faces",
    "pad_to",
]

log = logging.getLogger(__name__)

SOURCE_SIZE = 64
LANDMARKS_VERSION = 1
#: Detector order: image-left eye, image-right eye, nose, image-left and image-right mouth corner.
_FLIP_ORDER = [1, 0, 2, 4, 3]


# --------------------------------------------------------------------------- landmark caches


def _read_npz(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.warning("ignoring unreadable landmark cache %s (%s)", path, e)
        return None


def cached_cfp_landmarks(data: CfpDataset, detector: Callable[[], Any], cache_dir: Path) -> np.ndarray:
    """Five landmarks per CFP crop ``(N, 5, 2)`` (NaN where none), cached by the crops' fingerprint."""
    key = hashlib.sha256(f"cfp-lm-v{LANDMARKS_VERSION}-{data.fingerprint}".encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"cfp{data.size}-landmarks-{key}.npz"
    if path.is_file():
        got = _read_npz(path, ["landmarks"])
        if got is not None and got["landmarks"].shape == (len(data), 5, 2):
            return got["landmarks"]
    started = time.perf_counter()
    lm = cfp_crop_landmarks(data, detector())
    log.info("CFP landmarks: %d photos in %.0f s (%d without a face); cached in %s", len(data),
             time.perf_counter() - started, int((~np.isfinite(lm).all((1, 2))).sum()), path)
    save_npz_atomically(path, landmarks=lm)
    return lm


def cached_fer_landmarks(faces: np.ndarray, wanted: np.ndarray, detector: Callable[[], Any], cache_dir: Path,
                         fingerprint: str, *, chunk: int = 512) -> np.ndarray:
    """Landmarks ``(N, 5, 2)`` of the faces at indices ``wanted`` (NaN elsewhere or where none was
    found). The cache keeps every face detected so far, so a larger ``wanted`` adds to it; it is
    saved after every ``chunk`` faces, so an interrupted detection keeps its progress."""
    key = hashlib.sha256(f"fer-lm-v{LANDMARKS_VERSION}-{fingerprint}".encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"fer-landmarks-{key}.npz"
    lm, done = np.full((len(faces), 5, 2), np.nan), np.zeros(len(faces), bool)
    if path.is_file():
        got = _read_npz(path, ["landmarks", "done"])
        if got is not None and got["landmarks"].shape == lm.shape:
            lm, done = got["landmarks"], got["done"]
    todo = np.asarray(wanted)[~done[wanted]]
    if len(todo):
        log.info("FER2013 landmarks: detecting %d faces (about 27 ms each on one thread)", len(todo))
        det, started = detector(), time.perf_counter()
        for s in range(0, len(todo), chunk):
            idx = todo[s:s + chunk]
            found = detect_face_landmarks(faces[idx], det)
            lm[idx] = np.stack([np.full((5, 2), np.nan) if p is None else np.asarray(p, float)
                                for p in found])
            done[idx] = True
            save_npz_atomically(path, landmarks=lm, done=done)
        log.info("FER2013 landmarks: %d faces in %.0f s; cached in %s", len(todo),
                 time.perf_counter() - started, path)
    out = np.full_like(lm, np.nan)
    out[wanted] = lm[wanted]
    return out


# --------------------------------------------------------------------------- pools


@dataclass(frozen=True, eq=False)
class FacePool:
    """Faces as 64x64 sources.

    Attributes:
        images: uint8 ``(N, 64, 64)``.
        landmarks: float64 ``(N, 5, 2)`` in those pixels (all finite).
        person: int64 ``(N,)`` CFP person id, -1 for FER2013 faces.
        identity: int64 ``(N,)`` identity class (training ids only), else -1.
        pose: int64 ``(N,)`` 0 frontal, 1 left, 2 right profile (as seen).
    """

    images: Tensor
    landmarks: np.ndarray
    person: Tensor
    identity: Tensor
    pose: Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: Tensor | np.ndarray) -> FacePool:
        idx = torch.as_tensor(np.asarray(index))
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        return FacePool(self.images[idx], self.landmarks[idx.numpy()], self.person[idx], self.identity[idx],
                        self.pose[idx])

    @staticmethod
    def concat(pools: Sequence[FacePool]) -> FacePool:
        return FacePool(torch.cat([p.images for p in pools]), np.concatenate([p.landmarks for p in pools]),
                        torch.cat([p.person for p in pools]), torch.cat([p.identity for p in pools]),
                        torch.cat([p.pose for p in pools]))


@dataclass(frozen=True, eq=False)
class RefinerData:
    """Training pools (``frontal``: CFP frontals and near-frontal FER2013 faces; ``profile``: CFP
    profiles) and the held-out selection pools (CFP ``val_ids``, held-out FER2013 Training faces)."""

    frontal: FacePool
    profile: FacePool
    val_frontal_cfp: FacePool
    val_profile: FacePool
    val_frontal_fer: FacePool
    id_list: tuple[int, ...]  # identity class -> CFP id

    @property
    def num_identities(self) -> int:
        return len(self.id_list)

    def describe(self) -> str:
        fer = int((self.frontal.person < 0).sum())
        return (f"train: {len(self.frontal) - fer} CFP frontals + {fer} FER2013 near-frontal faces, "
                f"{len(self.profile)} CFP profiles of {self.num_identities} ids; held out: "
                f"{len(self.val_frontal_cfp)} frontals + {len(self.val_profile)} profiles of CFP ids, "
                f"{len(self.val_frontal_fer)} FER2013 Training faces")


def pad_to(faces: Tensor, landmarks: np.ndarray, size: int = SOURCE_SIZE) -> tuple[Tensor, np.ndarray]:
    """Centre uint8 faces ``(N, s, s)`` in ``size`` squares by edge replication; shift the landmarks."""
    s = faces.shape[-1]
    if s == size:
        return faces, landmarks
    lo = (size - s) // 2
    hi = size - s - lo
    padded = F.pad(faces[:, None].float(), (lo, hi, lo, hi), mode="replicate")[:, 0].to(torch.uint8)
    return padded, landmarks + lo


def build_refiner_data(cfp: CfpDataset, cfp_landmarks: np.ndarray, fer_faces: Tensor,
                       fer_landmarks: np.ndarray,
                       *, val_ids: range = range(426, 451), fer_val: int = 300,
                       near_frontal_yaw: float = 20.0, seed: int = 0) -> RefinerData:
    """Pools from CFP crops (training ids 001-450 only) and FER2013 *Training* faces.

    Faces without landmarks are dropped. ``fer_val`` near-frontal FER faces (seeded) are held out.

    Raises:
        ValueError: when CFP holds evaluation ids (451-500) or nothing is left to train on.
    """
    if len(cfp) and int(cfp.identity.max()) > 450:
        raise ValueError("the refiner trains on CFP ids 001-450 only; pass data.split('train')")
    ok = np.isfinite(cfp_landmarks).all((1, 2))
    cfp_images, cfp_lm = cfp.images[torch.from_numpy(ok)], cfp_landmarks[ok]
    person, pose = cfp.identity[torch.from_numpy(ok)], cfp.pose[torch.from_numpy(ok)]
    is_val = torch.tensor([int(p) in val_ids for p in person.tolist()], dtype=torch.bool)
    id_list = tuple(sorted(set(person[~is_val].tolist())))
    lookup = {pid: c for c, pid in enumerate(id_list)}
    identity = torch.tensor([lookup.get(int(p), -1) for p in person.tolist()], dtype=torch.long)
    cfp_pool = FacePool(cfp_images, cfp_lm, person, identity, pose)

    fer_ok = np.isfinite(fer_landmarks).all((1, 2))
    near = np.zeros(len(fer_faces), bool)
    near[fer_ok] = np.abs(estimate_yaw(fer_landmarks[fer_ok])) < near_frontal_yaw
    idx = np.nonzero(near)[0]
    faces, lm = pad_to(fer_faces[torch.from_numpy(idx)], fer_landmarks[idx])
    n = len(idx)
    unknown = torch.full((n,), -1)
    fer_pool = FacePool(faces, lm, unknown, unknown.clone(), torch.zeros(n, dtype=torch.long))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    held = np.zeros(n, bool)
    held[order[:min(fer_val, n // 2)]] = True

    frontal = (cfp_pool.pose == 0).numpy()
    data = RefinerData(
        frontal=FacePool.concat([cfp_pool.subset(frontal & ~is_val.numpy()), fer_pool.subset(~held)]),
        profile=cfp_pool.subset(~frontal & ~is_val.numpy()),
        val_frontal_cfp=cfp_pool.subset(frontal & is_val.numpy()),
        val_profile=cfp_pool.subset(~frontal & is_val.numpy()),
        val_frontal_fer=fer_pool.subset(held), id_list=id_list)
    if len(data.frontal) == 0 or len(data.profile) == 0:
        raise ValueError(f"nothing to train the refiner on ({data.describe()})")
    return data


# --------------------------------------------------------------------------- geometry helpers


def flip_faces(images: Tensor, landmarks: np.ndarray, flip: np.ndarray) -> tuple[Tensor, np.ndarray]:
    """Mirror the faces where ``flip``; landmarks follow (x -> W - 1 - x, left and right swap)."""
    flip = np.asarray(flip, bool)
    if not flip.any():
        return images, landmarks
    images, landmarks = images.clone(), landmarks.copy()
    f = torch.from_numpy(flip)
    images[f] = images[f].flip(-1)
    mirrored = landmarks[flip][:, _FLIP_ORDER]
    mirrored[..., 0] = images.shape[-1] - 1 - mirrored[..., 0]
    landmarks[flip] = mirrored
    return images, landmarks


def aligned_targets(warp: MeshWarp, sources: Tensor, landmarks: np.ndarray) -> Tensor:
    """The sources 2D-aligned into the output framing: the mean mesh's five points fitted at yaw
    0 (scale, roll, shift), the plane warp of :meth:`MeshWarp.grids`. Float ``(N, 1, S, S)`` 0..255."""
    pose = warp.fit(landmarks, yaw=np.zeros(len(landmarks)))
    _, _, background = warp.grids(pose)
    factor = np.maximum(1, np.floor(pose.scale / warp.raster.scale)).astype(int)
    return sample_input(sources[:, None].float(), torch.from_numpy(background.astype(np.float32)), factor)


def _similarity(q: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Least-squares 2D similarity ``(N, 2, 3)`` from points ``q`` onto ``p`` (both ``(N, K, 2)``)."""
    qm, pm = q.mean(1, keepdims=True), p.mean(1, keepdims=True)
    qc, pc = q - qm, p - pm
    qq = (qc**2).sum((1, 2))
    a = (qc * pc).sum((1, 2)) / qq
    b = (qc[..., 0] * pc[..., 1] - qc[..., 1] * pc[..., 0]).sum(1) / qq
    rot = np.stack([np.stack([a, -b], -1), np.stack([b, a], -1)], 1)  # (N, 2, 2)
    t = pm[:, 0] - np.einsum("nij,nj->ni", rot, qm[:, 0])
    return np.concatenate([rot, t[..., None]], 2)


def _apply(m: np.ndarray | Tensor, pts: np.ndarray | Tensor) -> Any:
    """Affine ``(N, 2, 3)`` applied to points ``(N, K, 2)``."""
    lin = m[:, :, :2].transpose(1, 2) if isinstance(m, Tensor) else m[:, :, :2].transpose(0, 2, 1)
    return pts @ lin + m[:, None, :, 2]


# --------------------------------------------------------------------------- rotate and render


@dataclass(frozen=True)
class RenderConfig:
    """Random ranges of the rotate-and-render stream (uniform; degrees, scale factors, pixels).

    The mesh is perturbed in width, height, depth (about the eyes' depth) and, with a smooth
    weight around the nose, in nose depth and width; the render adds pitch and roll the warp
    does not model, a re-framing jitter, landmark noise (in eye-mouth distances) and photometric
    change (contrast, brightness, gamma and blur, applied to the target too; pixel noise, input only).
    """

    max_yaw: float = 85.0
    max_pitch: float = 10.0
    max_roll: float = 8.0
    width: tuple[float, float] = (0.9, 1.1)
    height: tuple[float, float] = (0.95, 1.05)
    depth: tuple[float, float] = (0.8, 1.25)
    nose_depth: tuple[float, float] = (0.75, 1.35)
    nose_width: tuple[float, float] = (0.85, 1.2)
    scale: tuple[float, float] = (0.92, 1.08)
    shift_px: float = 1.5
    jitter: float = 0.03
    contrast: tuple[float, float] = (0.75, 1.25)
    brightness: float = 20.0
    gamma: tuple[float, float] = (0.8, 1.25)
    blur_p: float = 0.3
    noise: float = 3.0
    depth_slack_px: float = 2.0


@dataclass(frozen=True)
class Rendered:
    images: Tensor  # uint8 (N, S, S), the face turned
    landmarks: np.ndarray  # (N, 5, 2) the jittered landmarks of the turned face
    targets: Tensor  # float (N, 1, S, S) 0..255, the original 2D-aligned into the output framing
    yaw: np.ndarray  # (N,) degrees


class RotateRenderer:
    """Renders frontal sources to random yaws with a perturbed mean mesh (point splatting with a
    z-buffer over the mesh's dense surface samples, a turned background plane behind it)."""

    def __init__(self, warp: MeshWarp, config: RenderConfig | None = None) -> None:
        self.warp, self.config, self.size = warp, config or RenderConfig(), warp.size
        self.points = torch.from_numpy(warp.raster.occluders.astype(np.float32))  # 0.5 px apart
        self.model5 = warp.model_points
        self.z0 = float(self.model5[:2, 2].mean())  # depth is scaled about the eyes' depth
        self.nose = (0.0, float(self.model5[2, 1]) + 0.7)
        eye_gap = float(self.model5[1, 0] - self.model5[0, 0])
        self.nose_sigma = (0.19 * eye_gap, 0.3 * eye_gap)

    def _perturb(self, pts: Tensor, p: dict[str, Tensor]) -> Tensor:
        """Points ``(K, 3)`` or ``(B, K, 3)`` -> ``(B, K, 3)`` under each face's shape parameters."""
        x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
        wn = torch.exp(-0.5 * ((x - self.nose[0]) / self.nose_sigma[0]) ** 2
                       - 0.5 * ((y - self.nose[1]) / self.nose_sigma[1]) ** 2)
        c = {k: v[:, None].to(pts.dtype) for k, v in p.items()}
        return torch.stack([x * c["sx"] * (1 + (c["kw"] - 1) * wn), y * c["sy"],
                            self.z0 + (z - self.z0) * c["sz"] * (1 + (c["kn"] - 1) * wn)], -1)

    @staticmethod
    def _turn(pts: Tensor, yaw: Tensor, pitch: Tensor) -> Tensor:
        """Pitch about x, then yaw about y (nose to the image's right for yaw > 0)."""
        cy, sy = torch.cos(yaw)[:, None], torch.sin(yaw)[:, None]
        cp, sp = torch.cos(pitch)[:, None], torch.sin(pitch)[:, None]
        x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
        y1, z1 = y * cp - z * sp, y * sp + z * cp
        return torch.stack([x * cy + z1 * sy, y1, -x * sy + z1 * cy], -1)

    def _framing(self, q5: np.ndarray, yaw_deg: np.ndarray, roll: np.ndarray, scale: np.ndarray,
                 shift: np.ndarray) -> np.ndarray:
        """``(B, 2, 3)``: turned 2D mesh coordinates -> the pose-aware crop, then roll, scale, shift
        about the crop centre."""
        s, c = self.size, (self.size - 1) / 2
        out = []
        for k in range(len(q5)):
            eye, mouth = q5[k, :2].mean(0), q5[k, 3:].mean(0)
            anchors = FaceAnchors(tuple(eye), tuple(mouth), tuple(q5[k, 2]))
            m = pose_framing_matrix(anchors, yaw=float(yaw_deg[k]), size=s)
            r = math.radians(float(roll[k]))
            rot = scale[k] * np.array([[math.cos(r), -math.sin(r)], [math.sin(r), math.cos(r)]])
            a = rot @ m[:, :2]
            t = rot @ (m[:, 2] - c) + c + shift[k]
            out.append(np.concatenate([a, t[:, None]], 1))
        return np.stack(out)

    def render(self, sources: Tensor, landmarks: np.ndarray, generator: torch.Generator,
               *, yaw: np.ndarray | None = None) -> Rendered:
        """Render uint8 frontal sources ``(B, S, S)`` with their landmarks to random yaws (or to
        ``yaw``, degrees per face; the other draws are the same)."""
        cfg, b, s = self.config, len(sources), self.size

        def u(lo: float, hi: float) -> Tensor:
            return lo + (hi - lo) * torch.rand(b, generator=generator, dtype=torch.float64)

        shape = {"sx": u(*cfg.width), "sy": u(*cfg.height), "sz": u(*cfg.depth), "kn": u(*cfg.nose_depth),
                 "kw": u(*cfg.nose_width)}
        yaw_deg, pitch_deg, roll = u(-cfg.max_yaw, cfg.max_yaw), u(-cfg.max_pitch, cfg.max_pitch), \
            u(-cfg.max_roll, cfg.max_roll)
        if yaw is not None:
            yaw_deg = torch.from_numpy(np.broadcast_to(np.asarray(yaw, np.float64), (b,)).copy())
        scale = u(*cfg.scale)
        shift = (torch.rand(b, 2, generator=generator, dtype=torch.float64) * 2 - 1) * cfg.shift_px
        jitter = u(0.0, cfg.jitter)
        photo = {"contrast": u(*cfg.contrast), "brightness": u(-cfg.brightness, cfg.brightness),
                 "gamma": u(*cfg.gamma), "blur": u(0.0, 1.0) < cfg.blur_p, "sigma": u(0.4, 0.9),
                 "noise": u(0.0, cfg.noise)}
        noise_lm = torch.randn(b, 5, 2, generator=generator, dtype=torch.float64)
        noise_px = torch.randn(b, s, s, generator=generator)

        # the face in the source: the perturbed mesh placed on the source's landmarks at yaw 0
        m5 = self._perturb(torch.from_numpy(self.model5), shape).numpy()  # (B, 5, 3)
        q5 = np.stack([m5[..., 0], -m5[..., 1]], -1)
        src_m = _similarity(q5, np.asarray(landmarks, np.float64))  # mesh (x, -y) -> source pixels
        true_lm = _apply(src_m, q5)  # where the mesh's own five points land in the source
        pts = self._perturb(self.points, shape).float()  # (B, K, 3)
        src_xy = _apply(torch.from_numpy(src_m).float(), torch.stack([pts[..., 0], -pts[..., 1]], -1))
        src = sources[:, None].float()
        tex = F.grid_sample(src, ((src_xy + 0.5) * (2.0 / sources.shape[-1]) - 1)[:, None], mode="bilinear",
                            padding_mode="border", align_corners=False)[:, 0, 0]  # (B, K)

        # turn and frame
        yaw, pitch = torch.deg2rad(yaw_deg), torch.deg2rad(pitch_deg)
        turned = self._turn(pts.double(), yaw, pitch)
        t5 = self._turn(torch.from_numpy(m5), yaw, pitch).numpy()
        frame = self._framing(np.stack([t5[..., 0], -t5[..., 1]], -1), yaw_deg.numpy(), roll.numpy(),
                              scale.numpy(), shift.numpy())
        uv = _apply(torch.from_numpy(frame), torch.stack([turned[..., 0], -turned[..., 1]], -1)).float()
        px = torch.from_numpy(np.sqrt(np.abs(np.linalg.det(frame[:, :, :2])))).float()
        depth = turned[..., 2].float() * px[:, None]
        face, covered = self._splat(uv, depth, tex)
        alpha = F.avg_pool2d(covered[:, None], 3, 1, 1, count_include_pad=False)[:, 0] * covered

        # background: a plane at the eyes' depth, turned by the yaw (pitch ignored), textured by the source
        ys, xs = torch.meshgrid(torch.arange(s, dtype=torch.float64), torch.arange(s, dtype=torch.float64),
                                indexing="ij")
        pix = torch.stack([xs.ravel(), ys.ravel()], -1).expand(b, -1, -1)
        inv = np.linalg.inv(np.concatenate([frame, np.tile([[[0.0, 0.0, 1.0]]], (b, 1, 1))], 1))[:, :2]
        q = _apply(torch.from_numpy(inv), pix)
        cos = torch.cos(yaw).clamp_min(0.25)[:, None]
        plane = torch.stack([(q[..., 0] - self.z0 * torch.sin(yaw)[:, None]) / cos, q[..., 1]], -1)
        bg_xy = _apply(torch.from_numpy(src_m), plane).float().reshape(b, s, s, 2)
        bg = F.grid_sample(src, (bg_xy + 0.5) * (2.0 / sources.shape[-1]) - 1, mode="bilinear",
                           padding_mode="border", align_corners=False)[:, 0]
        image = self._photometric(alpha * face + (1 - alpha) * bg, photo)
        image = image + noise_px * photo["noise"].float()[:, None, None]
        image = image.round().clamp(0, 255).to(torch.uint8)

        lm = _apply(frame, np.stack([t5[..., 0], -t5[..., 1]], -1))
        h = np.linalg.norm(lm[:, :2].mean(1) - lm[:, 3:].mean(1), axis=1)  # eye-mouth distance, px
        lm = lm + noise_lm.numpy() * (jitter.numpy() * h)[:, None, None]
        # the same photometric change (but no noise): G is not asked to guess the original exposure
        targets = self._photometric(aligned_targets(self.warp, sources, true_lm)[:, 0], photo)[:, None]
        return Rendered(images=image, landmarks=lm, targets=targets, yaw=yaw_deg.numpy())

    def _splat(self, uv: Tensor, depth: Tensor, tex: Tensor) -> tuple[Tensor, Tensor]:
        """Nearest-pixel splatting with a z-buffer; small holes filled from their neighbours."""
        b = depth.shape[0]
        s = self.size
        ui, vi = uv[..., 0].round().long(), uv[..., 1].round().long()
        inside = (ui >= 0) & (ui < s) & (vi >= 0) & (vi < s)
        dump = b * s * s
        flat = torch.where(inside, torch.arange(b)[:, None] * s * s + vi * s + ui, torch.full_like(ui, dump))
        zbuf = torch.full((dump + 1,), -torch.inf)
        zbuf = zbuf.scatter_reduce(0, flat.ravel(), depth.ravel(), reduce="amax")
        keep = inside & (depth >= zbuf[flat] - self.config.depth_slack_px)
        idx = flat[keep]
        total = torch.zeros(dump + 1).index_add_(0, idx, tex[keep])
        count = torch.zeros(dump + 1).index_add_(0, idx, torch.ones_like(tex[keep]))
        total, count = total[:dump].view(b, s, s), count[:dump].view(b, s, s)
        covered = (count > 0).float()
        face = total / count.clamp_min(1)
        ones = torch.ones(1, 1, 3, 3)
        for _ in range(2):  # close pinholes: a pixel with >= 5 covered neighbours takes their mean
            nb = F.conv2d(covered[:, None], ones, padding=1)[:, 0]
            val = F.conv2d((face * covered)[:, None], ones, padding=1)[:, 0]
            fill = (covered == 0) & (nb >= 5)
            face = torch.where(fill, val / nb.clamp_min(1), face)
            covered = torch.where(fill, torch.ones_like(covered), covered)
        return face, covered

    @staticmethod
    def _photometric(image: Tensor, p: dict[str, Tensor]) -> Tensor:
        """Contrast, brightness, gamma and an optional Gaussian blur of float ``(B, S, S)`` 0..255."""
        b = image.shape[0]
        x = image / 255.0
        contrast, brightness = p["contrast"].float()[:, None, None], p["brightness"].float()[:, None, None]
        x = (x - 0.5) * contrast + 0.5 + brightness / 255
        x = x.clamp(0, 1) ** p["gamma"].float()[:, None, None]
        if bool(p["blur"].any()):
            r = torch.arange(-2, 3, dtype=torch.float32)
            k1 = torch.exp(-0.5 * (r[None] / p["sigma"].float()[:, None]) ** 2)
            k1 = k1 / k1.sum(1, keepdim=True)
            kern = (k1[:, :, None] * k1[:, None, :])[:, None]  # (B, 1, 5, 5)
            blurred = F.conv2d(F.pad(x[None], (2, 2, 2, 2), mode="replicate"), kern, groups=b)[0]
            x = torch.where(p["blur"][:, None, None], blurred, x)
        return x * 255


# --------------------------------------------------------------------------- streams


@dataclass(frozen=True)
class StreamBatch:
    """A batch for G: float sources ``(N, 1, 64, 64)`` 0..255 with landmarks, the target (None
    for profiles), identity class (-1 unknown), CFP person id (-1 for FER2013 faces)."""

    src: Tensor
    landmarks: np.ndarray
    target: Tensor | None
    identity: Tensor
    person: Tensor

    def __len__(self) -> int:
        return int(self.src.shape[0])


class RefinerStreams:
    """Draws the three streams and D's real photos from :class:`RefinerData` with one generator."""

    def __init__(self, data: RefinerData, warp: MeshWarp, renderer: RotateRenderer,
                 generator: torch.Generator, *, flip_p: float = 0.5) -> None:
        self.data, self.warp, self.renderer = data, warp, renderer
        self.generator, self.flip_p = generator, flip_p

    def _draw(self, pool: FacePool, n: int) -> tuple[FacePool, np.ndarray]:
        idx = torch.randint(len(pool), (n,), generator=self.generator)
        flip = (torch.rand(n, generator=self.generator) < self.flip_p).numpy()
        return pool.subset(idx), flip

    def _faces(self, pool: FacePool, n: int) -> tuple[Tensor, np.ndarray, FacePool, np.ndarray]:
        sub, flip = self._draw(pool, n)
        images, lm = flip_faces(sub.images, sub.landmarks, flip)
        return images, lm, sub, flip

    def render(self, n: int) -> StreamBatch:
        """Stream 1: frontal faces rendered to a random yaw; target: the original, aligned."""
        images, lm, sub, _ = self._faces(self.data.frontal, n)
        r = self.renderer.render(images, lm, self.generator)
        return StreamBatch(r.images[:, None].float(), r.landmarks, r.targets, sub.identity, sub.person)

    def profiles(self, n: int) -> StreamBatch:
        """Stream 2: real CFP profiles of training ids (no pixel target)."""
        images, lm, sub, _ = self._faces(self.data.profile, n)
        return StreamBatch(images[:, None].float(), lm, None, sub.identity, sub.person)

    def frontals(self, n: int) -> StreamBatch:
        """Stream 3: near-frontal faces as they are; target: the input, aligned."""
        images, lm, sub, _ = self._faces(self.data.frontal, n)
        return StreamBatch(images[:, None].float(), lm, aligned_targets(self.warp, images, lm), sub.identity,
                           sub.person)

    def real_frontals(self, n: int) -> tuple[Tensor, Tensor]:
        """D's real frontal faces (CFP frontals and near-frontal FER2013 faces, aligned into the
        output framing), ``[-1, 1]``, with identity class (-1 for FER2013)."""
        images, lm, sub, _ = self._faces(self.data.frontal, n)
        return aligned_targets(self.warp, images, lm) / 127.5 - 1, sub.identity

    def real_profiles(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """Real CFP profile crops for D's pose and identity heads: ``[-1, 1]``, pose, identity."""
        images, _, sub, flip = self._faces(self.data.profile, n)
        pose = torch.where(torch.from_numpy(flip), flip_pose(sub.pose), sub.pose)
        return images[:, None].float() / 127.5 - 1, pose, sub.identity


# --------------------------------------------------------------------------- selection set


@dataclass(frozen=True)
class ValSet:
    """The fixed checkpoint-selection set, from held-out *training* data only (CFP ``val_ids``,
    held-out FER2013 Training faces): rotate-and-render pairs, real profiles, faces as they are."""

    render: StreamBatch
    render_is_fer: Tensor  # bool (N,)
    profile: StreamBatch
    frontal_fer: StreamBatch
    frontal_cfp: Tensor  # the held-out ids' frontals, aligned, float (M, 1, S, S) 0..255 ...
    frontal_cfp_person: Tensor  # ... and their CFP ids (for identity centroids)

    @staticmethod
    def build(data: RefinerData, warp: MeshWarp, renderer: RotateRenderer, *, renders: int = 256,
              fer_faces: int = 256, seed: int = 1234) -> ValSet:
        """Deterministic in ``seed``; draws nothing from the training generator."""
        g = torch.Generator().manual_seed(seed)
        parts, is_fer = [], []
        for pool, fer in ((data.val_frontal_cfp, False), (data.val_frontal_fer, True)):
            if len(pool) == 0:
                continue
            take = torch.randperm(len(pool), generator=g)[:renders // 2]
            sub = pool.subset(take)
            r = renderer.render(sub.images, sub.landmarks, g)
            parts.append(StreamBatch(r.images[:, None].float(), r.landmarks, r.targets, sub.identity,
                                     sub.person))
            is_fer.append(torch.full((len(sub),), fer))
        render = StreamBatch(torch.cat([p.src for p in parts]), np.concatenate([p.landmarks for p in parts]),
                             torch.cat([p.target for p in parts]), torch.cat([p.identity for p in parts]),
                             torch.cat([p.person for p in parts]))
        prof = data.val_profile
        fer = data.val_frontal_fer.subset(torch.arange(min(fer_faces, len(data.val_frontal_fer))))
        cfp = data.val_frontal_cfp
        return ValSet(
            render=render, render_is_fer=torch.cat(is_fer),
            profile=StreamBatch(prof.images[:, None].float(), prof.landmarks, None, prof.identity,
                                prof.person),
            frontal_fer=StreamBatch(fer.images[:, None].float(), fer.landmarks,
                                    aligned_targets(warp, fer.images, fer.landmarks), fer.identity,
                                    fer.person),
            frontal_cfp=aligned_targets(warp, cfp.images, cfp.landmarks), frontal_cfp_person=cfp.person)
