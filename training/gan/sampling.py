"""Batches for the two paths, drawn from aligned CFP crops held as one uint8 tensor.

Identities are drawn uniformly. A reconstruction pair is two photos of one person: the source
``x_i`` is a profile with probability ``profile_source_p``, and the target ``x_j`` is frontal
with probability ``frontal_target_p`` (else a profile); with ``self_pair_p`` the target is the
source itself (a plain auto-encoding pair). Every image is flipped horizontally with
probability ``flip_p`` and its pose label flipped with it (left and right profile swap).
"""

from __future__ import annotations

import torch
from torch import Tensor

from facemodels.face.pose import POSE_CLASSES, flip_pose
from training.data.cfp import CfpDataset
from training.gan.recipe import GENERATION, RECONSTRUCTION, GanBatch

__all__ = ["PairSampler", "to_unit"]


def to_unit(images: Tensor) -> Tensor:
    """uint8 ``(N, S, S)`` -> float ``(N, 1, S, S)`` in [-1, 1] (the frontaliser's normalisation)."""
    return images.unsqueeze(1).float().div(127.5).sub(1.0)


class PairSampler:
    """Draws :class:`GanBatch` es for both paths from ``data`` (the training ids).

    Identity classes are the ids of ``data`` in sorted order (``id_classes``).
    """

    def __init__(self, data: CfpDataset, *, device: torch.device, generator: torch.Generator,
                 flip_p: float = 0.5, profile_source_p: float = 0.5, frontal_target_p: float = 0.75,
                 self_pair_p: float = 0.0, random_codes: bool = False) -> None:
        if len(data) == 0:
            raise ValueError("no training images")
        self.device, self.generator = device, generator
        self.flip_p, self.profile_source_p = flip_p, profile_source_p
        self.frontal_target_p, self.self_pair_p = frontal_target_p, self_pair_p
        self.random_codes = random_codes
        self.images = data.images.to(device)
        self.pose = data.pose.to(device)
        self.id_classes = data.ids
        lookup = {pid: c for c, pid in enumerate(self.id_classes)}
        self.id_class = torch.tensor([lookup[int(i)] for i in data.identity], device=device)
        self.frontal, self.n_frontal = self._table(data, frontal=True)
        self.profile, self.n_profile = self._table(data, frontal=False)

    @property
    def num_identities(self) -> int:
        return len(self.id_classes)

    def _table(self, data: CfpDataset, *, frontal: bool) -> tuple[Tensor, Tensor]:
        rows = []
        for pid in self.id_classes:
            mask = (data.identity == pid) & ((data.pose == 0) if frontal else (data.pose != 0))
            rows.append(mask.nonzero().flatten())
        width = max(1, max(len(r) for r in rows))
        table = torch.full((len(rows), width), -1, dtype=torch.long)
        for c, r in enumerate(rows):
            table[c, : len(r)] = r
        counts = torch.tensor([len(r) for r in rows])
        return table.to(self.device), counts.to(self.device)

    def _rand(self, n: int) -> Tensor:
        return torch.rand(n, generator=self.generator).to(self.device)

    def _pick(self, cls: Tensor, want_profile: Tensor) -> Tensor:
        """One image index per identity class; falls back to the other kind when one is missing."""
        use_profile = (want_profile & (self.n_profile[cls] > 0)) | (self.n_frontal[cls] == 0)
        count = torch.where(use_profile, self.n_profile[cls], self.n_frontal[cls])
        j = (self._rand(len(cls)) * count).long().clamp_max(count - 1)
        return torch.where(use_profile, self.profile[cls, j.clamp_max(self.profile.shape[1] - 1)],
                           self.frontal[cls, j.clamp_max(self.frontal.shape[1] - 1)])

    def _load(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Images in [-1, 1] and pose labels, each randomly flipped."""
        x, pose = to_unit(self.images[idx]), self.pose[idx]
        flip = self._rand(len(idx)) < self.flip_p
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, torch.where(flip, flip_pose(pose), pose)

    def _classes(self, n: int) -> Tensor:
        return (self._rand(n) * self.num_identities).long().clamp_max(self.num_identities - 1)

    def reconstruction(self, batch_size: int) -> GanBatch:
        """Pairs ``(x_i, x_j)`` of the same person; decode ``x_i`` to ``x_j``'s pose."""
        cls = self._classes(batch_size)
        i = self._pick(cls, self._rand(batch_size) < self.profile_source_p)
        j = self._pick(cls, self._rand(batch_size) >= self.frontal_target_p)
        j = torch.where(self._rand(batch_size) < self.self_pair_p, i, j)
        xi, _ = self._load(i)
        xj, pj = self._load(j)
        return GanBatch(RECONSTRUCTION, real=xj, real_pose=pj, real_id=cls, source=xi, source_id=cls,
                        target_pose=pj)

    def generation(self, batch_size: int) -> GanBatch:
        """Real photos for D, plus codes (of other photos, or random) at random target poses."""
        real_cls = self._classes(batch_size)
        real_x, real_pose = self._load(self._pick(real_cls, self._rand(batch_size) < 0.5))
        target = (self._rand(batch_size) * len(POSE_CLASSES)).long().clamp_max(len(POSE_CLASSES) - 1)
        if self.random_codes:
            return GanBatch(GENERATION, real=real_x, real_pose=real_pose, real_id=real_cls, source=None,
                            source_id=None, target_pose=target)
        src_cls = self._classes(batch_size)
        src_x, _ = self._load(self._pick(src_cls, self._rand(batch_size) < 0.5))
        return GanBatch(GENERATION, real=real_x, real_pose=real_pose, real_id=real_cls, source=src_x,
                        source_id=src_cls, target_pose=target)
