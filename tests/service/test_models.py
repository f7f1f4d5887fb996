"""Serving every checkpoint by name: discovery beside the classifier, FER_MODELS, ?model=<name>.

Real tiny checkpoints written with ``save_checkpoint``, the real app through ``TestClient`` and
real image bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError
from pydantic_settings import SettingsError

from facemodels.checkpoint import CheckpointError, code_version, save_checkpoint
from facemodels.classes import FER_CLASSES
from facemodels.models import create_model
from service.config import Settings
from service.inference.catalog import classifier_specs
from service.main import create_app

JPEG = {"content-type": "image/jpeg"}
FRONTALIZER_KWARGS = {"width": 8, "feat_dim": 32, "noise_dim": 8, "d_width": 8}


def _classifier(path: Path, arch: str, seed: int) -> Path:
    torch.manual_seed(seed)
    return save_checkpoint(path, create_model(arch), arch=arch, metrics={"PublicTest": {"acc": 0.0}})


def _frontalizer(path: Path) -> Path:
    torch.manual_seed(0)
    model = create_model("frontalizer", num_classes=3, **FRONTALIZER_KWARGS)
    return save_checkpoint(path, model, arch="frontalizer", model_kwargs=FRONTALIZER_KWARGS,
                           metrics={"FER2013-PublicTest": {"frontalize_helps": []}})


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoints folder like the shipped one, with more in it:

    default (compact_resnet_s, the configured classifier), compact (compact_resnet, another
    seed), frontalizer (the shipped frontaliser's name), side_gan (a frontaliser under another
    name) and notes.safetensors (weights without a card)."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("zoo")
    _classifier(folder / "default", "compact_resnet_s", seed=0)
    _classifier(folder / "compact", "compact_resnet", seed=1)
    _frontalizer(folder / "frontalizer")
    _frontalizer(folder / "side_gan")
    save_file({"x": torch.zeros(2)}, str(folder / "notes.safetensors"))
    return folder


@pytest.fixture(scope="module")
def zoo_client(make_settings, zoo: Path):
    settings = make_settings(classifier_checkpoint=zoo / "default.safetensors", use_shipped_extras=True)
    with TestClient(create_app(settings)) as c:
        yield c


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in metrics")


def _unknown(resp) -> str:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "unknown_model"
    return error["message"]


def test_every_classifier_in_the_folder_is_loaded_once_and_warmed_up(zoo_client: TestClient) -> None:
    models = {m["name"]: m for m in zoo_client.get("/models").json()["models"]}
    assert set(models) == {"default", "compact", "frontalizer"}  # not side_gan, not notes
    assert next(iter(models)) == "default"  # listed first
    assert (models["default"]["role"], models["default"]["arch"]) == ("default", "compact_resnet_s")
    assert (models["compact"]["role"], models["compact"]["arch"]) == ("classifier", "compact_resnet")
    assert (models["frontalizer"]["role"], models["frontalizer"]["arch"]) == ("frontalizer", "frontalizer")
    ready = zoo_client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == ["compact", "default"]
    engine = zoo_client.app.state.engine
    assert set(engine.classifiers) == {"default", "compact"}  # default.safetensors not twice
    text = zoo_client.get("/metrics").text
    for name in ("default", "compact"):
        assert _value(text, f'fer_batch_size_count{{model="{name}"}}') >= 1  # the warm-up batch
        assert f'fer_queue_capacity{{model="{name}"}}' in text
    assert 'fer_model_info{arch="compact_resnet",name="compact",role="classifier"' in text
    assert 'fer_model_info{arch="compact_resnet_s",name="default",role="default"' in text
    assert 'name="side_gan"' not in text


def test_predict_by_file_stem(zoo_client: TestClient, face_jpeg: bytes) -> None:
    default = zoo_client.post("/predict", content=face_jpeg, headers=JPEG).json()
    other = zoo_client.post("/predict?model=compact", content=face_jpeg, headers=JPEG)
    assert other.status_code == 200, other.text
    other = other.json()
    assert default["model"]["name"] == "default" and default["model"]["arch"] == "compact_resnet_s"
    assert other["model"]["name"] == "compact" and other["model"]["arch"] == "compact_resnet"
    (face,) = other["faces"]
    assert list(face["emotions"]) == list(FER_CLASSES)
    assert sum(face["emotions"].values()) == pytest.approx(1.0, abs=1e-3)
    assert face["emotions"] != default["faces"][0]["emotions"]  # another network answered
    batch = zoo_client.post("/predict/batch?model=compact",
                            files=[("files", ("a.jpg", face_jpeg, "image/jpeg"))])
    assert batch.status_code == 200, batch.text
    (item,) = batch.json()["results"]
    assert item["result"]["model"]["name"] == "compact"
    assert item["result"]["faces"][0]["emotions"] == pytest.approx(face["emotions"], abs=1e-4)
    text = zoo_client.get("/metrics").text
    assert _value(text, 'fer_batch_size_count{model="compact"}') >= 3  # warm-up + two requests


@pytest.mark.parametrize("name", ["vgg19", "side_gan", "frontalizer", "detector", "notes", "tiny"])
def test_an_unknown_model_is_a_400_listing_the_loaded_ones(zoo_client: TestClient, face_jpeg: bytes,
                                                           name: str) -> None:
    message = _unknown(zoo_client.post(f"/predict?model={name}", content=face_jpeg, headers=JPEG))
    assert repr(name) in message and message.endswith("available: default, compact")
    files = [("files", ("a.jpg", face_jpeg, "image/jpeg"))]
    assert _unknown(zoo_client.post(f"/predict/batch?model={name}", files=files)) == message


def test_openapi_describes_model_as_a_loaded_name(zoo_client: TestClient) -> None:
    spec = zoo_client.get("/openapi.json").json()
    for path in ("/predict", "/predict/batch"):
        (param,) = [p for p in spec["paths"][path]["post"]["parameters"] if p["name"] == "model"]
        assert param["schema"]["type"] == "string" and "enum" not in param["schema"]
        assert param["schema"]["default"] == "default"
        assert "GET /models" in param["description"]


def test_fer_models_serves_a_checkpoint_from_anywhere(make_settings, zoo: Path, tmp_path: Path,
                                                      face_jpeg: bytes) -> None:
    elsewhere = _classifier(tmp_path / "other_name", "compact_resnet_s", seed=2)
    settings = make_settings(models={"mine": elsewhere})  # the tiny default; no folder discovery
    with TestClient(create_app(settings)) as c:
        assert [m["name"] for m in c.get("/models").json()["models"]] == ["default", "mine", "frontalizer"]
        body = c.post("/predict?model=mine", content=face_jpeg, headers=JPEG).json()
        assert body["model"] == {"name": "mine", "version": code_version(), "arch": "compact_resnet_s"}
        assert _unknown(c.post("/predict?model=compact", content=face_jpeg, headers=JPEG)).endswith(
            "available: default, mine")
    gone = create_app(make_settings(models={"gone": tmp_path / "gone.safetensors"}))
    with pytest.raises(CheckpointError, match=r"gone\.json"), TestClient(gone):
        pass


def test_fer_models_from_the_environment(monkeypatch: pytest.MonkeyPatch, zoo: Path) -> None:
    monkeypatch.setenv("FER_MODELS", json.dumps({"fast": str(zoo / "compact.safetensors")}))
    assert Settings().models == {"fast": zoo / "compact.safetensors"}
    for bad in ({"default": "x.safetensors"}, {"ensemble": "x"}, {"detector": "x"}, {"a b": "x"},
                {"": "x"}):
        monkeypatch.setenv("FER_MODELS", json.dumps(bad))
        with pytest.raises(ValidationError, match="model name"):
            Settings()
    monkeypatch.setenv("FER_MODELS", "vgg19=/x")
    with pytest.raises(SettingsError, match=r"\bmodels\b"):  # not JSON: a clear startup error
        Settings()


def test_catalog_names_order_and_precedence(zoo: Path, tmp_path: Path) -> None:
    """Configured names win over discovered ones; the same file is never loaded twice."""
    ensemble = _classifier(tmp_path / "ens", "compact_resnet_s", seed=3)
    base = dict(classifier_checkpoint=zoo / "default.safetensors", use_shipped_extras=True)

    def names(**kw: object) -> list[tuple[str, str, str]]:
        return [(s.name, s.path.name, s.role) for s in classifier_specs(Settings(**{**base, **kw}))]

    assert names() == [("default", "default.safetensors", "default"),
                       ("compact", "compact.safetensors", "classifier")]
    assert names(use_shipped_extras=False) == [("default", "default.safetensors", "default")]
    assert names(ensemble_checkpoint=ensemble) == [("default", "default.safetensors", "default"),
                                                   ("ensemble", "ens.safetensors", "ensemble"),
                                                   ("compact", "compact.safetensors", "classifier")]
    # FER_MODELS may name the folder's file itself (then it is not discovered again under its stem)
    assert names(models={"fast": zoo / "compact"}) == [("default", "default.safetensors", "default"),
                                                       ("fast", "compact", "classifier")]
    # or take the stem's name for another file
    assert names(models={"compact": ensemble}) == [("default", "default.safetensors", "default"),
                                                   ("compact", "ens.safetensors", "classifier")]
    # the classifier configured elsewhere: the folder's default.safetensors cannot be `default`
    assert names(classifier_checkpoint=zoo / "compact.safetensors") == [
        ("default", "compact.safetensors", "default")]
    with pytest.raises(ValueError, match=r"'again' and model 'default' are the same checkpoint"):
        classifier_specs(Settings(**base, models={"again": zoo / "default.json"}))
    with pytest.raises(ValueError, match=r"'ensemble' and model 'default'"):
        classifier_specs(Settings(**base, ensemble_checkpoint=zoo / "default.safetensors"))


def test_shipped_ensemble_name_in_the_folder(zoo: Path, tmp_path: Path) -> None:
    """ensemble.safetensors beside the classifier is model=ensemble (role ensemble), as before;
    FER_ENSEMBLE_CHECKPOINT overrides it."""
    import shutil

    for suffix in (".safetensors", ".json"):
        shutil.copy(zoo / f"default{suffix}", tmp_path / f"default{suffix}")
        shutil.copy(zoo / f"compact{suffix}", tmp_path / f"ensemble{suffix}")
    settings = Settings(classifier_checkpoint=tmp_path / "default.safetensors")
    assert [(s.name, s.role) for s in classifier_specs(settings)] == [("default", "default"),
                                                                      ("ensemble", "ensemble")]
    override = Settings(classifier_checkpoint=tmp_path / "default.safetensors",
                        ensemble_checkpoint=zoo / "compact.safetensors")
    assert [(s.name, s.path) for s in classifier_specs(override)] == [
        ("default", tmp_path / "default.safetensors"), ("ensemble", zoo / "compact.safetensors")]


def test_a_broken_checkpoint_in_the_folder_stops_startup(make_settings, zoo: Path, tmp_path: Path) -> None:
    import shutil

    for suffix in (".safetensors", ".json"):
        shutil.copy(zoo / f"default{suffix}", tmp_path / f"default{suffix}")
    card = json.loads((zoo / "compact.json").read_text())
    (tmp_path / "broken.json").write_text(json.dumps(card))
    (tmp_path / "broken.safetensors").write_bytes((zoo / "default.safetensors").read_bytes())  # wrong arch
    app = create_app(make_settings(classifier_checkpoint=tmp_path / "default.safetensors",
                                   use_shipped_extras=True))
    with pytest.raises(CheckpointError, match=r"broken\.safetensors"), TestClient(app):
        pass
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"broken\.json"):
        classifier_specs(Settings(classifier_checkpoint=tmp_path / "default.safetensors"))


def test_a_training_run_folder_serves_only_the_configured_checkpoint(zoo: Path, tmp_path: Path) -> None:
    """fer-train leaves best, last and training state side by side: discovery must not serve
    ``last`` as a second model, nor choke on the state's JSON (it has no arch)."""
    import shutil

    from training.train_state import save_train_state

    run = tmp_path / "run"
    run.mkdir()
    for stem in ("best", "last"):
        for suffix in (".safetensors", ".json"):
            shutil.copy(zoo / f"compact{suffix}", run / f"{stem}{suffix}")
    model = create_model("compact_resnet")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    save_train_state(run / "last", optimizer=optimizer, scheduler=None,
                     generator=torch.Generator(), info={"epoch": 0})
    (run / "args.json").write_text(json.dumps({"model": "compact_resnet"}))
    specs = classifier_specs(Settings(classifier_checkpoint=run / "best.safetensors"))
    assert [(s.name, s.path) for s in specs] == [("default", run / "best.safetensors")]


def test_json_beside_weights_that_is_not_a_card_is_skipped(zoo: Path, tmp_path: Path) -> None:
    import shutil

    for stem in ("default", "notes"):
        for suffix in (".safetensors", ".json"):
            shutil.copy(zoo / f"default{suffix}", tmp_path / f"{stem}{suffix}")
    (tmp_path / "notes.json").write_text(json.dumps({"comment": "not a checkpoint card"}))
    specs = classifier_specs(Settings(classifier_checkpoint=tmp_path / "default.safetensors"))
    assert [s.name for s in specs] == ["default"]
