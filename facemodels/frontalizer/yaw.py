"""|yaw| ranges as the frontaliser's card records them: numbers, never display strings.

The evaluation (``fer-train eval-frontalizer``) lists the ranges where frontalising helped
expression accuracy under ``metrics["FER2013-PublicTest"]["frontalize_helps"]`` as
``{"min_abs_yaw": 45.0, "max_abs_yaw": null}`` objects (degrees; ``null`` = no upper bound), and
the service's ``frontalize=auto`` reads them back with :meth:`YawRange.from_json`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["YawRange"]


@dataclass(frozen=True)
class YawRange:
    """``lo <= |yaw| < hi`` in degrees; ``hi`` may be ``inf``."""

    lo: float
    hi: float = math.inf

    def __post_init__(self) -> None:
        if not (0 <= self.lo < self.hi):
            raise ValueError(f"a |yaw| range needs 0 <= lo < hi, got [{self.lo}, {self.hi})")

    def contains(self, yaw: float) -> bool:
        return self.lo <= abs(yaw) < self.hi

    @property
    def label(self) -> str:
        """For tables and logs: ``"<15°"``, ``"15-30°"``, ``">=45°"``."""
        if math.isinf(self.hi):
            return f">={self.lo:g}°"
        return f"<{self.hi:g}°" if self.lo == 0 else f"{self.lo:g}-{self.hi:g}°"

    def to_json(self) -> dict[str, float | None]:
        return {"min_abs_yaw": self.lo, "max_abs_yaw": None if math.isinf(self.hi) else self.hi}

    @classmethod
    def from_json(cls, value: Any) -> YawRange:
        """Parse :meth:`to_json`'s output.

        Raises:
            ValueError: ``value`` is not such an object (e.g. a display string).
        """
        if not isinstance(value, dict) or "min_abs_yaw" not in value:
            raise ValueError(f"expected {{'min_abs_yaw': number, 'max_abs_yaw': number or null}}, "
                             f"got {value!r}")
        lo, hi = value["min_abs_yaw"], value.get("max_abs_yaw")
        if not isinstance(lo, int | float) or not (hi is None or isinstance(hi, int | float)):
            raise ValueError(f"yaw range bounds must be numbers, got {value!r}")
        return cls(float(lo), math.inf if hi is None else float(hi))
