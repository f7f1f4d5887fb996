"""The README's examples work as written: its files exist, its links resolve inside the
repository, and its sample requests give the answers it shows (on the shipped default model)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
BASE_URL = "http://127.0.0.1:8000"
#: Probabilities may move this much between CPUs and backends (int8 on ONNX Runtime against
#: fp32 PyTorch moves them by about 0.001); a changed model moves them by more.
PROB_TOL = 0.005
#: Boxes and landmarks in pixels, the detection score and the yaw in degrees.
PIXEL_TOL, SCORE_TOL, YAW_TOL = 1.0, 0.002, 0.5
#: FER_* variables the README may name that are not service settings: the compose file's
#: (host port, torch threads per replica) and the tests' dataset folder.
NOT_SETTINGS = {"FER_HTTP_PORT", "FER_THREADS", "FER_SHARED_DATA"}


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    level = heading.split(" ", 1)[0]
    nxt = re.search(rf"\n{re.escape(level)} ", text[start + len(heading) + 2:])
    return text[start: start + len(heading) + 2 + nxt.start()] if nxt else text[start:]


def _fences(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _commands(block: str) -> list[str]:
    """Shell commands of a ```bash block, continuation lines joined, comments dropped."""
    return [c.strip() for c in block.replace("\\\n", " ").splitlines()
            if c.strip() and not c.lstrip().startswith("#")]


def _use_the_api() -> str:
    return _section(README.read_text(encoding="utf-8"), "## Use the API")


def _curl_files(command: str) -> list[Path]:
    """Repository files a curl command sends (``@path`` arguments, ``$(base64 ... path)``)."""
    paths = re.findall(r"@([\w./-]+)", command) + re.findall(r"base64 -w0 ([\w./-]+)", command)
    return [REPO / p for p in paths]


def test_curl_examples_send_files_that_ship() -> None:
    commands = [c for block in _fences(_use_the_api(), "bash") for c in _commands(block)
                if "curl" in c]
    assert len(commands) >= 4
    for command in commands:
        for path in _curl_files(command):
            assert path.is_file(), f"the README's example sends {path.relative_to(REPO)}, which does " \
                                   f"not exist: {command}"


_LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve_inside_the_repository(doc: Path) -> None:
    """The repository stands alone: no link leads to a file outside it or to one that is missing."""
    for target in _LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        assert path.is_relative_to(REPO), f"{doc.name} links to {target}, outside the repository"
        assert path.exists(), f"{doc.name} links to {target}, which does not exist"


def test_readme_names_only_real_settings_and_links_the_table() -> None:
    from service.config import Settings
    from service.settings_doc import env_name

    text = README.read_text(encoding="utf-8")
    settings = {env_name(n, f) for n, f in Settings.model_fields.items()}
    named = set(re.findall(r"\bFER_[A-Z0-9_]*[A-Z0-9]\b", text))
    assert named - settings - NOT_SETTINGS == set(), "the README names FER_ variables that no setting reads"
    assert "](docs/settings.md)" in text


# --- the sample requests against the app ------------------------------------------------------


@pytest.fixture(scope="module")
def shipped_client(detector_weights: Path, tmp_path_factory: pytest.TempPathFactory):
    """The app on the shipped default checkpoint with the default settings (only the detector
    weights and the cache come from the test session; the extra shipped models are not loaded)."""
    from fastapi.testclient import TestClient

    from service.config import Settings
    from service.main import create_app

    settings = Settings(detector_weights=detector_weights, cache_dir=tmp_path_factory.mktemp("readme"),
                        use_shipped_extras=False, device="cpu")
    with TestClient(create_app(settings)) as client:
        yield client


def _sample_response() -> dict[str, Any]:
    section = _use_the_api()
    blocks = _fences(section, "json")
    assert blocks, "the README's 'Use the API' section has no ```json sample response"
    return json.loads(blocks[0])


def _first_request() -> tuple[Path, str]:
    first = _commands(_fences(_use_the_api(), "bash")[0])[0]
    m = re.fullmatch(rf"curl -s -F file=@(\S+) {re.escape(BASE_URL)}(/\S+)", first)
    assert m, f"the README's first example is not a multipart upload: {first}"
    return REPO / m[1], m[2]


def _shape(value: Any) -> Any:
    """Keys and lengths without the values: what the JSON looks like."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return type(value).__name__ if not isinstance(value, int | float) or isinstance(value, bool) else "number"


def _close(a: Any, b: Any, tol: float, what: str) -> None:
    assert _shape(a) == _shape(b), what
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if isinstance(x, dict):
            stack += [(x[k], y[k]) for k in x]
        elif isinstance(x, list):
            stack += list(zip(x, y, strict=True))
        else:
            assert abs(x - y) <= tol, f"{what}: README {y}, app {x} (tolerance {tol})"


def test_sample_response_matches_the_shipped_model(shipped_client) -> None:
    path, route = _first_request()
    readme = _sample_response()
    r = shipped_client.post(route, files={"file": (path.name, path.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    got = r.json()

    assert _shape(got) == _shape(readme), "the README's sample response has other fields than the app's"
    assert re.fullmatch(r"\d+\.\d+\.\d+(\+[0-9a-f]{7,40})?", readme["model"]["version"])
    assert got["model"] == readme["model"], "model name, version or arch differs from the README's"
    assert got["image"] == readme["image"] and got["tta"] == readme["tta"]
    assert len(got["faces"]) == len(readme["faces"])
    for mine, shown in zip(got["faces"], readme["faces"], strict=True):
        assert mine["dominant"] == shown["dominant"]
        assert mine["frontalized"] == shown["frontalized"]
        assert abs(sum(shown["emotions"].values()) - 1) < 1e-3
        _close(mine["emotions"], shown["emotions"], PROB_TOL, "emotions")
        _close(mine["box"], shown["box"], PIXEL_TOL, "box")
        _close(mine["landmarks"], shown["landmarks"], PIXEL_TOL, "landmarks")
        _close(mine["score"], shown["score"], SCORE_TOL, "score")
        _close(mine["yaw"], shown["yaw"], YAW_TOL, "yaw")


def test_batch_example_answers_each_file(shipped_client) -> None:
    (batch,) = [c for c in _commands(_fences(_use_the_api(), "bash")[0]) if "/predict/batch" in c]
    paths = _curl_files(batch)
    assert len(paths) >= 2
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]
    r = shipped_client.post("/predict/batch", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == [p.name for p in paths]
    for item in results:
        assert item["error"] is None and len(item["result"]["faces"]) >= 1, item


def test_bad_upload_example_answers_as_shown(shipped_client) -> None:
    section = _use_the_api()
    m = re.search(r"\$ (curl .*?/predict)\n(\{.*\})\n", section)
    assert m, "the README's bad-upload example (a `$ curl` line and its answer) is missing"
    args = shlex.split(m[1])
    body = args[args.index("--data-binary") + 1].encode()
    content_type = args[args.index("-H") + 1].split(":", 1)[1].strip()
    r = shipped_client.post("/predict", content=body, headers={"content-type": content_type})
    assert r.status_code == 400
    assert r.json() == json.loads(m[2])
