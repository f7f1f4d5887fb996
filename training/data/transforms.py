"""Training augmentation on whole batches of normalised tensors (no per-sample PIL work).

The evaluation and serving preprocessing (normalise, centre crop, 10-crop) is
:mod:`facemodels.preprocess`; this module only adds the random training views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from facemodels.models.cfg import ModelCfg
from facemodels.preprocess import standardize, unstandardize
from training.data.camera import CameraAugment

__all__ = ["BatchAugment"]


@dataclass
class BatchAugment:
    """Random augmentation of a normalised batch ``(N,C,image_size,image_size)`` in one pass.

    Random crop, scale, rotation and translation are folded into one affine ``grid_sample`` whose
    output is ``cfg.input_size`` square; horizontal flip is a sign flip in the same matrix. Random
    erasing and mixup/cutmix follow. Labels come back as soft targets ``(N, num_classes)``.

    Args:
        cfg: the model's preprocessing contract.
        flip: probability of a horizontal flip.
        max_rotate: largest rotation in degrees (uniform in +-max_rotate).
        scale: range of zoom factors (1.0 = a plain random crop).
        max_shift: extra translation as a fraction of the image, on top of the crop offset.
        erase_p: probability of random erasing per image.
        erase_area: area fraction range of the erased rectangle.
        mixup_alpha: Beta(alpha, alpha) for mixup; 0 turns it off.
        cutmix_alpha: Beta(alpha, alpha) for cutmix; 0 turns it off.
        mix_p: probability that a batch is mixed at all, when either mix is on.
        camera: photometric and resolution degradations applied first (``None`` = off).
    """

    cfg: ModelCfg
    flip: float = 0.5
    max_rotate: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    max_shift: float = 0.0
    erase_p: float = 0.5
    erase_area: tuple[float, float] = (0.02, 0.2)
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_p: float = 0.5
    camera: CameraAugment | None = None

    def __call__(
        self, x: Tensor, y: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Augment ``x`` (normalised floats) and turn integer labels ``y`` into soft targets."""
        x = self.views(x, generator=generator)
        targets = F.one_hot(y, self.cfg.num_classes).to(x.dtype)
        return self.mix(x, targets, generator=generator)

    def views(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """One random view of each image: camera degradations, the affine warp, erasing.

        Everything but mixing, which combines samples and their labels.
        """
        if self.camera is not None:
            x = self.degrade(x, generator=generator)
        x = self.geometric(x, generator=generator)
        return self.erase(x, generator=generator)

    def degrade(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Apply :attr:`camera` in pixel space: undo the normalisation, degrade, redo it."""
        assert self.camera is not None
        pixels = unstandardize(x, self.cfg)
        return standardize(self.camera(pixels, generator=generator), self.cfg)

    def geometric(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        n, dev = x.shape[0], x.device
        size = x.shape[-1]
        out = self.cfg.input_size

        def rand(lo: float, hi: float) -> Tensor:
            return torch.rand(n, generator=generator, device="cpu").mul_(hi - lo).add_(lo)

        angle = rand(-self.max_rotate, self.max_rotate) * (math.pi / 180.0)
        zoom = rand(*self.scale)
        ratio = out / size  # the crop covers this fraction of the image
        # Offsets for the crop window (normalised coordinates), plus optional extra shift.
        room = 1.0 - ratio
        tx = rand(-room, room) + rand(-self.max_shift, self.max_shift) * 2
        ty = rand(-room, room) + rand(-self.max_shift, self.max_shift) * 2
        mirror = torch.where(torch.rand(n, generator=generator) < self.flip, -1.0, 1.0)
        s = ratio / zoom
        cos, sin = torch.cos(angle) * s, torch.sin(angle) * s
        theta = torch.stack(
            [
                torch.stack([cos * mirror, -sin, tx], dim=1),
                torch.stack([sin * mirror, cos, ty], dim=1),
            ],
            dim=1,
        ).to(device=dev, dtype=x.dtype)
        grid = F.affine_grid(theta, [n, x.shape[1], out, out], align_corners=False)
        # Border padding keeps zoomed-out edges from being hard black frames.
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def erase(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        if self.erase_p <= 0:
            return x
        n, _, h, w = x.shape
        area = torch.empty(n).uniform_(*self.erase_area, generator=generator) * h * w
        aspect = torch.exp(torch.empty(n).uniform_(math.log(0.3), math.log(3.3), generator=generator))
        eh = torch.sqrt(area * aspect).clamp(1, h).long()
        ew = torch.sqrt(area / aspect).clamp(1, w).long()
        top = (torch.rand(n, generator=generator) * (h - eh + 1).float()).long()
        left = (torch.rand(n, generator=generator) * (w - ew + 1).float()).long()
        apply = torch.rand(n, generator=generator) < self.erase_p
        rows = torch.arange(h).view(1, h, 1)
        cols = torch.arange(w).view(1, 1, w)
        mask = (
            (rows >= top.view(n, 1, 1)) & (rows < (top + eh).view(n, 1, 1))
            & (cols >= left.view(n, 1, 1)) & (cols < (left + ew).view(n, 1, 1))
            & apply.view(n, 1, 1)
        ).unsqueeze(1).to(x.device)
        noise = torch.randn(x.shape, generator=generator).to(device=x.device, dtype=x.dtype)
        return torch.where(mask, noise, x)

    def mix(
        self, x: Tensor, targets: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        modes = [m for m, a in (("mixup", self.mixup_alpha), ("cutmix", self.cutmix_alpha)) if a > 0]
        if not modes or torch.rand(1, generator=generator).item() >= self.mix_p:
            return x, targets
        mode = modes[int(torch.randint(len(modes), (1,), generator=generator))]
        alpha = self.mixup_alpha if mode == "mixup" else self.cutmix_alpha
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        lam = float(np.random.default_rng(seed).beta(alpha, alpha))
        perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
        if mode == "mixup":
            x = x * lam + x[perm] * (1 - lam)
        else:
            h, w = x.shape[-2:]
            ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
            cy = int(torch.randint(h, (1,), generator=generator))
            cx = int(torch.randint(w, (1,), generator=generator))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
        return x, targets * lam + targets[perm] * (1 - lam)
