"""Factories for a tiny synthetic CFP tree (images + 30 fiducials per image) and tiny GAN nets."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from training.gan.networks import Decoder, Discriminator, Encoder
from training.gan.recipe import GanNets

SIZE = 32  # image side for the tiny networks


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny networks run fastest on one thread (and do not fight a busy machine for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic_fiducials(kind: str, facing: str, cx: float = 80.0, ey: float = 60.0) -> np.ndarray:
    """30 CFP-style fiducials: one face side; profiles face ``facing`` ("left"/"right")."""
    pts = np.zeros((30, 2))
    if kind == "frontal":
        t = np.linspace(0, np.pi / 2, 9)
        pts[0:9] = np.stack([cx - 45 * np.cos(t), ey + 75 * np.sin(t)], 1)
        pts[9:12] = [[cx - 30, ey - 12], [cx - 20, ey - 14], [cx - 10, ey - 12]]
        a = np.linspace(0, 2 * np.pi, 6, endpoint=False)
        pts[12:18] = np.stack([cx - 20 + 5 * np.cos(a), ey + 3 * np.sin(a)], 1)
        pts[18:25] = [[cx, ey], [cx, ey + 10], [cx, ey + 20], [cx, ey + 28], [cx - 2, ey + 31],
                      [cx - 6, ey + 30], [cx - 10, ey + 29]]
        pts[25] = [cx - 15, ey + 40]
        pts[26:30] = [[cx, ey + 36], [cx, ey + 39], [cx, ey + 41], [cx, ey + 44]]
        return pts
    t = np.linspace(0, np.pi / 2, 9)
    pts[0:9] = np.stack([cx - 40 + 30 * np.sin(t), ey + 5 + 70 * np.sin(t)], 1)
    pts[9:12] = [[cx, ey - 12], [cx + 8, ey - 14], [cx + 15, ey - 12]]
    a = np.linspace(0, 2 * np.pi, 6, endpoint=False)
    pts[12:18] = np.stack([cx + 8 + 4 * np.cos(a), ey + 3 * np.sin(a)], 1)
    pts[18:25] = [[cx + 18, ey], [cx + 22, ey + 10], [cx + 27, ey + 20], [cx + 30, ey + 28],
                  [cx + 26, ey + 31], [cx + 22, ey + 31], [cx + 19, ey + 30]]
    pts[25] = [cx + 14, ey + 40]
    pts[26:30] = [[cx + 22, ey + 36], [cx + 23, ey + 39], [cx + 22, ey + 41], [cx + 21, ey + 44]]
    if facing == "left":
        pts[:, 0] = 2 * cx - pts[:, 0]
    return pts


def _image(fid: np.ndarray, rng: np.random.Generator, shade: int) -> np.ndarray:
    img = rng.normal(shade, 15, (160, 160, 3)).clip(0, 255).astype(np.uint8)
    for idx in (slice(12, 18), slice(21, 22), slice(25, 30)):
        x, y = fid[idx].mean(0)
        cv2.circle(img, (int(x), int(y)), 5, (20, 20, 20), -1)
    return img


@pytest.fixture
def make_cfp_tree(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``Data/Images`` + ``Data/Fiducials`` (+ an FP protocol over the eval ids)."""
    made: list[int] = []

    def make(ids: tuple[int, ...] = (1, 2, 3, 451, 452), frontal: int = 3, profile: int = 2,
             seed: int = 0) -> Path:
        rng = np.random.default_rng(seed)
        made.append(1)
        root = tmp_path / f"cfp{len(made)}"
        f_list, p_list = [], []
        for pid in ids:
            shade = 60 + (pid * 37) % 140
            for kind, n in (("frontal", frontal), ("profile", profile)):
                for k in range(1, n + 1):
                    facing = "right" if k % 2 else "left"
                    fid = synthetic_fiducials(kind, facing)
                    img_dir = root / "Data" / "Images" / f"{pid:03d}" / kind
                    fid_dir = root / "Data" / "Fiducials" / f"{pid:03d}" / kind
                    img_dir.mkdir(parents=True, exist_ok=True)
                    fid_dir.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(img_dir / f"{k:02d}.jpg"), _image(fid, rng, shade))
                    lines = "\n".join(f"{x:.3f},{y:.3f}" for x, y in fid)
                    (fid_dir / f"{k:02d}.txt").write_text(lines + "\n")
                    rel = f"../Data/Images/{pid:03d}/{kind}/{k:02d}.jpg"
                    (f_list if kind == "frontal" else p_list).append((rel, pid))
        proto = root / "Protocol"
        (proto / "Split" / "FP" / "10").mkdir(parents=True)
        (proto / "Pair_list_F.txt").write_text("".join(f"{i + 1} {r}\n" for i, (r, _) in enumerate(f_list)))
        (proto / "Pair_list_P.txt").write_text("".join(f"{i + 1} {r}\n" for i, (r, _) in enumerate(p_list)))
        ev_f = [i + 1 for i, (_, pid) in enumerate(f_list) if pid > 450]
        ev_p = [i + 1 for i, (_, pid) in enumerate(p_list) if pid > 450]
        same = [(a, b) for a in ev_f for b in ev_p if f_list[a - 1][1] == p_list[b - 1][1]]
        diff = [(a, b) for a in ev_f for b in ev_p if f_list[a - 1][1] != p_list[b - 1][1]]
        for name, pairs in (("same", same), ("diff", diff)):
            text = "".join(f"{a},{b}\n" for a, b in pairs)
            (proto / "Split" / "FP" / "10" / f"{name}.txt").write_text(text)
        return root

    return make


@pytest.fixture
def tiny_nets() -> GanNets:
    """Small G and D at 32x32 (fast on CPU)."""
    return GanNets(
        encoder=Encoder(width=8, feat_dim=16, image_size=SIZE),
        decoder=Decoder(width=8, feat_dim=16, noise_dim=4, image_size=SIZE),
        discriminator=Discriminator(num_identities=5, width=8, image_size=SIZE),
    )
