"""The two-path frontalisation recipe: ``d_step(batch)`` and ``g_step(batch)``.

Each training iteration runs both paths, each as ``n_critic`` D steps then one G step (the
alternation of CR-GAN's Algorithm 1, with DR-GAN's identity and pose heads in D):

* **Generation path** (``batch.path == "generation"``): decode a representation ``f`` with a
  random target pose ``p`` and noise ``z``. ``f`` is the encoder's code of another real photo
  ``x_k`` (computed without gradient; DR-GAN's choice, default) or a random code from the
  representation box ``U[-1, 1]`` (CR-GAN's). D learns real photos (``x``, with their pose and
  identity) against these fakes; the G step updates **G_dec only** with the adversarial term,
  D_p(fake) = ``p`` and, when ``f`` came from ``x_k``, D_id(fake) = id(``x_k``).
* **Reconstruction path** (``"reconstruction"``): encode ``x_i`` and decode to the pose
  ``p_j`` of ``x_j``, another photo of the same person. D learns ``x_j`` against the fake; the
  G step updates **G_enc** (and G_dec too when ``train_decoder_on_reconstruction``) with the
  adversarial term, D_p(fake) = ``p_j``, D_id(fake) = id and ``L1(fake, x_j)``.

D's step always updates D only (its loss on real photos: hinge real/fake on D_s, CE on D_p
and D_id). Nothing is kept on ``self`` between steps: every step regenerates its fakes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import Tensor, nn

from facemodels.device import autocast
from training.gan.losses import LossWeights, class_loss, d_hinge, g_hinge, l1_loss
from training.gan.networks import Decoder, Discriminator, Encoder

__all__ = ["GENERATION", "RECONSTRUCTION", "GanBatch", "GanNets", "GanRecipe"]

GENERATION: Literal["generation"] = "generation"
RECONSTRUCTION: Literal["reconstruction"] = "reconstruction"


@dataclass(frozen=True)
class GanBatch:
    """One batch of either path. Images are float ``(N, 1, S, S)`` in [-1, 1].

    Attributes:
        path: ``"generation"`` or ``"reconstruction"``.
        real: real photos for D (``x_j`` on the reconstruction path; also the L1 target).
        real_pose: their pose classes; real_id: their identity class indices.
        source: photos to encode (``x_i``; ``x_k`` on the generation path) or ``None`` for
            random codes (generation path only).
        source_id: identity class of each source (``None`` with random codes).
        target_pose: the pose code to decode to (``p_j``, or random on the generation path).
    """

    path: Literal["generation", "reconstruction"]
    real: Tensor
    real_pose: Tensor
    real_id: Tensor
    source: Tensor | None
    source_id: Tensor | None
    target_pose: Tensor

    def __post_init__(self) -> None:
        if self.path not in (GENERATION, RECONSTRUCTION):
            raise ValueError(f"unknown path {self.path!r}")
        if self.path == RECONSTRUCTION and (self.source is None or self.source_id is None):
            raise ValueError("the reconstruction path needs source images and their identity")

    def to(self, device: torch.device) -> GanBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, Tensor):
                moved[k] = v.to(device, non_blocking=True)
        return GanBatch(**moved)


@dataclass
class GanNets:
    """The three trainable networks."""

    encoder: Encoder
    decoder: Decoder
    discriminator: Discriminator


@contextlib.contextmanager
def _frozen(*modules: nn.Module) -> Iterator[None]:
    """Turn off parameter gradients of ``modules`` (activations still carry gradients)."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


class GanRecipe:
    """D and G steps over :class:`GanNets` with two optimizers.

    Args:
        opt_g: optimizer over G_enc and G_dec parameters (a step only moves those that got a
            gradient, so one optimizer serves both paths).
        opt_d: optimizer over D's parameters.
        weights: loss weights.
        amp_dtype: autocast dtype or ``None``.
        train_decoder_on_reconstruction: also update G_dec on the reconstruction path
            (the paper updates G_enc only there).
    """

    def __init__(self, nets: GanNets, *, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                 weights: LossWeights, amp_dtype: torch.dtype | None = None,
                 train_decoder_on_reconstruction: bool = False) -> None:
        self.nets, self.opt_g, self.opt_d, self.weights = nets, opt_g, opt_d, weights
        self.amp_dtype = amp_dtype
        self.train_decoder_on_reconstruction = train_decoder_on_reconstruction

    @property
    def device(self) -> torch.device:
        return next(self.nets.decoder.parameters()).device

    def _code(self, batch: GanBatch, *, grad: bool) -> Tensor:
        dec = self.nets.decoder
        n = batch.target_pose.shape[0]
        if batch.source is None:
            return torch.rand(n, dec.feat_dim, device=self.device) * 2 - 1
        with torch.set_grad_enabled(grad):
            return self.nets.encoder(batch.source)

    def generate(self, batch: GanBatch, *, encoder_grad: bool = False) -> Tensor:
        """The fakes of ``batch``: decode its code at ``target_pose`` with fresh noise ``z``."""
        dec = self.nets.decoder
        f = self._code(batch, grad=encoder_grad)
        z = torch.randn(f.shape[0], dec.noise_dim, device=f.device)
        return dec(f, batch.target_pose, z)

    def d_step(self, batch: GanBatch) -> dict[str, float]:
        """One D update on ``batch``; returns the named losses (``d_*``)."""
        nets, w = self.nets, self.weights
        nets.discriminator.train()
        with torch.no_grad(), autocast(self.device, self.amp_dtype):
            fake = self.generate(batch)
        with autocast(self.device, self.amp_dtype):
            real_out = nets.discriminator(batch.real)
            fake_out = nets.discriminator(fake.detach())
            adv = d_hinge(real_out.critic, fake_out.critic)
            pose = class_loss(real_out.pose, batch.real_pose)
            ident = class_loss(real_out.identity, batch.real_id)
            loss = w.adv * adv + w.pose * pose + w.identity * ident
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_d.step()
        return {"d_loss": loss.item(), "d_adv": adv.item(), "d_pose": pose.item(), "d_id": ident.item(),
                "d_real": real_out.critic.float().mean().item(),
                "d_fake": fake_out.critic.float().mean().item()}

    def g_step(self, batch: GanBatch) -> dict[str, float]:
        """One G update on ``batch`` (G_dec on generation, G_enc on reconstruction); ``g_*`` losses."""
        nets, w = self.nets, self.weights
        rec = batch.path == RECONSTRUCTION
        frozen: list[nn.Module] = [nets.discriminator]
        if rec and not self.train_decoder_on_reconstruction:
            frozen.append(nets.decoder)
        if not rec:
            frozen.append(nets.encoder)
        with _frozen(*frozen), autocast(self.device, self.amp_dtype):
            fake = self.generate(batch, encoder_grad=rec)
            out = nets.discriminator(fake)
            adv = g_hinge(out.critic)
            pose = class_loss(out.pose, batch.target_pose)
            terms = {"g_adv": adv, "g_pose": pose}
            loss = w.adv * adv + w.pose * pose
            if batch.source_id is not None:
                terms["g_id"] = class_loss(out.identity, batch.source_id)
                loss = loss + w.identity * terms["g_id"]
            if rec:
                terms["g_l1"] = l1_loss(fake, batch.real)
                loss = loss + w.l1 * terms["g_l1"]
            self.opt_g.zero_grad(set_to_none=True)
            loss.backward()
        self.opt_g.step()
        return {"g_loss": loss.item(), **{k: v.item() for k, v in terms.items()}}
