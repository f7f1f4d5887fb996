"""``fer-train frontalizer`` end to end on a tiny synthetic CFP: outputs, checkpoint, exact resume."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from facemodels.checkpoint import load_checkpoint
from training.cli import main as cli_main

pytestmark = [pytest.mark.e2e]

TINY = ["--image-size", "32", "--width", "8", "--d-width", "8", "--feat-dim", "16", "--noise-dim", "4",
        "--batch-size", "4", "--sample-every", "2", "--checkpoint-every", "2", "--log-every", "1",
        "--sample-count", "2", "--threads", "1", "--seed", "3", "--self-pair-p", "0.2"]


def _train(data: Path, out: Path, cache: Path, *extra: str) -> int:
    return cli_main(["frontalizer", "--data", str(data), "--output-dir", str(out), "--cache-dir", str(cache),
                     *TINY, *extra])


@pytest.fixture
def cfp(make_cfp_tree: Callable[..., Path]) -> Path:
    return make_cfp_tree(frontal=2, profile=2)


def test_smoke_run_writes_everything_and_resumes_exactly(cfp: Path, tmp_path: Path) -> None:
    straight, split, cache = tmp_path / "straight", tmp_path / "split", tmp_path / "cache"
    assert _train(cfp, straight, cache, "--steps", "4", "--half-checkpoint") == 0
    for name in ("args.json", "losses.jsonl", "last.safetensors", "last.json", "last_state.json",
                 "last_state.safetensors", "last_d_state.json", "last_discriminator.safetensors",
                 "final.safetensors", "final.json", "samples/latest.png", "samples/step_000002.png"):
        assert (straight / name).is_file(), name
    rows = [json.loads(line) for line in (straight / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"gen/d_loss", "gen/g_loss", "rec/d_loss", "rec/g_l1", "rec/g_id"} <= rows[0].keys()
    card = json.loads((straight / "final.json").read_text())
    assert card["arch"] == "frontalizer" and card["dtype"] == "float16" and card["steps_trained"] == 4
    model, _ = load_checkpoint(straight / "final")
    with torch.no_grad():
        assert model.frontalize(torch.zeros(2, 1, 32, 32)).shape == (2, 1, 32, 32)
    assert (straight / "samples" / "latest.png").stat().st_size > 500

    assert _train(cfp, split, cache, "--steps", "4", "--step-budget", "2") == 0
    assert not (split / "final.safetensors").exists()
    assert _train(cfp, split, cache, "--steps", "4", "--resume") == 0
    assert len((split / "losses.jsonl").read_text().splitlines()) == 4
    for name in ("last.safetensors", "last_discriminator.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(split / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), (name, k)


def test_missing_data_is_a_clean_error(tmp_path: Path) -> None:
    assert _train(tmp_path / "nowhere", tmp_path / "out", tmp_path / "cache", "--steps", "1") == 2
