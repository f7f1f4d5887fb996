"""Every Prometheus object the service exports, in one place, on a per-app registry.

Per-request metrics are recorded by one middleware (:func:`install_request_metrics`): routes
and error handlers only note what happened (:func:`note_faces`, :func:`note_error`) on the
request, and the middleware turns the notes into metrics once the response is known. The
WebSocket route ``/stream`` is no HTTP request: it records its own ``fer_stream_*`` series.

A client that hangs up before its answer (:func:`note_client_disconnect`) is counted with the
status ``499`` (nginx's "client closed request"), not as a server error: it is the client's doing.
A body that did not arrive in time is counted as the ``408`` its client got
(:func:`note_request_timeout`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "CLIENT_CLOSED_REQUEST",
    "Metrics",
    "batch_buckets",
    "install_request_metrics",
    "note_client_disconnect",
    "note_error",
    "note_faces",
    "note_request_timeout",
]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
WAIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
FACE_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50)
_REPORT = "fer_request_report"
_TIMED_OUT = "fer_body_timed_out"
#: HTTP methods kept as metric labels; any other (a client may send anything) is "other", so
#: clients cannot create unbounded label series.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: The status label of a request whose client hung up before the answer (nginx's 499).
CLIENT_CLOSED_REQUEST = 499


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two up to the configured ``max_batch_size``, which is always the last bucket."""
    powers = [1 << i for i in range(max_batch_size.bit_length()) if (1 << i) < max_batch_size]
    return (*powers, max_batch_size)


@dataclass
class _RequestReport:
    faces: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    client_disconnected: bool = False


def _report(request: Request) -> _RequestReport | None:
    return getattr(request.state, _REPORT, None)


def note_faces(request: Request, count: int) -> None:
    """Note that an image of this request had ``count`` faces (recorded by the middleware)."""
    if (report := _report(request)) is not None:
        report.faces.append(count)


def note_error(request: Request, code: str) -> None:
    """Note an error of kind ``code`` in this request (recorded by the middleware)."""
    if (report := _report(request)) is not None:
        report.errors.append(code)


def note_request_timeout(scope: Scope) -> None:
    """Note that the body timeout answered this request with a 408 (outside the app, so the
    middleware would otherwise record the app's view, a client that went away: 499)."""
    scope.setdefault("state", {})[_TIMED_OUT] = True


def note_client_disconnect(request: Request) -> None:
    """Note that the client hung up before its answer: recorded with status 499, not as a 5xx."""
    if (report := _report(request)) is not None:
        report.client_disconnected = True
        report.errors.append("client_disconnect")


class Metrics:
    """Holds the collectors; also the batcher's observer (``on_batch``/``on_queue_depth``)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, max_batch_size: int) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("fer_requests_total", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("fer_request_latency_seconds", "HTTP request latency by route",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("fer_queue_wait_seconds", "Time an item waits for its batch",
                                    ["model"], buckets=WAIT_BUCKETS, registry=r)
        self.batch_size = Histogram("fer_batch_size", "Items per model call", ["model"],
                                    buckets=batch_buckets(max_batch_size), registry=r)
        self.compute = Histogram("fer_model_compute_seconds", "Model call time per batch",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("fer_queue_depth", "Items waiting in the batch queue", ["model"],
                                 registry=r)
        self.queue_capacity = Gauge("fer_queue_capacity", "Most items the batch queue holds", ["model"],
                                    registry=r)
        self.faces = Histogram("fer_faces_per_image", "Faces detected per image",
                               buckets=FACE_BUCKETS, registry=r)
        self.errors = Counter("fer_errors_total", "Errors by kind", ["kind"], registry=r)
        self.model_info = Gauge("fer_model_info", "Loaded models (value 1)",
                                ["name", "arch", "version", "role"], registry=r)
        self.gpu_memory = Gauge("fer_gpu_memory_bytes", "CUDA memory allocated by the service",
                                ["device"], registry=r)
        self.ready = Gauge("fer_ready", "1 when the models are loaded and warmed up", registry=r)
        # WS /stream: HTTP middleware never sees a WebSocket, so the route records these itself.
        self.stream_frames = Counter("fer_stream_frames", "Frames answered on WS /stream (rate() = "
                                     "answered frames/s)", registry=r)
        self.stream_dropped = Counter("fer_stream_dropped_frames", "Frames dropped unanswered on WS "
                                      "/stream: a newer frame arrived before the server was free",
                                      registry=r)
        self.streams_active = Gauge("fer_streams_active", "Open WS /stream connections", registry=r)
        self.stream_tracks = Gauge("fer_stream_tracks_active", "Face tracks alive across the open "
                                   "WS /stream connections", registry=r)
        self.stream_latency = Histogram("fer_stream_frame_latency_seconds", "WS /stream: from a "
                                        "frame's arrival to its answer", buckets=LATENCY_BUCKETS,
                                        registry=r)

    # BatchObserver protocol -------------------------------------------------------------
    def on_batch(self, name: str, size: int, queue_wait_s: list[float], compute_s: float) -> None:
        self.batch_size.labels(model=name).observe(size)
        self.compute.labels(model=name).observe(compute_s)
        hist = self.queue_wait.labels(model=name)
        for w in queue_wait_s:
            hist.observe(w)

    def on_queue_depth(self, name: str, depth: int) -> None:
        self.queue_depth.labels(model=name).set(depth)

    def on_error(self, name: str, kind: str) -> None:
        self.errors.labels(kind=f"{name}:{kind}").inc()


def install_request_metrics(app: FastAPI, metrics: Metrics) -> None:
    """Record every request's count, latency, faces and errors in one middleware.

    A plain ASGI middleware, not ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware``
    wraps ``receive`` in a task group that loses a client's ``http.disconnect`` when a route asks
    ``request.is_disconnected()``, and routes ask that before running the models.
    """
    app.add_middleware(_RequestMetricsMiddleware, metrics=metrics)


class _RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        report = _RequestReport()
        scope.setdefault("state", {})[_REPORT] = report  # what request.state reads
        start = time.perf_counter()
        status = 500

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        except Exception:
            status = 500
            report.errors.append("internal_error")  # answered by the outermost 500 handler
            raise
        finally:
            if scope["state"].get(_TIMED_OUT):  # the client got the body timeout's 408
                status = 408
                report.errors = [e for e in report.errors if e != "client_disconnect"] + ["request_timeout"]
            elif report.client_disconnected:
                status = CLIENT_CLOSED_REQUEST
            self._record(scope, report, status, time.perf_counter() - start)

    def _record(self, scope: Scope, report: _RequestReport, status: int, seconds: float) -> None:
        m = self.metrics
        path = getattr(scope.get("route"), "path", "unmatched")
        method = scope["method"] if scope["method"] in _METHODS else "other"
        if path != "/metrics":
            m.requests.labels(route=path, method=method, status=str(status)).inc()
            m.latency.labels(route=path, method=method).observe(seconds)
        for count in report.faces:
            m.faces.observe(count)
        for code in report.errors:
            m.errors.labels(kind=code).inc()
