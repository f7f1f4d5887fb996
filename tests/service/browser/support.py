"""Helpers for the browser tests: finding Chromium, running the real server, watching a page.

Chromium is Debian's package (``apt-get install chromium``; ``.ci/run`` installs it) driven by
Playwright for Python through ``executable_path``: Playwright's own browser downloads are not
used. Without Chromium or Playwright the tests skip naming the fix; ``CI_REQUIRE_BROWSER=1``
(set by ``.ci/run``) turns those skips into failures, so CI cannot pass by skipping them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import httpx
import numpy as np
import pytest

__all__ = [
    "REPO",
    "REQUIRE_BROWSER",
    "SOCKET_PROBE",
    "PageProbe",
    "Server",
    "find_chromium",
    "need_playwright",
    "run_server",
    "write_y4m",
]

REPO = Path(__file__).resolve().parents[3]
REQUIRE_BROWSER = os.environ.get("CI_REQUIRE_BROWSER") == "1"
SERVER_START_S = 180.0
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

#: Records every request and counts /predict requests in flight, before the page's own script
#: runs (an init script: the page's Content-Security-Policy does not apply to it).
FETCH_PROBE = """
(() => {
  const probe = { inflight: 0, maxInflight: 0, predicts: 0, starts: [] };
  Object.defineProperty(window, "__probe", { value: probe });
  const realFetch = window.fetch.bind(window);
  window.fetch = async (input, init) => {
    const url = new URL(input instanceof Request ? input.url : String(input), location.href);
    const isPredict = url.pathname.endsWith("/predict");
    if (isPredict) {
      probe.inflight += 1;
      probe.predicts += 1;
      probe.maxInflight = Math.max(probe.maxInflight, probe.inflight);
      probe.starts.push(performance.now());
    }
    try {
      const response = await realFetch(input, init);
      if (isPredict) await response.clone().arrayBuffer();  // in flight until the body is in
      return response;
    } finally {
      if (isPredict) probe.inflight -= 1;
    }
  };
})();
"""

#: Records the page's WebSockets (URLs, chosen subprotocols, closes), every frame it sends with
#: its time, the JSON answers, and how many frames were unanswered at once, before the page's
#: own script runs.
SOCKET_PROBE = """
(() => {
  const probe = { urls: [], protocols: [], closes: [], starts: [], answers: [], sends: 0,
                  inflight: 0, maxInflight: 0 };
  Object.defineProperty(window, "__socketProbe", { value: probe });
  const Real = window.WebSocket;
  const realSend = Real.prototype.send;
  Real.prototype.send = function (data) {
    probe.sends += 1;
    probe.inflight += 1;
    probe.maxInflight = Math.max(probe.maxInflight, probe.inflight);
    probe.starts.push(performance.now());
    return realSend.call(this, data);
  };
  window.WebSocket = new Proxy(Real, {
    construct(target, args) {
      const socket = new target(...args);
      probe.urls.push(String(args[0]));
      socket.addEventListener("open", () => probe.protocols.push(socket.protocol));
      socket.addEventListener("message", (e) => {
        probe.inflight = Math.max(0, probe.inflight - 1);
        if (typeof e.data === "string") probe.answers.push(JSON.parse(e.data));
      });
      socket.addEventListener("close", (e) => {
        probe.inflight = 0;
        probe.closes.push({ code: e.code, reason: e.reason });
      });
      return socket;
    },
  });
})();
"""


def _unavailable(message: str) -> None:
    if REQUIRE_BROWSER:
        pytest.fail(message + " but CI_REQUIRE_BROWSER=1")
    pytest.skip(message)


def find_chromium() -> str:
    """Path of a Chromium binary ($CHROMIUM, else on PATH), or skip (fail in CI) naming the fix."""
    override = os.environ.get("CHROMIUM")
    candidates = [override] if override else [shutil.which(n) for n in CHROMIUM_NAMES]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    _unavailable("Chromium is not installed (`apt-get install chromium`; .ci/run installs it)")
    raise AssertionError("unreachable")


def need_playwright():
    """The sync Playwright module, or skip (fail in CI) naming the install command."""
    try:
        from playwright import sync_api
    except ImportError:
        _unavailable("Playwright for Python is not installed (`pip install -e '.[dev]'`)")
        raise
    return sync_api


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT/ (trailing slash)
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def origin(self) -> str:
        return self.url.rstrip("/")

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def run_server(tmp: Path, detector_weights: Path, *, log_level: str = "warning",
               **env_overrides: str) -> Iterator[Server]:
    """The real service (``python -m service.cli``, what ``fer-serve`` runs) on a loopback port.

    It serves the shipped checkpoints on the CPU with PyTorch, one thread, the converted detector
    weights and a temporary cache; ``env_overrides`` adds ``FER_*`` settings. Its log (at
    ``log_level``) is :meth:`Server.tail`.
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FER_")}
    env.update(FER_DEVICE="cpu", FER_BACKEND="torch", FER_TORCH_THREADS="1",
               FER_DETECTOR_WEIGHTS=str(detector_weights), FER_CACHE_DIR=str(tmp / "cache"),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env_overrides)
    log = tmp / f"server-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", log_level], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(url=f"http://127.0.0.1:{port}/", process=proc, log=log)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the service exited with {proc.returncode} before it was ready:\n"
                            f"{server.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.origin}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"the service was not ready within {SERVER_START_S:.0f} s:\n{server.tail()}")
            time.sleep(0.25)
        yield server
    finally:
        _stop(proc)


def write_y4m(path: Path, rgb: np.ndarray, *, width: int = 640, height: int = 480, frames: int = 8,
              fps: int = 15) -> Path:
    """A YUV4MPEG2 video for Chromium's fake camera: ``rgb`` centred on grey, drifting a little."""
    scale = min(width / rgb.shape[1], height / rgb.shape[0])
    face = cv2.resize(rgb, (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)),
                      interpolation=cv2.INTER_CUBIC)
    fh, fw = face.shape[:2]
    with path.open("wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for i in range(frames):
            canvas = np.full((height, width, 3), 128, np.uint8)
            dx = (width - fw) // 2 + round(6 * np.sin(2 * np.pi * i / frames))
            dy = (height - fh) // 2
            canvas[dy:dy + fh, dx:dx + fw] = face
            out.write(b"FRAME\n")
            out.write(cv2.cvtColor(canvas, cv2.COLOR_RGB2YUV_I420).tobytes())  # Y, then U, then V
    return path


@dataclass
class PageProbe:
    """What a page did: its requests (network level), console errors and uncaught exceptions."""

    origin: str
    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    predict_events: list[tuple[str, float]] = field(default_factory=list)  # ("start"|"end", time)

    def attach(self, context, page) -> None:
        context.on("request", self._on_request)
        context.on("requestfinished", lambda r: self._on_end(r))
        context.on("requestfailed", lambda r: self._on_end(r))
        page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))

    @staticmethod
    def _is_predict(request) -> bool:
        return request.method == "POST" and urlsplit(request.url).path.endswith("/predict")

    def _on_request(self, request) -> None:
        self.requests.append(request.url)
        if self._is_predict(request):
            self.predict_events.append(("start", time.monotonic()))

    def _on_end(self, request) -> None:
        if self._is_predict(request):
            self.predict_events.append(("end", time.monotonic()))

    def max_predicts_in_flight(self) -> int:
        """Most /predict requests open at once, as the browser's network layer saw them."""
        open_now = peak = 0
        for kind, _ in self.predict_events:
            open_now += 1 if kind == "start" else -1
            peak = max(peak, open_now)
        return peak

    def foreign_requests(self) -> list[str]:
        """Requests to anywhere but the server (data: URLs are inline; blob: ones must be its own)."""
        server = urlsplit(self.origin)
        out = []
        for url in self.requests:
            parts = urlsplit(url)
            if parts.scheme == "data":
                continue
            if parts.scheme == "blob":
                parts = urlsplit(url[len("blob:"):])
            if (parts.scheme, parts.netloc) != (server.scheme, server.netloc):
                out.append(url)
        return out

    def check(self, *, expected_http_errors: tuple[int, ...] = ()) -> None:
        """Every request went to the server, and the console shows no error but the expected ones.

        A 4xx/5xx answer that the page handles is still logged by Chromium as "Failed to load
        resource: ... status of N"; those are allowed for the statuses a test provokes, once each
        at least, and nothing else is.
        """
        assert not self.foreign_requests(), f"requests left the server: {self.foreign_requests()}"
        assert not self.page_errors, f"uncaught exceptions in the page: {self.page_errors}"
        unexpected = [m for m in self.console_errors
                      if not any(f"status of {s} " in m for s in expected_http_errors)]
        assert not unexpected, f"console errors: {unexpected}"
        for status in expected_http_errors:
            assert any(f"status of {status} " in m for m in self.console_errors), (
                f"expected a logged {status} answer; console errors: {self.console_errors}")
