"""A real scrape: the service on loopback, a real Prometheus on the repo's scrape config.

The service runs as ``python -m service.cli`` (what ``fer-serve`` runs) with a tiny checkpoint;
Prometheus (Debian's ``prometheus`` package) runs docker/prometheus/prometheus.yml with the DNS
discovery replaced by the loopback target and 1 s intervals, and loads docker/prometheus/
alerts.yml. After good and bad requests, Prometheus's HTTP API must show exactly what was sent.
Everything listens on 127.0.0.1, every wait is bounded and both processes are stopped in the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.deploy.support import DASHBOARD, DOCKER, REPO, dashboard_queries, need_module, need_tool

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SERVICE_START_S = 180.0
PROMETHEUS_START_S = 60.0
SCRAPE_WAIT_S = 45.0
BAD_IMAGE = b"this is not an image"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _wait_http(url: str, *, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> float:
    """Poll ``url`` until it answers 200; fail with the process log if it exits or times out."""
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited with {proc.returncode} before {url} was up:\n{_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - start
        time.sleep(0.25)
    pytest.fail(f"{url} did not answer 200 within {timeout:.0f} s:\n{_tail(log)}")


def _prometheus_config(port: int, prom_port: int) -> dict:
    """The repo's prometheus.yml with the loopback service as the fer target, 1 s intervals."""
    yaml = need_module("yaml", "pip install pyyaml")
    cfg = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str((DOCKER / "prometheus" / f).resolve()) for f in cfg["rule_files"]]
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    fer = jobs["fer"]
    assert fer.pop("dns_sd_configs"), "the shipped fer job discovers the api replicas by DNS"
    fer["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{prom_port}"]}]
    return cfg


@dataclass
class Stack:
    api: str
    prom: str
    service: subprocess.Popen[bytes]
    service_log: Path
    sent: dict[tuple[str, str, str], int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    faces: list[int] = field(default_factory=list)

    def query(self, promql: str) -> list[dict]:
        response = httpx.get(f"{self.prom}/api/v1/query", params={"query": promql}, timeout=5)
        body = response.json()
        assert body["status"] == "success", f"{promql}: {body}"
        return body["data"]["result"]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        assert len(result) <= 1, f"{promql} matched {len(result)} series: {result}"
        return float(result[0]["value"][1]) if result else None

    def eventually(self, promql: str, expected: float | None) -> None:
        """Wait (bounded) until an instant query returns ``expected``; fail showing the last value."""
        deadline = time.monotonic() + SCRAPE_WAIT_S
        got = self.value(promql)
        while got != expected and time.monotonic() < deadline:
            time.sleep(0.5)
            got = self.value(promql)
        assert got == expected, f"{promql}: Prometheus has {got}, expected {expected}"

    def wait_for(self, what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + SCRAPE_WAIT_S
        while not check():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path,
          detector_weights: Path) -> Iterator[Stack]:
    prometheus = need_tool("prometheus")
    tmp = tmp_path_factory.mktemp("monitoring")
    port, prom_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FER_")}
    env.update(FER_CLASSIFIER_CHECKPOINT=str(tiny_checkpoint), FER_DETECTOR_WEIGHTS=str(detector_weights),
               FER_DEVICE="cpu", FER_MAX_WAIT_MS="2", FER_CACHE_DIR=str(tmp / "cache"),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    config = tmp / "prometheus.yml"
    config.write_text(json.dumps(_prometheus_config(port, prom_port), indent=2))  # JSON is YAML
    service_log, prom_log = tmp / "service.log", tmp / "prometheus.log"
    service = prom = None
    try:
        with service_log.open("wb") as out:
            service = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "--host", "127.0.0.1", "--port", str(port),
                 "--log-level", "warning"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        with prom_log.open("wb") as out:
            prom = subprocess.Popen(
                [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                cwd=tmp, stdout=out, stderr=subprocess.STDOUT)
        api, prom_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prom_port}"
        _wait_http(f"{api}/readyz", proc=service, log=service_log, timeout=SERVICE_START_S)
        _wait_http(f"{prom_url}/-/ready", proc=prom, log=prom_log, timeout=PROMETHEUS_START_S)
        yield Stack(api=api, prom=prom_url, service=service, service_log=service_log)
    finally:
        _stop(service)
        _stop(prom)


@pytest.fixture(scope="module")
def traffic(stack: Stack, face_jpeg: bytes) -> Stack:
    """Send good and bad requests, recording what the service should count."""
    jpeg = {"content-type": "image/jpeg"}
    plan: list[tuple[str, str, dict, int]] = [
        *[("POST", "/predict", {"files": {"file": ("a.jpg", face_jpeg, "image/jpeg")}}, 200)] * 3,
        ("POST", "/detect", {"content": face_jpeg, "headers": jpeg}, 200),
        *[("POST", "/predict", {"content": BAD_IMAGE, "headers": jpeg}, 400)] * 2,
        ("POST", "/predict", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415),
        ("GET", "/no-such-route", {}, 404),
        *[("GET", "/healthz", {}, 200)] * 2,
    ]
    with httpx.Client(base_url=stack.api, timeout=60) as client:
        for method, path, kwargs, status in plan:
            response = client.request(method, path, **kwargs)
            assert response.status_code == status, f"{method} {path}: {response.status_code} {response.text}"
            route = path if status != 404 else "unmatched"
            key = (route, method, str(status))
            stack.sent[key] = stack.sent.get(key, 0) + 1
            body = response.json()
            if status >= 400:
                code = body["error"]["code"]
                stack.errors[code] = stack.errors.get(code, 0) + 1
            elif path in ("/predict", "/detect"):
                stack.faces.append(len(body["faces"]))
    assert sum(stack.faces) >= 4, "the fixture photo has one face per request"
    return stack


def test_target_is_up(traffic: Stack) -> None:
    traffic.eventually('up{job="fer"}', 1.0)
    targets = httpx.get(f"{traffic.prom}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    fer = [t for t in targets if t["labels"]["job"] == "fer"]
    assert len(fer) == 1 and fer[0]["health"] == "up", fer
    traffic.eventually('fer_ready{job="fer"}', 1.0)
    info = 'fer_model_info{job="fer", name="default", role="default", arch="compact_resnet_s"}'
    traffic.eventually(info, 1.0)


def test_request_counter_has_what_was_sent(traffic: Stack) -> None:
    for (route, method, status), n in traffic.sent.items():
        sel = f'job="fer", route="{route}", method="{method}", status="{status}"'
        traffic.eventually(f"fer_requests_total{{{sel}}}", float(n))
    assert traffic.value('count(fer_requests_total{route="/metrics"})') is None, "scrapes are not counted"
    statuses = {r["metric"]["status"] for r in traffic.query('fer_requests_total{route="/predict"}')}
    assert statuses == {"200", "400", "415"}
    for code, n in traffic.errors.items():
        traffic.eventually(f'fer_errors_total{{job="fer", kind="{code}"}}', float(n))
    assert set(traffic.errors) == {"not_an_image", "unsupported_media_type", "not_found"}


def test_latency_histogram_series(traffic: Stack) -> None:
    from prometheus_client.utils import floatToGoString

    from service.metrics import LATENCY_BUCKETS

    sel = 'job="fer", route="/predict", method="POST"'
    n = sum(v for (route, _, _), v in traffic.sent.items() if route == "/predict")
    traffic.eventually(f"fer_request_latency_seconds_count{{{sel}}}", float(n))
    buckets = {r["metric"]["le"]: float(r["value"][1])
               for r in traffic.query(f"fer_request_latency_seconds_bucket{{{sel}}}")}
    assert set(buckets) == {floatToGoString(b) for b in LATENCY_BUCKETS} | {"+Inf"}
    ordered = [buckets[k] for k in sorted(buckets, key=float)]
    assert ordered == sorted(ordered), "cumulative buckets never decrease"
    assert buckets["+Inf"] == n
    assert traffic.value(f"fer_request_latency_seconds_sum{{{sel}}}") > 0
    p95 = traffic.value(f"histogram_quantile(0.95, fer_request_latency_seconds_bucket{{{sel}}})")
    assert p95 is not None and 0 < p95 <= max(LATENCY_BUCKETS)


def test_pipeline_metrics_match_the_service(traffic: Stack) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    traffic.eventually('fer_faces_per_image_count{job="fer"}', float(len(traffic.faces)))
    traffic.eventually('fer_faces_per_image_sum{job="fer"}', float(sum(traffic.faces)))
    exposition = httpx.get(f"{traffic.api}/metrics", timeout=10).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(exposition) for s in f.samples}
    checked = 0
    for family in ("fer_batch_size", "fer_queue_wait_seconds", "fer_model_compute_seconds"):
        for model in ("default", "detector"):
            for suffix in ("_count", "_sum"):
                own = samples[(family + suffix, (("model", model),))]
                if suffix == "_count":
                    assert own > 0, f"{family}{{model={model}}} saw no batch"
                traffic.eventually(f'{family}{suffix}{{job="fer", model="{model}"}}', own)
                checked += 1
    assert checked == 12
    traffic.eventually('fer_queue_depth{job="fer", model="default"}', 0.0)


def _rfc3339_seconds(stamp: str) -> float:
    """Prometheus's nanosecond RFC 3339 time (``2026-12-02T07:56:53.708605824Z``) as epoch seconds."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    seconds = datetime.fromisoformat(whole).replace(tzinfo=UTC).timestamp()
    return seconds + float(f"0.{fraction or '0'}")


def test_alert_rules_load_and_evaluate(traffic: Stack) -> None:
    yaml = need_module("yaml", "pip install pyyaml")
    groups = yaml.safe_load((DOCKER / "prometheus" / "alerts.yml").read_text())["groups"]
    shipped = {r["alert"] for g in groups for r in g["rules"]}

    def rules() -> list[dict]:
        groups = httpx.get(f"{traffic.prom}/api/v1/rules", timeout=5).json()["data"]["groups"]
        return [r for g in groups for r in g["rules"]]

    # A rule evaluated before the first scrape sees no up{job="fer"} (FerNoTargets pending), so
    # judge only evaluations that ran after Prometheus holds a sample of the service.
    traffic.eventually('up{job="fer"}', 1.0)
    scraped_at = time.time()
    traffic.wait_for("every rule evaluated after the first scrape", lambda: rules() and all(
        r["health"] == "ok" and _rfc3339_seconds(r["lastEvaluation"]) > scraped_at for r in rules()))
    assert {r["name"] for r in rules()} == shipped
    firing = [a for a in httpx.get(f"{traffic.prom}/api/v1/alerts", timeout=5).json()["data"]["alerts"]]
    assert not firing, f"a healthy service raised alerts: {firing}"


def test_dashboard_queries_run_on_real_data(traffic: Stack) -> None:
    # Series that this traffic cannot produce: no 5xx, no queue_full, no GPU on CPU.
    may_be_empty = ('status=~"5.."', 'kind="queue_full"', "fer_gpu_memory_bytes")
    healthz = traffic.sent[("/healthz", "GET", "200")]
    traffic.eventually('fer_requests_total{job="fer", route="/healthz", status="200"}', float(healthz))
    time.sleep(2.5)  # rate() over the window needs two samples after the traffic
    for where, expr in dashboard_queries(json.loads(DASHBOARD.read_text())):
        if expr.startswith("label_values("):
            metric, label = expr[len("label_values("):-1].rsplit(",", 1)
            response = httpx.get(f"{traffic.prom}/api/v1/label/{label.strip()}/values",
                                 params={"match[]": metric}, timeout=5).json()
            assert response["status"] == "success" and response["data"], f"{where}: {response}"
            continue
        promql = (expr.replace("$__rate_interval", "1m").replace('=~"$instance"', '=~".*"')
                  .replace('=~"$route"', '=~"/predict"'))
        assert "$" not in promql, f"{where}: unhandled variable in {expr}"
        result = traffic.query(promql)
        if not any(marker in expr for marker in may_be_empty):
            assert result, f"{where} shows nothing on real data: {promql}"


def test_target_down_is_seen_and_alerted(traffic: Stack) -> None:
    """Stop the service: ``up`` drops to 0 and FerTargetDown goes pending (``for: 1m``)."""
    _stop(traffic.service)
    traffic.eventually('up{job="fer"}', 0.0)

    def pending() -> bool:
        alerts = httpx.get(f"{traffic.prom}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
        return any(a["labels"]["alertname"] == "FerTargetDown" and a["state"] in {"pending", "firing"}
                   for a in alerts)

    traffic.wait_for("FerTargetDown to be pending", pending)
