"""The expression path: FER2013 faces auto-encoded to the frontal pose under L1 + a frozen classifier's KL."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from facemodels.checkpoint import save_checkpoint
from facemodels.models import ModelCfg, create_model
from tests.support import synthetic_face
from training.cli import main as cli_main
from training.gan.expression import ExpressionPath, load_expression_classifier, refuse_grader_as_teacher
from training.gan.recipe import GanNets

SMALL = {"arch": "compact_resnet_s", "model_kwargs": {}, "cfg": ModelCfg().to_dict()}


def _faces(n: int = 6) -> Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(np.stack([synthetic_face(k % 7, rng) for k in range(n)]))


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return create_model("compact_resnet_s").eval().requires_grad_(False)


def _params(m: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def _moved(m: nn.Module, before: list[Tensor]) -> bool:
    return any(not torch.equal(p, b) for p, b in zip(m.parameters(), before, strict=True))


def test_step_moves_the_generator_only_and_lowers_its_loss(tiny_nets: GanNets) -> None:
    classifier = _classifier()
    path = ExpressionPath.build(_faces(), classifier, image_size=32, device=torch.device("cpu"))
    assert path.inputs.shape == (6, 32, 32) and path.inputs.dtype == torch.uint8
    opt = torch.optim.Adam([*tiny_nets.encoder.parameters(), *tiny_nets.decoder.parameters()], lr=2e-3)
    before = {k: _params(getattr(tiny_nets, k)) for k in ("encoder", "decoder", "discriminator")}
    frozen = _params(classifier)
    g = torch.Generator().manual_seed(1)
    losses = [path.step(tiny_nets, opt, 6, g) for _ in range(40)]
    assert {"e_loss", "e_l1", "e_kl", "e_agree"} == losses[0].keys()
    assert _moved(tiny_nets.encoder, before["encoder"]) and _moved(tiny_nets.decoder, before["decoder"])
    assert not _moved(tiny_nets.discriminator, before["discriminator"])
    assert not _moved(classifier, frozen)
    first = sum(r["e_loss"] for r in losses[:5]) / 5
    last = sum(r["e_loss"] for r in losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_the_kl_term_pulls_the_classifier_reading_of_the_output_to_the_input(tiny_nets: GanNets) -> None:
    """With only the KL term on, the classifier's output distribution moves toward its input's."""
    classifier = _classifier()
    path = ExpressionPath.build(_faces(4), classifier, image_size=32, device=torch.device("cpu"),
                                w_l1=0.0, w_kl=1.0, temperature=1.0)
    opt = torch.optim.Adam([*tiny_nets.encoder.parameters(), *tiny_nets.decoder.parameters()], lr=2e-3)
    g = torch.Generator().manual_seed(2)
    kls = [path.step(tiny_nets, opt, 4, g)["e_kl"] for _ in range(40)]
    assert sum(kls[-5:]) < 0.5 * sum(kls[:5]), kls


def test_classifier_member_is_picked_from_an_ensemble(tmp_path: Path) -> None:
    ens = create_model("ensemble", members=[SMALL, SMALL])
    save_checkpoint(tmp_path / "ens", ens, arch="ensemble", model_kwargs=ens.model_kwargs)
    member = load_expression_classifier(tmp_path / "ens", member=1)
    for a, b in zip(member.state_dict().values(), ens.members[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in member.parameters())
    with pytest.raises(ValueError, match="out of range"):
        load_expression_classifier(tmp_path / "ens", member=2)
    single = create_model("compact_resnet_s")
    save_checkpoint(tmp_path / "one", single, arch="compact_resnet_s")
    with pytest.raises(ValueError, match="not an ensemble"):
        load_expression_classifier(tmp_path / "one", member=0)


def test_a_teacher_holding_the_graders_weights_is_refused(tmp_path: Path) -> None:
    """The grader stored in float16 is still found inside an ensemble teacher; other members pass."""
    ens = create_model("ensemble", members=[SMALL, SMALL])
    save_checkpoint(tmp_path / "ens", ens, arch="ensemble", model_kwargs=ens.model_kwargs)
    save_checkpoint(tmp_path / "grader", ens.members[1], arch="compact_resnet_s", half=True)
    with pytest.raises(ValueError, match="member 1 has the weights of"):
        refuse_grader_as_teacher(load_expression_classifier(tmp_path / "ens"), tmp_path / "grader")
    with pytest.raises(ValueError, match="the expression classifier has the weights of"):
        refuse_grader_as_teacher(load_expression_classifier(tmp_path / "ens", member=1), tmp_path / "grader")
    refuse_grader_as_teacher(load_expression_classifier(tmp_path / "ens", member=0), tmp_path / "grader")
    refuse_grader_as_teacher(load_expression_classifier(tmp_path / "ens"), tmp_path / "absent")


@pytest.mark.e2e
def test_frontalizer_command_runs_the_expression_path(make_cfp_tree: Callable[..., Path],
                                                      make_fer_folder: Callable[..., Path],
                                                      tmp_path: Path) -> None:
    cfp = make_cfp_tree(frontal=2, profile=2)
    fer = make_fer_folder(per_class_train=2, per_class_test=1)
    save_checkpoint(tmp_path / "clf", _classifier(), arch="compact_resnet_s")
    tiny = ["--image-size", "32", "--width", "8", "--d-width", "8", "--feat-dim", "16", "--noise-dim", "4",
            "--batch-size", "4", "--sample-every", "2", "--checkpoint-every", "2", "--log-every", "1",
            "--sample-count", "2", "--threads", "1", "--steps", "2", "--cache-dir", str(tmp_path / "c")]
    out = tmp_path / "run"
    assert cli_main(["frontalizer", "--data", str(cfp), "--output-dir", str(out), *tiny,
                     "--fer-data", str(fer), "--expression-classifier", str(tmp_path / "clf")]) == 0
    rows = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert {"fer/e_l1", "fer/e_kl", "fer/e_agree"} <= rows[0].keys()
    card = json.loads((out / "final.json").read_text())
    assert card["train_args"]["fer_data"] == str(fer)
    rc = cli_main(["frontalizer", "--data", str(cfp), "--output-dir", str(tmp_path / "bad"), *tiny,
                   "--fer-data", str(fer)])
    assert rc != 0
