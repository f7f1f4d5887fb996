"""Training and inference throughput of the model zoo, fp32 against mixed precision.

Runs SGD steps and eval forwards on a synthetic batch for each model and prints one table:
parameters, GFLOPs per face, images/s for fp32 and AMP (bf16 autocast on CPU; bf16 or fp16
on CUDA) and the AMP speedups. Each configuration runs for ``--seconds`` after warm-up
(at least one step), or for exactly ``--steps`` steps when given.

    python benchmarks/train_throughput.py --models compact_resnet resnet18 --seconds 2
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from facemodels.models import create_model, list_models
from facemodels.models.complexity import count_flops, count_params

log = logging.getLogger("train_throughput")


@dataclass
class Row:
    model: str
    params: int
    gflops: float
    train_fp32: float
    train_amp: float
    infer_fp32: float
    infer_amp: float


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    zoo = list_models(include_ensemble=False)
    parser.add_argument("--models", nargs="+", default=zoo, choices=zoo, metavar="NAME",
                        help=f"models to run (default: all of {', '.join(zoo)})")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per configuration (default: time-based)")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="time per configuration when --steps is not given")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default: 1 on CPU, 3 on CUDA)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--amp-dtype", default="auto", choices=["auto", "bf16", "fp16"],
                        help="auto: bf16 on CPU and on CUDA GPUs that support it, else fp16")
    parser.add_argument("--channels-last", action="store_true",
                        help="run models and inputs in channels_last memory format")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_amp_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "fp16":
        return torch.float16
    if name == "bf16" or device.type != "cuda" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], *, device: torch.device, warmup: int,
          steps: int | None, seconds: float) -> float:
    """Seconds per step: ``steps`` steps, or as many as fit in ``seconds`` (at least one)."""
    for _ in range(warmup):
        step()
    _sync(device)
    n, start = 0, time.perf_counter()
    while True:
        step()
        n += 1
        if steps is not None and n >= steps:
            break
        if steps is None:
            _sync(device)
            if time.perf_counter() - start >= seconds:
                break
    _sync(device)
    return (time.perf_counter() - start) / n


def train_step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  amp_dtype: torch.dtype | None) -> Callable[[], None]:
    """One SGD step (autocast + loss scaling for fp16 when ``amp_dtype`` is given)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler(x.device.type, enabled=amp_dtype is torch.float16)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def infer_step_fn(model: nn.Module, x: torch.Tensor,
                  amp_dtype: torch.dtype | None) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), torch.autocast(
            x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            model(x)

    return step


def bench_model(name: str, args: argparse.Namespace, device: torch.device,
                amp_dtype: torch.dtype) -> Row:
    torch.manual_seed(0)
    model = create_model(name)
    params, gflops = count_params(model), count_flops(model) / 1e9
    cfg = model.cfg
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    x = torch.randn(args.batch_size, cfg.in_chans, cfg.input_size, cfg.input_size,
                    device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, cfg.num_classes, (args.batch_size,), device=device)
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)

    def rate(step: Callable[[], None], what: str) -> float:
        sec = timed(step, device=device, warmup=warmup, steps=args.steps, seconds=args.seconds)
        ips = args.batch_size / sec
        log.info("%-18s %-12s %9.1f img/s", name, what, ips)
        return ips

    # Each training run starts from the same weights so fp32 and AMP see the same model.
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    train_fp32 = rate(train_step_fn(model, x, y, None), "train fp32")
    model.load_state_dict(initial)
    train_amp = rate(train_step_fn(model, x, y, amp_dtype), "train amp")
    model.load_state_dict(initial)
    model.eval()
    infer_fp32 = rate(infer_step_fn(model, x, None), "infer fp32")
    infer_amp = rate(infer_step_fn(model, x, amp_dtype), "infer amp")
    return Row(name, params, gflops, train_fp32, train_amp, infer_fp32, infer_amp)


def format_table(rows: list[Row], header: str) -> str:
    cols = ("model", "params", "GFLOPs/face", "train fp32", "train amp", "amp x",
            "infer fp32", "infer amp", "amp x")
    lines = [
        (r.model, f"{r.params / 1e6:.2f}M", f"{r.gflops:.3f}", f"{r.train_fp32:.0f}",
         f"{r.train_amp:.0f}", f"{r.train_amp / r.train_fp32:.2f}", f"{r.infer_fp32:.0f}",
         f"{r.infer_amp:.0f}", f"{r.infer_amp / r.infer_fp32:.2f}")
        for r in rows
    ]
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    out = [header, "(throughput in images/s; amp x = AMP / fp32)", fmt(cols),
           fmt(tuple("-" * w for w in widths))]
    out += [fmt(line) for line in lines]
    return "\n".join(out)


def main(args: argparse.Namespace) -> list[Row]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amp_dtype = resolve_amp_dtype(args.amp_dtype, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU, {torch.get_num_threads()} threads"
    rows = []
    for name in args.models:
        rows.append(bench_model(name, args, device, amp_dtype))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    amp = str(amp_dtype).removeprefix("torch.")
    budget = f"{args.steps} steps" if args.steps else f"~{args.seconds:g} s"
    header = (f"device: {where} | batch {args.batch_size} | AMP {amp} | "
              f"{'channels_last' if args.channels_last else 'NCHW'} | {budget} per config | "
              f"torch {torch.__version__}")
    print(format_table(rows, header))
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
