"""``fer-train``: one command with subcommands for every training job."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["main"]


def _commands() -> dict[str, tuple[Callable[[bool], argparse.ArgumentParser], Callable[..., Any]]]:
    from training.cv import cv_main, get_cv_parser
    from training.evaluate import ensemble_main, eval_main, get_ensemble_parser, get_eval_parser
    from training.export import export_main, get_export_parser
    from training.gan import evaluate as gan_eval
    from training.gan import refiner_train
    from training.gan import train as gan_train
    from training.quantize import get_quantize_parser, quantize_main
    from training.quantize_detector import get_quantize_detector_parser, quantize_detector_main
    from training.soup import get_soup_parser, soup_main
    from training.train_classifier import get_args_parser
    from training.train_classifier import main as classify_main

    return {
        "classify": (get_args_parser, classify_main),
        "eval": (get_eval_parser, eval_main),
        "ensemble": (get_ensemble_parser, ensemble_main),
        "soup": (get_soup_parser, soup_main),
        "cv": (get_cv_parser, cv_main),
        "export": (get_export_parser, export_main),
        "quantize": (get_quantize_parser, quantize_main),
        "quantize-detector": (get_quantize_detector_parser, quantize_detector_main),
        "frontalizer": (gan_train.get_args_parser, gan_train.main),
        "eval-frontalizer": (gan_eval.get_args_parser, gan_eval.main),
        "refiner": (refiner_train.get_args_parser, refiner_train.main),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fer-train", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (make_parser, run) in _commands().items():
        child = make_parser(False)
        sp = sub.add_parser(name, parents=[child], help=child.description,
                            description=child.description)
        sp.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    try:
        args.run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        logging.getLogger("fer-train").error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
