"""Load test: the real server under N concurrent clients, dynamic batching on against off.

Starts ``fer-serve`` twice on loopback (``FER_MAX_BATCH_SIZE`` = 32, then 1), runs N concurrent
clients for T seconds each time against ``/predict`` with a set of photos, and prints one table
with throughput, p50/p95/p99 latency and the mean batch size (from the server's own metrics),
plus the batched/unbatched ratio. With ``--backends torch onnx`` each backend (``FER_BACKEND``)
gets its own rows, and the table ends with the onnx/torch throughput ratio. Not a test.

    python benchmarks/load.py --clients 16 --seconds 20
    python benchmarks/load.py --detect false       # classifier only (images are face crops)
    python benchmarks/load.py --backends torch onnx --clients 8 --size 640x480 --no-unbatched
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def photo_set(limit: int, size: str | None = None) -> list[bytes]:
    """CFP frontal photos when ../shared is present (real photos), else the test fixture.

    ``size`` (``WxH``) letterboxes each photo onto a black canvas of that size (JPEG quality 90).
    """
    cfp = ROOT.parent / "shared/data/cfp/Data/Images"
    files = sorted(cfp.glob("0[0-4][0-9]/frontal/01.jpg"))[:limit] if cfp.is_dir() else []
    files = files or [ROOT / "tests/fixtures/astronaut.jpg"]
    if size is None:
        return [f.read_bytes() for f in files]
    import cv2
    import numpy as np

    width, height = (int(v) for v in size.lower().split("x"))
    out = []
    for f in files:
        img = cv2.imread(str(f))
        scale = min(width / img.shape[1], height / img.shape[0])
        w, h = round(img.shape[1] * scale), round(img.shape[0] * scale)
        canvas = np.zeros((height, width, 3), np.uint8)
        top, left = (height - h) // 2, (width - w) // 2
        canvas[top:top + h, left:left + w] = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
        out.append(cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "service.cli", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not become ready in 180 s")


async def run_clients(url: str, photos: list[bytes], clients: int, seconds: float,
                      ) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + seconds

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        k = i
        while time.monotonic() < stop_at:
            body = photos[k % len(photos)]
            k += clients
            t0 = time.perf_counter()
            r = await http.post(url, content=body, headers={"content-type": "image/jpeg"})
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    return latencies, errors


def batch_totals(port: int) -> tuple[float, float]:
    """(sum, count) of the default classifier's batch-size histogram."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    vals = {}
    for line in text.splitlines():
        for key in ("fer_batch_size_sum", "fer_batch_size_count"):
            if line.startswith(key + '{model="default"}'):
                vals[key] = float(line.rsplit(" ", 1)[1])
    return vals.get("fer_batch_size_sum", 0.0), vals.get("fer_batch_size_count", 0.0)


def measure(label: str, env: dict[str, str], args: argparse.Namespace, photos: list[bytes]) -> dict:
    port = free_port()
    proc = start_server(port, env)
    try:
        url = f"http://127.0.0.1:{port}/predict?detect={args.detect}"
        asyncio.run(run_clients(url, photos, args.clients, min(3.0, args.seconds)))  # warm-up
        sum0, count0 = batch_totals(port)
        lat, errors = asyncio.run(run_clients(url, photos, args.clients, args.seconds))
        sum1, count1 = batch_totals(port)
        mb = (sum1 - sum0) / max(count1 - count0, 1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    return {"label": label, "requests": len(lat), "errors": errors, "rps": len(lat) / args.seconds,
            "p50": q[49] * 1000, "p95": q[94] * 1000, "p99": q[98] * 1000, "batch": mb}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--photos", type=int, default=50)
    p.add_argument("--detect", choices=("true", "false"), default="true")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--backends", nargs="+", default=[None], choices=("auto", "torch", "onnx"),
                   help="FER_BACKEND per server (default: the server's own default)")
    p.add_argument("--threads", type=int, default=None, help="FER_TORCH_THREADS (default: unset)")
    p.add_argument("--size", default=None, help="letterbox the photos to WxH, e.g. 640x480")
    p.add_argument("--no-unbatched", action="store_true", help="skip the max_batch_size=1 server")
    args = p.parse_args()
    photos = photo_set(args.photos, args.size)
    base = {"FER_TORCH_THREADS": str(args.threads)} if args.threads is not None else {}
    rows = []
    for backend in args.backends:
        env = {**base, **({"FER_BACKEND": backend} if backend else {})}
        tag = f"{backend} " if backend else ""
        rows.append(measure(f"{tag}batched (max_batch_size={args.max_batch})",
                            {**env, "FER_MAX_BATCH_SIZE": str(args.max_batch)}, args, photos))
        if not args.no_unbatched:
            rows.append(measure(f"{tag}unbatched (max_batch_size=1)",
                                {**env, "FER_MAX_BATCH_SIZE": "1", "FER_DETECTOR_BATCH_SIZE": "1"},
                                args, photos))
    print(f"\n/predict?detect={args.detect}: {args.clients} clients x {args.seconds:.0f} s, "
          f"{len(photos)} photos{f' ({args.size})' if args.size else ''}, {os.cpu_count()} CPUs"
          f"{f', FER_TORCH_THREADS={args.threads}' if args.threads is not None else ''}")
    print(f"{'config':38}{'req':>7}{'err':>5}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
          f"{'batch':>8}")
    for r in rows:
        print(f"{r['label']:38}{r['requests']:>7}{r['errors']:>5}{r['rps']:>9.1f}{r['p50']:>9.1f}"
              f"{r['p95']:>9.1f}{r['p99']:>9.1f}{r['batch']:>8.2f}")
    if not args.no_unbatched:
        for i in range(0, len(rows), 2):
            print(f"{'ratio batched/unbatched':38}{'':>12}"
                  f"{rows[i]['rps'] / max(rows[i + 1]['rps'], 1e-9):>9.2f}x")
    if {"torch", "onnx"} <= set(args.backends):
        step = 1 if args.no_unbatched else 2
        by = {b: rows[i * step] for i, b in enumerate(args.backends)}
        print(f"{'ratio onnx/torch (batched)':38}{'':>12}"
              f"{by['onnx']['rps'] / max(by['torch']['rps'], 1e-9):>9.2f}x")


if __name__ == "__main__":
    main()
