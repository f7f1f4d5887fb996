"""Model size, compute and CPU latency: parameters, multiply-adds and ms per face."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "count_macs", "count_params", "default_input_shape", "measure_latency"]


def count_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def default_input_shape(model: nn.Module, batch_size: int = 1) -> tuple[int, int, int, int]:
    """``(batch_size, in_chans, input_size, input_size)`` from the model's ``cfg``."""
    cfg = model.cfg
    return (batch_size, cfg.in_chans, cfg.input_size, cfg.input_size)


def count_flops(model: nn.Module, input_shape: Sequence[int] | None = None) -> int:
    """Floating-point operations of one eval-mode forward pass on ``input_shape``.

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode`, which sees every
    convolution and matrix multiply (2 FLOPs per multiply-add); norms, activations and
    pooling are not counted. ``input_shape`` includes the batch dimension and defaults to
    one face at the model's ``cfg`` size.
    """
    shape = tuple(input_shape) if input_shape is not None else default_input_shape(model)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(torch.zeros(shape, device=device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def count_macs(model: nn.Module, input_shape: Sequence[int] | None = None) -> int:
    """Multiply-adds of one forward pass on ``input_shape`` (see :func:`count_flops`)."""
    return count_flops(model, input_shape) // 2


def measure_latency(
    model: nn.Module,
    batch_size: int,
    *,
    repeats: int = 20,
    warmup: int = 5,
    channels_last: bool = False,
    device: str | torch.device = "cpu",
) -> float:
    """Median wall-clock milliseconds per face of an eval-mode fp32 forward pass.

    The model is timed in place (put in eval mode and moved to ``device``; with
    ``channels_last`` its memory format is changed too).
    """
    device = torch.device(device)
    model.eval().to(device)
    x = torch.randn(default_input_shape(model, batch_size), device=device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times) / batch_size
