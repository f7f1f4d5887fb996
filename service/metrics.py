"""Every Prometheus object the service exports, in one place, on a per-app registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
WAIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
FACE_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50)


class Metrics:
    """Holds the collectors; also the batcher's observer (``on_batch``/``on_queue_depth``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("fer_requests_total", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("fer_request_latency_seconds", "HTTP request latency by route",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("fer_queue_wait_seconds", "Time an item waits for its batch",
                                    ["model"], buckets=WAIT_BUCKETS, registry=r)
        self.batch_size = Histogram("fer_batch_size", "Items per model call", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
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
