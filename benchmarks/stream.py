"""Live-camera benchmark: one WebSocket stream of 640x480 JPEG frames at a fixed rate.

Plays a camera against ``WS /stream``: a frame every 1/``--fps`` seconds, sent whatever the
server is doing (a camera does not wait), while answers are read as they come. Frames the server
had no time for are dropped by it (each answer names them), so the answered rate and the latency
show what a live view gets. It prints one table: frames sent, answered frames/s, dropped, and the
p50/p99 latency from a frame's sending to its answer (client side) and as the server measured it.

Starts ``fer-serve`` (``python -m service.cli``) on loopback with the shipped checkpoints, unless
``--url`` names a running server. The frames are the test face photo moving across a grey
640x480 canvas (or ``--size``). Not a test; the issue's target on a 2-core machine is at least
10 answered frames/s with p99 <= 200 ms.

    python benchmarks/stream.py --fps 15 --seconds 30
    python benchmarks/stream.py --url ws://127.0.0.1:8000/stream --key "$FER_API_KEY"
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FACE = ROOT / "tests" / "fixtures" / "astronaut.jpg"
START_S = 180.0
DRAIN_S = 5.0  # after the last frame, how long to wait for its answer

log = logging.getLogger("stream-benchmark")


def camera_frames(size: str, count: int = 30, quality: int = 85) -> list[bytes]:
    """``count`` JPEG frames of the face photo sliding left and right on grey (a looped clip)."""
    width, height = (int(v) for v in size.lower().split("x"))
    face = cv2.imread(str(FACE))
    side = min(width, height) // 2
    face = cv2.resize(face, (side, side), interpolation=cv2.INTER_CUBIC)
    frames = []
    for i in range(count):
        canvas = np.full((height, width, 3), 128, np.uint8)
        x = (width - side) // 2 + round(0.15 * width * np.sin(2 * np.pi * i / count))
        y = (height - side) // 2
        canvas[y:y + side, x:x + side] = face
        frames.append(cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes())
    return frames


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(env: dict[str, str]) -> Iterator[str]:
    """``fer-serve`` on a loopback port until the block ends; yields its ``ws://`` stream URL."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warning"], cwd=ROOT, env={**os.environ, **env})
    try:
        deadline = time.monotonic() + START_S
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"the server was not ready within {START_S:.0f} s")
            time.sleep(0.5)
        yield f"ws://127.0.0.1:{port}/stream"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass
class Run:
    sent: dict[int, float] = field(default_factory=dict)  # seq -> send time
    latencies_ms: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)
    answered: int = 0
    dropped: int = 0
    busy: int = 0  # answers with an error (queue_full)
    first_sent: float = 0.0
    last_answer: float = 0.0


async def play(url: str, frames: list[bytes], *, fps: float, seconds: float, key: str | None) -> Run:
    """Send ``frames`` in a loop at ``fps`` for ``seconds``, reading answers as they arrive."""
    from websockets.asyncio.client import connect

    protocols = ["fer.stream"]
    if key:
        protocols.append("fer.key." + base64.urlsafe_b64encode(key.encode()).decode().rstrip("="))
    run = Run()
    total = max(1, round(fps * seconds))
    async with connect(url, subprotocols=protocols, max_size=2**22) as ws:
        async def send() -> None:
            start = time.perf_counter()
            run.first_sent = start
            for seq in range(total):
                await asyncio.sleep(max(0.0, start + seq / fps - time.perf_counter()))
                run.sent[seq] = time.perf_counter()
                await ws.send(frames[seq % len(frames)])

        async def receive() -> None:
            async for message in ws:
                now = time.perf_counter()
                answer = json.loads(message)
                run.dropped += answer["dropped_count"]
                if answer.get("error"):
                    run.busy += 1
                else:
                    run.answered += 1
                    run.latencies_ms.append((now - run.sent[answer["seq"]]) * 1000)
                    run.server_ms.append(answer["server_ms"])
                    run.last_answer = now
                if answer["seq"] == total - 1:
                    return

        receiving = asyncio.create_task(receive())
        await send()
        try:
            await asyncio.wait_for(receiving, DRAIN_S)
        except TimeoutError:
            log.warning("the last frame was not answered within %.0f s", DRAIN_S)
    return run


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def report(run: Run, *, fps: float, size: str, url: str) -> None:
    sent = len(run.sent)
    span = max(run.last_answer - run.first_sent, 1e-9)
    load = os.getloadavg()
    print(f"\nWS /stream ({url}): one {size} JPEG camera at {fps:g} frames/s, {sent} frames; "
          f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end")
    print("| target fps | sent | answered | answered/s | dropped | busy | p50 ms | p99 ms "
          "| server p50 ms | server p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    client = f"{_pct(run.latencies_ms, 50):.1f} | {_pct(run.latencies_ms, 99):.1f}"
    server = f"{_pct(run.server_ms, 50):.1f} | {_pct(run.server_ms, 99):.1f}"
    print(f"| {fps:g} | {sent} | {run.answered} | {run.answered / span:.1f} | {run.dropped} "
          f"({100 * run.dropped / max(sent, 1):.0f} %) | {run.busy} | {client} | {server} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server's ws://HOST:PORT/stream (default: start fer-serve)")
    p.add_argument("--key", default=None, help="the server's API key (sent as the fer.key subprotocol)")
    p.add_argument("--fps", type=float, default=15.0, help="frames sent per second")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--size", default="640x480", help="frame size WxH")
    p.add_argument("--backend", default=None, choices=("auto", "torch", "onnx"),
                   help="FER_BACKEND of the started server (default: its own default)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the readiness polls
    frames = camera_frames(args.size)
    if args.url:
        url = args.url
        run = asyncio.run(play(url, frames, fps=args.fps, seconds=args.seconds, key=args.key))
    else:
        env = {"FER_DEVICE": "cpu", **({"FER_BACKEND": args.backend} if args.backend else {})}
        if args.key:
            env["FER_API_KEY"] = args.key
        with running_server(env) as url:
            run = asyncio.run(play(url, frames, fps=args.fps, seconds=args.seconds, key=args.key))
    report(run, fps=args.fps, size=args.size, url=url)


if __name__ == "__main__":
    main()
