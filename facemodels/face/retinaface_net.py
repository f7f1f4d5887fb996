"""RetinaFace with a MobileNet-0.25 backbone (biubug6/Pytorch_Retinaface), BatchNorm folded.

The pretrained weights ship as an ONNX graph in which every BatchNorm has been folded into the
preceding convolution, so each ``conv_bn`` block of the original is one ``Conv2d`` with a bias
here. Module names follow the graph's node names (``body.stage1.1.0.0`` is the depthwise conv
of the second stage-1 block), which lets :mod:`facemodels.face.retinaface_convert` map the
tensors by name.

The network expects BGR float input with the per-channel mean :data:`BGR_MEAN` subtracted and
no scaling. It returns, per prior box, ``loc`` offsets (N, P, 4), softmaxed ``conf`` (N, P, 2;
column 1 is "face") and ``landm`` offsets (N, P, 10), in the prior order of :func:`prior_boxes`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BGR_MEAN",
    "MIN_SIZES",
    "STEPS",
    "VARIANCES",
    "RetinaFaceNet",
    "decode_boxes",
    "decode_landmarks",
    "prior_boxes",
]

BGR_MEAN: tuple[float, float, float] = (104.0, 117.0, 123.0)
"""Mean subtracted from B, G, R pixel values (0-255) during training; there is no std scaling."""
MIN_SIZES: tuple[tuple[int, int], ...] = ((16, 32), (64, 128), (256, 512))
STEPS: tuple[int, ...] = (8, 16, 32)
VARIANCES: tuple[float, float] = (0.1, 0.2)
NUM_ANCHORS = 2
LEAKY_SLOPE = 0.1


def _conv(
    in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    """Conv2d (BN folded into its bias) followed by LeakyReLU(0.1) or nothing."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups),
        nn.LeakyReLU(LEAKY_SLOPE) if act else nn.Identity(),
    )


def _conv_dw(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 then pointwise 1x1, each with activation."""
    return nn.Sequential(
        _conv(in_ch, in_ch, 3, stride=stride, groups=in_ch), _conv(in_ch, out_ch, 1)
    )


class MobileNetV1025(nn.Module):
    """MobileNetV1 at width 0.25; returns the stride 8, 16 and 32 feature maps."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            _conv(3, 8, 3, stride=2),
            _conv_dw(8, 16, 1),
            _conv_dw(16, 32, 2),
            _conv_dw(32, 32, 1),
            _conv_dw(32, 64, 2),
            _conv_dw(64, 64, 1),
        )
        self.stage2 = nn.Sequential(
            _conv_dw(64, 128, 2), *(_conv_dw(128, 128, 1) for _ in range(5))
        )
        self.stage3 = nn.Sequential(_conv_dw(128, 256, 2), _conv_dw(256, 256, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        c3 = self.stage3(c2)
        return [c1, c2, c3]


class FPN(nn.Module):
    """Top-down feature pyramid with nearest upsampling and 3x3 merge convs."""

    def __init__(self, in_channels: tuple[int, int, int], out_channels: int) -> None:
        super().__init__()
        self.output1 = _conv(in_channels[0], out_channels, 1)
        self.output2 = _conv(in_channels[1], out_channels, 1)
        self.output3 = _conv(in_channels[2], out_channels, 1)
        self.merge1 = _conv(out_channels, out_channels, 3)
        self.merge2 = _conv(out_channels, out_channels, 3)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[-2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[-2:], mode="nearest"))
        return [o1, o2, o3]


class SSH(nn.Module):
    """Single Stage Headless context module: 3x3, 5x5 and 7x7 (stacked 3x3) branches."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv3X3 = _conv(in_ch, out_ch // 2, 3, act=False)
        self.conv5X5_1 = _conv(in_ch, out_ch // 4, 3)
        self.conv5X5_2 = _conv(out_ch // 4, out_ch // 4, 3, act=False)
        self.conv7X7_2 = _conv(out_ch // 4, out_ch // 4, 3)
        self.conv7x7_3 = _conv(out_ch // 4, out_ch // 4, 3, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.conv3X3(x)
        mid = self.conv5X5_1(x)
        b5 = self.conv5X5_2(mid)
        b7 = self.conv7x7_3(self.conv7X7_2(mid))
        return F.relu(torch.cat([b3, b5, b7], dim=1))


class RetinaFaceNet(nn.Module):
    """RetinaFace-MobileNet0.25: backbone, FPN, three SSH modules and three 1x1 heads."""

    def __init__(self, *, fpn_channels: int = 64) -> None:
        super().__init__()
        self.body = MobileNetV1025()
        self.fpn = FPN((64, 128, 256), fpn_channels)
        self.ssh1 = SSH(fpn_channels, fpn_channels)
        self.ssh2 = SSH(fpn_channels, fpn_channels)
        self.ssh3 = SSH(fpn_channels, fpn_channels)
        self.class_head = nn.ModuleList(nn.Conv2d(fpn_channels, NUM_ANCHORS * 2, 1) for _ in STEPS)
        self.bbox_head = nn.ModuleList(nn.Conv2d(fpn_channels, NUM_ANCHORS * 4, 1) for _ in STEPS)
        self.landmark_head = nn.ModuleList(
            nn.Conv2d(fpn_channels, NUM_ANCHORS * 10, 1) for _ in STEPS
        )

    @staticmethod
    def _flatten(heads: nn.ModuleList, feats: list[torch.Tensor], width: int) -> torch.Tensor:
        n = feats[0].shape[0]
        flat = [
            head(f).permute(0, 2, 3, 1).reshape(n, -1, width)
            for head, f in zip(heads, feats, strict=True)
        ]
        return torch.cat(flat, dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Args: x: (N, 3, H, W) mean-subtracted BGR. Returns: (loc, conf, landm)."""
        p1, p2, p3 = self.fpn(self.body(x))
        feats = [self.ssh1(p1), self.ssh2(p2), self.ssh3(p3)]
        loc = self._flatten(self.bbox_head, feats, 4)
        conf = self._flatten(self.class_head, feats, 2).softmax(dim=-1)
        landm = self._flatten(self.landmark_head, feats, 10)
        return loc, conf, landm


def prior_boxes(height: int, width: int, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """Anchor boxes (cx, cy, w, h) in input pixels, in the order the heads emit them.

    For each level (stride 8, 16, 32), rows then columns of its ``ceil(H/step) x ceil(W/step)``
    grid, then the level's two sizes. biubug6 normalises these by the input size and scales
    the decoded boxes back; working in pixels directly is the same arithmetic.
    """
    levels = []
    for step, sizes in zip(STEPS, MIN_SIZES, strict=True):
        fh, fw = -(-height // step), -(-width // step)
        cy = (torch.arange(fh, device=device, dtype=torch.float32) + 0.5) * step
        cx = (torch.arange(fw, device=device, dtype=torch.float32) + 0.5) * step
        yy, xx = torch.meshgrid(cy, cx, indexing="ij")
        centers = torch.stack([xx, yy], dim=-1).reshape(-1, 1, 2).expand(-1, len(sizes), 2)
        wh = torch.tensor(sizes, device=device, dtype=torch.float32)[:, None].expand(-1, 2)
        wh = wh.unsqueeze(0).expand(centers.shape[0], -1, -1)
        levels.append(torch.cat([centers, wh], dim=-1).reshape(-1, 4))
    return torch.cat(levels, dim=0)


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Offsets (..., P, 4) and priors (P, 4) to boxes (..., P, 4) as x1, y1, x2, y2."""
    centers = priors[:, :2] + loc[..., :2] * VARIANCES[0] * priors[:, 2:]
    sizes = priors[:, 2:] * torch.exp(loc[..., 2:] * VARIANCES[1])
    return torch.cat([centers - sizes / 2, centers + sizes / 2], dim=-1)


def decode_landmarks(landm: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Offsets (..., P, 10) and priors (P, 4) to five (x, y) points, shape (..., P, 5, 2)."""
    offsets = landm.reshape(*landm.shape[:-1], 5, 2)
    return priors[:, None, :2] + offsets * VARIANCES[0] * priors[:, None, 2:]
