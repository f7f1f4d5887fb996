"""The refiner's loss networks and terms: a PatchGAN critic with pose and identity heads, the CFP
identity embedder trained here, a frozen expression teacher's logits and features, and the
pixel, flow and mask terms (issue #12, section 2; :mod:`training.gan.refiner_train` combines
them).

Images are ``(N, 1, S, S)`` floats in [-1, 1] unless said otherwise.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from facemodels.preprocess import eval_views
from training.engine import soft_target_kl

__all__ = [
    "CosFaceHead",
    "CriticOut",
    "ExpressionTeacher",
    "IdentityEmbedder",
    "PatchCritic",
    "RefinerWeights",
    "flow_smoothness",
    "identity_distance",
    "masked_l1",
    "symmetry_l1",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefinerWeights:
    """G's loss weights (``--w-*`` flags). Pixel terms are on [-1, 1] images; ``expr`` multiplies
    ``T^2 KL``; ``adv`` is small on purpose (the warp already looks like a photo)."""

    l1: float = 10.0
    perceptual: float = 1.0
    expr: float = 1.0
    identity: float = 1.0
    adv: float = 0.05
    pose: float = 0.1
    d_identity: float = 0.1
    symmetry: float = 0.1
    flow_tv: float = 0.1
    mask: float = 0.05

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class CriticOut:
    """``patches`` ``(N, 1, h, w)`` realness per patch; ``pose`` ``(N, 3)`` and ``identity``
    ``(N, K)`` logits from the pooled features."""

    patches: Tensor
    pose: Tensor
    identity: Tensor


class PatchCritic(nn.Module):
    """D: spectrally normalised convs (no norm layers), a PatchGAN map for the hinge loss and,
    on the pooled trunk features, a pose head (frontal, left, right) and an identity head over
    the training ids (the seed's dual-path D)."""

    def __init__(self, num_identities: int, *, width: int = 32, num_poses: int = 3) -> None:
        super().__init__()
        w = width
        chans = [1, w, 2 * w, 4 * w]
        layers: list[nn.Module] = []
        for cin, cout in itertools.pairwise(chans):
            layers += [spectral_norm(nn.Conv2d(cin, cout, 4, 2, 1)), nn.LeakyReLU(0.2)]
        layers += [spectral_norm(nn.Conv2d(4 * w, 4 * w, 3, 1, 1)), nn.LeakyReLU(0.2)]
        self.trunk = nn.Sequential(*layers)
        self.patch = spectral_norm(nn.Conv2d(4 * w, 1, 3, 1, 1))
        self.pose = nn.Linear(4 * w, num_poses)
        self.identity = nn.Linear(4 * w, num_identities)

    def forward(self, x: Tensor) -> CriticOut:
        h = self.trunk(x)
        pooled = h.mean((2, 3))
        return CriticOut(self.patch(h), self.pose(pooled), self.identity(pooled))


class IdentityEmbedder(nn.Module):
    """A small face embedder (conv-BN-ReLU, five stages, average pool, linear, L2 norm) trained
    here on CFP training ids with a CosFace head; frozen while the refiner trains."""

    def __init__(self, *, width: int = 32, dim: int = 128) -> None:
        super().__init__()
        chans = [1, width, 2 * width, 3 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(itertools.pairwise(chans)):
            layers += [nn.Conv2d(cin, cout, 3, 1 if i == 0 else 2, 1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(4 * width, dim)
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.proj(self.features(x).mean((2, 3))), dim=1)


class CosFaceHead(nn.Module):
    """CosFace logits ``s * (cos - m * onehot)`` over ``num_classes`` class centres."""

    def __init__(self, dim: int, num_classes: int, *, scale: float = 16.0, margin: float = 0.2) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * 0.01)
        self.scale, self.margin = scale, margin

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        cos = emb @ F.normalize(self.weight, dim=1).t()
        return self.scale * (cos - self.margin * F.one_hot(labels, cos.shape[1]).to(cos))


class ExpressionTeacher:
    """A frozen expression classifier read through the service's evaluation view (resize to its
    image size, centre crop): logits, plus, for the zoo's ResNets (``stem``, ``stages``, ``pool``,
    ``forward_head``), the stem's and first two stages' activations as perceptual features."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)
        self.has_features = all(hasattr(model, a) for a in ("stem", "stages", "pool", "forward_head"))
        if not self.has_features:
            log.warning("the expression teacher is not a zoo ResNet: the perceptual term is off")

    def __call__(self, faces: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``faces`` in [-1, 1] at any size -> (logits, feature maps)."""
        x = eval_views((faces.float() + 1) / 2, self.model.cfg, tta=False)[0]
        if not self.has_features:
            return self.model(x), []
        m = self.model
        h = m.stem(x)
        feats = [h]
        for i, stage in enumerate(m.stages):
            h = stage(h)
            if i < 2:
                feats.append(h)
        return m.forward_head(torch.flatten(m.pool(h), 1)), feats

    @staticmethod
    def perceptual(fake: list[Tensor], real: list[Tensor]) -> Tensor:
        """Mean over taps of the L1 between feature maps, each normalised by the real's mean |f|."""
        if not fake:
            return torch.zeros(())
        terms = [(a.float() - b.float()).abs().mean() / (b.float().abs().mean() + 1e-6)
                 for a, b in zip(fake, real, strict=True)]
        return torch.stack(terms).mean()

    @staticmethod
    def kl(fake_logits: Tensor, real_logits: Tensor, temperature: float) -> Tensor:
        """``T^2 KL(C_T(real) || C_T(fake))``."""
        return temperature**2 * soft_target_kl(fake_logits, real_logits, temperature)


def masked_l1(fake: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Per-pixel L1 weighted by ``weight`` ``(1 or N, 1, S, S)``, normalised by the weight's sum."""
    w = weight.expand_as(fake)
    return ((fake.float() - target.float()).abs() * w).sum() / w.sum().clamp_min(1e-6)


def flow_smoothness(flow: Tensor) -> Tensor:
    """Total variation of a flow ``(N, S, S, 2)`` in pixels (mean |neighbour difference|)."""
    return (flow[:, 1:] - flow[:, :-1]).abs().mean() + (flow[:, :, 1:] - flow[:, :, :-1]).abs().mean()


def symmetry_l1(fake: Tensor, weight: Tensor) -> Tensor:
    """A weak symmetry prior: L1 between the face and its mirror image, in ``weight`` (the face
    mask, which is nearly symmetric)."""
    return masked_l1(fake, fake.flip(-1), weight * weight.flip(-1))


def identity_distance(emb: Tensor, ref: Tensor) -> Tensor:
    """Mean ``1 - cos`` between L2-normalised embeddings."""
    return (1 - (emb * ref).sum(1)).mean()
