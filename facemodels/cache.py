"""Where cached files live under a cache root. Nothing here reads the environment.

The service's settings (``FER_CACHE_DIR``) and the training CLI each resolve the root and
pass it in; :func:`default_cache_root` is what both use when it is not set.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["default_cache_root", "detector_dir", "onnx_dir"]


def default_cache_root() -> Path:
    """``~/.cache/fer-service`` (for the current ``HOME``)."""
    return Path.home() / ".cache" / "fer-service"


def detector_dir(root: Path) -> Path:
    """Converted detector weights: ``<root>/detector``."""
    return Path(root).expanduser() / "detector"


def onnx_dir(root: Path) -> Path:
    """ONNX graphs exported from the weights (:mod:`facemodels.onnx_export`): ``<root>/onnx``."""
    return Path(root).expanduser() / "onnx"
