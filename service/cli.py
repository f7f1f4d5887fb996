"""``fer-serve``: run the service with uvicorn.

The HTTP stack is uvicorn's fastest one that is installed: the uvloop event loop and the
httptools parser (the serve extra installs both; uvloop not on Windows), else asyncio and h11.
Either parser gets the same limits on slow clients and on the request head
(:mod:`service.timeouts`, :mod:`service.httptools_protocol`). ``--loop`` and ``--http`` pick one.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Sequence

__all__ = ["HTTP_PROTOCOLS", "http_stack", "main"]

log = logging.getLogger(__name__)

#: Largest request head (request line and headers) a connection may send: h11's default, 16 KiB.
H11_MAX_HEADER_BYTES = 16 * 1024
#: The uvicorn protocol class behind each ``--http`` choice (both enforce the header limits).
HTTP_PROTOCOLS = {"httptools": "service.httptools_protocol:HardenedHttpToolsProtocol",
                  "h11": "service.timeouts:HeaderTimeoutH11Protocol"}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def http_stack(loop: str = "auto", http: str = "auto") -> tuple[str, str]:
    """The (event loop, HTTP parser) to run: ``auto`` is uvloop and httptools when installed.

    Raises:
        SystemExit: uvloop or httptools was asked for by name and is not installed.
    """
    if loop == "auto":
        loop = "uvloop" if sys.platform != "win32" and _installed("uvloop") else "asyncio"
    if http == "auto":
        http = "httptools" if _installed("httptools") else "h11"
    for name in {loop, http} - {"asyncio", "h11"}:
        if not _installed(name):
            raise SystemExit(f"fer-serve: {name} is not installed (pip install {name})")
    return loop, http


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fer-serve", description="Serve the FER API (settings: FER_* env)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument("--log-level", default="info")
    p.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                   help="event loop; auto: uvloop when installed (default %(default)s)")
    p.add_argument("--http", choices=("auto", "httptools", "h11"), default="auto",
                   help="HTTP/1.1 parser; auto: httptools when installed (default %(default)s)")
    p.add_argument("--prepare", action="store_true",
                   help="convert the detector weights into FER_CACHE_DIR (unless FER_DETECTOR_WEIGHTS "
                        "is set) and, when FER_BACKEND resolves to onnx, export the detector, every "
                        "served classifier and a frontal_refiner frontaliser to ONNX into "
                        "FER_CACHE_DIR/onnx; then exit, so the first "
                        "start needs neither")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.prepare:
        _prepare()
        return
    _serve(args.host, args.port, args.workers, args.log_level, *http_stack(args.loop, args.http))


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _serve(host: str, port: int, workers: int, log_level: str, loop: str, http: str) -> None:
    """uvicorn on ``loop`` and ``http`` with the FER_TIMEOUT_* limits. SIGTERM is a clean shutdown:
    uvicorn finishes the requests in flight (at most FER_TIMEOUT_GRACEFUL_SHUTDOWN_S), then
    re-raises the signal, which lands in :func:`_exit_cleanly`: exit status 0, not -15."""
    import signal

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from service.config import Settings

    settings = Settings()
    config = uvicorn.Config(
        "service.main:create_app", factory=True, host=host, port=port, workers=workers,
        log_level=log_level, loop=loop, http=HTTP_PROTOCOLS[http],
        timeout_keep_alive=settings.timeout_keep_alive_s,
        timeout_graceful_shutdown=settings.timeout_graceful_shutdown_s,
        h11_max_incomplete_event_size=H11_MAX_HEADER_BYTES)
    config.fer_timeout_headers = settings.timeout_headers_s  # read by both protocol classes
    log.info("serving on %s:%d with the %s event loop and the %s HTTP parser", host, port, loop, http)
    signal.signal(signal.SIGTERM, _exit_cleanly)
    server = uvicorn.Server(config)
    if workers > 1:
        Multiprocess(config, target=server.run, sockets=[config.bind_socket()]).run()
    else:
        server.run()
    if not server.started and workers <= 1:
        raise SystemExit(3)  # uvicorn's STARTUP_FAILURE


def _prepare() -> None:
    from facemodels.checkpoint import load_card
    from facemodels.device import resolve_device
    from facemodels.face.detector import load_detector_net
    from facemodels.face.retinaface_convert import ensure_detector_weights
    from facemodels.frontalizer.refiner import REFINER_ARCH
    from facemodels.onnx_export import (
        cached_classifier_onnx,
        cached_detector_onnx,
        cached_refiner_onnx,
        resolve_backend,
    )
    from service.config import Settings
    from service.inference.catalog import classifier_specs, served_frontalizer_checkpoint

    settings = Settings()
    path = settings.detector_weights or ensure_detector_weights(settings.cache_dir)
    log.info("detector weights ready: %s", path)
    if resolve_backend(settings.backend, resolve_device(settings.device)) != "onnx":
        return
    cache = settings.cache_dir
    log.info("detector ONNX ready: %s", cached_detector_onnx(path, cache, net=load_detector_net(path)))
    for spec in classifier_specs(settings):
        log.info("classifier %s ONNX ready: %s", spec.name, cached_classifier_onnx(spec.path, cache))
    frontalizer = served_frontalizer_checkpoint(settings)
    if frontalizer is not None and load_card(frontalizer).get("arch") == REFINER_ARCH:
        log.info("frontaliser refiner ONNX ready: %s", cached_refiner_onnx(frontalizer, cache))


if __name__ == "__main__":
    main()
