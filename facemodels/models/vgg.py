"""VGG-19 for 44x44 FER crops (the ~73% FER2013 variant of "Facial-Expression-Recognition.Pytorch").

Sixteen 3x3 conv -> BatchNorm -> ReLU layers in five blocks, each closed by a 2x2 max-pool
(44 -> 22 -> 11 -> 5 -> 2 -> 1), then average pooling to 1x1, dropout 0.5 and a single
``Linear(512, num_classes)``. About 20M parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from facemodels.models._layers import ConvNormAct, LayerType, resolve_cfg
from facemodels.models._registry import register_model
from facemodels.models.cfg import ModelCfg

__all__ = ["VGG", "vgg19"]

#: Conv widths, with "M" for a 2x2 max-pool.
VGG19_LAYERS: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
    512, 512, 512, 512, "M",
)


class VGG(nn.Module):
    """Plain conv stack described by ``layers`` (ints are widths, ``"M"`` max-pools).

    Adaptive average pooling makes the head independent of the input size; at 44x44 the
    five pools already reduce the map to 1x1, as in the reference model.
    """

    def __init__(
        self,
        layers: Sequence[int | str],
        *,
        num_classes: int,
        cfg: ModelCfg,
        drop_rate: float = 0.5,
        norm_layer: LayerType = nn.BatchNorm2d,
        act_layer: LayerType = nn.ReLU,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        feats: list[nn.Module] = []
        chs = cfg.in_chans
        for item in layers:
            if item == "M":
                feats.append(nn.MaxPool2d(2, stride=2))
            else:
                feats.append(ConvNormAct(chs, int(item), 3, norm_layer=norm_layer,
                                         act_layer=act_layer))
                chs = int(item)
        self.features = nn.Sequential(*feats)
        self.num_features = chs
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(chs, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features, shape ``(N, num_features)``."""
        return torch.flatten(self.pool(self.features(x)), 1)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.fc(self.dropout(features))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def vgg19(*, num_classes: int = 7, cfg: ModelCfg | None = None, **kwargs: Any) -> VGG:
    """VGG-19 with BatchNorm, one-Linear head."""
    cfg = resolve_cfg(cfg, num_classes)
    return VGG(VGG19_LAYERS, num_classes=num_classes, cfg=cfg, **kwargs)
