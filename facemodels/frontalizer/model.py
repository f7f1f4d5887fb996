"""The shipped frontaliser: registry model ``frontalizer`` and the helpers the service uses.

Inference contract (everything follows the checkpoint's :class:`ModelCfg`):

* Input: grayscale faces framed by :func:`facemodels.face.pose_framing.align_pose_face` at
  ``cfg.image_size`` (64), as uint8 ``(N, S, S)``; :meth:`Frontalizer.preprocess` scales them
  to ``[-1, 1]`` (``cfg.mean = cfg.std = 0.5``).
* :meth:`Frontalizer.frontalize` decodes the identity representation with the frontal pose
  code and ``z = 0``: a frontal face in the FER2013 framing at ``S`` x ``S``, in ``[-1, 1]``.
  :func:`to_uint8` and a resize to 48 (:func:`frontalize_faces` does all of it) give a crop
  the expression classifiers take as is.
* :meth:`Frontalizer.pose_logits`: D's pose head (``cfg.class_names`` = frontal,
  left_profile, right_profile; left/right as seen in the image).

A 48x48 FER2013-style crop (already in the frontal FER framing) maps to the input by
:func:`fer_crop_to_input` (a resize, or the pose-aware framing when landmarks are known).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facemodels.face.pose import POSE_CLASSES
from facemodels.face.pose_framing import align_pose_face
from facemodels.frontalizer.networks import Decoder, Encoder, PoseNet, build_disc_trunk
from facemodels.models import ModelCfg, register_model
from facemodels.preprocess import normalize

__all__ = ["FRONTAL", "Frontalizer", "default_cfg", "fer_crop_to_input", "frontalize_faces",
           "frontalizer", "to_uint8"]

FRONTAL = 0


def default_cfg(image_size: int = 64) -> ModelCfg:
    """Frontaliser ModelCfg: gray ``image_size`` squares scaled to [-1, 1], pose class names."""
    return ModelCfg(image_size=image_size, input_size=image_size, in_chans=1, mean=(0.5,),
                    std=(0.5,), class_names=POSE_CLASSES)


class Frontalizer(nn.Module):
    """G_enc + G_dec (+ D's trunk and pose head) for inference.

    ``forward(x)`` is :meth:`frontalize`. Submodules share weights with the training
    networks when built by :meth:`from_parts`, so saving it saves the trained weights.
    """

    def __init__(self, encoder: Encoder, decoder: Decoder, pose_net: PoseNet | None,
                 cfg: ModelCfg) -> None:
        super().__init__()
        self.encoder, self.decoder, self.pose_net, self.cfg = encoder, decoder, pose_net, cfg

    def frontalize(self, x: Tensor, *, pose: int = FRONTAL) -> Tensor:
        """``(N, 1, S, S)`` in [-1, 1] -> the face re-rendered at ``pose`` (default frontal)."""
        f = self.encoder(x)
        target = torch.full((x.shape[0],), pose, dtype=torch.long, device=x.device)
        return self.decoder(f, target, None)

    def forward(self, x: Tensor) -> Tensor:
        return self.frontalize(x)

    def pose_logits(self, x: Tensor) -> Tensor:
        """D_p logits ``(N, 3)`` over ``cfg.class_names``."""
        if self.pose_net is None:
            raise RuntimeError("this frontalizer was built without D's pose head")
        return self.pose_net(x)

    def preprocess(self, faces: Tensor) -> Tensor:
        """uint8 ``(N, H, W)`` faces -> float ``(N, 1, S, S)`` in [-1, 1] on this model's device."""
        device = next(self.parameters()).device
        return normalize(faces.to(device), self.cfg)


def to_uint8(x: Tensor, *, size: int | None = None) -> Tensor:
    """``(N, 1, S, S)`` in [-1, 1] -> uint8 ``(N, size, size)`` on the CPU (area-resized)."""
    x = x.detach().float()
    if size is not None and size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return ((x[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


@torch.inference_mode()
def frontalize_faces(model: Frontalizer, faces: Tensor, *, out_size: int = 48,
                     batch_size: int = 256) -> Tensor:
    """uint8 faces in the frontaliser framing -> uint8 frontal faces ``(N, out_size, out_size)``.

    ``out_size=48`` gives FER2013-framed crops for the expression classifiers.
    """
    model.eval()
    out = [to_uint8(model.frontalize(model.preprocess(chunk)), size=out_size)
           for chunk in faces.split(batch_size)]
    return torch.cat(out) if out else torch.empty(0, out_size, out_size, dtype=torch.uint8)


def fer_crop_to_input(face: np.ndarray, *, size: int = 64, landmarks: np.ndarray | None = None,
                      yaw: float | None = None) -> np.ndarray:
    """A FER-framed crop (e.g. 48x48 uint8) -> the frontaliser input framing at ``size``.

    Without ``landmarks`` (in ``face``'s pixels) the crop is just resized: the FER framing is
    the pose framing at yaw 0. With them, the pose-aware framing is applied, so a turned face
    is placed as in training.
    """
    if landmarks is None:
        interp = cv2.INTER_AREA if face.shape[0] > size else cv2.INTER_LINEAR
        return cv2.resize(face, (size, size), interpolation=interp)
    return align_pose_face(face, landmarks, size=size, yaw=yaw)


@register_model(task="frontalize")
def frontalizer(num_classes: int = 3, cfg: ModelCfg | None = None, *, width: int = 32,
                feat_dim: int = 320, noise_dim: int = 50, d_width: int = 32,
                pose_head: bool = True, **_: Any) -> Frontalizer:
    """DR-GAN frontaliser for inference (see :mod:`facemodels.frontalizer.networks`)."""
    cfg = cfg or default_cfg()
    if num_classes != cfg.num_classes or cfg.num_classes != len(POSE_CLASSES):
        raise ValueError(f"num_classes must be {len(POSE_CLASSES)} pose classes, got {num_classes}")
    if cfg.in_chans != 1 or cfg.input_size != cfg.image_size:
        raise ValueError("the frontalizer takes uncropped grayscale faces "
                         "(in_chans 1, input_size == image_size)")
    size = cfg.image_size
    enc = Encoder(width=width, feat_dim=feat_dim, image_size=size)
    dec = Decoder(width=width, feat_dim=feat_dim, noise_dim=noise_dim, image_size=size)
    pose_net = None
    if pose_head:
        trunk = build_disc_trunk(width=d_width, image_size=size)
        pose_net = PoseNet(trunk, nn.Linear(8 * d_width, num_classes))
    return Frontalizer(enc, dec, pose_net, cfg)
