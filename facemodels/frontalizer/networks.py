"""The frontaliser's inference networks (DR-GAN style): ``G_enc``, ``G_dec`` and D's pose path.

* :class:`Encoder` ``x -> f(x)``: convolutional, BatchNorm + ELU (as DR-GAN), global average
  pooling to a ``feat_dim`` identity representation squashed by ``tanh`` into ``[-1, 1]``, the
  same box as the random codes of the generation path (CR-GAN's "complete representation").
* :class:`Decoder` ``(f, pose one-hot, z) -> image``: a linear layer to a ``S/16`` grid, four
  upsample + conv stages, ``tanh`` output in ``[-1, 1]``.
* :func:`build_disc_trunk` and :class:`PoseNet`: the discriminator's spectrally normalised
  trunk and its pose head (D_p), shipped so a checkpoint can estimate pose.

The full three-headed discriminator is training-only (:mod:`training.gan.networks`).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

__all__ = ["NUM_POSES", "Decoder", "Encoder", "PoseNet", "build_disc_trunk"]

NUM_POSES = 3


def _check_size(image_size: int) -> int:
    if image_size % 16 or image_size < 32:
        raise ValueError(f"image_size must be a multiple of 16 and at least 32, got {image_size}")
    return image_size // 16


def _conv_bn(cin: int, cout: int, stride: int, norm_layer: type[nn.Module],
             act_layer: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm_layer(cout), act_layer())


class Encoder(nn.Module):
    """``G_enc``: ``(N, C, S, S)`` in [-1, 1] -> ``(N, feat_dim)`` in [-1, 1]."""

    def __init__(self, *, in_chans: int = 1, width: int = 32, feat_dim: int = 320,
                 image_size: int = 64, norm_layer: type[nn.Module] = nn.BatchNorm2d,
                 act_layer: type[nn.Module] = nn.ELU) -> None:
        super().__init__()
        _check_size(image_size)
        w = width
        chans = [w, 2 * w, 4 * w, 8 * w]
        layers = [_conv_bn(in_chans, w, 1, norm_layer, act_layer)]
        cin = w
        for cout in chans[1:]:
            layers += [_conv_bn(cin, cout, 2, norm_layer, act_layer),
                       _conv_bn(cout, cout, 1, norm_layer, act_layer)]
            cin = cout
        layers.append(_conv_bn(cin, feat_dim, 2, norm_layer, act_layer))
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(feat_dim, feat_dim)
        self.feat_dim = feat_dim

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x).mean((2, 3))
        return torch.tanh(self.proj(h))


class Decoder(nn.Module):
    """``G_dec``: ``(f, pose one-hot, z) -> (N, C, S, S)`` in [-1, 1]."""

    def __init__(self, *, out_chans: int = 1, width: int = 32, feat_dim: int = 320,
                 noise_dim: int = 50, num_poses: int = NUM_POSES, image_size: int = 64,
                 norm_layer: type[nn.Module] = nn.BatchNorm2d, act_layer: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.grid = _check_size(image_size)
        self.feat_dim, self.noise_dim, self.num_poses = feat_dim, noise_dim, num_poses
        w = width
        self.top = 8 * w
        self.fc = nn.Sequential(nn.Linear(feat_dim + num_poses + noise_dim, self.top * self.grid**2),
                                act_layer())
        chans = [8 * w, 8 * w, 4 * w, 2 * w, w]
        blocks = []
        for cin, cout in itertools.pairwise(chans):
            blocks += [nn.Upsample(scale_factor=2, mode="nearest"),
                       _conv_bn(cin, cout, 1, norm_layer, act_layer),
                       _conv_bn(cout, cout, 1, norm_layer, act_layer)]
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv2d(w, out_chans, 3, 1, 1)

    def forward(self, f: Tensor, pose: Tensor, z: Tensor | None = None) -> Tensor:
        """``pose`` is an ``(N,)`` class index or an ``(N, num_poses)`` code; ``z=None`` is zeros."""
        if pose.dim() == 1:
            pose = F.one_hot(pose.long(), self.num_poses).to(f.dtype)
        if z is None:
            z = f.new_zeros(f.shape[0], self.noise_dim)
        h = self.fc(torch.cat([f, pose.to(f.dtype), z.to(f.dtype)], 1))
        h = h.view(-1, self.top, self.grid, self.grid)
        return torch.tanh(self.out(self.blocks(h)))


def build_disc_trunk(*, in_chans: int = 1, width: int = 32, image_size: int = 64) -> nn.Sequential:
    """D's shared feature extractor: spectrally normalised convs, leaky ReLU, sum pooling later."""
    _check_size(image_size)
    w = width
    chans = [in_chans, w, 2 * w, 4 * w, 8 * w]
    layers: list[nn.Module] = []
    for cin, cout in itertools.pairwise(chans):
        layers += [spectral_norm(nn.Conv2d(cin, cout, 4, 2, 1)), nn.LeakyReLU(0.2),
                   spectral_norm(nn.Conv2d(cout, cout, 3, 1, 1)), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers)


class PoseNet(nn.Module):
    """D's trunk plus its pose head: ``(N, C, S, S)`` -> pose logits ``(N, 3)``."""

    def __init__(self, trunk: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x).mean((2, 3)))
