"""Per-stage profile of /predict: ms per stage on the same photos, PyTorch and ONNX Runtime side by side.

Photos: ``--photos`` CFP frontal photos letterboxed to 640x480 (one face each) plus one 1280x720
frame with ``--group-faces`` CFP faces on it, all JPEG-encoded once (quality 90). For each backend
(``torch``, ``onnx``) and intra-op thread count (1, 2) it measures, in this process and with the
service's own code and settings (detection threshold 0.6, min face 16 px, long side 640):

* decode: ``service.inference.decode.decode_image`` on the JPEG bytes;
* detect: ``RetinaFaceDetector.detect`` on 1 image per call (batch 1) or 8 (batch 8); on the
  ``onnx`` backend with ``--int8 auto`` (the service's default) from the shipped int8 graph
  ``checkpoints/detector.int8.onnx`` when its note matches, as the service does;
* align: ``align_face`` for every detected face;
* classify: the service's ``Classifier`` (the shipped default checkpoint, int8 on ``onnx`` with
  ``--int8 auto``) on 1 or 8 faces per call;
* encode: the ``PredictResponse`` built and serialised to JSON, as the route does.

With ``--int8 off auto`` the onnx backend runs twice, side by side: the float32 graphs
(``onnx-fp32``) and the int8 ones (``onnx-int8``).

Then a real ``fer-serve`` (uvicorn on 127.0.0.1, the same backend, FER_INT8 and thread count)
answers ``/predict`` for the same photos: one request at a time (batch 1), and from 8 concurrent clients
(batch 8: the dynamic batchers then see up to 8 images at once). ``http`` is its time per image
(for 8 clients: wall time / images), and ``overhead`` is ``http`` minus the sum of the stages.

Every time is the median of ``--repeats`` passes over all photos, in ms per image. The backends
alternate pass by pass (in process, and between two servers running side by side), so both see
the same machine load; ratios are only meaningful within one run. Not a test.

    python benchmarks/profile_pipeline.py                 # both backends, 1 and 2 threads (~2 min)
    python benchmarks/profile_pipeline.py --backends onnx --threads 2 --no-http
    python benchmarks/profile_pipeline.py --backends onnx --threads 1 --int8 off auto   # fp32 vs int8
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

import cv2
import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from facemodels.cache import default_cache_root  # noqa: E402
from facemodels.face.align import align_face  # noqa: E402
from facemodels.face.detector import RetinaFaceDetector  # noqa: E402
from facemodels.face.detector_int8 import usable_int8_graph  # noqa: E402
from facemodels.face.retinaface_convert import ensure_detector_weights  # noqa: E402
from service.api.faces import prediction_out  # noqa: E402
from service.config import DEFAULT_CHECKPOINTS, Settings  # noqa: E402
from service.inference.classifier import Classifier, FaceJob  # noqa: E402
from service.inference.decode import decode_image  # noqa: E402
from service.inference.pipeline import FaceResult, face_yaw  # noqa: E402
from service.schemas import ImageInfo, ModelRef, PredictResponse  # noqa: E402
from training.quantize_detector import letterbox  # noqa: E402

STAGES = ("decode", "detect", "align", "classify", "encode")


# --- photos ---------------------------------------------------------------------------------


def _cfp_files(root: Path, n: int) -> list[Path]:
    files = sorted((root / "cfp/Data/Images").glob("*/frontal/01.jpg"))
    if not files:
        raise SystemExit(f"no CFP photos under {root}/cfp/Data/Images (pass --data)")
    step = max(1, len(files) // n)
    return files[::step][:n]


def _group_frame(files: list[Path], faces: int) -> np.ndarray:
    """A 1280x720 frame with ``faces`` CFP photos (about 150x190 px each) on a grey background."""
    frame = np.full((720, 1280, 3), 96, np.uint8)
    cols = (faces + 1) // 2
    for i, f in enumerate(files[-faces:]):
        rgb = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
        tile = letterbox(rgb, 1280 // cols - 20, 340)
        row, col = divmod(i, cols)
        y, x = 20 + row * 360, 10 + col * (1280 // cols)
        frame[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
    return frame


def photo_set(data: Path, n: int, group_faces: int) -> list[bytes]:
    files = _cfp_files(data, n + group_faces)
    images = [letterbox(cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB), 640, 480) for f in files[:n]]
    images.append(_group_frame(files[n:], group_faces))
    out = []
    for rgb in images:
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        out.append(buf.tobytes())
    return out


# --- in-process stages ----------------------------------------------------------------------


class StageRunner:
    """One backend's detector and classifier at one thread count, with its inputs prepared."""

    def __init__(self, jpegs: list[bytes], backend: str, threads: int, batch: int, *, weights: Path,
                 cache: Path, int8: str = "auto") -> None:
        s = Settings(cache_dir=cache)
        self.jpegs = jpegs
        graph = (usable_int8_graph(DEFAULT_CHECKPOINTS / "detector.int8.onnx", weights)
                 if backend == "onnx" and int8 == "auto" else None)
        self.detector = RetinaFaceDetector(weights, score_threshold=s.detection_threshold,
                                           min_face_size=s.min_face_size, max_side=s.detector_max_side,
                                           backend=backend, cache_dir=cache, threads=threads,
                                           int8_graph=graph)
        self.clf = Classifier(DEFAULT_CHECKPOINTS / "default.safetensors", name="default", role="default",
                              device=torch.device("cpu"), backend=backend, cache_dir=cache, threads=threads,
                              int8=int8)
        self.images = [decode_image(j, content_type="image/jpeg") for j in jpegs]
        self.chunks = [self.images[i:i + batch] for i in range(0, len(jpegs), batch)]
        self.faces = [f for c in self.chunks for f in self.detector.detect(c)]  # also the warm-up
        self.crops = self.align()
        jobs = [FaceJob(c) for c in self.crops]
        self.job_chunks = [jobs[i:i + batch] for i in range(0, len(jobs), batch)]
        probs = [p for c in self.job_chunks for p in self.clf(c)]  # warm-up
        self.results, k = [], 0
        for fs in self.faces:
            self.results.append([FaceResult(d, probs[k + i], face_yaw(d)) for i, d in enumerate(fs)])
            k += len(fs)

    def decode(self) -> None:
        for j in self.jpegs:
            decode_image(j, content_type="image/jpeg")

    def detect(self) -> None:
        for c in self.chunks:
            self.detector.detect(c)

    def align(self) -> list[np.ndarray]:
        size = self.clf.cfg.image_size
        return [align_face(img, np.asarray(d.landmarks), size=size)
                for img, fs in zip(self.images, self.faces, strict=True) for d in fs]

    def classify(self) -> None:
        for c in self.job_chunks:
            self.clf(c)

    def encode(self) -> None:
        ref = ModelRef(name="default", version=self.clf.version, arch=self.clf.arch)
        for img, rs in zip(self.images, self.results, strict=True):
            PredictResponse(image=ImageInfo(width=img.shape[1], height=img.shape[0]), model=ref, tta=False,
                            faces=[prediction_out(r, self.clf.class_names) for r in rs]).model_dump_json()


def profile_stages(runners: dict[str, StageRunner], repeats: int) -> dict[str, dict[str, float]]:
    """ms per image of each stage for each backend; the backends alternate pass by pass."""
    times: dict[str, dict[str, list[float]]] = {b: {s: [] for s in STAGES} for b in runners}
    for stage in STAGES:
        for _ in range(repeats):
            for backend, runner in runners.items():
                t0 = time.perf_counter()
                getattr(runner, stage)()
                times[backend][stage].append(time.perf_counter() - t0)
    return {b: {s: statistics.median(t) * 1000 / len(runners[b].jpegs) for s, t in per.items()}
            for b, per in times.items()}


# --- the real server ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(backend: str, threads: int, *, weights: Path, cache: Path,
                 int8: str = "auto") -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "FER_BACKEND": backend, "FER_TORCH_THREADS": str(threads), "FER_DEVICE": "cpu",
           "FER_CACHE_DIR": str(cache), "FER_DETECTOR_WEIGHTS": str(weights),
           "FER_USE_SHIPPED_EXTRAS": "false", "FER_INT8": int8}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warning"], cwd=ROOT, env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"fer-serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("fer-serve was not ready in 180 s")
        time.sleep(0.3)


def http_ms(jpegs: list[bytes], configs: dict[str, tuple[str, str]], threads: int, batches: list[int], *,
            weights: Path, cache: Path, repeats: int) -> dict[str, dict[int, float]]:
    """ms per image through a real fer-serve per configuration (label -> (backend, FER_INT8)):
    batch 1 is one request at a time, batch N is N concurrent clients. The servers run side by
    side and alternate pass by pass."""
    backends = list(configs)
    servers = {label: start_server(b, threads, weights=weights, cache=cache, int8=int8)
               for label, (b, int8) in configs.items()}
    try:
        for proc, url in servers.values():
            wait_ready(proc, url)

        async def run() -> dict[str, dict[int, float]]:
            clients = {b: httpx.AsyncClient(base_url=url, timeout=60) for b, (_, url) in servers.items()}

            async def one_pass(backend: str, n: int) -> float:
                async def client(i: int) -> None:
                    for body in jpegs[i::n]:
                        r = await clients[backend].post("/predict", content=body,
                                                        headers={"content-type": "image/jpeg"})
                        r.raise_for_status()

                t0 = time.perf_counter()
                await asyncio.gather(*(client(i) for i in range(n)))
                return time.perf_counter() - t0

            for backend in backends:  # warm-up: one sequential pass each
                await one_pass(backend, 1)
            times: dict[str, dict[int, list[float]]] = {b: {n: [] for n in batches} for b in backends}
            for n in batches:
                for _ in range(repeats):
                    for backend in backends:
                        times[backend][n].append(await one_pass(backend, n))
            for c in clients.values():
                await c.aclose()
            return {b: {n: statistics.median(t) * 1000 / len(jpegs) for n, t in per.items()}
                    for b, per in times.items()}

        return asyncio.run(run())
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            proc.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--photos", type=int, default=24, help="640x480 letterboxed CFP photos")
    p.add_argument("--group-faces", type=int, default=6, help="faces on the 1280x720 frame")
    p.add_argument("--backends", nargs="+", default=["torch", "onnx"], choices=("torch", "onnx"))
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--repeats", type=int, default=3, help="passes per measurement (median)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="cache root for detector weights and ONNX files (default: FER_CACHE_DIR or "
                        f"{default_cache_root()})")
    p.add_argument("--no-http", action="store_true", help="skip the real-server column")
    p.add_argument("--int8", nargs="+", choices=("auto", "off"), default=["auto"],
                   help="FER_INT8 for the onnx backend: auto runs the shipped int8 detector and classifier "
                        "graphs (the service's default), off float32; both: side by side as onnx-int8 "
                        "and onnx-fp32")
    args = p.parse_args()
    started = time.monotonic()
    cache = args.cache_dir or Settings().cache_dir
    weights = ensure_detector_weights(cache)
    jpegs = photo_set(args.data, args.photos, args.group_faces)
    configs: dict[str, tuple[str, str]] = {}  # label -> (backend, FER_INT8)
    for b in args.backends:
        for int8 in args.int8 if b == "onnx" else ["off"]:
            kind = "int8" if int8 == "auto" else "fp32"
            label = f"onnx-{kind}" if b == "onnx" and len(args.int8) > 1 else b
            configs[label] = (b, int8)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        http = ({} if args.no_http else
                http_ms(jpegs, configs, threads, args.batches, weights=weights, cache=cache,
                        repeats=args.repeats))
        for batch in args.batches:
            runners = {label: StageRunner(jpegs, b, threads, batch, weights=weights, cache=cache, int8=int8)
                       for label, (b, int8) in configs.items()}
            precision = {b: f"detector {r.detector.precision}, classifier {r.clf.precision}"
                         for b, r in runners.items()}
            n_faces = len(next(iter(runners.values())).crops)
            for backend, ms in profile_stages(runners, args.repeats).items():
                rows.append({"backend": backend, "threads": threads, "batch": batch, **ms,
                             "sum": sum(ms[s] for s in STAGES),
                             "http": http.get(backend, {}).get(batch, float("nan"))})
    print(f"\n{len(jpegs)} photos ({args.photos} CFP 640x480 letterboxed + one 1280x720 frame with "
          f"{args.group_faces} faces; {n_faces} faces found), ms per image, median of {args.repeats} passes; "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {_ort_version()}; "
          + "; ".join(f"{b}: {p}" for b, p in precision.items()))
    head = ["backend", "threads", "batch", *STAGES, "sum", "http", "overhead"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["backend"], str(r["threads"]), str(r["batch"]), *(f"{r[s]:.2f}" for s in STAGES),
                 f"{r['sum']:.2f}", f"{r['http']:.2f}", f"{r['http'] - r['sum']:.2f}"]
        print("| " + " | ".join(cells) + " |")
    base = next(iter(configs))
    for other in list(configs)[1:]:
        print(f"\n{base} / {other} time ratio (higher = {other} faster):")
        for threads in args.threads:
            for batch in args.batches:
                t, o = (next(r for r in rows
                             if (r["backend"], r["threads"], r["batch"]) == (label, threads, batch))
                        for label in (base, other))
                print(f"  threads {threads}, batch {batch}: detect {t['detect'] / o['detect']:.2f}x, "
                      f"classify {t['classify'] / o['classify']:.2f}x, stages {t['sum'] / o['sum']:.2f}x, "
                      f"http {t['http'] / o['http']:.2f}x")
    print(f"\n(run took {time.monotonic() - started:.0f} s)")


def _ort_version() -> str:
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime not installed"
    return f"onnxruntime {onnxruntime.__version__}"


if __name__ == "__main__":
    main()
