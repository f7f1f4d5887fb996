"""Data-parallel training: the shard arithmetic, and two real CPU ranks under ``torchrun``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from facemodels.checkpoint import load_checkpoint
from facemodels.models import create_model
from tests.support import REPO
from training.distributed import (
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    is_main,
    seeded_generator,
    shard,
)

ARCH = "compact_resnet_s"

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this PyTorch build has no gloo backend")


@pytest.mark.parametrize(("n", "world_size"), [(12, 2), (12, 3), (13, 2), (10, 4), (1, 3), (0, 2)])
def test_shards_are_even_covering_and_disjoint_up_to_padding(n: int, world_size: int) -> None:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    shards = [shard(order, r, world_size) for r in range(world_size)]
    per_rank = -(-n // world_size)
    assert [len(s) for s in shards] == [per_rank] * world_size  # same number of steps everywhere
    together = torch.cat(shards).tolist()
    assert set(together) == set(range(n))  # every sample is seen
    assert len(together) - len(set(together)) == per_rank * world_size - n  # repeats = padding
    if n % world_size == 0:
        assert sorted(together) == list(range(n))  # disjoint


def test_one_rank_keeps_the_whole_order_and_bad_ranks_are_refused() -> None:
    order = torch.arange(5)
    assert torch.equal(shard(order, 0, 1), order)
    with pytest.raises(ValueError, match="rank 2"):
        shard(order, 2, 2)


def test_seeded_generators_agree_across_ranks_only_where_they_should() -> None:
    def draw(*keys: int) -> list[int]:
        return torch.randperm(50, generator=seeded_generator(*keys)).tolist()

    assert draw(0, 3) == draw(0, 3)  # the shared order: the same on every rank
    assert draw(0, 3) != draw(0, 4)  # a new order every epoch
    assert draw(0, 3, 1) != draw(0, 3, 2)  # augmentation draws differ per rank


def test_without_torchrun_there_is_one_process_and_no_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert init_distributed(torch.device("cpu")) == torch.device("cpu")
    assert not is_distributed()
    assert (get_rank(), get_world_size(), is_main()) == (0, 1, True)


def _torchrun(*args: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FER_CACHE_DIR": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


_DIVERGING = """
import torch
from torch import nn
from training.distributed import (
    check_replicas_in_sync, cleanup_distributed, get_rank, init_distributed, same_on_all_ranks,
)

init_distributed(torch.device("cpu"))
# what a resume compares: equal on every rank, or not
print(f"rank {get_rank()} same: {same_on_all_ranks((3, 1, 0))} {same_on_all_ranks((get_rank(), 1, 0))}")
torch.manual_seed(get_rank())  # a different model on each rank: what DDP must never let happen
try:
    check_replicas_in_sync(nn.Linear(4, 3))
except RuntimeError as e:
    print(f"rank {get_rank()} raised: {e}")
cleanup_distributed()
"""


@pytest.mark.slow
@needs_gloo
def test_replicas_that_differ_are_reported_on_every_rank(tmp_path: Path) -> None:
    script = tmp_path / "diverge.py"
    script.write_text(_DIVERGING)
    done = _torchrun(str(script), cwd=REPO, cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} raised: ranks diverged: 2 of 2 parameter tensors" in done.stdout
        assert f"rank {rank} same: True False" in done.stdout


@pytest.mark.slow
@pytest.mark.e2e
@needs_gloo
def test_two_cpu_ranks_train_in_sync_and_save_like_one_process(
    tmp_path: Path, make_fer_folder: Callable[..., Path]
) -> None:
    """Two gloo ranks: identical replicas every epoch, rank-0-only outputs, EMA and resume."""
    data = make_fer_folder(per_class_train=4, per_class_test=2)
    out, cache = tmp_path / "run", tmp_path / "cache"
    common = ["-m", "training.cli", "classify", "--model", ARCH, "--data", str(data),
              "--output-dir", str(out), "--cache-dir", str(cache), "--batch-size", "4",
              "--epochs", "2", "--ema", "0.9", "--class-balance", "sampler", "--no-progress",
              "--threads", "1", "--seed", "3"]
    first = _torchrun(*common, "--epoch-budget", "1", cwd=REPO, cache=cache)
    assert first.returncode == 0, first.stderr[-3000:]
    # The resumed half also distils from the first half's best, to take --teacher through DDP,
    # on 3 stored views that the two ranks compute between them (views 0 and 2, and 1).
    second = _torchrun(*common, "--resume", "--teacher", str(out / "best"), "--teacher-views", "3",
                       cwd=REPO, cache=cache)
    assert second.returncode == 0, second.stderr[-3000:]
    (views,) = cache.glob("teacher-views-*")
    assert sorted(p.name for p in views.iterdir()) == [f"view-{v}.safetensors" for v in range(3)]
    assert "training on 3 stored teacher views" in second.stderr

    for done, epoch in ((first, 0), (second, 1)):
        log = done.stderr
        assert "global batch 8 (--batch-size 4 per rank)" in log
        # one check per epoch, all-reduced over both ranks, logged by rank 0 only
        assert log.count("replicas in sync: ") == 1, log[-3000:]
        assert "diverged" not in log
        assert log.count(f"epoch {epoch}: train loss") == 1  # the other rank logs no epoch lines
    assert "resumed" in second.stderr

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]  # rank 0 alone appends
    reference = create_model(ARCH).state_dict()
    for stem in ("best", "last", "last_ema"):
        weights = load_file(str(out / f"{stem}.safetensors"))
        assert weights.keys() == reference.keys(), stem  # the plain module, no "module." prefix
        assert all(weights[k].shape == reference[k].shape for k in weights)
        _, card = load_checkpoint(out / stem)  # rebuilds the model and loads it strictly
        assert card["arch"] == ARCH and card["world_size"] == 2 and card["ema_decay"] == 0.9
    card = json.loads((out / "best.json").read_text())
    assert 0 <= card["metrics"]["PublicTest"]["acc_tta"] <= 1  # finalised by rank 0
    assert (out / "best_confusion.json").is_file() and (out / "curves.png").is_file()
