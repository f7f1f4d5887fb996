"""load_fer2013 on bad input: every case raises DatasetError naming the file, or is skipped."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from training.data.dataset import DatasetError
from training.data.fer2013 import load_fer2013

Factory = Callable[..., object]
PIXELS = " ".join(["128"] * 2304)


@pytest.fixture
def folder(tmp_path: Path, fer_samples: Factory, write_fer_folder: Factory) -> Path:
    return write_fer_folder(tmp_path / "fer", fer_samples(1))  # type: ignore[return-value]


@pytest.fixture
def write_csv(tmp_path: Path, fer_samples: Factory, write_fer_csv: Factory
              ) -> Callable[..., Path]:
    """A CSV of 14 good rows, then ``extra_lines`` (the first extra row is on line 16)."""
    samples = fer_samples(1)

    def write(*extra_lines: str, header: str = "emotion,pixels,Usage") -> Path:
        return write_fer_csv(tmp_path / "fer2013.csv", samples, header=header,  # type: ignore[return-value]
                             extra_lines=extra_lines)

    return write


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nowhere"):
        load_fer2013(tmp_path / "nowhere", use_cache=False)


@pytest.mark.parametrize("split", ["train", "test"])
def test_missing_split_folder(folder: Path, split: str) -> None:
    shutil.rmtree(folder / split)
    with pytest.raises(DatasetError, match=re.escape(f"{folder / split}: missing split folder")):
        load_fer2013(folder, use_cache=False)


def test_no_images(tmp_path: Path) -> None:
    for split in ("train", "test"):
        (tmp_path / split / "happy").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        load_fer2013(tmp_path, use_cache=False)


def test_unknown_class_folder(folder: Path) -> None:
    (folder / "train" / "happiness").mkdir()
    with pytest.raises(DatasetError, match="happiness"):
        load_fer2013(folder, use_cache=False, skip_bad=True)  # structural: never skipped


def _corrupt(path: Path) -> None:
    path.write_bytes(b"\xff\xd8 definitely not a jpeg")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_corrupt, _empty])
def test_undecodable_image(folder: Path, damage: Callable[[Path], None]) -> None:
    bad = folder / "test" / "fear" / "PublicTest_bad.jpg"
    damage(bad)
    with pytest.raises(DatasetError, match=r"PublicTest_bad\.jpg: corrupt or undecodable"):
        load_fer2013(folder, use_cache=False)


def test_wrong_image_size(folder: Path, image_writer: Factory) -> None:
    image_writer(folder / "train" / "sad" / "Training_big.png", np.zeros((40, 50), np.uint8))
    with pytest.raises(DatasetError, match=r"Training_big\.png: image is 50x40, expected 48x48"):
        load_fer2013(folder, use_cache=False)


@pytest.mark.parametrize(
    ("header", "line", "message"),
    [
        ("emotion,pixel,Usage", None, "header must name the columns"),
        ("", None, "header must name the columns"),
        (None, f"3,{' '.join(['1'] * 2303)},Training", "expected 2304 pixels, got 2303"),
        (None, f"3,{' '.join(['1'] * 2305)},Training", "expected 2304 pixels, got 2305"),
        (None, f"3,{PIXELS[:-3]}1.5,Training", "pixel '1.5' is not an integer"),
        (None, f"3,{PIXELS[:-3]}abc,Training", "pixel 'abc' is not an integer"),
        (None, f"3,{PIXELS[:-3]}256,Training", r"pixel values must lie in 0\.\.255"),
        (None, f"3,{PIXELS[:-3]}-1,Training", r"pixel values must lie in 0\.\.255"),
        (None, f"7,{PIXELS},Training", r"emotion 7 is outside 0\.\.6"),
        (None, f"-1,{PIXELS},Training", r"emotion -1 is outside 0\.\.6"),
        (None, f"happy,{PIXELS},Training", "emotion 'happy' is not an integer"),
        (None, f"3,{PIXELS},Validation", "unknown Usage 'Validation'"),
        (None, f"3,{PIXELS}", "expected at least 3 columns, got 2"),
    ],
)
def test_bad_csv(write_csv: Callable[..., Path], header: str | None, line: str | None,
                 message: str) -> None:
    path = write_csv(*([line] if line else []),
                     **({"header": header} if header is not None else {}))
    where = f"{path}:16: " if line else f"{path}: "
    with pytest.raises(DatasetError, match=message) as err:
        load_fer2013(path, use_cache=False)
    assert str(err.value).startswith(where)


def test_csv_without_rows(write_csv: Callable[..., Path], tmp_path: Path) -> None:
    path = tmp_path / "empty" / "fer2013.csv"
    path.parent.mkdir()
    path.write_text("emotion,pixels,Usage\n")
    with pytest.raises(DatasetError, match="no usable rows"):
        load_fer2013(path, use_cache=False)


def test_skip_bad_images_counts_in_one_warning(
    folder: Path, image_writer: Factory, data_logs: pytest.LogCaptureFixture
) -> None:
    good = len(load_fer2013(folder, use_cache=False))
    _corrupt(folder / "train" / "angry" / "Training_a.jpg")
    _empty(folder / "test" / "happy" / "PublicTest_b.png")
    image_writer(folder / "train" / "sad" / "Training_c.png", np.zeros((47, 48), np.uint8))
    data_logs.clear()
    ds = load_fer2013(folder, use_cache=False, skip_bad=True)
    assert len(ds) == good
    assert ds.paths is not None and not any("_a." in p or "_b." in p or "_c." in p
                                            for p in ds.paths)
    warnings = [r.getMessage() for r in data_logs.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0].startswith("skipped 3 bad images")
    assert "Training_a.jpg" in warnings[0]  # the first bad file, in load order


def test_skip_bad_csv_rows(write_csv: Callable[..., Path],
                           data_logs: pytest.LogCaptureFixture) -> None:
    path = write_csv(f"9,{PIXELS},Training", f"3,{PIXELS},Nope", f"3,{PIXELS},PrivateTest")
    ds = load_fer2013(path, use_cache=False, skip_bad=True)
    assert len(ds) == 15 and ds.usage_names[-1] == "PrivateTest"
    warnings = [r.getMessage() for r in data_logs.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("skipped 2 bad CSV rows")
    assert f"{path}:16" in warnings[0]


def test_skip_bad_result_is_cached_apart(folder: Path, tmp_path: Path,
                                         data_logs: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    _corrupt(folder / "train" / "angry" / "Training_a.jpg")
    first = load_fer2013(folder, cache_dir=cache, skip_bad=True)
    assert [p.name.endswith("-skipbad.npz") for p in cache.glob("*.npz")] == [True]
    data_logs.clear()
    again = load_fer2013(folder, cache_dir=cache, skip_bad=True)
    assert any("cache hit" in r.getMessage() for r in data_logs.records)
    assert any(r.getMessage().startswith("skipped 1 bad images") for r in data_logs.records)
    assert again.fingerprint == first.fingerprint
    with pytest.raises(DatasetError, match=r"Training_a\.jpg"):  # strict ignores that cache
        load_fer2013(folder, cache_dir=cache)
