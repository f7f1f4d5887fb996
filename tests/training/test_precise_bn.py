"""Precise BN: running statistics recomputed as an exact average, and its switch in the trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from facemodels.models import create_model
from training.cli import main as cli_main
from training.precise_bn import recalibrate_batchnorm


def test_running_mean_becomes_the_average_of_batch_means() -> None:
    torch.manual_seed(0)
    model = create_model("compact_resnet").eval()
    norm = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    norm.running_mean.fill_(100.0)  # stale statistics, far from the data
    seen: list[Tensor] = []
    hook = norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0].float().mean((0, 2, 3))))
    images = torch.randint(0, 256, (96, 1, 48, 48), dtype=torch.uint8)

    count = recalibrate_batchnorm(model, images, batches=3, batch_size=32,
                                  generator=torch.Generator().manual_seed(1), channels_last=False)
    hook.remove()

    assert count == sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert len(seen) == 3
    assert torch.allclose(norm.running_mean, torch.stack(seen).mean(0), atol=1e-5)
    assert not model.training, "the model's mode is restored"
    assert norm.momentum == 0.1, "the layer's momentum is restored"


def test_frozen_norms_keep_their_statistics_and_modes_are_restored() -> None:
    """A layer left in eval mode inside a training model is frozen on purpose; a short last
    batch is not used, so every pass weighs the same."""
    torch.manual_seed(0)
    model = create_model("compact_resnet").train()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    frozen, live = norms[0], norms[-1]
    frozen.eval()
    frozen.running_mean.fill_(3.0)
    before = live.num_batches_tracked.item()
    images = torch.randint(0, 256, (40, 1, 48, 48), dtype=torch.uint8)
    count = recalibrate_batchnorm(model, images, batches=5, batch_size=16, channels_last=False)
    assert count == len(norms) - 1
    assert torch.all(frozen.running_mean == 3.0)
    assert live.num_batches_tracked.item() == 2 != before  # 40 faces: two full batches of 16
    assert model.training and not frozen.training and live.training


def test_a_model_without_batchnorm_is_left_alone() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    assert recalibrate_batchnorm(model, torch.zeros(4, 1, 2, 2, dtype=torch.uint8), batches=2) == 0


@pytest.mark.slow
def test_trainer_logs_accuracy_before_and_after_recalibration(tmp_path: Path, make_fer_folder) -> None:
    data = make_fer_folder(per_class_train=12, per_class_test=4)
    out = tmp_path / "run"
    assert cli_main(["classify", "--model", "compact_resnet", "--data", str(data), "--output-dir",
                     str(out), "--cache-dir", str(tmp_path / "cache"), "--batch-size", "16",
                     "--epochs", "2", "--no-progress", "--amp", "none", "--bn-recalibrate", "2"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert all(0 <= r["val_acc_bn_running"] <= 1 for r in rows)
    # the saved weights carry the recalibrated statistics: 2 passes, not the epoch's ~6 batches
    tracked = [v for k, v in load_file(str(out / "last.safetensors")).items()
               if k.endswith("num_batches_tracked")]
    assert tracked and all(int(v) == 2 for v in tracked)
    assert json.loads((out / "args.json").read_text())["bn_recalibrate"] == 2
