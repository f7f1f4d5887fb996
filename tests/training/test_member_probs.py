"""Stored member probabilities: round trip, ensemble arithmetic, errors that name the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.member_probs import (
    MemberProbs,
    MemberProbsError,
    average_accuracy,
    load_member_probs,
    save_member_probs,
)

ROOT = Path(__file__).resolve().parents[2]
LABELS = torch.tensor([0, 1, 2, 0])


def member(name: str, rows: list[list[float]], *, fingerprint: str = "abc") -> MemberProbs:
    probs = torch.tensor(rows)
    return MemberProbs(name=name, split="PublicTest", data_fingerprint=fingerprint, labels=LABELS,
                       probs_1crop=probs, probs_10crop=probs.flip(1))


# a is right on rows 0 and 1, b on rows 0 and 2; their average is right on rows 0, 1, 2
A = member("a", [[0.9, 0.1, 0.0], [0.2, 0.5, 0.3], [0.6, 0.0, 0.4], [0.1, 0.8, 0.1]])
B = member("b", [[0.7, 0.2, 0.1], [0.4, 0.3, 0.3], [0.1, 0.0, 0.9], [0.2, 0.7, 0.1]])


def test_round_trip_keeps_probabilities_and_metadata(tmp_path: Path) -> None:
    path = save_member_probs(tmp_path / "a.safetensors", A)
    back = load_member_probs(path)
    assert (back.name, back.split, back.data_fingerprint) == ("a", "PublicTest", "abc")
    assert torch.equal(back.labels, LABELS)
    assert torch.equal(back.probs_1crop, A.probs_1crop)
    assert torch.equal(back.probs_10crop, A.probs_10crop)
    assert back.source == str(path)


def test_average_is_the_soft_vote() -> None:
    assert A.accuracy(tta=False) == pytest.approx(0.5)
    assert B.accuracy(tta=False) == pytest.approx(0.5)
    assert average_accuracy([A, B], tta=False) == pytest.approx(0.75)
    # the 10-crop probabilities are separate tensors (here the columns reversed): right on row 1 only
    assert average_accuracy([A, B], tta=True) == pytest.approx(0.25)


def test_members_of_other_data_are_refused() -> None:
    other = member("c", A.probs_1crop.tolist(), fingerprint="zzz")
    with pytest.raises(MemberProbsError, match="other data"):
        average_accuracy([A, other], tta=False)


def test_corrupt_file_error_names_it(tmp_path: Path) -> None:
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(MemberProbsError, match=r"broken\.safetensors"):
        load_member_probs(bad)
    with pytest.raises(MemberProbsError, match=r"missing\.safetensors"):
        load_member_probs(tmp_path / "missing.safetensors")


def test_ensemble_table_prints_member_and_ensemble_rows(tmp_path: Path) -> None:
    save_member_probs(tmp_path / "a.safetensors", A)
    save_member_probs(tmp_path / "b.safetensors", B)
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/ensemble_table.py"), str(tmp_path),
         "--ensemble", "both=a,b", "--search", "2"],
        capture_output=True, text=True, check=True, timeout=120).stdout
    assert "| a | 1 | 50.00 |" in out
    assert "| **both** | 2 | 75.00 |" in out
    assert "| search #1 | 2 | 75.00 |" in out


def test_ensemble_table_refuses_two_members_of_one_name(tmp_path: Path) -> None:
    save_member_probs(tmp_path / "a.safetensors", A)
    save_member_probs(tmp_path / "a_copy.safetensors", A)
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/ensemble_table.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "a_copy.safetensors" in res.stderr


def test_ensemble_table_names_a_missing_member(tmp_path: Path) -> None:
    save_member_probs(tmp_path / "a.safetensors", A)
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/ensemble_table.py"), str(tmp_path),
         "--ensemble", "x=a,nope"], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "nope" in res.stderr
