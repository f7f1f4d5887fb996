"""CFP (Celebrities in Frontal-Profile) loader: aligned grayscale crops, pose and identity.

Layout (``../shared/data/cfp``)::

    Data/Images/<id 001..500>/{frontal,profile}/<nn>.jpg
    Data/Fiducials/<id>/{frontal,profile}/<nn>.txt      30 "x,y" lines

The 30 fiducials annotate one side of the face (the visible side of a profile; the image-left
side of a frontal photo): 0-8 jaw contour from the ear down to the chin, 9-11 eyebrow,
12-17 eye, 18-24 nose (21 is the tip), 25 mouth corner, 26-29 lips. They give the three
anchors of :mod:`facemodels.face.pose_framing`: eye centre (mean of 12-17), mouth (corner 25)
and nose tip (21). Small vertical offsets (:data:`FIDUCIAL_EYE_DY`,
:data:`FIDUCIAL_MOUTH_DY`), measured on 300 frontal photos against our RetinaFace detector,
make these anchors agree with the detector's, so a frontal crop is framed like a served face.

Pose labels (:data:`facemodels.face.pose.POSE_CLASSES`): 0 for the ``frontal`` folder; a profile
is 2 (``right_profile``) when its nose tip lies right of its ear (mean of fiducials 0-2) in
the image, else 1. All 2,000 profiles are unambiguous (the nose-ear gap is at least half an
eye-mouth distance): 1,027 point left, 973 right.

Crops are 64x64 grayscale by default (a CPU-friendly working size; ``size=96`` works too).
Decoded crops are cached as ``.npz`` (no pickle) keyed by the files' metadata, the size and
:data:`CFP_CACHE_VERSION`. Ids 001-450 are for training, 451-500 for evaluation only.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch import Tensor

from facemodels.atomic import save_npz_atomically
from facemodels.face.align import warp_face
from facemodels.face.pose_framing import FaceAnchors, pose_framing_matrix
from training.data._cache import default_cache_dir, metadata_key
from training.data._images import decode_gray
from training.data.dataset import DatasetError

__all__ = [
    "CFP_CACHE_VERSION",
    "CFP_POSE_YAW",
    "EVAL_IDS",
    "FIDUCIAL_EYE_DY",
    "FIDUCIAL_MOUTH_DY",
    "TRAIN_IDS",
    "CfpDataset",
    "align_cfp_image",
    "cfp_anchors",
    "cfp_fiducials_path",
    "cfp_framing_matrix",
    "cfp_pose_label",
    "load_cfp",
    "read_fiducials",
]

log = logging.getLogger(__name__)

TRAIN_IDS = range(1, 451)
EVAL_IDS = range(451, 501)
KINDS = ("frontal", "profile")
CFP_CACHE_VERSION = 1
#: Anchor corrections, in eye-mouth distances (see module docstring).
FIDUCIAL_EYE_DY = -0.03
FIDUCIAL_MOUTH_DY = -0.05
#: The yaw each pose class (0 frontal, 1 left profile, 2 right profile) is framed at, degrees.
CFP_POSE_YAW: tuple[float, float, float] = (0.0, -90.0, 90.0)
_NUM_FIDUCIALS = 30


@dataclass(frozen=True, eq=False)
class CfpDataset:
    """Aligned CFP faces.

    Attributes:
        images: uint8 ``(N, S, S)`` grayscale crops.
        pose: int64 ``(N,)`` pose class (0 frontal, 1 left profile, 2 right profile).
        identity: int64 ``(N,)`` CFP person id (1..500).
        paths: image paths relative to ``source`` (``Data/Images/001/frontal/01.jpg``).
        fingerprint: SHA-256 of the content (pixels, poses, ids).
        source: the CFP root folder (the one holding ``Data/`` and ``Protocol/``).
    """

    images: Tensor
    pose: Tensor
    identity: Tensor
    paths: tuple[str, ...]
    fingerprint: str
    source: str

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def ids(self) -> list[int]:
        return sorted(set(self.identity.tolist()))

    def subset(self, index: Tensor | Sequence[int]) -> CfpDataset:
        """Samples picked by a boolean mask or integer indices."""
        idx = torch.as_tensor(index)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = idx.to(torch.int64)
        h = hashlib.sha256(self.fingerprint.encode())
        h.update(idx.numpy().tobytes())
        return CfpDataset(images=self.images[idx], pose=self.pose[idx],
                          identity=self.identity[idx],
                          paths=tuple(self.paths[i] for i in idx.tolist()),
                          fingerprint=h.hexdigest(), source=self.source)

    def split(self, name: str) -> CfpDataset:
        """``"train"`` (ids 001-450) or ``"eval"`` (ids 451-500)."""
        ids = {"train": TRAIN_IDS, "eval": EVAL_IDS}.get(name)
        if ids is None:
            raise ValueError(f"unknown CFP split {name!r}; expected 'train' or 'eval'")
        return self.subset((self.identity >= ids.start) & (self.identity < ids.stop))


def read_fiducials(path: Path) -> np.ndarray:
    """The 30 ``(x, y)`` fiducials of one image.

    Raises:
        DatasetError: naming ``path`` when it is missing or malformed.
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read fiducials ({e})") from e
    try:
        pts = np.array([[float(v) for v in line.split(",")] for line in text.split()], dtype=np.float64)
    except ValueError as e:
        raise DatasetError(f"{path}: malformed fiducials, expected 'x,y' lines ({e})") from e
    if pts.shape != (_NUM_FIDUCIALS, 2) or not np.isfinite(pts).all():
        raise DatasetError(f"{path}: expected {_NUM_FIDUCIALS} finite 'x,y' lines, got shape {pts.shape}")
    return pts


def cfp_pose_label(fiducials: np.ndarray, kind: str) -> int:
    """0 for frontal photos; for profiles 2 when the nose points to the image's right, else 1."""
    if kind == "frontal":
        return 0
    ear_x = fiducials[0:3, 0].mean()
    return 2 if fiducials[21, 0] > ear_x else 1


def cfp_anchors(fiducials: np.ndarray) -> FaceAnchors:
    """Eye centre, mouth and nose tip from the 30 fiducials (with the detector offsets)."""
    eye = fiducials[12:18].mean(0)
    mouth = fiducials[25].copy()
    h = float(np.linalg.norm(mouth - eye))
    eye[1] += FIDUCIAL_EYE_DY * h
    mouth[1] += FIDUCIAL_MOUTH_DY * h
    return FaceAnchors(eye=(eye[0], eye[1]), mouth=(mouth[0], mouth[1]),
                       nose=(fiducials[21, 0], fiducials[21, 1]))


def cfp_fiducials_path(source: str | Path, image_path: str) -> Path:
    """The fiducials file of a :attr:`CfpDataset.paths` entry (``Data/Images/<id>/<kind>/<nn>.jpg``
    under ``source``): ``Data/Fiducials/<id>/<kind>/<nn>.txt``."""
    rel = PurePosixPath(image_path)
    if len(rel.parts) != 5 or rel.parts[:2] != ("Data", "Images") or rel.suffix != ".jpg":
        raise ValueError(f"{image_path!r} is not a CFP image path (Data/Images/<id>/<kind>/<nn>.jpg)")
    return Path(source) / "Data" / "Fiducials" / rel.parts[2] / rel.parts[3] / f"{rel.stem}.txt"


def cfp_framing_matrix(fiducials: np.ndarray, pose: int, *, size: int = 64) -> np.ndarray:
    """The ``(2, 3)`` matrix from a CFP photo to its pose-aware crop at ``size`` (profiles framed
    at ±90° yaw, :data:`CFP_POSE_YAW`)."""
    return pose_framing_matrix(cfp_anchors(fiducials), yaw=CFP_POSE_YAW[pose], size=size)


def align_cfp_image(image: np.ndarray, fiducials: np.ndarray, pose: int, *, size: int = 64) -> np.ndarray:
    """Crop one CFP photo to the pose-aware frontaliser framing (profiles at ±90° yaw)."""
    return warp_face(image, cfp_framing_matrix(fiducials, pose, size=size), size=size)


def _data_dir(root: Path) -> Path:
    for cand in (root / "Data", root):
        if (cand / "Images").is_dir():
            return cand
    raise DatasetError(f"{root}: no CFP data (expected Data/Images/<id>/{{frontal,profile}}/*.jpg)")


def _scan(data: Path, ids: Iterable[int] | None) -> list[tuple[str, str, str]]:
    """``(id, kind, stem)`` of every image, sorted; checks each has its fiducial file."""
    wanted = None if ids is None else {f"{i:03d}" for i in ids}
    items = []
    for pdir in sorted((data / "Images").iterdir()):
        if not pdir.is_dir() or not pdir.name.isdigit() or (wanted is not None and pdir.name not in wanted):
            continue
        for kind in KINDS:
            for img in sorted((pdir / kind).glob("*.jpg")) if (pdir / kind).is_dir() else []:
                fid = data / "Fiducials" / pdir.name / kind / f"{img.stem}.txt"
                if not fid.is_file():
                    raise DatasetError(f"{fid}: fiducial file missing for {img}")
                items.append((pdir.name, kind, img.stem))
    if not items:
        raise DatasetError(f"{data / 'Images'}: no CFP images found")
    return items


def _process(data: Path, item: tuple[str, str, str], size: int) -> tuple[np.ndarray, int]:
    pid, kind, stem = item
    fid = read_fiducials(data / "Fiducials" / pid / kind / f"{stem}.txt")
    pose = cfp_pose_label(fid, kind)
    image = decode_gray(data / "Images" / pid / kind / f"{stem}.jpg", size=None)
    try:
        crop = align_cfp_image(image, fid, pose, size=size)
    except ValueError as e:
        raise DatasetError(f"{data / 'Fiducials' / pid / kind / stem}.txt: {e}") from e
    return crop, pose


def _fingerprint(images: np.ndarray, pose: np.ndarray, identity: np.ndarray) -> str:
    h = hashlib.sha256(repr(images.shape).encode())
    for a in (images, pose, identity):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _build(data: Path, items: list[tuple[str, str, str]], size: int, workers: int) -> dict[str, np.ndarray]:
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(lambda it: _process(data, it, size), items))
    images = np.stack([r[0] for r in results]).astype(np.uint8)
    pose = np.array([r[1] for r in results], dtype=np.int64)
    identity = np.array([int(pid) for pid, _, _ in items], dtype=np.int64)
    paths = np.array([f"Data/Images/{pid}/{kind}/{stem}.jpg" for pid, kind, stem in items])
    return {"images": images, "pose": pose, "identity": identity, "paths": paths,
            "fingerprint": np.array(_fingerprint(images, pose, identity))}


def _read_cache(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in ("images", "pose", "identity", "paths", "fingerprint")}
    if _fingerprint(arrays["images"], arrays["pose"], arrays["identity"]) != str(arrays["fingerprint"]):
        raise ValueError("content does not match its fingerprint")
    return arrays


def load_cfp(root: str | Path, *, size: int = 64, ids: Iterable[int] | None = None,
             cache_dir: Path | None = None, use_cache: bool = True, num_workers: int = 2) -> CfpDataset:
    """Load CFP as aligned ``size`` x ``size`` grayscale crops with pose and identity labels.

    Args:
        root: the CFP folder (holding ``Data/``) or its ``Data`` folder.
        size: crop side.
        ids: only these person ids (default: all found).
        cache_dir: ``.npz`` cache folder (default the datasets cache); ``use_cache=False``
            always decodes.
        num_workers: decoding threads.

    Raises:
        DatasetError: naming the file when an image or fiducial file is missing or corrupt.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"{root}: no such folder (expected the CFP dataset)")
    data = _data_dir(root)
    items = _scan(data, ids)
    entries = []
    for pid, kind, stem in items:
        for rel in (f"Images/{pid}/{kind}/{stem}.jpg", f"Fiducials/{pid}/{kind}/{stem}.txt"):
            st = (data / rel).stat()
            entries.append((rel, st.st_size, st.st_mtime_ns))
    key = metadata_key(f"cfp-v{CFP_CACHE_VERSION}-size{size}-{data.resolve()}", entries)
    cache = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / (
        f"cfp{size}-{key[:40]}.npz")
    arrays = None
    if use_cache and cache.is_file():
        try:
            arrays = _read_cache(cache)
            log.info("CFP cache hit: %s", cache)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            log.warning("ignoring corrupt CFP cache %s (%s); rebuilding it", cache, e)
    if arrays is None:
        log.info("aligning %d CFP images to %dx%d", len(items), size, size)
        arrays = _build(data, items, size, num_workers)
        if use_cache:
            try:
                save_npz_atomically(cache, **arrays)
            except OSError as e:
                log.warning("could not write CFP cache %s (%s)", cache, e)
    return CfpDataset(
        images=torch.from_numpy(np.ascontiguousarray(arrays["images"])),
        pose=torch.from_numpy(arrays["pose"].astype(np.int64)),
        identity=torch.from_numpy(arrays["identity"].astype(np.int64)),
        paths=tuple(arrays["paths"].tolist()), fingerprint=str(arrays["fingerprint"]),
        source=str(data.parent),
    )

