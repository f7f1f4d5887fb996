"""Load test: the real server under N concurrent clients, dynamic batching on against off.

Starts one ``fer-serve`` on loopback per configuration, all side by side, and runs every
``--clients`` count for T seconds against ``/predict`` with a set of photos, ``--rounds`` times,
alternating between the servers pass by pass. It prints one table with throughput, p50/p95/p99
latency and the mean batch size (from the server's own metrics).
A configuration is a backend (``--backends``, ``FER_BACKEND``), an intra-op thread count
(``--threads``, ``FER_TORCH_THREADS``), an HTTP stack (``--stacks LOOP/HTTP``, ``fer-serve
--loop/--http``), a variant (``--variants LABEL:NAME=VALUE,...``: more server environment, and
with ``--tree LABEL=DIR`` another source tree, e.g. the last commit's, to run before and after side
by side) and batching: ``FER_MAX_BATCH_SIZE`` = 32, then 1 unless ``--no-unbatched``.
The table ends with each configuration's throughput and p50 as a ratio to the first one's.
Compare configurations within one run. Not a test.

    python benchmarks/load.py --clients 16 --seconds 20
    python benchmarks/load.py --detect false --size 48x48 --stacks asyncio/h11 uvloop/httptools
    python benchmarks/load.py --backends onnx --threads 1 2 --clients 1 8 --size 640x480 --no-unbatched
    git archive HEAD | tar -x -C /tmp/before    # (an empty /tmp/before)
    python benchmarks/load.py --no-unbatched --variants before after --tree before=/tmp/before
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


def start_server(port: int, env: dict[str, str], stack: str = "auto/auto", tree: Path = ROOT
                 ) -> subprocess.Popen:
    """``fer-serve`` on loopback, run from the source tree ``tree`` (its ``service`` package)."""
    cmd = [sys.executable, "-m", "service.cli", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning"]
    if stack != "auto/auto":  # trees older than 2026-12-02 have no --loop/--http
        loop, http = stack.split("/")
        cmd += ["--loop", loop, "--http", http]
    proc = subprocess.Popen(cmd, cwd=tree, env={**os.environ, **env})
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


async def _raw_post(port: int, target: str, photos: list[bytes], stop_at: float,
                    latencies: list[float]) -> int:
    """One keep-alive HTTP/1.1 connection posting photos until ``stop_at``; returns its errors.

    Written on asyncio streams, so the client costs a fraction of what the server does per request
    (2-4 % of a core at 500 req/s; httpx took 52 % at 306 req/s, 1.7 ms a request against the
    server's 2.5, and on two shared cores that sets the ceiling).
    """
    heads = [f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
             f"Content-Length: {len(b)}\r\n\r\n".encode() + b for b in photos]
    errors, k = 0, 0
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            writer.write(heads[k % len(heads)])
            k += 1
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line[:15].lower() == b"content-length:")
                await reader.readexactly(length)
            except (asyncio.IncompleteReadError, ConnectionError):  # the server closed it
                errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            if head.startswith(b"HTTP/1.1 200"):
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1
    finally:
        writer.close()
    return errors


async def run_clients(url: str, photos: list[bytes], clients: int, seconds: float, *,
                      client: str = "raw") -> tuple[list[float], int]:
    """``clients`` concurrent connections posting photos for ``seconds``: (latencies, errors)."""
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds
    if client == "raw":
        parts = httpx.URL(url)
        target = parts.raw_path.decode()
        errors = await asyncio.gather(*(_raw_post(parts.port, target, photos[i:] + photos[:i], stop_at,
                                                  latencies) for i in range(clients)))
        return latencies, sum(errors)

    async def one(i: int, http: httpx.AsyncClient) -> int:
        errors, k = 0, i
        while time.monotonic() < stop_at:
            body = photos[k % len(photos)]
            k += clients
            t0 = time.perf_counter()
            r = await http.post(url, content=body, headers={"content-type": "image/jpeg"})
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1
        return errors

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        errors = await asyncio.gather(*(one(i, http) for i in range(clients)))
    return latencies, sum(errors)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_totals(port: int) -> tuple[float, float]:
    """(sum, count) of the default classifier's batch-size histogram."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    vals = {}
    for line in text.splitlines():
        for key in ("fer_batch_size_sum", "fer_batch_size_count"):
            if line.startswith(key + '{model="default"}'):
                vals[key] = float(line.rsplit(" ", 1)[1])
    return vals.get("fer_batch_size_sum", 0.0), vals.get("fer_batch_size_count", 0.0)


Config = tuple[str, dict[str, str], str, Path]
"""(label, server environment, loop/http, source tree)."""


def measure(configs: list[Config], args: argparse.Namespace, photos: list[bytes]) -> list[dict]:
    """Every configuration's server runs side by side; passes alternate between them.

    Each round runs every client count against every server for ``--seconds``, so all the
    servers see the same background load. A row's req/s is the median over the rounds, its
    latencies are pooled, and its mean batch comes from the server's own metrics.
    """
    servers = []
    try:
        for label, env, stack, tree in configs:
            port = free_port()
            servers.append((label, port, start_server(port, env, stack, tree)))
        for _, port, _ in servers:  # warm-up
            asyncio.run(run_clients(f"http://127.0.0.1:{port}/predict?detect={args.detect}", photos,
                                    max(args.clients), min(3.0, args.seconds), client=args.client))
        acc = {(label, c): {"rps": [], "lat": [], "errors": 0, "batch": [0.0, 0.0], "cpu": [],
                            "server_cpu": 0.0}
               for label, _, _ in servers for c in args.clients}
        for _ in range(args.rounds):
            for clients in args.clients:
                for label, port, proc in servers:
                    a = acc[(label, clients)]
                    sum0, count0 = batch_totals(port)
                    cpu0, server0 = time.process_time(), cpu_seconds(proc.pid)
                    lat, errors = asyncio.run(run_clients(
                        f"http://127.0.0.1:{port}/predict?detect={args.detect}", photos, clients,
                        args.seconds, client=args.client))
                    a["cpu"].append((time.process_time() - cpu0) / args.seconds * 100)
                    a["server_cpu"] += cpu_seconds(proc.pid) - server0
                    sum1, count1 = batch_totals(port)
                    a["rps"].append(len(lat) / args.seconds)
                    a["lat"] += lat
                    a["errors"] += errors
                    a["batch"][0] += sum1 - sum0
                    a["batch"][1] += count1 - count0
    finally:
        for _, _, proc in servers:
            proc.terminate()
        for _, _, proc in servers:
            proc.wait(timeout=30)
    rows = []
    for (label, clients), a in acc.items():
        lat = a["lat"]
        q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
        rows.append({"label": label, "clients": clients, "requests": len(lat), "errors": a["errors"],
                     "rps": statistics.median(a["rps"]), "p50": q[49] * 1000, "p95": q[94] * 1000,
                     "p99": q[98] * 1000, "client_cpu": statistics.median(a["cpu"]),
                     "server_ms": a["server_cpu"] * 1000 / max(len(lat) + a["errors"], 1),
                     "batch": a["batch"][0] / max(a["batch"][1], 1)})
    return rows


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """``LABEL`` or ``LABEL:NAME=VALUE[,NAME=VALUE...]`` -> (label, extra server environment)."""
    label, _, assignments = spec.partition(":")
    env = {}
    for item in filter(None, assignments.split(",")):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"--variants: {item!r} in {spec!r} is not NAME=VALUE")
        env[name] = value
    if not label:
        raise argparse.ArgumentTypeError(f"--variants: {spec!r} has no label")
    return label, env


def parse_tree(spec: str) -> tuple[str, Path]:
    """``LABEL=DIR`` -> (variant label, source tree)."""
    label, sep, folder = spec.partition("=")
    tree = Path(folder).resolve()
    if not sep or not (tree / "service" / "cli.py").is_file():
        raise argparse.ArgumentTypeError(f"--tree: {spec!r} is not LABEL=DIR with DIR/service/cli.py")
    return label, tree


def configurations(args: argparse.Namespace) -> list[Config]:
    """(label, server environment, loop/http, source tree) for every combination asked for."""
    trees = dict(args.tree)
    unknown = set(trees) - {label for label, _ in args.variants}
    if unknown:
        raise SystemExit(f"--tree names no --variants label: {', '.join(sorted(unknown))}")
    out = []
    for variant, extra in args.variants:
        tree = trees.get(variant, ROOT)
        for backend in args.backends:
            for threads in args.threads:
                for stack in args.stacks:
                    env = {**({"FER_BACKEND": backend} if backend else {}),
                           **({"FER_TORCH_THREADS": str(threads)} if threads is not None else {}),
                           **extra}
                    tag = " ".join(t for t in (variant or None, backend,
                                               None if threads is None else f"{threads}t",
                                               None if stack == "auto/auto" else stack) if t)
                    tag = f"{tag} " if tag else ""
                    out.append((f"{tag}batched", {**env, "FER_MAX_BATCH_SIZE": str(args.max_batch)},
                                stack, tree))
                    if not args.no_unbatched:
                        out.append((f"{tag}unbatched", {**env, "FER_MAX_BATCH_SIZE": "1",
                                                        "FER_DETECTOR_BATCH_SIZE": "1"}, stack, tree))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[16], help="concurrent clients, each count "
                   "against every server")
    p.add_argument("--seconds", type=float, default=20, help="length of one pass")
    p.add_argument("--rounds", type=int, default=1, help="passes per row, alternating between servers")
    p.add_argument("--photos", type=int, default=50)
    p.add_argument("--detect", choices=("true", "false"), default="true")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--backends", nargs="+", default=[None], choices=("auto", "torch", "onnx"),
                   help="FER_BACKEND per server (default: the server's own default)")
    p.add_argument("--threads", type=int, nargs="+", default=[None],
                   help="FER_TORCH_THREADS per server (default: unset, the server's own default)")
    p.add_argument("--stacks", nargs="+", default=["auto/auto"],
                   help="fer-serve --loop/--http per server, e.g. asyncio/h11 uvloop/httptools")
    p.add_argument("--size", default=None, help="letterbox the photos to WxH, e.g. 640x480 or 48x48")
    p.add_argument("--no-unbatched", action="store_true", help="skip the max_batch_size=1 servers")
    p.add_argument("--variants", nargs="+", type=parse_variant, default=[("", {})],
                   metavar="LABEL[:NAME=VALUE,...]",
                   help="servers that differ by environment, e.g. wait5:FER_MAX_WAIT_MS=5 "
                        "wait0:FER_MAX_WAIT_MS=0 (each with every other option)")
    p.add_argument("--tree", nargs="+", type=parse_tree, default=[], metavar="LABEL=DIR",
                   help="run a variant's servers from another source tree, e.g. a `git archive HEAD` "
                        "unpacked in /tmp/before, to measure before and after side by side")
    p.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="raw: keep-alive HTTP/1.1 on asyncio streams (cheap); httpx: httpx.AsyncClient, "
                        "as before 2026-12-02 (1.7 ms of CPU a request, two thirds of the server's)")
    args = p.parse_args()
    photos = photo_set(args.photos, args.size)
    started = time.monotonic()
    rows = measure(configurations(args), args, photos)
    print(f"\n/predict?detect={args.detect}: {args.rounds} x {args.seconds:g} s per row (req/s: median of "
          f"the rounds), {len(photos)} photos"
          f"{f' ({args.size})' if args.size else ''}, {os.cpu_count()} CPUs, "
          f"{len(os.sched_getaffinity(0))} usable; max_batch_size={args.max_batch} when batched; "
          f"{args.client} client (its CPU: % of one core); server CPU: ms of CPU time (all threads) per "
          f"request")
    print(f"| {'config':34} | clients | req | err | req/s | p50 ms | p95 ms | p99 ms | batch | server CPU ms "
          f"| client CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']:34} | {r['clients']} | {r['requests']} | {r['errors']} | {r['rps']:.1f} | "
              f"{r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | {r['batch']:.2f} | {r['server_ms']:.2f} | "
              f"{r['client_cpu']:.0f} % |")
    first = rows[:len(args.clients)]
    for r in rows[len(args.clients):]:
        base = first[args.clients.index(r["clients"])]
        print(f"ratio {r['label']} / {base['label']}, {r['clients']} clients: "
              f"{r['rps'] / max(base['rps'], 1e-9):.2f}x req/s, {r['p50'] / max(base['p50'], 1e-9):.2f}x p50")
    print(f"(run took {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
