"""FER2013 loader: the image-folder layout or the original ``fer2013.csv``, cached as ``.npz``.

Both forms give the same :class:`FaceDataset`: 48x48 uint8 faces with labels in the original
FER2013 order (:data:`facemodels.classes.FER_CLASSES`) and the original usage of each face.

Folder layout::

    root/train/<class>/Training_<id>.jpg      (usage from the file-name prefix when present,
    root/test/<class>/PublicTest_<id>.jpg      else train/ -> Training, test/ -> PublicTest)

CSV: ``fer2013.csv`` with columns ``emotion,pixels,Usage`` (2304 space-separated pixels).
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facemodels.classes import FER_CLASSES
from training.data._cache import Decoded, cached_build, default_cache_dir, metadata_key
from training.data._images import decode_many, is_image_file
from training.data.dataset import USAGES, DatasetError, FaceDataset

__all__ = ["CSV_NAME", "DEFAULT_DATA", "SELECTION_SPLIT", "SPLIT_FOLDERS", "default_cache_dir",
           "load_fer2013", "selection_split"]

log = logging.getLogger(__name__)

CSV_NAME = "fer2013.csv"
#: Split folder -> usage of files without a ``Training_``/``PublicTest_``/``PrivateTest_`` prefix.
SPLIT_FOLDERS: dict[str, str] = {"train": "Training", "test": "PublicTest"}
_SIZE = 48


#: The only split models are selected on; PrivateTest is withheld and measured independently.
SELECTION_SPLIT = "PublicTest"
DEFAULT_DATA = "../shared/data/fer2013"


def selection_split(dataset: FaceDataset) -> FaceDataset:
    """The PublicTest part of ``dataset``; selecting on anything else is not possible."""
    val = dataset.split(SELECTION_SPLIT)
    if len(val) == 0:
        raise ValueError(f"the dataset has no {SELECTION_SPLIT} samples to select models on")
    return val

def load_fer2013(
    root: str | Path, *, cache_dir: Path | None = None, skip_bad: bool = False,
    use_cache: bool = True, num_workers: int | None = None,
) -> FaceDataset:
    """Load FER2013 from an image folder, a ``fer2013.csv``, or a folder holding that CSV.

    Args:
        root: the folder with ``train/`` and ``test/``, the CSV file, or a folder containing
            ``fer2013.csv`` (the CSV wins when a folder has both).
        cache_dir: where decoded arrays are cached (default :func:`default_cache_dir`).
        skip_bad: skip undecodable or malformed samples (one warning counts them) instead of
            raising.
        use_cache: ``False`` decodes every time and writes no cache.
        num_workers: decoding threads (default: up to 8, one per CPU).

    Returns:
        All samples; ``split("Training")`` / ``split("PublicTest")`` select the usages.

    Raises:
        DatasetError: naming the offending file or folder.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"{root}: no such file or folder (expected a FER2013 image folder "
                           f"with train/ and test/, or {CSV_NAME})")
    csv_path = root if root.is_file() else root / CSV_NAME
    if csv_path.is_file():
        st = csv_path.stat()
        key = metadata_key("fer2013-csv",
                           [(str(csv_path.resolve()), st.st_size, st.st_mtime_ns)])
        return cached_build(
            "fer2013", key, lambda: _read_csv(csv_path, skip_bad=skip_bad), source=str(csv_path),
            cache_dir=cache_dir, skip_bad=skip_bad, use_cache=use_cache, what="CSV rows",
        )
    files = _scan_folder(root)
    key = metadata_key("fer2013-folder", [(f.rel, f.size, f.mtime_ns) for f in files])
    return cached_build(
        "fer2013", key,
        lambda: _decode_folder(root, files, skip_bad=skip_bad, num_workers=num_workers),
        source=str(root), cache_dir=cache_dir, skip_bad=skip_bad, use_cache=use_cache,
    )


@dataclass(frozen=True)
class _File:
    rel: str
    size: int
    mtime_ns: int
    label: int
    usage: int


def _usage_of(name: str, default: str) -> int:
    prefix = name.split("_", 1)[0]
    return USAGES.index(prefix if prefix in USAGES else default)


def _sorted_entries(folder: Path) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as it:
        return sorted(it, key=lambda e: e.name)


def _scan_folder(root: Path) -> list[_File]:
    """Every image under ``root/{train,test}/<class>/``, sorted by split, class index, name."""
    files: list[_File] = []
    for split, default_usage in SPLIT_FOLDERS.items():
        split_dir = root / split
        if not split_dir.is_dir():
            raise DatasetError(
                f"{split_dir}: missing split folder (a FER2013 image folder has "
                f"{', '.join(s + '/' for s in SPLIT_FOLDERS)}; or pass {CSV_NAME})"
            )
        class_dirs: list[tuple[int, os.DirEntry[str]]] = []
        for cdir in _sorted_entries(split_dir):
            if not cdir.is_dir() or cdir.name.startswith("."):
                continue
            if cdir.name.lower() not in FER_CLASSES:
                raise DatasetError(f"{cdir.path}: unknown class folder {cdir.name!r}; "
                                   f"expected {', '.join(FER_CLASSES)}")
            class_dirs.append((FER_CLASSES.index(cdir.name.lower()), cdir))
        for label, cdir in sorted(class_dirs, key=lambda t: (t[0], t[1].name)):
            for e in _sorted_entries(Path(cdir.path)):
                if not (e.is_file() and is_image_file(Path(e.name))):
                    continue
                st = e.stat()
                files.append(_File(f"{split}/{cdir.name}/{e.name}", st.st_size,
                                   st.st_mtime_ns, label, _usage_of(e.name, default_usage)))
    if not files:
        raise DatasetError(f"{root}: no images found under "
                           f"{', '.join(s + '/<class>/' for s in SPLIT_FOLDERS)}")
    return files


def _decode_folder(
    root: Path, files: list[_File], *, skip_bad: bool, num_workers: int | None
) -> Decoded:
    images, ok, errors = decode_many(
        [root / f.rel for f in files], size=_SIZE, skip_bad=skip_bad,
        desc="decoding FER2013", num_workers=num_workers,
    )
    keep = [f for f, good in zip(files, ok, strict=True) if good]
    if not keep:
        raise DatasetError(f"{root}: none of the {len(files)} images could be decoded; "
                           f"first error: {errors[0]}")
    return Decoded(
        images=images[ok],
        labels=np.array([f.label for f in keep], dtype=np.int64),
        usage=np.array([f.usage for f in keep], dtype=np.uint8),
        paths=[f.rel for f in keep], class_names=FER_CLASSES, skipped=errors,
    )


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _parse_row(row: list[str], cols: tuple[int, int, int], where: str) -> tuple[np.ndarray,
                                                                                 int, int]:
    ie, ip, iu = cols
    if len(row) <= max(cols):
        raise DatasetError(f"{where}: expected at least {max(cols) + 1} columns, got {len(row)}")
    try:
        label = int(row[ie])
    except ValueError:
        raise DatasetError(f"{where}: emotion {row[ie]!r} is not an integer") from None
    if not 0 <= label < len(FER_CLASSES):
        raise DatasetError(f"{where}: emotion {label} is outside 0..{len(FER_CLASSES) - 1}")
    usage = row[iu].strip()
    if usage not in USAGES:
        raise DatasetError(f"{where}: unknown Usage {usage!r}; expected one of {USAGES}")
    values = row[ip].split()
    if len(values) != _SIZE * _SIZE:
        raise DatasetError(f"{where}: expected {_SIZE * _SIZE} pixels, got {len(values)}")
    try:
        pixels = np.array(values, dtype=np.int64)
    except ValueError:
        bad = next(v for v in values if not _is_int(v))
        raise DatasetError(f"{where}: pixel {bad!r} is not an integer") from None
    if pixels.min() < 0 or pixels.max() > 255:
        raise DatasetError(f"{where}: pixel values must lie in 0..255")
    return pixels.astype(np.uint8).reshape(_SIZE, _SIZE), label, USAGES.index(usage)


def _read_csv(path: Path, *, skip_bad: bool) -> Decoded:
    """Parse and validate ``fer2013.csv``; errors name the file and line."""
    images: list[np.ndarray] = []
    labels: list[int] = []
    usage: list[int] = []
    paths: list[str] = []
    errors: list[str] = []
    try:
        fh = path.open(newline="", encoding="utf-8")
    except OSError as e:
        raise DatasetError(f"{path}: cannot read file ({e.strerror or e})") from e
    with fh:
        reader = csv.reader(fh)
        try:
            header = [c.strip() for c in next(reader, [])]
        except (csv.Error, UnicodeDecodeError) as e:
            raise DatasetError(f"{path}: not a readable CSV ({e})") from e
        need = ("emotion", "pixels", "Usage")
        if any(c not in header for c in need):
            raise DatasetError(f"{path}: header must name the columns {','.join(need)}; "
                               f"got {','.join(header) or '(empty file)'}")
        cols = (header.index("emotion"), header.index("pixels"), header.index("Usage"))
        rows = tqdm(reader, desc="parsing FER2013 CSV", unit="row", disable=None, leave=False)
        try:
            for row in rows:
                if not row:
                    continue
                where = f"{path}:{reader.line_num}"
                try:
                    img, label, use = _parse_row(row, cols, where)
                except DatasetError as e:
                    if not skip_bad:
                        raise
                    errors.append(str(e))
                    continue
                images.append(img)
                labels.append(label)
                usage.append(use)
                paths.append(f"{path.name}:{reader.line_num}")
        except (csv.Error, UnicodeDecodeError) as e:
            raise DatasetError(f"{path}:{reader.line_num}: malformed CSV ({e})") from e
    if not images:
        raise DatasetError(f"{path}: no usable rows" + (f"; first error: {errors[0]}"
                                                          if errors else ""))
    return Decoded(
        images=np.stack(images), labels=np.array(labels, dtype=np.int64),
        usage=np.array(usage, dtype=np.uint8), paths=paths, class_names=FER_CLASSES,
        skipped=errors,
    )
