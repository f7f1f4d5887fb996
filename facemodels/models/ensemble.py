"""Soft-voting ensembles: a weighted mean of the members' softmax probabilities.

The ensemble is an ordinary registered model (``create_model("ensemble", members=[...])``),
so it saves and loads through ``facemodels.checkpoint`` like any other: its state dict holds
the members under ``members.<i>.`` plus the ``member_weights`` buffer, and
:attr:`SoftVotingEnsemble.model_kwargs` is what ``save_checkpoint`` needs to rebuild it.
Fit the weights on PublicTest with :func:`fit_ensemble_weights` and report on PrivateTest.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from facemodels.models._registry import create_model, register_model
from facemodels.models.cfg import ModelCfg

__all__ = [
    "SoftVotingEnsemble",
    "ensemble",
    "ensemble_from_checkpoints",
    "fit_ensemble_weights",
]

log = logging.getLogger(__name__)

#: A member as stored in a checkpoint card: ``{"arch", "model_kwargs", "cfg"}``.
MemberSpec = dict[str, Any]


class SoftVotingEnsemble(nn.Module):
    """Weighted soft voting over members that share one :class:`ModelCfg`.

    ``forward`` returns the log of the weighted mean probability, so ``argmax`` and
    ``softmax`` of the output behave as they do for a single model's logits.

    Args:
        members: the member models, each with a ``cfg`` attribute.
        weights: one non-negative weight per member (normalised to sum to 1); ``None`` for a
            plain average.
        specs: how to rebuild each member (``arch``, ``model_kwargs``, ``cfg``); needed only
            to save the ensemble as a checkpoint.

    Raises:
        ValueError: no members, members with different cfgs, or bad weights.
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        *,
        weights: Sequence[float] | Tensor | None = None,
        specs: Sequence[MemberSpec] | None = None,
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        cfg: ModelCfg = members[0].cfg
        for i, member in enumerate(members[1:], start=1):
            if member.cfg != cfg:
                raise ValueError(
                    f"ensemble members must share one ModelCfg: member 0 has {cfg}, "
                    f"member {i} has {member.cfg}"
                )
        if specs is not None and len(specs) != len(members):
            raise ValueError(f"{len(specs)} specs for {len(members)} members")
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.members = nn.ModuleList(members)
        self.specs: list[MemberSpec] | None = list(specs) if specs is not None else None
        self.register_buffer("member_weights", _normalise_weights(weights, len(members)))

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``create_model("ensemble", ...)`` / ``save_checkpoint``."""
        if self.specs is None:
            raise RuntimeError("this ensemble was built without member specs; it cannot be saved")
        return {"members": self.specs, "weights": self.member_weights.tolist()}

    def member_probs(self, x: Tensor) -> Tensor:
        """Float32 softmax probabilities of every member, shape ``(M, N, C)``."""
        return torch.stack([m(x).float().softmax(dim=-1) for m in self.members])

    def forward(self, x: Tensor) -> Tensor:
        probs = self.member_probs(x)
        w = self.member_weights.float()
        mixed = (w[:, None, None] / w.sum() * probs).sum(dim=0)
        return mixed.clamp_min(torch.finfo(mixed.dtype).tiny).log()


def _normalise_weights(weights: Sequence[float] | Tensor | None, n: int) -> Tensor:
    if weights is None:
        return torch.full((n,), 1.0 / n)
    w = torch.as_tensor(weights, dtype=torch.float32).detach().cpu().flatten().clone()
    if w.numel() != n:
        raise ValueError(f"{w.numel()} weights for {n} members")
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero: {w.tolist()}")
    return w / w.sum()


def _build_member(spec: MemberSpec, num_classes: int, default_cfg: ModelCfg | None) -> nn.Module:
    if "arch" not in spec:
        raise ValueError(f"ensemble member spec has no 'arch': {spec}")
    unknown = set(spec) - {"arch", "model_kwargs", "cfg"}
    if unknown:
        raise ValueError(f"unknown keys in ensemble member spec: {sorted(unknown)}")
    raw = spec.get("cfg")
    cfg = raw if raw is None or isinstance(raw, ModelCfg) else ModelCfg.from_dict(raw)
    cfg = cfg or default_cfg
    kwargs = dict(spec.get("model_kwargs") or {})
    return create_model(spec["arch"], num_classes=num_classes, cfg=cfg, **kwargs)


@register_model
def ensemble(
    *,
    num_classes: int = 7,
    cfg: ModelCfg | None = None,
    members: Sequence[MemberSpec],
    weights: Sequence[float] | None = None,
) -> SoftVotingEnsemble:
    """Build an untrained soft-voting ensemble from member specs.

    Args:
        members: ``{"arch": str, "model_kwargs": dict, "cfg": ModelCfg.to_dict()}`` each. A
            member without ``cfg`` takes the ensemble's ``cfg``.
        weights: voting weights, one per member; ``None`` averages.

    Raises:
        ValueError: members disagree on their cfg, or with ``cfg`` / ``num_classes``.
    """
    if cfg is not None and cfg.num_classes != num_classes:
        raise ValueError(f"num_classes={num_classes} disagrees with cfg ({cfg.num_classes})")
    built = [_build_member(spec, num_classes, cfg) for spec in members]
    model = SoftVotingEnsemble(
        built,
        weights=weights,
        specs=[
            {"arch": s["arch"], "model_kwargs": dict(s.get("model_kwargs") or {}),
             "cfg": m.cfg.to_dict()}
            for s, m in zip(members, built, strict=True)
        ],
    )
    if cfg is not None and model.cfg != cfg:
        raise ValueError(f"ensemble cfg {cfg} differs from its members' cfg {model.cfg}")
    return model


def ensemble_from_checkpoints(
    paths: Sequence[str | Path],
    weights: Sequence[float] | Tensor | None = None,
    *,
    device: str | torch.device = "cpu",
) -> SoftVotingEnsemble:
    """Load trained members from checkpoints into an ensemble (eval mode, on ``device``)."""
    from facemodels.checkpoint import load_checkpoint  # lazy: checkpoint imports the registry

    members, specs = [], []
    for path in paths:
        model, card = load_checkpoint(path, device=device)
        members.append(model)
        specs.append({"arch": card["arch"], "model_kwargs": card.get("model_kwargs", {}),
                      "cfg": card["cfg"]})
    return SoftVotingEnsemble(members, weights=weights, specs=specs).to(device).eval()


def fit_ensemble_weights(member_probs: Tensor, labels: Tensor, *, steps: int = 200) -> Tensor:
    """Voting weights that minimise the NLL of the mixed probabilities (e.g. on PublicTest).

    The weights are a softmax of free parameters (so non-negative, summing to 1) optimised
    with L-BFGS for at most ``steps`` iterations.

    Args:
        member_probs: ``(M, N, C)`` probabilities of M members on N samples.
        labels: ``(N,)`` integer class labels.

    Returns:
        ``(M,)`` float32 weights on the CPU.
    """
    if member_probs.ndim != 3 or labels.ndim != 1 or labels.numel() != member_probs.shape[1]:
        raise ValueError(
            f"expected probs (M, N, C) and labels (N,), got {tuple(member_probs.shape)} "
            f"and {tuple(labels.shape)}"
        )
    probs = member_probs.detach().double().cpu()
    labels = labels.detach().long().cpu()
    # log p_m(y_n): (M, N); clamped so a member that is certain and wrong stays finite.
    log_p = probs.gather(2, labels.view(1, -1, 1).expand(probs.shape[0], -1, 1)).squeeze(2)
    log_p = log_p.clamp_min(1e-12).log()
    theta = torch.zeros(probs.shape[0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure() -> Tensor:
        opt.zero_grad()
        log_w = theta.log_softmax(dim=0)
        loss = -torch.logsumexp(log_w[:, None] + log_p, dim=0).mean()
        loss.backward()
        return loss

    opt.step(closure)
    weights = theta.detach().softmax(dim=0).float()
    log.info("fitted ensemble weights %s", [round(w, 4) for w in weights.tolist()])
    return weights
