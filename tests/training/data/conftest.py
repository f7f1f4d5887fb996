"""Fixture factories for the dataset-loader tests: small FER2013 and CK+ trees written to tmp."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from facemodels.classes import FER_CLASSES
from tests.support import require_shared, shared_data_root
from training.data.ckplus import CK_CLASSES

SPLIT_OF_USAGE = {"Training": "train", "PublicTest": "test", "PrivateTest": "test"}


def shared_data_dir() -> Path:
    """``$FER_SHARED_DATA`` if set, else ``<repo>/../shared/data`` (see ``tests.support``)."""
    return shared_data_root()


@pytest.fixture
def fer2013_root() -> Path:
    """The real FER2013 image folder; skips with the reason when absent."""
    return require_shared("fer2013")


@pytest.fixture
def ckplus_root() -> Path:
    """The real CK+48 folder; skips with the reason when absent."""
    return require_shared("ckplus48")


@pytest.fixture
def data_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """``caplog`` capturing INFO and above from ``training.data``."""
    with caplog.at_level(logging.INFO, logger="training.data"):
        yield caplog


def smooth_face(rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A random but smooth uint8 image (JPEG keeps it within a few grey levels)."""
    coarse = rng.uniform(0, 255, (6, 6)).astype(np.float32)
    img = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def write_image(path: Path, img: np.ndarray) -> Path:
    """Encode ``img`` by the suffix of ``path`` (JPEG quality 95) and write it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.suffix.lower() in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(path.suffix, img, params)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


@pytest.fixture
def image_writer() -> Callable[[Path, np.ndarray], Path]:
    """:func:`write_image` as a fixture (test modules cannot import conftest)."""
    return write_image


@pytest.fixture
def face_maker() -> Callable[[int], list[np.ndarray]]:
    """Factory: ``n`` smooth random faces, the same ones for the same ``seed``."""

    def make(n: int, seed: int = 1) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [smooth_face(rng) for _ in range(n)]

    return make


@dataclass(frozen=True)
class FerSample:
    """One synthetic FER2013 face: ``uid`` is its row in the CSV and the number in its file name."""

    uid: int
    pixels: np.ndarray
    label: int
    usage: str


@pytest.fixture
def fer_samples() -> Callable[..., list[FerSample]]:
    """Factory: ``per_class`` faces of every class for each usage, deterministic by ``seed``."""

    def make(per_class: int = 2, *, usages: Sequence[str] = ("Training", "PublicTest"),
             seed: int = 0) -> list[FerSample]:
        rng = np.random.default_rng(seed)
        out: list[FerSample] = []
        for usage in usages:
            for label in range(len(FER_CLASSES)):
                for _ in range(per_class):
                    out.append(FerSample(len(out), smooth_face(rng), label, usage))
        return out

    return make


@pytest.fixture
def write_fer_folder() -> Callable[..., Path]:
    """Factory: write samples as ``root/{train,test}/<class>/<Usage>_<uid>.<ext>``."""

    def write(root: Path, samples: Sequence[FerSample], *, ext: str = "png",
              prefix: bool = True) -> Path:
        for s in samples:
            name = f"{s.usage}_{s.uid:05d}.{ext}" if prefix else f"{s.uid:05d}.{ext}"
            write_image(root / SPLIT_OF_USAGE[s.usage] / FER_CLASSES[s.label] / name, s.pixels)
        for split in ("train", "test"):
            (root / split).mkdir(parents=True, exist_ok=True)
        return root

    return write


def csv_line(s: FerSample) -> str:
    return f"{s.label},{' '.join(map(str, s.pixels.ravel().tolist()))},{s.usage}"


@pytest.fixture
def write_fer_csv() -> Callable[..., Path]:
    """Factory: write samples as a ``fer2013.csv`` (row ``uid`` is on line ``uid + 2``)."""

    def write(path: Path, samples: Sequence[FerSample], *,
              header: str = "emotion,pixels,Usage", extra_lines: Sequence[str] = ()) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [header, *(csv_line(s) for s in samples), *extra_lines]
        path.write_text("\n".join(lines) + "\n")
        return path

    return write


@pytest.fixture
def write_ckplus() -> Callable[..., dict[str, np.ndarray]]:
    """Factory: write ``{class: [file names]}`` as a CK+48 tree; returns ``{rel path: pixels}``."""

    def write(root: Path, layout: dict[str, Sequence[str]], *, seed: int = 0
              ) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        written: dict[str, np.ndarray] = {}
        for cls, names in layout.items():
            for name in names:
                img = rng.integers(0, 256, (48, 48), dtype=np.uint8)
                write_image(root / cls / name, img)
                written[f"{cls}/{name}"] = img
        return written

    return write


def ck_layout(n_subjects: int = 12, seed: int = 0) -> dict[str, list[str]]:
    """A CK+-like layout: each subject has 1-3 sequences, each 1-4 frames, in random classes."""
    rng = np.random.default_rng(seed)
    layout: dict[str, list[str]] = {c: [] for c in CK_CLASSES}
    for subject in range(10, 10 + n_subjects * 3, 3):
        for seq in range(1, int(rng.integers(1, 4)) + 1):
            cls = CK_CLASSES[int(rng.integers(len(CK_CLASSES)))]
            for frame in range(int(rng.integers(1, 5))):
                layout[cls].append(f"S{subject:03d}_{seq:03d}_{frame + 10:08d}.png")
    return layout


@pytest.fixture
def ck_tree(tmp_path: Path, write_ckplus: Callable[..., dict[str, np.ndarray]]
            ) -> tuple[Path, dict[str, np.ndarray]]:
    """A generated CK+48 tree of 12 subjects and the pixels of every file."""
    root = tmp_path / "ck"
    return root, write_ckplus(root, ck_layout())
