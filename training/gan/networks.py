"""DR-GAN style networks: the generator (shipped) and the three-headed discriminator ``D``.

``G_enc`` (:class:`Encoder`) and ``G_dec`` (:class:`Decoder`) and D's trunk with its pose head
are the frontaliser's inference model, in :mod:`facemodels.frontalizer.networks`; this module
adds the rest of ``D``.

:class:`Discriminator`: a spectrally normalised conv trunk (no normalisation layers, leaky
ReLU) with three heads on the pooled features: ``critic`` (D_s, one unbounded score for the
hinge loss), ``pose`` (D_p, 3 classes) and ``identity`` (D_id, one class per training id).
D_id has no extra "fake" class: realness is D_s's job, so D_id is trained on real photos
only and, for the generator, asks that a fake keeps its source's identity (AC-GAN style).
This replaces DR-GAN's N_d+1-way identity head.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from facemodels.frontalizer.networks import NUM_POSES, Decoder, Encoder, PoseNet, build_disc_trunk

__all__ = ["Decoder", "DiscOutput", "Discriminator", "Encoder", "PoseNet", "build_disc_trunk"]


class DiscOutput(NamedTuple):
    critic: Tensor  # (N,) D_s score, higher = more real
    pose: Tensor  # (N, 3) D_p logits
    identity: Tensor  # (N, num_identities) D_id logits


class Discriminator(nn.Module):
    """``D`` with heads ``critic`` (D_s), ``pose`` (D_p) and ``identity`` (D_id)."""

    def __init__(self, *, num_identities: int, in_chans: int = 1, width: int = 32,
                 image_size: int = 64, num_poses: int = NUM_POSES) -> None:
        super().__init__()
        self.trunk = build_disc_trunk(in_chans=in_chans, width=width, image_size=image_size)
        feat = 8 * width
        self.critic = spectral_norm(nn.Linear(feat, 1))
        self.pose = nn.Linear(feat, num_poses)
        self.identity = nn.Linear(feat, num_identities)

    def forward(self, x: Tensor) -> DiscOutput:
        h = self.trunk(x).mean((2, 3))
        return DiscOutput(self.critic(h).squeeze(1), self.pose(h), self.identity(h))

    def pose_net(self) -> PoseNet:
        """A view sharing this D's trunk and pose head (no copy)."""
        return PoseNet(self.trunk, self.pose)
