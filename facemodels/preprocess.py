"""Model input preprocessing, one definition for training, evaluation and the service.

Images arrive as ``uint8`` tensors shaped ``(N, H, W)`` (grayscale) or ``(N, C, H, W)``; the
:class:`~facemodels.models.cfg.ModelCfg` stored with the weights decides size, channels and
normalisation. Everything works on whole batches, on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from facemodels.models.cfg import ModelCfg

__all__ = ["center_crop", "crop_boxes_10", "eval_views", "normalize", "standardize", "ten_crop",
           "unstandardize"]


def normalize(images: Tensor, cfg: ModelCfg) -> Tensor:
    """uint8 ``(N,H,W)`` or ``(N,C,H,W)`` -> float ``(N,C,H,W)`` scaled and standardised per ``cfg``.

    Grayscale input is repeated to ``cfg.in_chans`` channels; RGB input is converted to gray
    (ITU-R 601 luma) when the model is grayscale. Images whose side differs from
    ``cfg.image_size`` are resized (bilinear, antialiased) to it.
    """
    x = images
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"expected (N,H,W) or (N,C,H,W) images, got shape {tuple(images.shape)}")
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    c = x.shape[1]
    if c == 3 and cfg.in_chans == 1:
        w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
        x = (x * w).sum(1, keepdim=True)
    elif c == 1 and cfg.in_chans > 1:
        x = x.expand(-1, cfg.in_chans, -1, -1)
    elif c != cfg.in_chans:
        raise ValueError(f"cannot map {c} channels to the model's {cfg.in_chans}")
    if x.shape[-2:] != (cfg.image_size, cfg.image_size):
        x = F.interpolate(
            x, size=(cfg.image_size, cfg.image_size), mode="bilinear", antialias=True,
            align_corners=False,
        )
    return standardize(x, cfg)


def _mean_std(cfg: ModelCfg, like: Tensor) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(cfg.mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
    return mean, std


def standardize(x: Tensor, cfg: ModelCfg) -> Tensor:
    """Float pixels in [0, 1] ``(N,C,H,W)`` -> the model's input (``cfg.mean``/``cfg.std``)."""
    mean, std = _mean_std(cfg, x)
    return (x - mean) / std


def unstandardize(x: Tensor, cfg: ModelCfg) -> Tensor:
    """The inverse of :func:`standardize`: model input -> float pixels in [0, 1]."""
    mean, std = _mean_std(cfg, x)
    return x * std + mean


def crop_boxes_10(image_size: int, crop: int) -> list[tuple[int, int, bool]]:
    """The 10-crop views as ``(top, left, mirrored)``: four corners and centre, then mirrors."""
    if crop > image_size:
        raise ValueError(f"crop {crop} larger than image {image_size}")
    far = image_size - crop
    mid = far // 2
    five = [(0, 0), (0, far), (far, 0), (far, far), (mid, mid)]
    return [(t, left, False) for t, left in five] + [(t, left, True) for t, left in five]


def center_crop(x: Tensor, size: int) -> Tensor:
    """Centre ``size``x``size`` crop of ``(N,C,H,W)`` (same rounding as the 10-crop centre)."""
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def ten_crop(x: Tensor, size: int) -> Tensor:
    """``(N,C,H,W)`` -> ``(10,N,C,size,size)``: corners, centre, and their horizontal mirrors."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError("ten_crop expects square images")
    views = []
    for top, left, mirrored in crop_boxes_10(x.shape[-1], size):
        v = x[..., top : top + size, left : left + size]
        views.append(v.flip(-1) if mirrored else v)
    return torch.stack(views)


def eval_views(images: Tensor, cfg: ModelCfg, *, tta: bool) -> Tensor:
    """Evaluation input: ``(V,N,C,s,s)`` with V=10 under TTA, else V=1 (centre crop)."""
    x = normalize(images, cfg)
    if tta:
        return ten_crop(x, cfg.input_size)
    return center_crop(x, cfg.input_size).unsqueeze(0)
