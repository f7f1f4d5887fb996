"""Soak and fault run: the real server through steady traffic and the faults of issue #17.

Starts ``fer-serve`` (``python -m service.cli``) on loopback from a source tree (``--repo``,
default this checkout; an older commit can be exported with ``git archive <commit> | tar -x -C
DIR``) with the shipped checkpoints, a small batch queue (``FER_MAX_QUEUE=8``,
``FER_MAX_FACES=8``) and short slow-client limits (``FER_TIMEOUT_HEADERS_S``, ``_BODY_S``,
``_GRACEFUL_SHUTDOWN_S``), then runs, in order:

1. steady: mixed traffic from the test face photo (``/predict`` at two sizes, a 48x48 crop with
   ``detect=false``, ``/detect``, a two-image ``/predict/batch``, an undecodable body, ``/healthz``);
2. abandoned: clients that send half an upload (raw and multipart) and hang up (item 2: each
   must be a 499, logged at INFO, not a 500);
3. bombs: 8 black 6000x6000 8-bit PNGs (35 KB each) at once (item 6: peak RSS <= 2 GB), then
   ``--settle`` seconds idle (RSS back to at most 10 % above the RSS before the bombs);
4. slow: clients that stall in their headers or half-way through their body while a probe
   keeps posting photos (item 7: both are cut off by the timeouts);
5. overload: photos from ``--within-clients`` clients (no queue is full), then from
   ``--overload-clients`` that wait what a 503's Retry-After asks, then from as many that send
   again at once (item 8: early 503s; successful req/s not below the first level);
6. SIGTERM while a client stalls mid-upload and another in its headers (item 7: exit 0 within
   the graceful timeout).

The server's RSS (``VmRSS``) is read from ``/proc/<pid>/status`` every 0.5 s, and the bombs' peak
from ``VmHWM`` (reset through ``/proc/<pid>/clear_refs`` before them, where the kernel allows);
status counts come from the server's own ``/metrics`` (``fer_requests_total``, what it recorded)
and from what the clients saw. It prints one table, one row per phase, then one line per target.
Not a test; numbers from a busy machine are noisy.

    python benchmarks/soak.py                                  # this checkout, 60 s settle
    git archive 07504db | tar -x -C /tmp/before && python benchmarks/soak.py --repo /tmp/before
    python benchmarks/soak.py --settle 10 --steady-s 10        # quicker look
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MB = 1024  # /proc reports kB


# -- inputs -----------------------------------------------------------------------------------

def black_png(side: int, mode: str = "grey") -> bytes:
    """A black ``side`` x ``side`` PNG, 8 bits a pixel, zlib level 9: 6000 px is 35 KB (every byte
    of the filtered rows is 0, zlib's best case, about 1030:1). ``mode``: ``grey`` (Pillow mode
    L) or ``palette`` (mode P, one black palette entry)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    colour_type, plte = (3, chunk(b"PLTE", b"\x00\x00\x00")) if mode == "palette" else (0, b"")
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, colour_type, 0, 0, 0))
    rows = bytes((side + 1) * side)
    return b"\x89PNG\r\n\x1a\n" + ihdr + plte + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def photos() -> dict[str, bytes]:
    """The test face photo as it is, letterboxed into 1280x960, and as a 48x48 crop."""
    from PIL import Image

    raw = (ROOT / "tests/fixtures/astronaut.jpg").read_bytes()
    img = Image.open(io.BytesIO(raw)).convert("RGB")

    def jpeg(im: Image.Image) -> bytes:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        return buf.getvalue()

    canvas = Image.new("RGB", (1280, 960), (0, 0, 0))
    canvas.paste(img.resize((720, 720)), (280, 120))
    w, h = img.size
    crop = img.crop((w // 4, h // 8, 3 * w // 4, 5 * h // 8)).resize((48, 48))
    return {"photo": raw, "photo_1280": jpeg(canvas), "crop_48": jpeg(crop)}


def post(target: str, body: bytes, content_type: str = "image/jpeg", *, length: int | None = None) -> bytes:
    return (f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n").encode() + body


def multipart(files: list[bytes]) -> tuple[bytes, str]:
    boundary = "soakboundary7MA4YWxkTrZu0gW"
    parts = b"".join(
        (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{i}.jpg\"\r\n"
         "Content-Type: image/jpeg\r\n\r\n").encode() + f + b"\r\n" for i, f in enumerate(files))
    return parts + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


# -- the server -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_status(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in kB; (0, 0) once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    vals = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M))
    return int(vals.get("VmRSS", 0)), int(vals.get("VmHWM", 0))


class RssSampler(threading.Thread):
    """VmRSS every ``interval`` seconds; phases read their start, peak and end from it."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            rss, _ = read_status(self.pid)
            if rss:
                self.samples.append((time.monotonic(), rss))
            self.stopped.wait(self.interval)

    def peak(self, t0: float, t1: float) -> int:
        return max((r for t, r in self.samples if t0 <= t <= t1), default=0)


def reset_hwm(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux >= 4.0); False when not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def status_counts(port: int) -> Counter:
    """fer_requests_total summed over routes and methods, by status."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    out: Counter = Counter()
    for line in text.splitlines():
        if line.startswith("fer_requests_total{"):
            status = re.search(r'status="([^"]*)"', line)
            if status:
                out[status.group(1)] += int(float(line.rsplit(" ", 1)[1]))
    return out


# -- clients ----------------------------------------------------------------------------------

async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool, float]:
    """Read one response: (status, whether the server closes the connection after it, its
    Retry-After in seconds or 0)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status, length, close, retry_after = int(lines[0].split()[1]), None, False, 0.0
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        key = key.strip().lower()
        if key == b"content-length":
            length = int(value)
        elif key == b"connection" and value.strip().lower() == b"close":
            close = True
        elif key == b"retry-after":
            with contextlib.suppress(ValueError):
                retry_after = float(value)
    if length is None:
        await reader.read()
        close = True
    else:
        await reader.readexactly(length)
    return status, close, retry_after


@dataclass
class Seen:
    """What the clients saw: latencies (s) by status; 'closed' when the server closed first."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def add(self, status: int | str, seconds: float) -> None:
        self.latencies[str(status)].append(seconds)

    def count(self) -> int:
        return sum(len(v) for v in self.latencies.values())

    def all(self, statuses: tuple[str, ...] | None = None) -> list[float]:
        return [x for s, v in self.latencies.items() if statuses is None or s in statuses for x in v]

    def summary(self) -> str:
        return " ".join(f"{s}:{len(v)}" for s, v in sorted(self.latencies.items())) or "-"


async def client(port: int, requests: list[bytes], stop_at: float, seen: Seen, offset: int = 0,
                 retry_after: bool = False) -> None:
    """One keep-alive connection sending ``requests`` in turn until ``stop_at``; with
    ``retry_after``, a 503 is followed by the wait its Retry-After asks for (cut at ``stop_at``)."""
    conn = None
    k = offset
    while time.monotonic() < stop_at:
        if conn is None:
            conn = await asyncio.open_connection("127.0.0.1", port)
        reader, writer = conn
        raw = requests[k % len(requests)]
        k += 1
        t0 = time.perf_counter()
        try:
            writer.write(raw)
            status, close, wait = await asyncio.wait_for(read_response(reader), 120)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            seen.add("closed", time.perf_counter() - t0)
            writer.close()
            conn = None
            continue
        seen.add(status, time.perf_counter() - t0)
        if close:
            writer.close()
            conn = None
        if status == 503 and retry_after and wait:
            await asyncio.sleep(max(0.0, min(wait, stop_at - time.monotonic())))
    if conn is not None:
        conn[1].close()


async def run_clients(port: int, requests: list[bytes], clients: int, seconds: float,
                      retry_after: bool = False) -> Seen:
    seen = Seen()
    stop_at = time.monotonic() + seconds
    await asyncio.gather(*(client(port, requests, stop_at, seen, i, retry_after)
                           for i in range(clients)))
    return seen


async def abandon(port: int, raw: bytes, keep: int) -> None:
    """Send the first ``keep`` bytes of ``raw``, wait a moment, hang up."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw[:keep])
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.close()


async def stall(port: int, raw: bytes, bound: float) -> tuple[str, float]:
    """Send ``raw`` and stall: (what came back, seconds until the server closed) within ``bound``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    t0 = time.monotonic()
    got = b""
    try:
        async with asyncio.timeout(bound):
            while chunk := await reader.read(65536):
                got += chunk
    except TimeoutError:
        writer.close()
        return "open", float("nan")
    except ConnectionError:
        pass
    writer.close()
    status = got.split(b" ", 2)[1].decode() if got.startswith(b"HTTP/1.1 ") else "none"
    return status, time.monotonic() - t0


# -- the run ----------------------------------------------------------------------------------

def pct(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@dataclass
class Row:
    phase: str
    seconds: float
    requests: int
    server: str
    client: str
    ok_rps: float | None
    p50: float
    p99: float
    rss: tuple[int, int, int]
    log: str


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.port = free_port()
        self.log_path = Path(args.log)
        self.env = {**os.environ, "FER_MAX_QUEUE": "8", "FER_MAX_FACES": "8",
                    "FER_TIMEOUT_HEADERS_S": str(args.timeout_headers),
                    "FER_TIMEOUT_BODY_S": str(args.timeout_body),
                    "FER_TIMEOUT_GRACEFUL_SHUTDOWN_S": str(args.graceful)}
        for item in args.env:
            key, _, value = item.partition("=")
            self.env[key] = value
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.hwm_resettable = False

    # server ---------------------------------------------------------------------------------
    def start(self) -> float:
        t0 = time.monotonic()
        self.log_file = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "info"], cwd=self.args.repo, env=self.env, stdout=self.log_file,
            stderr=subprocess.STDOUT)
        while time.monotonic() - t0 < 240:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200:
                    self.sampler = RssSampler(self.proc.pid)
                    self.sampler.start()
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.proc.kill()
        raise RuntimeError("server not ready within 240 s")

    def log_counts(self, start: int) -> str:
        time.sleep(0.3)  # let the server's last lines of the phase reach the file
        self.log_file.flush()
        with self.log_path.open("rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        disconnect = len(re.findall(r" INFO .*disconnect", text))
        errors = len(re.findall(r"\bERROR\b", text))
        tracebacks = text.count("Traceback (most recent call last)")
        return f"INFO disconnect {disconnect}, ERROR {errors}, tracebacks {tracebacks}"

    # phases ---------------------------------------------------------------------------------
    def phase(self, name: str, body, *, statuses_ok: tuple[str, ...] = ("200",), hwm: bool = False):
        """Run ``body()`` (returns Seen, client note, latency override) and record a row."""
        before = status_counts(self.port)
        log_start = self.log_path.stat().st_size
        rss0, _ = read_status(self.proc.pid)
        if hwm:
            self.hwm_resettable = reset_hwm(self.proc.pid)
        t0 = time.monotonic()
        seen, note, latencies = body()
        t1 = time.monotonic()
        rss1, hwm1 = read_status(self.proc.pid)
        peak = max(self.sampler.peak(t0, t1), rss1, hwm1 if hwm and self.hwm_resettable else 0)
        counts = status_counts(self.port) - before
        server = " ".join(f"{s}:{n}" for s, n in sorted(counts.items())) or "-"
        ok = seen.all(statuses_ok) if seen else []
        lat = latencies if latencies is not None else (seen.all() if seen else [])
        row = Row(name, t1 - t0, seen.count() if seen else 0, server,
                  note or (seen.summary() if seen else "-"),
                  len(ok) / (t1 - t0) if seen else None, pct(lat, 50) * 1000, pct(lat, 99) * 1000,
                  (rss0 // MB, peak // MB, rss1 // MB), self.log_counts(log_start))
        self.rows.append(row)
        return row, seen

    def steady(self) -> None:
        p, a = photos(), self.args
        batch, batch_type = multipart([p["photo"], p["photo_1280"]])
        mix = [post("/predict", p["photo"]), post("/predict", p["photo_1280"]),
               post("/predict?detect=false", p["crop_48"]), post("/detect", p["photo"]),
               post("/predict/batch", batch, batch_type), post("/predict", b"not an image at all"),
               b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"]

        def run():
            return asyncio.run(run_clients(self.port, mix, a.steady_clients, a.steady_s)), None, None
        self.phase(f"steady mixed, {a.steady_clients} clients", run, statuses_ok=("200", "400"))

    def abandoned(self) -> None:
        p, n = photos(), self.args.abandoned
        raw = post("/predict", p["photo_1280"])
        body, ctype = multipart([p["photo"], p["photo_1280"]])
        parts = post("/predict/batch", body, ctype)

        def run():
            async def go():
                await asyncio.gather(*(abandon(self.port, raw, len(raw) // 2) for _ in range(n)),
                                     *(abandon(self.port, parts, len(parts) // 2) for _ in range(n)))
                await asyncio.sleep(1.5)  # the server notices and records
            asyncio.run(go())
            return None, f"{2 * n} hung up half-way ({n} raw, {n} multipart)", []
        row, _ = self.phase("abandoned uploads", run)
        row.requests = 2 * n

    def bombs(self) -> tuple[int, int]:
        a = self.args
        png = black_png(a.bomb_side, a.bomb_mode)
        self.notes.append(f"bomb: a black {a.bomb_side}x{a.bomb_side} 8-bit {a.bomb_mode} PNG of "
                          f"{len(png)} bytes")
        raw = post("/predict", png, "image/png")

        def run():
            async def one(seen: Seen):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                t0 = time.perf_counter()
                writer.write(raw)
                try:
                    status, _, _ = await asyncio.wait_for(read_response(reader), 180)
                except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                    status = "closed"
                seen.add(status, time.perf_counter() - t0)
                writer.close()

            async def go():
                seen = Seen()
                await asyncio.gather(*(one(seen) for _ in range(a.bombs)))
                return seen
            return asyncio.run(go()), None, None
        baseline, _ = read_status(self.proc.pid)
        row, _ = self.phase(f"bombs: {a.bombs} x {a.bomb_side}^2 {a.bomb_mode} PNG at once", run, hwm=True)
        peak = row.rss[1]

        def settle():
            time.sleep(a.settle)
            return None, "idle", []
        row, _ = self.phase(f"settle {a.settle:g} s idle", settle)
        row.ok_rps = None
        return baseline // MB, peak

    def slow(self) -> None:
        a, p = self.args, photos()
        bound = max(a.timeout_headers, a.timeout_body) + a.stall_extra
        head = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
        full = post("/predict", p["photo_1280"])
        half = full[:len(full) - len(p["photo_1280"]) // 2]
        results: dict[str, list[tuple[str, float]]] = {}
        probe = Seen()

        def run():
            async def go():
                stop = asyncio.Event()

                async def prober():
                    while not stop.is_set():
                        await run_clients_once(self.port, post("/predict", p["photo"]), probe)

                task = asyncio.create_task(prober())
                heads = [stall(self.port, head, bound) for _ in range(a.slow)]
                bodies = [stall(self.port, half, bound) for _ in range(a.slow)]
                out = await asyncio.gather(*heads, *bodies)
                stop.set()
                await task
                results["headers"], results["body"] = out[:a.slow], out[a.slow:]
            asyncio.run(go())
            return probe, None, None
        row, _ = self.phase(f"slow: {a.slow} partial heads, {a.slow} half bodies", run)
        row.requests = 2 * a.slow + probe.count()
        desc = []
        for kind, limit in (("headers", a.timeout_headers), ("body", a.timeout_body)):
            got = Counter(s for s, _ in results[kind])
            times = [t for _, t in results[kind] if t == t]
            desc.append(f"{kind} stalls: {' '.join(f'{s}:{n}' for s, n in sorted(got.items()))}, cut off "
                        + (f"after {min(times):.1f}-{max(times):.1f} s" if times else "never")
                        + f" (limit {limit:g} s, waited {bound:g} s)")
        row.client = f"probe {probe.summary()}; " + "; ".join(desc)
        self.slow_results = results

    def overload(self) -> tuple[float, float]:
        a, p = self.args, photos()
        reqs = [post("/predict", p["photo"])]
        within, _ = self.phase(f"within capacity, {a.within_clients} clients",
                               lambda: (asyncio.run(run_clients(self.port, reqs, a.within_clients,
                                                                a.overload_s)), None, None),
                               statuses_ok=("200",))
        rates = [within.ok_rps or 0.0]
        for honour, how in ((True, "wait Retry-After"), (False, "resend at once")):
            cpu0 = time.process_time()

            def run(honour=honour):
                seen = asyncio.run(run_clients(self.port, reqs, a.overload_clients, a.overload_s, honour))
                ok, busy = seen.all(("200",)), seen.all(("503",))
                note = (f"{seen.summary()}; 200 p50 {pct(ok, 50) * 1000:.1f} ms, 503 p50 "
                        f"{pct(busy, 50) * 1000:.1f} ms, p99 {pct(busy, 99) * 1000:.1f} ms")
                return seen, note, ok
            over, _ = self.phase(f"overload, {a.overload_clients} clients, {how} on 503", run)
            rates.append(over.ok_rps or 0.0)
            self.notes.append(f"overload ({how}): the load generator used "
                              f"{(time.process_time() - cpu0) / a.overload_s * 100:.0f} % of one core")
        return rates

    def shutdown(self) -> tuple[float, float, int | None, str]:
        """SIGTERM while one client is half-way through an upload and one is in its headers:
        (seconds until uvicorn logged 'Finished server process', until the process was gone,
        its exit code or None when it had to be killed, what the stalled clients got)."""
        a, p = self.args, photos()
        full = post("/predict", p["photo_1280"])
        half = full[:len(full) - len(p["photo_1280"]) // 2]
        bound = a.graceful + a.stall_extra
        out: dict[str, object] = {}

        async def go():
            task = asyncio.gather(stall(self.port, half, bound + 5),
                                  stall(self.port, b"POST /predict HTTP/1.1\r\nHost: x\r\n", bound + 5))
            await asyncio.sleep(0.5)
            log_start = out["log_start"] = self.log_path.stat().st_size
            t0 = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            while self.proc.poll() is None and time.monotonic() - t0 < bound:
                await asyncio.sleep(0.02)
                if "finished" not in out and self.finished_logged(log_start):
                    out["finished"] = time.monotonic() - t0
            out["seconds"] = time.monotonic() - t0
            if self.proc.poll() is None:
                self.proc.kill()
                out["killed"] = True
            out["clients"] = await task
        asyncio.run(go())
        self.sampler.stopped.set()
        code = self.proc.wait()
        log = self.log_counts(out["log_start"])
        self.log_file.close()
        if "finished" not in out and self.finished_logged(out["log_start"]):
            out["finished"] = out["seconds"]
        what = ", ".join(f"{kind} {status}" for kind, (status, _) in zip(("upload:", "headers:"),
                                                                          out["clients"], strict=True))
        if out.get("killed"):
            return (out.get("finished", float("nan")), out["seconds"], None,
                    f"still running {bound:g} s after SIGTERM, killed (exit {code}); "
                    f"stalled clients got {what}; log: {log}")
        return (out.get("finished", float("nan")), out["seconds"], code,
                f"stalled clients got {what}; log: {log}")

    def finished_logged(self, start: int) -> bool:
        with self.log_path.open("rb") as f:
            f.seek(start)
            return b"Finished server process" in f.read()


async def run_clients_once(port: int, raw: bytes, seen: Seen) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    writer.write(raw)
    try:
        status, _, _ = await asyncio.wait_for(read_response(reader), 60)
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
        status = "closed"
    seen.add(status, time.perf_counter() - t0)
    writer.close()


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or x != x else f"{x:.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=ROOT, help="source tree to serve from (default: this one)")
    p.add_argument("--label", default=None, help="name printed above the table (default: --repo)")
    p.add_argument("--log", default="/tmp/fer-soak-server.log", help="the server's log file")
    p.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="more server environment")
    p.add_argument("--steady-s", type=float, default=30)
    p.add_argument("--steady-clients", type=int, default=3)
    p.add_argument("--abandoned", type=int, default=8, help="hang-ups of each kind (raw, multipart)")
    p.add_argument("--bombs", type=int, default=8)
    p.add_argument("--bomb-side", type=int, default=6000)
    p.add_argument("--bomb-mode", choices=("grey", "palette"), default="grey",
                   help="the bombs' PNG colour type (both 8 bits a pixel, the same 35 KB at 6000 px)")
    p.add_argument("--settle", type=float, default=60, help="idle seconds after the bombs before "
                   "RSS is compared with the RSS before them")
    p.add_argument("--slow", type=int, default=4, help="stalled clients of each kind")
    p.add_argument("--timeout-headers", type=float, default=2.0, help="FER_TIMEOUT_HEADERS_S")
    p.add_argument("--timeout-body", type=float, default=6.0, help="FER_TIMEOUT_BODY_S")
    p.add_argument("--graceful", type=float, default=3.0, help="FER_TIMEOUT_GRACEFUL_SHUTDOWN_S")
    p.add_argument("--stall-extra", type=float, default=10.0, help="how much longer than its limit a "
                   "stalled client (or a shutdown) is waited for")
    p.add_argument("--within-clients", type=int, default=4)
    p.add_argument("--overload-clients", type=int, default=64)
    p.add_argument("--overload-s", type=float, default=12)
    args = p.parse_args()
    args.repo = args.repo.resolve()

    started = time.monotonic()
    soak = Soak(args)
    ready_s = soak.start()
    warm = Seen()
    for _ in range(5):
        asyncio.run(run_clients_once(soak.port, post("/predict", photos()["photo"]), warm))
    rss_ready, _ = read_status(soak.proc.pid)
    soak.steady()
    soak.abandoned()
    baseline, bomb_peak = soak.bombs()
    settled = soak.rows[-1].rss[2]
    soak.slow()
    within, over, hammer = soak.overload()
    finished_s, shutdown_s, code, shutdown_note = soak.shutdown()

    print(f"\nsoak of {args.label or args.repo} on loopback: FER_MAX_QUEUE=8 FER_MAX_FACES=8 "
          f"FER_TIMEOUT_HEADERS_S={args.timeout_headers:g} FER_TIMEOUT_BODY_S={args.timeout_body:g} "
          f"FER_TIMEOUT_GRACEFUL_SHUTDOWN_S={args.graceful:g}{' ' + ' '.join(args.env) if args.env else ''}; "
          f"ready after {ready_s:.0f} s, RSS {rss_ready // MB} MB after 5 warm-up requests; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("server: statuses in the server's fer_requests_total; client: what the clients saw "
          "(closed: the server closed the connection); ok req/s: 200s a second (steady: 200s and 400s); "
          "p50/p99: client latency (slow: the probe's; abandoned: none); "
          "log: lines in the server's log during the phase")
    print("| phase | s | requests | server | client | ok req/s | p50 ms | p99 ms | RSS start / peak / end MB "
          "| log |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in soak.rows:
        print(f"| {r.phase} | {r.seconds:.1f} | {r.requests} | {r.server} | {r.client} | {fmt(r.ok_rps)} | "
              f"{fmt(r.p50)} | {fmt(r.p99)} | {r.rss[0]} / {r.rss[1]} / {r.rss[2]} | {r.log} |")
    print(f"shutdown: SIGTERM with a stalled upload and a stalled head: uvicorn finished after "
          f"{finished_s:.2f} s, process gone after {shutdown_s:.2f} s, exit code {code} "
          f"(FER_TIMEOUT_GRACEFUL_SHUTDOWN_S={args.graceful:g}); {shutdown_note}")
    for note in soak.notes:
        print(note)

    ab = soak.rows[1]
    counts = Counter(dict(kv.split(":") for kv in ab.server.split() if ":" in kv))
    n499 = int(counts.get("499", 0))
    print("targets:")
    print(f"  item 2, hang-ups are 499 at INFO: {n499} of {2 * args.abandoned} recorded as 499 "
          f"(server: {ab.server}; log: {ab.log}) -> "
          f"{'met' if n499 == 2 * args.abandoned and ' ERROR 0,' in ab.log else 'missed'}")
    print(f"  item 6, peak RSS <= 2048 MB with {args.bombs} bombs at once: {bomb_peak} MB "
          f"({'VmHWM' if soak.hwm_resettable else 'sampled VmRSS'}) -> "
          f"{'met' if bomb_peak <= 2048 else 'missed'}")
    change = (settled - baseline) / baseline * 100
    print(f"  item 6, RSS {args.settle:g} s later back within 10 % of the {baseline} MB before the bombs "
          f"(at most +10 %; below it counts as returned): {settled} MB ({change:+.1f} %) -> "
          f"{'met' if change <= 10 else 'missed'}")
    res = soak.slow_results
    heads_ok = all(s != "open" and t <= args.timeout_headers + 1.5 for s, t in res["headers"])
    bodies_ok = all(s == "408" and t <= args.timeout_body + 1.5 for s, t in res["body"])
    print(f"  item 7, partial headers closed within FER_TIMEOUT_HEADERS_S + 1.5 s: "
          f"{'met' if heads_ok else 'missed'}; half bodies answered 408 within FER_TIMEOUT_BODY_S + 1.5 s: "
          f"{'met' if bodies_ok else 'missed'}")
    stopped = code == 0 and finished_s <= args.graceful + 0.5
    print(f"  item 7, SIGTERM with a stalled client: exit 0 and served no longer than "
          f"FER_TIMEOUT_GRACEFUL_SHUTDOWN_S + 0.5 s: {'met' if stopped else 'missed'}; the process was "
          f"gone {shutdown_s - args.graceful:+.2f} s after that limit (Python's own teardown after uvicorn "
          f"finished: {shutdown_s - finished_s:.2f} s)")
    for rate, row in ((over, soak.rows[-2]), (hammer, soak.rows[-1])):
        print(f"  item 8, {row.phase}: successful {rate:.1f} req/s against {within:.1f} req/s within "
              f"capacity ({rate / max(within, 1e-9):.2f}x; {row.client}) -> "
              f"{'met' if rate >= within else 'missed'}")
    print(f"(run took {time.monotonic() - started:.0f} s; server log: {args.log})")


if __name__ == "__main__":
    main()
