"""scripts/zoo_cpu.sh: every named run must be a command that ``fer-train classify`` accepts.

The runs take hours, so a misspelled flag or a moved checkpoint would otherwise show only when a
run is started. ``DRY_RUN=1`` prints the command; these tests parse it with the real parser.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from facemodels.models import list_models
from training.train_classifier import get_args_parser

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "zoo_cpu.sh"


def _run_names() -> list[str]:
    """The run names of the script's ``case`` list (``name)`` at the start of a line)."""
    names = re.findall(r"^\s+([a-z0-9_]+)\)\s", SCRIPT.read_text(), flags=re.MULTILINE)
    return [n for n in names if n != "esac"]


def _command(run: str, **env: str) -> list[str]:
    out = subprocess.run(["bash", str(SCRIPT), run], env={**os.environ, "DRY_RUN": "1", **env},
                         capture_output=True, text=True, timeout=30, check=True)
    return shlex.split(out.stdout)


def test_the_script_lists_the_zoo_and_the_screen() -> None:
    names = _run_names()
    for expected in ("cnn3_kd", "cnn5_kd", "cnn7_kd", "vgg19_kd", "resnet18_kd", "resnet34_kd",
                     "screen_compact", "screen_compact_fr", "screen_compact_w2"):
        assert expected in names


@pytest.mark.parametrize("run", _run_names())
def test_each_run_is_a_valid_classify_command(run: str) -> None:
    cmd = _command(run)
    assert cmd[:2] == ["fer-train", "classify"]
    args = get_args_parser().parse_args(cmd[2:])
    assert args.model in list_models()
    assert args.threads == 1 and args.resume
    assert args.output_dir.name == run
    for path in (args.init, args.teacher):
        if path is not None and not path.is_absolute():
            assert (REPO / path).with_suffix(".safetensors").is_file(), f"{run}: {path} is missing"


def test_epochs_override_wins_and_unknown_runs_fail() -> None:
    args = get_args_parser().parse_args(_command("resnet18_kd", EPOCHS="7")[2:])
    assert args.epochs == 7
    on = get_args_parser().parse_args(_command("camera_on")[2:])
    off = get_args_parser().parse_args(_command("camera_off")[2:])
    stored = get_args_parser().parse_args(_command("camera_off_views")[2:])
    assert on.camera_aug == 0.3 and off.camera_aug == 0.0
    assert vars(on) | {"camera_aug": 0.0, "output_dir": off.output_dir} == vars(off)
    # the stored-views A/B differs from camera_off in nothing else
    assert stored.teacher_views == 8 and off.teacher_views == 0
    assert vars(stored) | {"teacher_views": 0, "output_dir": off.output_dir} == vars(off)
    bad = subprocess.run(["bash", str(SCRIPT), "no_such_run"], capture_output=True, text=True,
                         env={**os.environ, "DRY_RUN": "1"}, timeout=30)
    assert bad.returncode == 2 and "unknown run" in bad.stderr
