"""ResNet for 44x44 FER crops (CIFAR-style: 3x3 stride-1 stem, no stem max-pool).

``resnet18`` and ``resnet34`` use BasicBlocks in four stages of 64/128/256/512 channels
(strides 1/2/2/2, so 44 -> 44 -> 22 -> 11 -> 6), global average pooling and one Linear.
:class:`ResNet` is also the backbone of the compact serving models in ``compact.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from facemodels.models._layers import ConvNormAct, LayerType, resolve_cfg
from facemodels.models._registry import register_model
from facemodels.models.cfg import ModelCfg

__all__ = ["BasicBlock", "ResNet", "resnet18", "resnet34"]


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 conv + norm) shortcut."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        *,
        stride: int = 1,
        norm_layer: LayerType = nn.BatchNorm2d,
        act_layer: LayerType = nn.ReLU,
    ) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(in_chs, out_chs, 3, stride=stride,
                                 norm_layer=norm_layer, act_layer=act_layer)
        self.conv2 = ConvNormAct(out_chs, out_chs, 3, norm_layer=norm_layer, act_layer=None)
        self.shortcut: nn.Module = (
            nn.Identity()
            if stride == 1 and in_chs == out_chs
            else ConvNormAct(in_chs, out_chs, 1, stride=stride, padding=0,
                             norm_layer=norm_layer, act_layer=None)
        )
        self.act = act_layer()

    def zero_init_last(self) -> None:
        """Start the residual branch at zero so each block begins as the identity."""
        norm = self.conv2[1]
        if getattr(norm, "weight", None) is not None:
            nn.init.zeros_(norm.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem of ``ConvNormAct`` layers, BasicBlock stages, global average pool, dropout, Linear.

    Args:
        layers: number of blocks per stage; the first stage has stride 1, the others 2.
        widths: output channels per stage.
        stem_chs: output channels of each stem conv (3x3).
        stem_strides: stride of each stem conv.
        drop_rate: dropout before the classifier.
        zero_init_residual: zero the last norm of every block (often +0.2-0.5% accuracy).
    """

    def __init__(
        self,
        layers: Sequence[int],
        widths: Sequence[int],
        *,
        num_classes: int,
        cfg: ModelCfg,
        stem_chs: Sequence[int] = (64,),
        stem_strides: Sequence[int] = (1,),
        drop_rate: float = 0.0,
        zero_init_residual: bool = True,
        norm_layer: LayerType = nn.BatchNorm2d,
        act_layer: LayerType = nn.ReLU,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths):
            raise ValueError("layers and widths need one entry per stage")
        if len(stem_chs) != len(stem_strides):
            raise ValueError("stem_chs and stem_strides need one entry per stem conv")
        self.cfg = cfg
        self.num_classes = num_classes

        stem: list[nn.Module] = []
        chs = cfg.in_chans
        for out, stride in zip(stem_chs, stem_strides, strict=True):
            stem.append(ConvNormAct(chs, out, 3, stride=stride,
                                    norm_layer=norm_layer, act_layer=act_layer))
            chs = out
        self.stem = nn.Sequential(*stem)

        stages: list[nn.Module] = []
        for i, (depth, width) in enumerate(zip(layers, widths, strict=True)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(chs, width, stride=stride,
                                         norm_layer=norm_layer, act_layer=act_layer))
                chs = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = chs

        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(chs, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    m.zero_init_last()

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features, shape ``(N, num_features)``."""
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.fc(self.dropout(features))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _resnet(
    layers: Sequence[int], *, num_classes: int, cfg: ModelCfg | None, **kwargs: Any
) -> ResNet:
    cfg = resolve_cfg(cfg, num_classes)
    return ResNet(layers, (64, 128, 256, 512), num_classes=num_classes, cfg=cfg, **kwargs)


@register_model
def resnet18(*, num_classes: int = 7, cfg: ModelCfg | None = None, **kwargs: Any) -> ResNet:
    """ResNet-18 (BasicBlock 2-2-2-2), about 11.2M parameters."""
    return _resnet((2, 2, 2, 2), num_classes=num_classes, cfg=cfg, **kwargs)


@register_model
def resnet34(*, num_classes: int = 7, cfg: ModelCfg | None = None, **kwargs: Any) -> ResNet:
    """ResNet-34 (BasicBlock 3-4-6-3), about 21.3M parameters."""
    return _resnet((3, 4, 6, 3), num_classes=num_classes, cfg=cfg, **kwargs)
