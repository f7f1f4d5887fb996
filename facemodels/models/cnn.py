"""The three plain CNN branches of the multi-receptive-field FER ensemble.

Each branch has three conv stages and a four-layer fully connected head; the branches differ
only in kernel and pooling sizes, so their errors decorrelate in the ensemble:

=========  ===========  ==========  =========================
model      conv kernel  pool size   spatial size (44 input)
=========  ===========  ==========  =========================
cnn3       3 / 3 / 3    2 / 2 / 2   44 -> 22 -> 11 -> 5
cnn5       5 / 4 / 5    3 / 3 / 3   44 -> 22 -> 11 -> 6
cnn7       7 / 7 / 7    2 / 2 / 2   44 -> 22 -> 11 -> 5
=========  ===========  ==========  =========================

Choices not fixed by the paper, documented here:

* Conv stages: 64 / 128 / 256 channels, zero "same" padding (an even kernel such as 4 gets
  the extra pixel right and bottom) -> conv (stride 1) -> BatchNorm -> ReLU -> max-pool.
* Max-pools all have stride 2 and padding ``(k - 1) // 2``: the 2x2 pools tile the map, the
  3x3 pools overlap (AlexNet style) and keep the same 2x reduction.
* Head: flatten -> FC 3072 -> FC 2048 -> FC 1024 -> FC 512 -> FC ``num_classes``, each hidden
  FC followed by ReLU and dropout with drop probability 0.8 after the 3072 layer and 0.5 after
  the others (``drop_rates``). No norm in the head, so single-sample training batches work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from facemodels.models._layers import ConvNormAct, LayerType, resolve_cfg
from facemodels.models._registry import register_model
from facemodels.models.cfg import ModelCfg

__all__ = ["BranchCNN", "cnn3", "cnn5", "cnn7"]


class BranchCNN(nn.Module):
    """Three conv -> norm -> act -> max-pool stages, then an MLP head.

    Args:
        kernel_sizes: conv kernel per stage.
        pool_sizes: max-pool kernel per stage (stride 2, padding ``(k - 1) // 2``).
        widths: conv channels per stage.
        fc_dims: hidden sizes of the fully connected head.
        drop_rates: dropout probability after each hidden FC layer.
    """

    def __init__(
        self,
        kernel_sizes: Sequence[int],
        pool_sizes: Sequence[int],
        *,
        num_classes: int,
        cfg: ModelCfg,
        widths: Sequence[int] = (64, 128, 256),
        fc_dims: Sequence[int] = (3072, 2048, 1024, 512),
        drop_rates: Sequence[float] = (0.8, 0.5, 0.5, 0.5),
        norm_layer: LayerType = nn.BatchNorm2d,
        act_layer: LayerType = nn.ReLU,
    ) -> None:
        super().__init__()
        if not len(kernel_sizes) == len(pool_sizes) == len(widths):
            raise ValueError("kernel_sizes, pool_sizes and widths need one entry per stage")
        if len(fc_dims) != len(drop_rates):
            raise ValueError("fc_dims and drop_rates need one entry per hidden layer")
        self.cfg = cfg
        self.num_classes = num_classes

        stages: list[nn.Module] = []
        chs, size = cfg.in_chans, cfg.input_size
        for k, p, width in zip(kernel_sizes, pool_sizes, widths, strict=True):
            pad = (p - 1) // 2
            conv = ConvNormAct(chs, width, k, padding=0, norm_layer=norm_layer,
                               act_layer=act_layer)
            stages += [_same_pad(k), conv, nn.MaxPool2d(p, stride=2, padding=pad)]
            chs, size = width, (size + 2 * pad - p) // 2 + 1
        if size < 1:
            raise ValueError(f"input_size {cfg.input_size} is too small for pools {pool_sizes}")
        self.features = nn.Sequential(*stages)
        self.num_features = chs * size * size

        head: list[nn.Module] = []
        dim = self.num_features
        for out, drop in zip(fc_dims, drop_rates, strict=True):
            head += [nn.Linear(dim, out), act_layer(), nn.Dropout(drop)]
            dim = out
        self.head = nn.Sequential(*head)
        self.fc = nn.Linear(dim, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """Flattened conv features, shape ``(N, num_features)``."""
        return torch.flatten(self.features(x), 1)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.fc(self.head(features))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _same_pad(kernel_size: int) -> nn.ZeroPad2d:
    """Zero padding that keeps the size for a stride-1 conv (the extra pixel right/bottom)."""
    before = (kernel_size - 1) // 2
    after = kernel_size - 1 - before
    return nn.ZeroPad2d((before, after, before, after))


def _branch(
    kernel_sizes: Sequence[int],
    pool_sizes: Sequence[int],
    *,
    num_classes: int,
    cfg: ModelCfg | None,
    **kwargs: Any,
) -> BranchCNN:
    cfg = resolve_cfg(cfg, num_classes)
    return BranchCNN(kernel_sizes, pool_sizes, num_classes=num_classes, cfg=cfg, **kwargs)


@register_model
def cnn3(*, num_classes: int = 7, cfg: ModelCfg | None = None, **kwargs: Any) -> BranchCNN:
    """Branch with 3x3 kernels and 2x2 pools."""
    return _branch((3, 3, 3), (2, 2, 2), num_classes=num_classes, cfg=cfg, **kwargs)


@register_model
def cnn5(*, num_classes: int = 7, cfg: ModelCfg | None = None, **kwargs: Any) -> BranchCNN:
    """Branch with 5x5 / 4x4 / 5x5 kernels and overlapping 3x3 pools."""
    return _branch((5, 4, 5), (3, 3, 3), num_classes=num_classes, cfg=cfg, **kwargs)


@register_model
def cnn7(*, num_classes: int = 7, cfg: ModelCfg | None = None, **kwargs: Any) -> BranchCNN:
    """Branch with 7x7 kernels and 2x2 pools."""
    return _branch((7, 7, 7), (2, 2, 2), num_classes=num_classes, cfg=cfg, **kwargs)
