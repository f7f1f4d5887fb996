"""load_fer2013: folder vs CSV equivalence, usage, class order and the on-disk cache."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from facemodels.classes import FER_CLASSES
from training.data.dataset import USAGES, FaceDataset
from training.data.fer2013 import default_cache_dir, load_fer2013

Factory = Callable[..., object]


def uid_of(path: str) -> int:
    """Sample uid from a folder path (``.../Training_00003.png``) or a CSV path (``x.csv:5``)."""
    if m := re.search(r":(\d+)$", path):
        return int(m.group(1)) - 2
    return int(re.search(r"(\d+)\.\w+$", path).group(1))  # type: ignore[union-attr]


def by_uid(ds: FaceDataset) -> FaceDataset:
    assert ds.paths is not None
    return ds.subset(np.argsort([uid_of(p) for p in ds.paths]))


def npz_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.npz"))


@pytest.fixture
def samples(fer_samples: Factory) -> list:
    return fer_samples(2, usages=("Training", "PublicTest", "PrivateTest"))  # type: ignore[return-value]


def test_png_folder_equals_csv(tmp_path: Path, samples: list, write_fer_folder: Factory,
                               write_fer_csv: Factory) -> None:
    folder = write_fer_folder(tmp_path / "img", samples, ext="png")
    csv = write_fer_csv(tmp_path / "csv" / "fer2013.csv", samples)
    a = by_uid(load_fer2013(folder, cache_dir=tmp_path / "cache"))
    b = load_fer2013(csv, cache_dir=tmp_path / "cache")
    assert len(a) == len(b) == len(samples)
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.usage, b.usage)
    assert a.class_names == b.class_names == FER_CLASSES
    expected = torch.from_numpy(np.stack([s.pixels for s in samples]))
    assert torch.equal(b.images, expected)
    assert b.labels.tolist() == [s.label for s in samples]
    assert b.usage_names == [s.usage for s in samples]
    assert b.paths is not None and b.paths[0] == "fer2013.csv:2"


def test_csv_in_folder_same_as_csv_path(tmp_path: Path, samples: list,
                                        write_fer_csv: Factory) -> None:
    csv = write_fer_csv(tmp_path / "fer2013.csv", samples)
    a = load_fer2013(csv, use_cache=False)
    b = load_fer2013(tmp_path, use_cache=False)
    assert torch.equal(a.images, b.images) and a.fingerprint == b.fingerprint


def test_jpeg_folder_close_to_csv(tmp_path: Path, samples: list, write_fer_folder: Factory,
                                  write_fer_csv: Factory) -> None:
    folder = write_fer_folder(tmp_path / "img", samples, ext="jpg")
    a = by_uid(load_fer2013(folder, use_cache=False))
    b = load_fer2013(write_fer_csv(tmp_path / "fer2013.csv", samples), use_cache=False)
    diff = (a.images.int() - b.images.int()).abs()
    assert diff.float().mean() < 3 and diff.max() < 32
    assert torch.equal(a.labels, b.labels) and torch.equal(a.usage, b.usage)


def test_order_labels_and_class_order(tmp_path: Path, samples: list,
                                      write_fer_folder: Factory) -> None:
    ds = load_fer2013(write_fer_folder(tmp_path, samples), use_cache=False)
    assert ds.class_names == FER_CLASSES
    assert ds.paths is not None
    assert list(ds.paths) == sorted(ds.paths, key=lambda p: (
        p.split("/")[0] == "test", FER_CLASSES.index(p.split("/")[1]), p))
    for path, label in zip(ds.paths, ds.labels.tolist(), strict=True):
        assert FER_CLASSES[label] == path.split("/")[1]
    assert ds.source == str(tmp_path)


def test_usage_from_prefix_or_split_folder(tmp_path: Path, fer_samples: Factory,
                                           write_fer_folder: Factory, image_writer: Factory,
                                           face_maker: Factory) -> None:
    plain = fer_samples(1, usages=("Training", "PublicTest"))
    write_fer_folder(tmp_path, plain, prefix=False)  # no prefix: usage from split folder
    extra = [
        ("test/happy/PrivateTest_90001.png", "PrivateTest"),
        ("test/sad/Training_90002.jpg", "Training"),  # the prefix wins over the folder
        ("train/fear/PublicTest_90003.JPEG", "PublicTest"),
    ]
    for (rel, _), face in zip(extra, face_maker(len(extra)), strict=True):  # type: ignore[call-overload]
        image_writer(tmp_path / rel, face)
    (tmp_path / "train" / "angry" / "notes.txt").write_text("ignored")
    (tmp_path / "train" / "angry" / ".hidden.png").write_bytes(b"ignored")
    ds = load_fer2013(tmp_path, use_cache=False)
    usage = dict(zip(ds.paths or (), ds.usage_names, strict=True))
    for s in plain:
        folder = "train" if s.usage == "Training" else "test"
        assert usage[f"{folder}/{FER_CLASSES[s.label]}/{s.uid:05d}.png"] == s.usage
    for rel, expected in extra:
        assert usage[rel] == expected
    assert len(ds) == len(plain) + len(extra)
    assert set(ds.split("PrivateTest").paths or ()) == {"test/happy/PrivateTest_90001.png"}


def test_cache_round_trip(tmp_path: Path, samples: list, write_fer_folder: Factory,
                          data_logs: pytest.LogCaptureFixture) -> None:
    root, cache = write_fer_folder(tmp_path / "img", samples), tmp_path / "cache"
    first = load_fer2013(root, cache_dir=cache)
    files = npz_files(cache)
    assert len(files) == 1
    assert not any("cache hit" in r.message for r in data_logs.records)
    data_logs.clear()
    second = load_fer2013(root, cache_dir=cache)
    assert any("cache hit" in r.message for r in data_logs.records)
    assert npz_files(cache) == files
    for name in ("images", "labels", "usage"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    assert (first.paths, first.fingerprint, first.class_names, first.source) == (
        second.paths, second.fingerprint, second.class_names, second.source)


def test_changed_file_changes_fingerprint(tmp_path: Path, samples: list,
                                          write_fer_folder: Factory,
                                          image_writer: Factory) -> None:
    root, cache = write_fer_folder(tmp_path / "img", samples), tmp_path / "cache"
    before = load_fer2013(root, cache_dir=cache)
    target = root / (before.paths or ())[0]
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same content
    touched = load_fer2013(root, cache_dir=cache)
    assert len(npz_files(cache)) == 2  # new metadata key -> decoded again
    assert touched.fingerprint == before.fingerprint  # ... but the content is the same
    image_writer(target, np.full((48, 48), 7, dtype=np.uint8))
    after = load_fer2013(root, cache_dir=cache)
    assert after.fingerprint != before.fingerprint
    assert (after.images[0] == 7).all()


def test_use_cache_false_writes_nothing(tmp_path: Path, samples: list,
                                        write_fer_folder: Factory,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "envcache"))
    load_fer2013(write_fer_folder(tmp_path / "img", samples), use_cache=False)
    assert not (tmp_path / "envcache").exists()
    load_fer2013(write_fer_folder(tmp_path / "img2", samples))
    assert len(list((tmp_path / "envcache" / "datasets").glob("fer2013-*.npz"))) == 1


def test_default_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" / "datasets"  # the root the detector cache shares
    monkeypatch.delenv("FER_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "fer-service" / "datasets"


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not an npz file")


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _tampered(path: Path) -> None:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["images"] = arrays["images"].copy()
    arrays["images"][0, 0, 0] ^= 1
    with path.open("wb") as fh:
        np.savez(fh, **arrays)


def _pickled(path: Path) -> None:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["images"] = np.array([{"evil": 1}], dtype=object)
    with path.open("wb") as fh:
        np.savez(fh, **arrays)  # object arrays are pickled; the loader must refuse them


def _missing_array(path: Path) -> None:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != "labels"}
    with path.open("wb") as fh:
        np.savez(fh, **arrays)


@pytest.mark.parametrize("damage", [_garbage, _truncated, _tampered, _pickled, _missing_array])
def test_corrupt_cache_is_rebuilt(tmp_path: Path, samples: list, write_fer_folder: Factory,
                                  data_logs: pytest.LogCaptureFixture,
                                  damage: Callable[[Path], None]) -> None:
    root, cache = write_fer_folder(tmp_path / "img", samples), tmp_path / "cache"
    good = load_fer2013(root, cache_dir=cache)
    (cache_file,) = npz_files(cache)
    damage(cache_file)
    data_logs.clear()
    rebuilt = load_fer2013(root, cache_dir=cache)
    warnings = [r for r in data_logs.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "corrupt" in warnings[0].message
    assert cache_file.name in warnings[0].message
    assert torch.equal(rebuilt.images, good.images) and rebuilt.fingerprint == good.fingerprint
    data_logs.clear()
    load_fer2013(root, cache_dir=cache)  # the rewritten cache is good again
    assert any("cache hit" in r.message for r in data_logs.records)
    assert not any(r.levelname == "WARNING" for r in data_logs.records)


def test_usage_codes_index_usages(tmp_path: Path, samples: list,
                                  write_fer_csv: Factory) -> None:
    ds = load_fer2013(write_fer_csv(tmp_path / "fer2013.csv", samples), use_cache=False)
    assert ds.usage.dtype == torch.uint8
    assert [USAGES[c] for c in ds.usage.tolist()] == ds.usage_names
    assert {u: len(ds.split(u)) for u in USAGES} == {u: 14 for u in USAGES}
