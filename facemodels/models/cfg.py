"""``ModelCfg``: the preprocessing contract that travels with a model's weights.

Training transforms, evaluation transforms and the service all build their preprocessing
from this one object, so a checkpoint can never be served with the wrong framing or scaling.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from facemodels.classes import FER_CLASSES

__all__ = ["ModelCfg"]


@dataclass(frozen=True)
class ModelCfg:
    """What a model expects as input and what its outputs mean.

    Attributes:
        image_size: side of the aligned face image the data comes in (FER2013: 48).
        input_size: side of the crop the network sees (random crop in training, centre or
            10-crop at test time). Equal to ``image_size`` means no cropping.
        in_chans: 1 for grayscale, 3 for RGB.
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation divided after subtracting the mean.
        class_names: output index -> class name.
    """

    image_size: int = 48
    input_size: int = 44
    in_chans: int = 1
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    class_names: tuple[str, ...] = field(default=FER_CLASSES)

    def __post_init__(self) -> None:
        if self.input_size > self.image_size:
            raise ValueError(
                f"input_size {self.input_size} is larger than image_size {self.image_size}"
            )
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError("mean and std need one value per input channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCfg:
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing keys take defaults."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelCfg keys: {sorted(unknown)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)
