"""Distillation targets computed once: K fixed augmented views of every training face and the
teacher's logits on each (``fer-train classify --teacher T --teacher-views K``).

A strong teacher (an ensemble with ResNets and a VGG) costs many times the compact student's
forward and backward pass, so distilling from it live makes every epoch several times slower.
With the views fixed, the teacher runs K times over the training set once; every epoch after
that draws one of the K stored views per face, with the stored logits, at the student's own
speed. The student sees exactly the pixels the teacher saw (the views are stored as uint8 and
the teacher's logits are taken on the stored pixels). Storing crops and soft labels this way is
the scheme of Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition"
(ECCV 2022).

The views come from the run's own :class:`~training.data.transforms.BatchAugment` (camera
degradations, affine warp, erasing; mixing is not allowed) and aligned-view swapping, drawn
from a generator seeded by ``(seed, view)``. Each view is one safetensors file under
``<cache>/teacher-views-<key>/``; the key covers the teacher's weights, the training images,
the augmentation and the seed, so a build that stops resumes at the first missing view and a
changed setting never reads stale targets.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from facemodels.atomic import save_safetensors_atomically
from facemodels.device import autocast
from facemodels.models.cfg import ModelCfg
from facemodels.preprocess import normalize, standardize, unstandardize
from training.data.aligned_views import mix_views
from training.data.transforms import BatchAugment
from training.distributed import barrier, seeded_generator

__all__ = ["TeacherViews", "TeacherViewsError", "build_teacher_views", "teacher_views_dir",
           "to_pixels"]

log = logging.getLogger(__name__)

#: Bump when the way views are drawn changes, so older caches are not reused.
VIEWS_VERSION = 2
#: Mixed into each view's seed so that view v's stream is not epoch v's (``seeded_generator``
#: also draws the epoch orders and the BatchNorm recalibration batches).
_VIEW_SALT = 0x7456


class TeacherViewsError(ValueError):
    """A teacher-views file is corrupt or does not match the run; the message names the file."""


@dataclass(frozen=True)
class TeacherViews:
    """``images`` uint8 ``(K, N, C, S, S)``, the teacher's ``logits`` float32 ``(K, N, classes)``
    and the cache ``folder`` they were read from."""

    images: Tensor
    logits: Tensor
    folder: Path

    @property
    def num_views(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> TeacherViews:
        return TeacherViews(self.images.to(device), self.logits.to(device), self.folder)

    def draw(self, idx: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One stored view per sample of ``idx`` (uniform over the K views) and its logits."""
        view = torch.randint(self.num_views, (len(idx),), generator=generator).to(idx.device)
        return self.images[view, idx], self.logits[view, idx]


def to_pixels(x: Tensor, cfg: ModelCfg) -> Tensor:
    """Model input -> uint8 pixels (rounded, clipped to 0..255), the form views are stored in."""
    return unstandardize(x.float(), cfg).mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def teacher_views_dir(
    cache_dir: Path, teacher: nn.Module, images: Tensor, augment: BatchAugment,
    *, aligned: Tensor | None, aligned_p: float, seed: int, batch_size: int,
    amp_dtype: torch.dtype | None,
) -> Path:
    """``<cache_dir>/teacher-views-<key>``: the key hashes everything a view depends on.

    That is the teacher (class and weights), the images, the aligned views and their swap
    probability, the augmentation, the seed, the batching (random draws go batch by batch),
    the autocast dtype and the device type (CPU and CUDA resample pixels slightly differently).
    """
    device = next(teacher.parameters()).device
    settings = (f"teacher-views v{VIEWS_VERSION}\n{type(teacher).__name__}\n{augment!r}\n"
                f"{aligned_p}\n{seed}\n{batch_size}\n{amp_dtype}\n{device.type}\n")
    h = hashlib.sha256(settings.encode())
    for name, t in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(t.detach().float().cpu().numpy()).tobytes())
    for t in (images, aligned):
        h.update(b"-" if t is None else np.ascontiguousarray(t.cpu().numpy()).tobytes())
    return Path(cache_dir) / f"teacher-views-{h.hexdigest()[:24]}"


@torch.no_grad()
def _draw_view(
    teacher: nn.Module, images: Tensor, augment: BatchAugment, *, aligned: Tensor | None,
    aligned_p: float, generator: torch.Generator, batch_size: int, amp_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor]:
    cfg = augment.cfg
    device = next(teacher.parameters()).device
    pixels, logits = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device)
        if aligned is not None:
            batch = mix_views(batch, aligned[start:start + batch_size].to(device), aligned_p,
                              generator)
        view = to_pixels(augment.views(normalize(batch, cfg), generator=generator), cfg)
        x = standardize(view.float().div_(255.0), cfg)
        with autocast(device, amp_dtype):
            out = teacher(x)
        pixels.append(view.cpu())
        logits.append(out.float().cpu())
    return torch.cat(pixels), torch.cat(logits)


def _load_view(path: Path, image_shape: tuple[int, ...], num_classes: int) -> tuple[Tensor, Tensor]:
    try:
        tensors = load_file(str(path))
        images, logits = tensors["images"], tensors["logits"]
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise TeacherViewsError(f"teacher-views file {path} is corrupt or unreadable ({e}); "
                                "delete it to rebuild that view") from e
    n = image_shape[0]
    if (images.dtype != torch.uint8 or tuple(images.shape) != image_shape
            or tuple(logits.shape) != (n, num_classes)):
        raise TeacherViewsError(f"teacher-views file {path} holds images {tuple(images.shape)} "
                                f"and logits {tuple(logits.shape)}, expected {image_shape} and "
                                f"{(n, num_classes)}; delete it to rebuild that view")
    return images, logits.float()


def build_teacher_views(
    teacher: nn.Module, images: Tensor, augment: BatchAugment, *, num_views: int, cache_dir: Path,
    aligned: Tensor | None = None, aligned_p: float = 0.0, seed: int = 0, batch_size: int = 256,
    amp_dtype: torch.dtype | None = None, rank: int = 0, world_size: int = 1,
) -> TeacherViews:
    """Load ``num_views`` stored views of ``images`` (uint8 ``(N,H,W)``), computing missing ones.

    Under ``torchrun`` every rank calls this: rank r computes the missing views r, r + W, ...,
    all ranks wait for each other (the collective timeout, one hour, bounds a rank's share), then
    each loads all of them.

    Raises:
        ValueError: if ``augment`` mixes samples (mixup or cutmix), which fixed views cannot hold.
        TeacherViewsError: naming the file, if a stored view is corrupt or of the wrong shape.
    """
    if augment.mixup_alpha > 0 or augment.cutmix_alpha > 0:
        raise ValueError("teacher views cannot be combined with mixup or cutmix")
    if num_views < 1:
        raise ValueError(f"num_views must be at least 1, got {num_views}")
    teacher = teacher.eval()
    folder = teacher_views_dir(cache_dir, teacher, images, augment, aligned=aligned,
                               aligned_p=aligned_p, seed=seed, batch_size=batch_size,
                               amp_dtype=amp_dtype)
    n, classes, cfg = len(images), augment.cfg.num_classes, augment.cfg
    for v in range(rank, num_views, world_size):
        path = folder / f"view-{v}.safetensors"
        if path.is_file():
            continue
        start = time.perf_counter()
        view_images, view_logits = _draw_view(
            teacher, images, augment, aligned=aligned, aligned_p=aligned_p,
            generator=seeded_generator(seed, v, _VIEW_SALT), batch_size=batch_size,
            amp_dtype=amp_dtype)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"view": str(v), "seed": str(seed), "augment": repr(augment),
                "aligned_p": str(aligned_p), "amp": str(amp_dtype),
                "device": str(next(teacher.parameters()).device), "version": str(VIEWS_VERSION)}
        save_safetensors_atomically(path, {"images": view_images, "logits": view_logits},
                                    metadata=meta)
        log.info("teacher view %d of %d (%d faces) computed in %.0f s: %s", v + 1, num_views, n,
                 time.perf_counter() - start, path)
    if world_size > 1:
        barrier()
    stored = TeacherViews(
        torch.empty((num_views, n, cfg.in_chans, cfg.input_size, cfg.input_size), dtype=torch.uint8),
        torch.empty((num_views, n, classes)), folder)
    for v in range(num_views):
        stored.images[v], stored.logits[v] = _load_view(
            folder / f"view-{v}.safetensors", tuple(stored.images.shape[1:]), classes)
    return stored
