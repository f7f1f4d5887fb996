"""Photometric and resolution changes that real cameras make, as a batch augmentation.

FER2013 faces are web images: mostly well exposed, mid-resolution and JPEG-compressed once.
Faces met in service come from webcams and phones (dim or harsh light, low resolution upscaled
by the aligner, blur, sensor noise, strong compression). :class:`CameraAugment` draws those
changes per image: down-then-up sampling, Gaussian blur, gamma, contrast, Gaussian noise and
JPEG re-encoding, each with its own probability. It works on ``(N, C, H, W)`` floats in
``[0, 1]`` and returns the same shape and range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.io import decode_jpeg, encode_jpeg

__all__ = ["CameraAugment"]


@dataclass
class CameraAugment:
    """Per-image camera degradations; ``p`` is each step's probability.

    Args:
        p: probability that an image gets each step (the steps are drawn independently).
        down_scale: resolution factor range for down-then-up sampling (bilinear, antialiased).
        blur_sigma: Gaussian blur sigma range in pixels.
        gamma: gamma range (``x ** gamma``; > 1 darkens mid-tones).
        contrast: contrast factor range around each image's mean.
        noise_std: Gaussian noise standard deviation range (in ``[0, 1]`` units).
        jpeg_quality: JPEG quality range (integers, inclusive).
    """

    p: float = 0.3
    down_scale: tuple[float, float] = (0.35, 0.9)
    blur_sigma: tuple[float, float] = (0.4, 1.2)
    gamma: tuple[float, float] = (0.6, 1.6)
    contrast: tuple[float, float] = (0.6, 1.4)
    noise_std: tuple[float, float] = (0.01, 0.05)
    jpeg_quality: tuple[int, int] = (20, 80)

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"camera augmentation probability must be in [0, 1], got {self.p}")

    def __call__(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Degrade a random subset of ``x`` (floats in [0, 1], ``(N, C, H, W)``)."""
        if self.p <= 0:
            return x
        g = generator
        x = self.resample(x, self._pick(x, g), generator=g)
        x = self.blur(x, self._pick(x, g), generator=g)
        x = self.tone(x, self._pick(x, g), self._pick(x, g), generator=g)
        x = self.noise(x, self._pick(x, g), generator=g)
        return self.jpeg(x, self._pick(x, g), generator=g)

    def _pick(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        return torch.rand(x.shape[0], generator=g) < self.p

    @staticmethod
    def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None) -> Tensor:
        return torch.rand(n, generator=g) * (hi - lo) + lo

    def resample(self, x: Tensor, pick: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Down-sample the picked images to a random smaller side, then back up."""
        idx = pick.nonzero().flatten()
        if len(idx) == 0:
            return x
        size = x.shape[-1]
        sides = (self._uniform(len(idx), *self.down_scale, generator) * size).round().clamp(4, size)
        out = x.clone()
        for side in sides.unique():  # one interpolate per distinct side
            sel = idx[(sides == side).to(idx.device)]
            small = F.interpolate(x[sel], size=(int(side),) * 2, mode="bilinear", antialias=True,
                                  align_corners=False)
            out[sel] = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out

    def blur(self, x: Tensor, pick: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Gaussian blur with a per-image sigma (5x5 separable kernel)."""
        idx = pick.nonzero().flatten()
        if len(idx) == 0:
            return x
        sigma = self._uniform(len(idx), *self.blur_sigma, generator).to(x.device, x.dtype)
        taps = torch.arange(-2, 3, device=x.device, dtype=x.dtype)
        k1 = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None] ** 2))
        k1 = k1 / k1.sum(1, keepdim=True)  # (n, 5)
        c = x.shape[1]
        sub = x[idx].reshape(1, len(idx) * c, *x.shape[-2:])
        kx = k1.repeat_interleave(c, 0)[:, None, None, :]  # (n*c, 1, 1, 5)
        ky = kx.transpose(-1, -2)
        sub = F.conv2d(F.pad(sub, (2, 2, 0, 0), mode="replicate"), kx, groups=len(idx) * c)
        sub = F.conv2d(F.pad(sub, (0, 0, 2, 2), mode="replicate"), ky, groups=len(idx) * c)
        out = x.clone()
        out[idx] = sub.reshape(len(idx), c, *x.shape[-2:])
        return out

    def tone(self, x: Tensor, pick_gamma: Tensor, pick_contrast: Tensor, *,
             generator: torch.Generator | None = None) -> Tensor:
        """Gamma, then contrast around each image's mean, on the picked images."""
        n = x.shape[0]
        gamma = torch.where(pick_gamma, self._uniform(n, *self.gamma, generator), 1.0)
        contrast = torch.where(pick_contrast, self._uniform(n, *self.contrast, generator), 1.0)
        gamma = gamma.to(x.device, x.dtype).view(n, 1, 1, 1)
        contrast = contrast.to(x.device, x.dtype).view(n, 1, 1, 1)
        x = x.clamp(0, 1) ** gamma
        mean = x.mean((1, 2, 3), keepdim=True)
        return ((x - mean) * contrast + mean).clamp(0, 1)

    def noise(self, x: Tensor, pick: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Additive Gaussian noise with a per-image standard deviation."""
        std = torch.where(pick, self._uniform(x.shape[0], *self.noise_std, generator), 0.0)
        grain = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        return (x + grain * std.to(x.device, x.dtype).view(-1, 1, 1, 1)).clamp(0, 1)

    def jpeg(self, x: Tensor, pick: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Re-encode the picked images as JPEG at a random quality (on the CPU)."""
        idx = pick.nonzero().flatten().tolist()
        if not idx:
            return x
        lo, hi = self.jpeg_quality
        quality = torch.randint(lo, hi + 1, (len(idx),), generator=generator).tolist()
        out = x.clone()
        for i, q in zip(idx, quality, strict=True):
            img = (x[i].detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
            decoded = decode_jpeg(encode_jpeg(img, quality=q))
            out[i] = decoded.to(x.device, x.dtype) / 255.0
        return out

    def describe(self) -> str:
        """One line for logs."""
        return (f"camera augmentation p={self.p}: down-up x{self.down_scale}, blur sigma "
                f"{self.blur_sigma}, gamma {self.gamma}, contrast {self.contrast}, noise "
                f"{self.noise_std}, JPEG q{self.jpeg_quality}")

