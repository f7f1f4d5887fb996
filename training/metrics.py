"""Classification metrics: confusion matrix and per-class precision, recall and F1."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["classification_report", "confusion_matrix"]


def confusion_matrix(labels: Tensor, preds: Tensor, num_classes: int) -> Tensor:
    """``(C, C)`` int64 matrix; row = true class, column = predicted class."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def classification_report(
    labels: Tensor, preds: Tensor, class_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support, JSON-ready."""
    c = len(class_names)
    cm = confusion_matrix(labels, preds, c).double()
    tp = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp_min(1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-12), torch.zeros_like(tp))
    per_class = {
        name: {
            "precision": round(float(precision[i]), 4),
            "recall": round(float(recall[i]), 4),
            "f1": round(float(f1[i]), 4),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }
    total = float(cm.sum())
    return {
        "accuracy": float(tp.sum() / total) if total else float("nan"),
        "macro_f1": float(f1[support > 0].mean()) if bool((support > 0).any()) else float("nan"),
        "per_class": per_class,
        "confusion_matrix": cm.long().tolist(),
        "class_names": list(class_names),
    }
