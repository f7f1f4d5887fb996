"""Building blocks shared by the architectures in the zoo."""

from __future__ import annotations

from torch import nn

from facemodels.models.cfg import ModelCfg

__all__ = ["ConvNormAct", "LayerType", "resolve_cfg"]

#: A layer passed as a type (or any callable returning a module), e.g. ``nn.BatchNorm2d``.
LayerType = type[nn.Module]


def resolve_cfg(cfg: ModelCfg | None, num_classes: int) -> ModelCfg:
    """Return ``cfg`` (default :class:`ModelCfg`) after checking it agrees with ``num_classes``.

    Raises:
        ValueError: ``cfg`` names a different number of classes than ``num_classes``.
    """
    cfg = ModelCfg() if cfg is None else cfg
    if not isinstance(cfg, ModelCfg):
        raise TypeError(f"cfg must be a ModelCfg, got {type(cfg).__name__}")
    if cfg.num_classes != num_classes:
        raise ValueError(
            f"num_classes={num_classes} disagrees with cfg, which names {cfg.num_classes} "
            f"classes: {cfg.class_names}"
        )
    return cfg


class ConvNormAct(nn.Sequential):
    """``Conv2d`` (no bias) -> ``norm_layer`` -> ``act_layer``.

    ``padding=None`` means "same" for odd kernels at stride 1 (``kernel_size // 2``).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding: int | str | None = None,
        groups: int = 1,
        norm_layer: LayerType = nn.BatchNorm2d,
        act_layer: LayerType | None = nn.ReLU,
    ) -> None:
        if padding is None:
            padding = kernel_size // 2
        layers: list[nn.Module] = [
            nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=padding,
                      groups=groups, bias=False),
            norm_layer(out_chs),
        ]
        if act_layer is not None:
            layers.append(act_layer())
        super().__init__(*layers)
