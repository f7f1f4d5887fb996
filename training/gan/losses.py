"""GAN losses: hinge adversarial terms (with D's spectral norm), pose and identity CE, L1."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.nn.functional as F
from torch import Tensor

__all__ = ["LossWeights", "class_loss", "d_hinge", "g_hinge", "l1_loss"]


@dataclass(frozen=True)
class LossWeights:
    """Weights of the terms. ``adv`` scales D_s terms, ``pose`` D_p, ``identity`` D_id, ``l1``
    the reconstruction of ``x_j``. D uses the same ``pose``/``identity`` weights on real photos."""

    adv: float = 1.0
    pose: float = 1.0
    identity: float = 1.0
    l1: float = 10.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def d_hinge(real: Tensor, fake: Tensor) -> Tensor:
    """Critic hinge loss: ``E[relu(1 - D(x))] + E[relu(1 + D(G))]``."""
    return F.relu(1.0 - real.float()).mean() + F.relu(1.0 + fake.float()).mean()


def g_hinge(fake: Tensor) -> Tensor:
    """Generator hinge loss: ``-E[D(G)]``."""
    return -fake.float().mean()


def class_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy in float32 (pose or identity head)."""
    return F.cross_entropy(logits.float(), target)


def l1_loss(fake: Tensor, target: Tensor) -> Tensor:
    """Mean absolute pixel error (images in [-1, 1])."""
    return (fake.float() - target.float()).abs().mean()
