"""Compact ResNets for CPU serving (candidates for the shipped default model).

Both are :class:`~facemodels.models.resnet.ResNet` with a two-conv stem that halves the
resolution early (3x3 stride 1 at 44x44, then 3x3 stride 2 to 22x22) and half-width stages
of 32/64/128/256 channels at 22/11/6/3 pixels. Plain 3x3 convs were chosen over
depthwise-separable / inverted-residual blocks because oneDNN runs them far faster on CPU:
a MobileNetV2-style net with 49M multiply-adds measured about 3x slower per face than
``compact_resnet`` with 74M.

==================  ======  =========  ======  ===========================
model               params  MACs/face  GFLOPs  blocks per stage
==================  ======  =========  ======  ===========================
compact_resnet      2.80M   74.0M      0.148   2-2-2-2 (the default pick)
compact_resnet_s    1.23M   34.9M      0.070   1-1-1-1 (lowest batch-1 latency)
compact_resnet_fr   2.80M   283M       0.566   2-2-2-2, stem stride 1 (full resolution)
compact_resnet_w2   11.19M  295M       0.591   2-2-2-2, twice as wide (64/128/256/512)
==================  ======  =========  ======  ===========================

(FLOPs = 2 x MACs at the default 1x44x44 input.) The last two are the stronger students
screened for the default: each stays within the default's budget of 0.6 GFLOPs and 12M
parameters a face.
"""

from __future__ import annotations

from typing import Any

from facemodels.models._layers import resolve_cfg
from facemodels.models._registry import register_model
from facemodels.models.cfg import ModelCfg
from facemodels.models.resnet import ResNet

__all__ = ["compact_resnet", "compact_resnet_fr", "compact_resnet_s", "compact_resnet_w2"]

_WIDTHS = (32, 64, 128, 256)
_STEM = {"stem_chs": (16, 32), "stem_strides": (1, 2)}


@register_model
def compact_resnet(*, num_classes: int = 7, cfg: ModelCfg | None = None, **kwargs: Any) -> ResNet:
    """Half-width ResNet-18 with a stride-2 stem: 2.8M params, 74M MACs per 44x44 face."""
    cfg = resolve_cfg(cfg, num_classes)
    return ResNet((2, 2, 2, 2), _WIDTHS, num_classes=num_classes, cfg=cfg, **(_STEM | kwargs))


@register_model
def compact_resnet_s(
    *, num_classes: int = 7, cfg: ModelCfg | None = None, **kwargs: Any
) -> ResNet:
    """Half-width ResNet-10 with a stride-2 stem: 1.2M params, 35M MACs per 44x44 face."""
    cfg = resolve_cfg(cfg, num_classes)
    return ResNet((1, 1, 1, 1), _WIDTHS, num_classes=num_classes, cfg=cfg, **(_STEM | kwargs))


@register_model
def compact_resnet_fr(
    *, num_classes: int = 7, cfg: ModelCfg | None = None, **kwargs: Any
) -> ResNet:
    """``compact_resnet`` without the early downsampling: stages at 44/22/11/6 pixels."""
    cfg = resolve_cfg(cfg, num_classes)
    stem = {"stem_chs": (16, 32), "stem_strides": (1, 1)}
    return ResNet((2, 2, 2, 2), _WIDTHS, num_classes=num_classes, cfg=cfg, **(stem | kwargs))


@register_model
def compact_resnet_w2(
    *, num_classes: int = 7, cfg: ModelCfg | None = None, **kwargs: Any
) -> ResNet:
    """``compact_resnet`` at twice the width (64/128/256/512): a ResNet-18 with a stride-2 stem."""
    cfg = resolve_cfg(cfg, num_classes)
    stem = {"stem_chs": (32, 64), "stem_strides": (1, 2)}
    return ResNet((2, 2, 2, 2), tuple(2 * w for w in _WIDTHS), num_classes=num_classes, cfg=cfg,
                  **(stem | kwargs))
