"""The Grafana dashboard and the alert rules only read metrics the service really exports.

The exported names come from the real app's ``/metrics`` (models loaded, a few requests sent
so that every labelled family has series), with the ``_bucket``/``_sum``/``_count`` suffixes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.deploy.support import (
    DASHBOARD,
    DOCKER,
    PROMETHEUS_SERIES,
    dashboard_queries,
    exported_metric_names,
    metric_names,
    need_module,
)

DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
ALERTS = DOCKER / "prometheus" / "alerts.yml"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def exported(app_client, face_jpeg: bytes) -> set[str]:
    """Series names on the real app's /metrics after good and bad requests."""
    jpeg = {"content-type": "image/jpeg"}
    assert app_client.post("/predict", files={"file": ("a.jpg", face_jpeg, "image/jpeg")}).status_code == 200
    assert app_client.post("/detect", content=face_jpeg, headers=jpeg).status_code == 200
    assert app_client.post("/predict", content=b"not an image", headers=jpeg).status_code == 400
    response = app_client.get("/metrics")
    assert response.status_code == 200
    return exported_metric_names(response.text)


def test_metric_name_parser() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, route) (rate(fer_request_latency_seconds_bucket'
            '{route=~"/predict|/detect", instance=~"$instance"}[$__rate_interval]))) > 1')
    assert metric_names(expr) == {"fer_request_latency_seconds_bucket"}
    assert metric_names('sum(rate(fer_requests_totl{status=~"5.."}[5m])) / sum(up) > 0.05') == {
        "fer_requests_totl", "up"}
    assert metric_names('label_values(up{job="fer"}, instance)') == {"up"}
    assert metric_names("max by (model) (max_over_time(fer_queue_depth[5m] offset 1h)) > 7.5e2") == {
        "fer_queue_depth"}


def test_exported_names_include_the_documented_metrics(exported: set[str]) -> None:
    for name in ("fer_requests_total", "fer_request_latency_seconds_bucket", "fer_queue_wait_seconds_bucket",
                 "fer_batch_size_count", "fer_model_compute_seconds_sum", "fer_queue_depth",
                 "fer_faces_per_image_bucket", "fer_errors_total", "fer_model_info",
                 "fer_gpu_memory_bytes", "fer_ready"):
        assert name in exported


def test_every_dashboard_query_reads_exported_metrics(dashboard: dict, exported: set[str]) -> None:
    allowed = exported | PROMETHEUS_SERIES
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 10
    unknown = {where: sorted(metric_names(expr) - allowed) for where, expr in queries
               if metric_names(expr) - allowed}
    assert not unknown, f"the dashboard reads metrics the service does not export: {unknown}"
    for where, expr in queries:
        assert metric_names(expr), f"{where} reads no metric: {expr}"


def test_dashboard_shows_what_the_issue_asks_for(dashboard: dict) -> None:
    used = set().union(*(metric_names(expr) for _, expr in dashboard_queries(dashboard)))
    for name in ("fer_requests_total", "fer_request_latency_seconds_bucket", "fer_batch_size_bucket",
                 "fer_queue_depth", "fer_queue_wait_seconds_bucket", "fer_faces_per_image_count",
                 "fer_errors_total"):
        assert name in used, f"no panel shows {name}"
    quantiles = {expr.split(",")[0] for _, expr in dashboard_queries(dashboard)
                 if "fer_request_latency_seconds_bucket" in expr}
    assert {"histogram_quantile(0.5", "histogram_quantile(0.95", "histogram_quantile(0.99"} <= quantiles


def test_dashboard_is_well_formed(dashboard: dict) -> None:
    yaml = need_module("yaml", "pip install pyyaml")
    uids = {d["uid"] for d in yaml.safe_load(DATASOURCES.read_text())["datasources"]}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"]
    for panel in dashboard["panels"]:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] in uids, panel["title"]
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]


def test_every_alert_reads_exported_metrics(exported: set[str]) -> None:
    yaml = need_module("yaml", "pip install pyyaml")
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    allowed = exported | PROMETHEUS_SERIES
    for rule in rules:
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= allowed, f"{rule['alert']} reads {sorted(names - allowed)}"


def test_dashboard_file_is_provisioned() -> None:
    yaml = need_module("yaml", "pip install pyyaml")
    provider = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "dashboards" / "fer.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert Path(DASHBOARD).suffix == ".json"
