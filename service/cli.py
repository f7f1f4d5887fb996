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
                        "is set) and exit, so the first start needs no conversion")
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
    from facemodels.face.retinaface_convert import ensure_detector_weights
    from service.config import Settings

    settings = Settings()
    path = settings.detector_weights or ensure_detector_weights(settings.cache_dir)
    logging.getLogger(__name__).info("detector weights ready: %s", path)


if __name__ == "__main__":
    main()
