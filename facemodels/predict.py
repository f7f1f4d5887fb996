"""Class probabilities for batches of face crops: the one prediction path of evaluation and serving."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from facemodels.device import autocast
from facemodels.models.cfg import ModelCfg
from facemodels.preprocess import eval_views

__all__ = ["predict_probs", "predict_probs_onnx"]


@torch.inference_mode()
def predict_probs(
    model: nn.Module,
    images: Tensor,
    *,
    tta: bool = False,
    batch_size: int = 256,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = True,
) -> Tensor:
    """Class probabilities ``(N, C)`` (CPU, float32) for uint8 ``images`` on the model's device.

    With ``tta`` the softmax is averaged over the 10 crops (corners, centre and mirrors).
    """
    model.eval()
    cfg: ModelCfg = model.cfg
    device = next(model.parameters()).device
    out = []
    for chunk in images.split(batch_size):
        views = eval_views(chunk.to(device), cfg, tta=tta)  # (V, n, C, s, s)
        v, n = views.shape[:2]
        x = views.flatten(0, 1)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(x)
        probs = logits.float().softmax(1).view(v, n, -1).mean(0)
        out.append(probs.cpu())
    return torch.cat(out) if out else torch.empty(0, cfg.num_classes)


@torch.inference_mode()
def predict_probs_onnx(
    session: Any,
    images: Tensor,
    cfg: ModelCfg,
    *,
    tta: bool = False,
    batch_size: int = 256,
) -> Tensor:
    """:func:`predict_probs` with an ONNX Runtime session of the classifier's graph (CPU).

    The same preprocessing (:func:`~facemodels.preprocess.eval_views`) feeds the graph that
    :func:`facemodels.onnx_export.export_classifier` wrote, which ends in the softmax; the
    views' probabilities are averaged as in :func:`predict_probs`.
    """
    from facemodels.onnx_export import CLASSIFIER_INPUT, CLASSIFIER_OUTPUT

    out = []
    for chunk in images.split(batch_size):
        views = eval_views(chunk.cpu(), cfg, tta=tta)  # (V, n, C, s, s)
        v, n = views.shape[:2]
        x = views.flatten(0, 1).contiguous().numpy()
        (probs,) = session.run([CLASSIFIER_OUTPUT], {CLASSIFIER_INPUT: x})
        out.append(torch.from_numpy(probs).view(v, n, -1).mean(0))
    return torch.cat(out) if out else torch.empty(0, cfg.num_classes)
