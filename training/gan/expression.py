"""The expression path: an optional third G step that teaches the frontaliser to keep expressions.

DR-GAN's terms keep identity and pose; nothing in them keeps an expression, and CFP faces
mostly smile or look neutral. This path (``fer-train frontalizer --fer-data ...``) draws
FER2013 *Training* faces (never PublicTest), frames them as the frontaliser's input
(:func:`facemodels.frontalizer.model.fer_crop_to_input`, the yaw-0 framing, since FER2013 faces
are mostly frontal), decodes them at the frontal pose and updates G_enc and G_dec with

* ``w_l1`` x L1(fake, input): a frontal face should come back as it went in, and
* ``w_kl`` x T^2 x KL(C_T(input) || C_T(fake)): a frozen expression classifier C should read
  the same expression in the output as in the input (the distillation loss of the classifier
  trainer, at temperature T).

D is not involved: the real/fake, pose and identity heads stay CFP-only. Use a classifier
for C that is not the one the evaluation reports with (``--expression-member`` picks one
member of an ensemble checkpoint), so the evaluation does not grade its own teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from facemodels.checkpoint import load_checkpoint, weights_path
from facemodels.device import autocast
from facemodels.frontalizer.model import FRONTAL, fer_crop_to_input
from facemodels.preprocess import eval_views
from training.engine import soft_target_kl
from training.gan.losses import l1_loss
from training.gan.recipe import GanNets
from training.gan.sampling import to_unit

__all__ = ["ExpressionPath", "load_expression_classifier", "refuse_grader_as_teacher"]


def load_expression_classifier(path: str | Path, *, member: int | None = None,
                               device: torch.device | str = "cpu") -> nn.Module:
    """A frozen classifier checkpoint, or one member of an ensemble checkpoint."""
    model, card = load_checkpoint(path, device=device)
    if member is not None:
        members = getattr(model, "members", None)
        if members is None:
            raise ValueError(f"{path} is a {card['arch']!r} checkpoint, not an ensemble; "
                             "drop --expression-member")
        if not 0 <= member < len(members):
            raise ValueError(f"{path} has {len(members)} members; --expression-member {member} "
                             "is out of range")
        model = members[member]
    return model.eval().requires_grad_(False)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Equal state dicts up to float16 storage rounding."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape
        and torch.allclose(sa[k].float(), sb[k].float(), rtol=1e-3, atol=1e-5) for k in sa)


def refuse_grader_as_teacher(teacher: nn.Module, grader_path: str | Path) -> None:
    """Raise if the teacher, or one member of an ensemble teacher, has the grader's weights.

    The evaluation reports with ``grader_path`` (the served default); a teacher that contains
    it would let the frontaliser be graded by the classifier it was trained to please. A path
    check cannot see this when the default is also a member of the shipped ensemble.
    """
    if not weights_path(Path(grader_path)).is_file():
        return
    grader, _ = load_checkpoint(grader_path)
    for i, candidate in enumerate([teacher, *getattr(teacher, "members", [])]):
        if _same_weights(candidate, grader):
            where = "the expression classifier" if i == 0 else f"its member {i - 1}"
            raise ValueError(f"{where} has the weights of {grader_path}, which grades the result; "
                             "pick another classifier or --expression-member")


@dataclass
class ExpressionPath:
    """FER2013 faces and a frozen classifier; :meth:`step` is one G update.

    Attributes:
        faces: uint8 ``(N, 48, 48)`` FER-framed crops (the classifier's input).
        inputs: uint8 ``(N, S, S)``, the same faces in the frontaliser's input framing.
        classifier: the frozen expression classifier.
        w_l1, w_kl, temperature: loss weights and the KL temperature.
    """

    faces: Tensor
    inputs: Tensor
    classifier: nn.Module
    w_l1: float = 10.0
    w_kl: float = 1.0
    temperature: float = 2.0

    @classmethod
    def build(cls, faces: Tensor, classifier: nn.Module, *, image_size: int,
              device: torch.device, **weights: float) -> ExpressionPath:
        """Frame ``faces`` (uint8, FER-framed) once for the frontaliser and move all to ``device``."""
        if len(faces) == 0:
            raise ValueError("the expression path needs at least one FER2013 face")
        framed = np.stack([fer_crop_to_input(f, size=image_size) for f in faces.numpy()])
        return cls(faces=faces.to(device), inputs=torch.from_numpy(framed).to(device),
                   classifier=classifier.to(device), **weights)

    def _logits(self, faces01: Tensor) -> Tensor:
        """Classifier logits for float faces in [0, 1] (any side: resized to its framing)."""
        return self.classifier(eval_views(faces01, self.classifier.cfg, tta=False)[0])

    def step(self, nets: GanNets, opt_g: torch.optim.Optimizer, batch_size: int,
             generator: torch.Generator, *, amp_dtype: torch.dtype | None = None) -> dict[str, float]:
        """Auto-encode a batch of FER faces to the frontal pose; update G_enc and G_dec."""
        device = self.inputs.device
        idx = torch.randint(len(self.inputs), (batch_size,), generator=generator).to(device)
        flip = (torch.rand(batch_size, generator=generator) < 0.5).to(device)
        x = to_unit(self.inputs[idx])
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        face = self.faces[idx].unsqueeze(1)
        face = torch.where(flip[:, None, None, None], face.flip(-1), face)
        t = self.temperature
        with autocast(device, amp_dtype):
            with torch.no_grad():
                target = self._logits(face.float() / 255.0)
            f = nets.encoder(x)
            z = torch.randn(f.shape[0], nets.decoder.noise_dim, device=device)
            frontal = torch.full((batch_size,), FRONTAL, dtype=torch.long, device=device)
            fake = nets.decoder(f, frontal, z)
            l1 = l1_loss(fake, x)
            logits = self._logits((fake.float() + 1) / 2)
            kl = soft_target_kl(logits, target, t)
            loss = self.w_l1 * l1 + self.w_kl * t * t * kl
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        agree = (logits.argmax(1) == target.argmax(1)).float().mean()
        return {"e_loss": loss.item(), "e_l1": l1.item(), "e_kl": kl.item(), "e_agree": agree.item()}
