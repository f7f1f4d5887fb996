"""CFP loader: alignment, pose labels from the fiducials, flips, id split, cache and errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from facemodels.face.pose import flip_pose
from facemodels.face.pose_framing import EYE_Y, MOUTH_Y, NOSE_X, PROFILE_SHIFT, pose_framing_matrix
from tests.support import require_shared
from training.data.cfp import cfp_anchors, cfp_fiducials_path, cfp_pose_label, load_cfp, read_fiducials
from training.data.dataset import DatasetError


def test_load_aligns_labels_and_splits(make_cfp_tree: Callable[..., Path], tmp_path: Path) -> None:
    root = make_cfp_tree()
    ds = load_cfp(root, size=64, cache_dir=tmp_path / "cache")
    assert ds.images.shape == (25, 64, 64) and ds.images.dtype == torch.uint8
    assert ds.ids == [1, 2, 3, 451, 452]
    frontal = torch.tensor(["/frontal/" in p for p in ds.paths])
    assert (ds.pose[frontal] == 0).all()
    # profile 01 faces right (nose right of the ear) -> 2, profile 02 faces left -> 1
    for i, p in enumerate(ds.paths):
        if "/profile/01" in p:
            assert ds.pose[i] == 2
        elif "/profile/02" in p:
            assert ds.pose[i] == 1
    train, held = ds.split("train"), ds.split("eval")
    assert set(train.ids) == {1, 2, 3} and set(held.ids) == {451, 452}
    assert len(train) + len(held) == len(ds)
    with pytest.raises(ValueError, match="split"):
        ds.split("test")
    again = load_cfp(root, size=64, cache_dir=tmp_path / "cache")
    assert again.fingerprint == ds.fingerprint
    assert len(list((tmp_path / "cache").glob("cfp64-*.npz"))) == 1
    assert torch.equal(again.images, ds.images)
    assert load_cfp(root, size=32, use_cache=False).images.shape[-1] == 32
    # each image's fiducials, found from its dataset path (as the warp evaluation needs them)
    for p in ds.paths:
        assert cfp_fiducials_path(ds.source, p) == Path(ds.source) / p.replace(
            "Images", "Fiducials").replace(".jpg", ".txt")
        assert cfp_fiducials_path(ds.source, p).is_file()
    with pytest.raises(ValueError, match="not a CFP image path"):
        cfp_fiducials_path(ds.source, "Data/Fiducials/001/frontal/01.txt")


def test_frontal_anchors_land_on_the_fer_template() -> None:
    from tests.training.gan.conftest import synthetic_fiducials

    fid = synthetic_fiducials("frontal", "right")
    m = pose_framing_matrix(cfp_anchors(fid), yaw=0.0, size=64)
    a = cfp_anchors(fid)
    nose = m @ np.array([*a.nose, 1.0])
    eye, mouth = m @ np.array([*a.eye, 1.0]), m @ np.array([*a.mouth, 1.0])
    assert nose[0] == pytest.approx(NOSE_X * 64)
    assert (eye[1] + mouth[1]) / 2 == pytest.approx((EYE_Y + MOUTH_Y) / 2 * 64)
    assert np.hypot(*(mouth - eye)) == pytest.approx((MOUTH_Y - EYE_Y) * 64)
    right = pose_framing_matrix(a, yaw=90.0, size=64) @ np.array([*a.nose, 1.0])
    assert right[0] == pytest.approx((NOSE_X + PROFILE_SHIFT) * 64)


def test_pose_label_from_geometry_and_flip() -> None:
    from tests.training.gan.conftest import synthetic_fiducials

    assert cfp_pose_label(synthetic_fiducials("profile", "right"), "profile") == 2
    assert cfp_pose_label(synthetic_fiducials("profile", "left"), "profile") == 1
    assert cfp_pose_label(synthetic_fiducials("profile", "left"), "frontal") == 0
    assert flip_pose(torch.tensor([0, 1, 2, 2])).tolist() == [0, 2, 1, 1]


def test_flip_of_aligned_profile_matches_other_side(make_cfp_tree: Callable[..., Path]) -> None:
    """A mirrored right profile is framed like a left one (the nose lands on the other side)."""
    ds = load_cfp(make_cfp_tree(ids=(1,)), size=64, use_cache=False)
    right = ds.images[ds.pose == 2][0].float()
    left = ds.images[ds.pose == 1][0].float()
    dark_r = (right < 60).float().nonzero()[:, 1].float().mean()
    dark_l = (left.flip(-1) < 60).float().nonzero()[:, 1].float().mean()
    assert abs(dark_r - dark_l) < 3  # same layout once flipped


def test_missing_fiducials_names_the_file(make_cfp_tree: Callable[..., Path]) -> None:
    root = make_cfp_tree(ids=(1,))
    victim = root / "Data" / "Fiducials" / "001" / "profile" / "02.txt"
    victim.unlink()
    with pytest.raises(DatasetError, match=r"001/profile/02\.txt"):
        load_cfp(root, use_cache=False)


def test_corrupt_image_and_bad_fiducials_name_the_file(make_cfp_tree: Callable[..., Path]) -> None:
    root = make_cfp_tree(ids=(1,))
    img = root / "Data" / "Images" / "001" / "frontal" / "02.jpg"
    img.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"001/frontal/02\.jpg"):
        load_cfp(root, use_cache=False)
    root2 = make_cfp_tree(ids=(2,), seed=1)
    fid = root2 / "Data" / "Fiducials" / "002" / "frontal" / "01.txt"
    fid.write_text("1,2\n3,4\n")
    with pytest.raises(DatasetError, match=r"002/frontal/01\.txt"):
        read_fiducials(fid)
    with pytest.raises(DatasetError, match="no such folder"):
        load_cfp(root / "nowhere")


@pytest.mark.shared_data
def test_real_cfp_two_people(tmp_path: Path) -> None:
    root = require_shared("cfp")
    ds = load_cfp(root, ids=(1, 451), cache_dir=tmp_path)
    assert len(ds) == 28
    assert torch.bincount(ds.pose[ds.identity == 1], minlength=3).tolist()[0] == 10
    assert set(ds.pose[ds.pose != 0].tolist()) == {1, 2}  # both profile directions occur
    assert ds.split("eval").ids == [451]
