"""Identity preservation: CFP frontal-profile pairs scored by an independent face embedder.

The embedder is dlib's ResNet face recogniser (``dlib_face_recognition_resnet_model_v1``, 128-d,
trained by dlib on its own data, never seen by the GAN), installed with the optional ``eval``
extra (``dlib-bin`` and ``face-recognition-models``, whose wheel ships the ``.dat`` files, so
nothing is downloaded at run time). Each grayscale crop is upscaled, given to dlib's 5-point
shape predictor with the whole crop as the face box, cut into dlib's 150x150 face chip and
embedded; pairs are scored by cosine similarity.

Pairs: CFP's own frontal-profile protocol fold 10 (``Protocol/Split/FP/10``: 350 same and 350
different pairs), whose people are exactly ids 451-500, and every frontal x profile pair among
those ids (2,000 same, 98,000 different), which gives TAR at FAR 1% more impostors to rest on.
The frontal-frontal fold 10 (``Protocol/Split/FF/10``) checks what frontalising does to faces
that were frontal already (both members frontalised).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
from torch import Tensor

from training.data.cfp import CfpDataset
from training.data.dataset import DatasetError

__all__ = ["DlibEmbedder", "Embedder", "all_pairs", "identity_scores", "protocol_pairs", "roc_auc",
           "tar_at_far", "verification_scores"]

log = logging.getLogger(__name__)
EVAL_FOLD = 10


class Embedder(Protocol):
    """Maps uint8 ``(N, S, S)`` gray faces to L2-normalised ``(N, D)`` embeddings."""

    name: str

    def embed(self, faces: np.ndarray) -> np.ndarray: ...


class DlibEmbedder:
    """dlib's ResNet face recogniser on grayscale crops (see module docstring).

    Raises:
        RuntimeError: when ``dlib`` or ``face_recognition_models`` is not installed.
    """

    name = "dlib-resnet-v1"

    def __init__(self, *, upscale: int = 256) -> None:
        spec = importlib.util.find_spec("face_recognition_models")
        if importlib.util.find_spec("dlib") is None or spec is None or not spec.submodule_search_locations:
            raise RuntimeError("identity evaluation needs dlib and its models: "
                               "pip install 'fer-service[eval]' (dlib-bin, face-recognition-models)")
        import dlib

        # The package's __init__ needs pkg_resources; read the shipped files by path instead.
        models = Path(next(iter(spec.submodule_search_locations))) / "models"
        self._dlib = dlib
        self._shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self._net = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
        self.upscale = upscale

    def embed(self, faces: np.ndarray) -> np.ndarray:
        out = np.zeros((len(faces), 128), dtype=np.float32)
        u = self.upscale
        rect = self._dlib.rectangle(0, 0, u - 1, u - 1)
        for i, face in enumerate(faces):
            rgb = cv2.cvtColor(cv2.resize(face, (u, u), interpolation=cv2.INTER_CUBIC), cv2.COLOR_GRAY2RGB)
            shape = self._shape(rgb, rect)
            out[i] = np.asarray(self._net.compute_face_descriptor(rgb, shape), dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True).clip(1e-12)


def roc_auc(scores: np.ndarray, same: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counted half)."""
    scores, same = np.asarray(scores, dtype=np.float64), np.asarray(same, dtype=bool)
    pos, neg = same.sum(), (~same).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = start + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[same].sum() - pos * (pos + 1) / 2) / (pos * neg))


def tar_at_far(scores: np.ndarray, same: np.ndarray, far: float = 0.01) -> float:
    """True-accept rate at the threshold that accepts at most ``far`` of the different pairs."""
    scores, same = np.asarray(scores, dtype=np.float64), np.asarray(same, dtype=bool)
    neg = np.sort(scores[~same])[::-1]
    if len(neg) == 0 or same.sum() == 0:
        return float("nan")
    k = int(np.floor(far * len(neg)))  # this many impostors may score above the threshold
    threshold = neg[k] if k < len(neg) else -np.inf
    return float((scores[same] > threshold).mean())


def verification_scores(frontal: np.ndarray, profile: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine similarity of each ``(frontal row, profile row)`` pair of L2-normalised embeddings."""
    return (frontal[pairs[:, 0]] * profile[pairs[:, 1]]).sum(1)


def _pair_list(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise DatasetError(f"{path}: CFP pair list missing")
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            idx, rel = line.split()
            out[idx] = rel.removeprefix("../")
    return out


def protocol_pairs(root: Path, frontal_paths: list[str], profile_paths: list[str], *,
                   fold: int = EVAL_FOLD, split: str = "FP") -> tuple[np.ndarray, np.ndarray]:
    """CFP's FP fold as ``(pairs (K, 2) of row indices into the two path lists, same (K,))``.

    ``split="FF"`` reads the frontal-frontal protocol instead: both members are frontal photos,
    so pass the frontal paths as ``profile_paths`` too.
    """
    if split not in ("FP", "FF"):
        raise ValueError(f"unknown CFP protocol split {split!r}; expected 'FP' or 'FF'")
    proto = root / "Protocol"
    f_list = _pair_list(proto / "Pair_list_F.txt")
    p_list = f_list if split == "FF" else _pair_list(proto / "Pair_list_P.txt")
    f_row = {p: i for i, p in enumerate(frontal_paths)}
    p_row = {p: i for i, p in enumerate(profile_paths)}
    pairs, same = [], []
    for kind in ("same", "diff"):
        path = proto / "Split" / split / f"{fold:02d}" / f"{kind}.txt"
        if not path.is_file():
            raise DatasetError(f"{path}: CFP protocol file missing")
        for line in path.read_text().split():
            a, b = line.split(",")
            fa, pb = f_list[a], p_list[b]
            if fa not in f_row or pb not in p_row:
                raise DatasetError(f"{path}: pair {line} refers to an image outside the evaluation ids")
            pairs.append((f_row[fa], p_row[pb]))
            same.append(kind == "same")
    return np.array(pairs, dtype=np.int64), np.array(same, dtype=bool)


def all_pairs(frontal_ids: np.ndarray, profile_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every frontal x profile pair, with whether the two show the same person."""
    fi, pi = np.meshgrid(np.arange(len(frontal_ids)), np.arange(len(profile_ids)), indexing="ij")
    pairs = np.stack([fi.ravel(), pi.ravel()], 1)
    return pairs, frontal_ids[pairs[:, 0]] == profile_ids[pairs[:, 1]]


def identity_scores(runs: Mapping[str, Callable[[CfpDataset], Tensor]], data_root: Path, frontal: CfpDataset,
                    profile: CfpDataset, embedder: Embedder) -> dict[str, Any]:
    """ROC AUC and TAR@FAR=1% of CFP pairs, raw and through each frontaliser of ``runs``.

    ``runs`` maps a name to a function from CFP crops to uint8 ``(N, S, S)`` frontalised crops.
    Frontal-profile pairs (FP fold 10, all frontal x profile pairs) keep the real frontal and
    frontalise the profile; CFP's frontal-frontal fold 10, where its protocol is present,
    frontalises both photos. All variants share the pairs and the raw embeddings.

    Returns:
        ``{"embedder": name, pair set: {"same": n, "different": n, "raw": {"auc", "tar_at_far_1pct"},
        <run name>: {...}}}``.
    """
    front_emb = embedder.embed(frontal.images.numpy())
    raw_emb = embedder.embed(profile.images.numpy())
    fake_emb = {name: embedder.embed(run(profile).numpy()) for name, run in runs.items()}
    # name -> (pairs, same, {label: (first member's embeddings, second member's)})
    pair_sets = {}
    for name, (pairs, same) in (
            ("FP fold 10", protocol_pairs(data_root, list(frontal.paths), list(profile.paths))),
            ("all F x P pairs", all_pairs(frontal.identity.numpy(), profile.identity.numpy()))):
        variants = {"raw": (front_emb, raw_emb)} | {k: (front_emb, e) for k, e in fake_emb.items()}
        pair_sets[name] = (pairs, same, variants)
    if (data_root / "Protocol" / "Split" / "FF").is_dir():
        pairs, same = protocol_pairs(data_root, list(frontal.paths), list(frontal.paths), split="FF")
        variants = {"raw": (front_emb, front_emb)}
        for k, run in runs.items():
            ff_emb = embedder.embed(run(frontal).numpy())
            variants[k] = (ff_emb, ff_emb)
        pair_sets["FF fold 10"] = (pairs, same, variants)
    result: dict[str, Any] = {"embedder": embedder.name}
    for name, (pairs, same, variants) in pair_sets.items():
        entry: dict[str, Any] = {"same": int(same.sum()), "different": int((~same).sum())}
        for label, (a, b) in variants.items():
            s = verification_scores(a, b, pairs)
            entry[label] = {"auc": roc_auc(s, same), "tar_at_far_1pct": tar_at_far(s, same, 0.01)}
        result[name] = entry
    return result
