"""``fer-serve``: run the service with uvicorn."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fer-serve", description="Serve the FER API (settings: FER_* env)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument("--log-level", default="info")
    p.add_argument("--prepare", action="store_true",
                   help="convert the detector weights into FER_CACHE_DIR (unless FER_DETECTOR_WEIGHTS "
                        "is set) and, when FER_BACKEND resolves to onnx, export the detector and every "
                        "served classifier to ONNX into FER_CACHE_DIR/onnx; then exit, so the first "
                        "start needs neither")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.prepare:
        _prepare()
        return
    import uvicorn

    uvicorn.run("service.main:create_app", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level=args.log_level)


def _prepare() -> None:
    from facemodels.device import resolve_device
    from facemodels.face.detector import load_detector_net
    from facemodels.face.retinaface_convert import ensure_detector_weights
    from facemodels.onnx_export import cached_classifier_onnx, cached_detector_onnx, resolve_backend
    from service.config import Settings
    from service.inference.catalog import classifier_specs

    log = logging.getLogger(__name__)
    settings = Settings()
    path = settings.detector_weights or ensure_detector_weights(settings.cache_dir)
    log.info("detector weights ready: %s", path)
    if resolve_backend(settings.backend, resolve_device(settings.device)) != "onnx":
        return
    cache = settings.cache_dir
    log.info("detector ONNX ready: %s", cached_detector_onnx(path, cache, net=load_detector_net(path)))
    for spec in classifier_specs(settings):
        log.info("classifier %s ONNX ready: %s", spec.name, cached_classifier_onnx(spec.path, cache))


if __name__ == "__main__":
    main()
