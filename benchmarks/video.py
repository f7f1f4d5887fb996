"""POST /predict/video on the real server: processing speed against real time, and memory.

Synthesises 640x480 MP4 videos (``mp4v``, 25 fps source) from real face photos: two CFP frontal
photos (subjects 001 and 002, from ``../shared/data/cfp``; the test fixture when that is absent)
moving independently on a lightly textured grey background, one ``--lengths`` video per length.
They are written once to ``--workdir`` (outside the checkout) and reused.

Starts one ``fer-serve`` (``python -m service.cli``) on loopback with the shipped checkpoints, as
``benchmarks/load.py`` does, and POSTs each video to ``/predict/video?fps=5``, one after the
other. For each request it records the wall time, the processing ratio (video seconds / wall
seconds: above 1 is faster than real time), and the server's memory from
``/proc/<pid>/status`` sampled every 0.5 s: VmRSS before, the peak (VmHWM, reset through
``/proc/<pid>/clear_refs`` before each request) and VmRSS after. It also sums the sizes of the
files the server holds open (``/proc/<pid>/fd``, deleted temporary files included) every 0.05 s,
which gives the peak disk the uploads take, and the bytes it wrote (``wchar`` of
``/proc/<pid>/io``: files and sockets).

Rows: each length as a raw ``video/mp4`` body; with ``--multipart`` the first length again as a
multipart ``file`` field; with ``--concurrent N`` the first length N times at once. A 2 s
warm-up request (not reported) runs first. ``--size`` makes larger frames (faces scaled alike),
to see what a request holds outside the decode pixel budget. Before the server starts, the first video
is decoded in process four ways (``read()`` every frame; ``grab()`` every frame; the service's
``grab()`` every frame with ``retrieve()`` for the sampled ones; seeking to each sampled frame),
to show what decoding costs when only 1 frame in 5 is wanted.

    python benchmarks/video.py                                  # 30 s and 5 min
    python benchmarks/video.py --lengths 300 --multipart --no-decode-check
    python benchmarks/video.py --lengths 30 --concurrent 3 --no-decode-check
    python benchmarks/video.py --lengths 4 --size 3840x2160 --concurrent 4

Prints one table (and the decoding check above it). Not a test.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from load import free_port, start_server  # noqa: E402

log = logging.getLogger("video-benchmark")
SIZE = (640, 480)
SRC_FPS = 25


# --- the videos -----------------------------------------------------------------------------

def face_photos() -> list[np.ndarray]:
    """Two real face photos (BGR): CFP frontal 001 and 002, else the test fixture twice."""
    cfp = ROOT.parent / "shared/data/cfp/Data/Images"
    files = [cfp / f"{s}/frontal/01.jpg" for s in ("001", "002")]
    if not all(f.is_file() for f in files):
        files = [ROOT / "tests/fixtures/astronaut.jpg"] * 2
    out = []
    for f in files:
        img = cv2.imread(str(f))
        scale = 200 / img.shape[0]  # faces about 200 px tall, as a webcam sees a person
        out.append(cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC))
    return out


def make_video(path: Path, seconds: float, size: tuple[int, int] = SIZE) -> Path:
    """A ``seconds``-long mp4v video at 25 fps (640x480 by default): two faces moving on a
    textured grey, each as large a share of the frame as at 640x480."""
    if path.is_file() and path.stat().st_size > 0:
        return path
    width, height = size
    zoom = height / SIZE[1]
    rng = np.random.default_rng(0)
    background = np.clip(110 + rng.normal(0, 6, (height, width, 1)), 0, 255).astype(np.uint8)
    background = cv2.GaussianBlur(np.repeat(background, 3, axis=2), (5, 5), 0)
    faces = [cv2.resize(f, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_CUBIC) if zoom != 1 else f
             for f in face_photos()]
    tmp = path.with_suffix(".part.mp4")
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), SRC_FPS, size)
    if not writer.isOpened():
        raise RuntimeError("OpenCV cannot write mp4v here")
    for i in range(round(seconds * SRC_FPS)):
        t = i / SRC_FPS
        canvas = background.copy()
        # Each face sways on its own period; they never overlap (left half, right half).
        for k, (face, period, x_lo, x_hi) in enumerate(((faces[0], 7.0, 10, 130),
                                                        (faces[1], 11.0, 330, 460))):
            h, w = face.shape[:2]
            x = int(zoom * (x_lo + (x_hi - x_lo) * (0.5 - 0.5 * np.cos(2 * np.pi * t / period))))
            y = int((height - h) / 2 + zoom * 40 * np.sin(2 * np.pi * t / (period * 0.7) + k))
            x = min(max(x, 0), width - w)
            y = min(max(y, 0), height - h)
            canvas[y:y + h, x:x + w] = face
        writer.write(canvas)
    writer.release()
    tmp.rename(path)
    return path


# --- decoding when sampling ------------------------------------------------------------------

def decode_check(path: Path, fps: float) -> list[tuple[str, int, int, float]]:
    """(mode, frames decoded or grabbed, frames returned, seconds) for four ways to sample."""
    step = SRC_FPS / fps

    def run(mode: str) -> tuple[str, int, int, float]:
        cap = cv2.VideoCapture(str(path))
        t0 = time.perf_counter()
        seen = returned = 0
        if mode == "seek to each sampled frame (CAP_PROP_POS_FRAMES)":
            total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            k = 0
            while round(k * step) < total:
                cap.set(cv2.CAP_PROP_POS_FRAMES, round(k * step))
                if not cap.read()[0]:
                    break
                returned += 1
                k += 1
            seen = returned
        else:
            while cap.grab():
                wanted = seen >= returned * step - 1e-6
                seen += 1
                if mode == "read() every frame" or (
                        wanted and mode == "grab() + retrieve() sampled (the service)"):
                    cap.retrieve()
                    returned += 1
                elif wanted and mode == "grab() every frame":
                    returned += 1
        cap.release()
        return mode, seen, returned, time.perf_counter() - t0

    return [run(m) for m in ("read() every frame", "grab() every frame",
                             "grab() + retrieve() sampled (the service)",
                             "seek to each sampled frame (CAP_PROP_POS_FRAMES)")]


# --- the server's memory and open files ------------------------------------------------------

def status_kib(pid: int, key: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def written_bytes(pid: int) -> int:
    """Bytes ``pid`` has passed to write() so far (``wchar`` of ``/proc/<pid>/io``)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise KeyError("wchar")


def open_file_bytes(pid: int) -> int:
    """Bytes in the regular files ``pid`` holds open (deleted ones included), excluding the
    read-only model files and libraries it opened at start."""
    total = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return 0
    for fd in fds:
        try:
            target = os.readlink(fd)
            if not target.startswith("/tmp") and "fer-video" not in target:
                continue
            total += os.stat(fd).st_size
        except OSError:
            continue
    return total


@dataclass
class Sampler:
    """Samples the server's VmRSS every ``rss_s`` and its open temporary files every ``fd_s``."""

    pid: int
    rss_s: float = 0.5
    fd_s: float = 0.05
    rss_peak_kib: int = 0
    disk_peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        next_rss = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_rss:
                self.rss_peak_kib = max(self.rss_peak_kib, status_kib(self.pid, "VmRSS"))
                next_rss = now + self.rss_s
            self.disk_peak = max(self.disk_peak, open_file_bytes(self.pid))
            self._stop.wait(self.fd_s)


# --- requests --------------------------------------------------------------------------------

def post_video(url: str, data: bytes, *, multipart: bool) -> dict:
    """POST one video; returns the response's JSON (raises on a non-200)."""
    with httpx.Client(timeout=900) as http:
        if multipart:
            r = http.post(url, files={"file": ("video.mp4", data, "video/mp4")})
        else:
            r = http.post(url, content=data, headers={"content-type": "video/mp4"})
    if r.status_code != 200:
        raise RuntimeError(f"{r.status_code}: {r.text[:300]}")
    body = r.json()
    body["_bytes"] = len(r.content)
    return body


def measure(pid: int, label: str, seconds: float, run: Callable[[], list[dict]]) -> dict:
    """One row: reset the peak, sample memory and files while ``run`` posts, read what is left."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = status_kib(pid, "VmRSS")
    written = written_bytes(pid)
    t0 = time.perf_counter()
    with Sampler(pid) as sampler:
        bodies = run()
    wall = time.perf_counter() - t0
    written = written_bytes(pid) - written
    time.sleep(1.0)
    after = status_kib(pid, "VmRSS")
    hwm = status_kib(pid, "VmHWM")
    body = bodies[0]
    return {"label": label, "video_s": seconds, "n": len(bodies), "wall": wall,
            "ratio": seconds * len(bodies) / wall, "frames": body["video"]["frames"],
            "decoded": body["video"]["source_frames"], "tracks": len(body["tracks"]),
            "server_s": max(b["video"]["processing_s"] for b in bodies),
            "resp_kib": body["_bytes"] / 1024, "before": before / 1024,
            "peak": max(hwm, sampler.rss_peak_kib) / 1024, "after": after / 1024,
            "disk": sampler.disk_peak / 2**20, "written": written / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=float, nargs="+", default=[30.0, 300.0], help="video seconds")
    p.add_argument("--fps", type=float, default=5.0, help="the fps= of the request")
    p.add_argument("--multipart", action="store_true", help="also send the first length as multipart")
    p.add_argument("--concurrent", type=int, default=0, help="also send the first length N at once")
    p.add_argument("--size", default="640x480", help="WxH of the videos (the target is 640x480)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/fer-video-bench"))
    p.add_argument("--no-decode-check", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.monotonic()
    args.workdir.mkdir(parents=True, exist_ok=True)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    videos = {}
    warm = make_video(args.workdir / f"two_faces_2s_{args.size}_25fps.mp4", 2.0, size)
    for seconds in args.lengths:
        t0 = time.perf_counter()
        videos[seconds] = make_video(args.workdir / f"two_faces_{seconds:g}s_{args.size}_25fps.mp4",
                                     seconds, size)
        log.info("video %s: %.1f MB (%.1f s to make or find)", videos[seconds].name,
                 videos[seconds].stat().st_size / 2**20, time.perf_counter() - t0)
    first = args.lengths[0]
    if not args.no_decode_check:
        rows = decode_check(videos[first], args.fps)
        print(f"\nDecoding the {first:g} s video ({SRC_FPS} fps source, {args.fps:g} fps sampled) in "
              f"process, OpenCV {cv2.__version__} FFmpeg backend:")
        print("| mode | frames grabbed/decoded | frames returned | s | ms per source frame | x real time |")
        print("|---|---|---|---|---|---|")
        for mode, seen, returned, secs in rows:
            print(f"| {mode} | {seen} | {returned} | {secs:.2f} | {secs / max(seen, 1) * 1000:.2f} | "
                  f"{first / secs:.0f} |")

    port = free_port()
    proc = start_server(port, {})
    url = f"http://127.0.0.1:{port}/predict/video?fps={args.fps:g}"
    data = {s: v.read_bytes() for s, v in videos.items()}
    results = []
    try:
        post_video(url, warm.read_bytes(), multipart=False)  # warm-up
        for seconds in args.lengths:
            results.append(measure(proc.pid, f"{seconds:g} s, raw body", seconds,
                                   lambda s=seconds: [post_video(url, data[s], multipart=False)]))
        if args.multipart:
            results.append(measure(proc.pid, f"{first:g} s, multipart", first,
                                   lambda: [post_video(url, data[first], multipart=True)]))
        if args.concurrent > 1:
            n = args.concurrent

            def together() -> list[dict]:
                with ThreadPoolExecutor(n) as pool:
                    return list(pool.map(lambda _: post_video(url, data[first], multipart=False), range(n)))

            results.append(measure(proc.pid, f"{first:g} s, raw body, {n} at once", first, together))
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    print(f"\nPOST /predict/video?fps={args.fps:g}, {args.size} mp4v at {SRC_FPS} fps, two faces, the "
          f"shipped default model, server defaults, one request at a time unless stated; "
          f"{os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable; ratio = video seconds (all "
          f"requests) / wall seconds; RSS from /proc/<pid>/status of the server; disk = open "
          f"temporary files, peak; written = bytes the server wrote (wchar, sockets included)")
    print("| video | upload MB | sampled frames | source frames | tracks | wall s | server s | ratio "
          "| RSS before MiB | RSS peak MiB | RSS after MiB | response KiB | disk peak MiB "
          "| written MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        size = len(data[r["video_s"]]) / 2**20
        print(f"| {r['label']} | {size:.1f} | {r['frames']} | {r['decoded']} | {r['tracks']} | "
              f"{r['wall']:.1f} | {r['server_s']:.1f} | {r['ratio']:.2f}x | {r['before']:.0f} | "
              f"{r['peak']:.0f} | {r['after']:.0f} | {r['resp_kib']:.0f} | {r['disk']:.1f} | "
              f"{r['written']:.1f} |")
    if len(args.lengths) > 1:
        a, b = results[0], results[1]
        print(f"{b['label']} / {a['label']}: {b['video_s'] / a['video_s']:.0f}x the video, peak RSS "
              f"{b['peak'] - a['peak']:+.0f} MiB ({b['peak'] / a['peak']:.2f}x), RSS after "
              f"{b['after'] - a['after']:+.0f} MiB, ratio {b['ratio'] / a['ratio']:.2f}x")
    print(f"(run took {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
