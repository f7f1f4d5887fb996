"""``fer-train frontalizer``: train the DR-GAN frontaliser on CFP ids 001-450.

Shaped like the classifier trainer (``get_args_parser()`` and ``main(args)``). Every
``--checkpoint-every`` steps (default: one epoch, i.e. as many pairs as training photos) it
writes ``last`` (the registry model ``frontalizer``: G_enc, G_dec and D's pose head, with a
card), ``last_discriminator.safetensors`` (all of D) and the optimizer/RNG state of G
(``last_state``) and D (``last_d_state``), so ``--resume`` continues exactly. Losses go to
``losses.jsonl``; every ``--sample-every`` steps ``samples/step_<n>.png`` (and
``samples/latest.png``) shows profile | frontalised | real frontal for evaluation ids
451-500. The end of the run also writes ``final`` (fp16 with ``--half-checkpoint``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from facemodels.atomic import save_safetensors_atomically
from facemodels.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from facemodels.device import AMP_CHOICES, resolve_amp, resolve_device
from facemodels.frontalizer.model import Frontalizer, default_cfg
from training.data.cfp import load_cfp
from training.data.fer2013 import load_fer2013
from training.gan.expression import ExpressionPath, load_expression_classifier
from training.gan.losses import LossWeights
from training.gan.networks import Decoder, Discriminator, Encoder
from training.gan.recipe import GanNets, GanRecipe
from training.gan.sampling import PairSampler, to_unit
from training.gan.sheets import pick_sheet_rows, write_sheet
from training.runtime import resolved_args, seed_everything
from training.train_state import load_train_state, save_train_state

__all__ = ["build_nets", "get_args_parser", "inference_model", "main"]

log = logging.getLogger(__name__)
DEFAULT_DATA = "../shared/data/cfp"
ARCH = "frontalizer"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the DR-GAN face frontaliser on CFP",
                                add_help=add_help)
    p.add_argument("--data", default=DEFAULT_DATA, help="CFP folder (with Data/ and Protocol/)")
    p.add_argument("--cache-dir", type=Path, default=None, help="aligned-crop cache folder")
    p.add_argument("--output-dir", type=Path, default=Path("runs/frontalizer"))
    p.add_argument("--image-size", type=int, default=64, help="crop side (multiple of 16)")
    p.add_argument("--width", type=int, default=32, help="G channel width")
    p.add_argument("--d-width", type=int, default=32, help="D channel width")
    p.add_argument("--feat-dim", type=int, default=320, help="identity representation size")
    p.add_argument("--noise-dim", type=int, default=50)
    p.add_argument("--epochs", type=int, default=50, help="used when --steps is 0")
    p.add_argument("--steps", type=int, default=0, help="iterations (both paths); 0 = from --epochs")
    p.add_argument("--step-budget", type=int, default=0, help="stop after N steps now; resume later")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr-g", type=float, default=2e-4)
    p.add_argument("--lr-d", type=float, default=2e-4)
    p.add_argument("--betas", type=float, nargs=2, default=(0.5, 0.999))
    p.add_argument("--n-critic", type=int, default=1, help="D steps per G step, on each path")
    p.add_argument("--w-adv", type=float, default=1.0, help="adversarial (D_s) weight")
    p.add_argument("--w-pose", type=float, default=1.0, help="pose classification (D_p) weight")
    p.add_argument("--w-id", type=float, default=1.0, help="identity classification (D_id) weight")
    p.add_argument("--w-l1", type=float, default=10.0, help="L1 to x_j weight (reconstruction path)")
    p.add_argument("--random-codes", action="store_true",
                   help="generation path decodes random codes (CR-GAN) instead of codes of other photos")
    p.add_argument("--train-decoder-on-reconstruction", action="store_true",
                   help="also update G_dec on the reconstruction path (the paper: G_enc only)")
    p.add_argument("--flip-p", type=float, default=0.5)
    p.add_argument("--profile-source-p", type=float, default=0.5)
    p.add_argument("--frontal-target-p", type=float, default=0.75)
    p.add_argument("--self-pair-p", type=float, default=0.1,
                   help="probability that x_j is x_i itself (auto-encoding pair)")
    p.add_argument("--fer-data", default=None,
                   help="FER2013 folder: add the expression path (FER2013 Training faces auto-encoded "
                        "to the frontal pose, kept by L1 and a frozen classifier's KL); off by default")
    p.add_argument("--expression-classifier", type=Path, default=None,
                   help="frozen classifier checkpoint for the expression path's KL term")
    p.add_argument("--expression-member", type=int, default=None,
                   help="use only this member of an ensemble --expression-classifier")
    p.add_argument("--w-expr-l1", type=float, default=10.0, help="expression path: L1 weight")
    p.add_argument("--w-expr-kl", type=float, default=1.0, help="expression path: KL weight")
    p.add_argument("--expr-temp", type=float, default=2.0, help="expression path: KL temperature")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps; 0 = once per epoch")
    p.add_argument("--sample-every", type=int, default=200, help="steps between sample sheets")
    p.add_argument("--sample-count", type=int, default=8, help="people on a sample sheet")
    p.add_argument("--log-every", type=int, default=20, help="steps between loss log lines")
    p.add_argument("--half-checkpoint", action="store_true", help="store 'final' as fp16")
    p.add_argument("--amp", choices=AMP_CHOICES, default="none")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    return p


def build_nets(args: argparse.Namespace, num_identities: int) -> GanNets:
    size = args.image_size
    return GanNets(
        encoder=Encoder(width=args.width, feat_dim=args.feat_dim, image_size=size),
        decoder=Decoder(width=args.width, feat_dim=args.feat_dim, noise_dim=args.noise_dim, image_size=size),
        discriminator=Discriminator(num_identities=num_identities, width=args.d_width, image_size=size),
    )


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"width": args.width, "feat_dim": args.feat_dim, "noise_dim": args.noise_dim,
            "d_width": args.d_width}


def inference_model(nets: GanNets, image_size: int) -> Frontalizer:
    """The shipped wrapper, sharing the training networks' modules (no copy)."""
    return Frontalizer(nets.encoder, nets.decoder, nets.discriminator.pose_net(), default_cfg(image_size))


def _save(out: Path, stem: str, nets: GanNets, recipe: GanRecipe, generator: torch.Generator,
          args: argparse.Namespace, info: dict[str, Any], fingerprint: str, *, half: bool = False,
          full: bool = True) -> None:
    wrapper = inference_model(nets, args.image_size)
    save_checkpoint(out / stem, wrapper, arch=ARCH, model_kwargs=model_kwargs(args),
                    train_args=resolved_args(args), data_fingerprint=fingerprint, half=half,
                    extra={"steps_trained": info["step"], "wall_time_s": round(info["wall_time_s"], 1),
                           "train_ids": "001-450", "pose_classes_note": "left/right as seen in the image"})
    if not full:
        return
    state = {k: v.detach().cpu().contiguous() for k, v in nets.discriminator.state_dict().items()}
    save_safetensors_atomically(out / f"{stem}_discriminator.safetensors", state)
    for s, opt in ((stem, recipe.opt_g), (f"{stem}_d", recipe.opt_d)):
        save_train_state(out / s, optimizer=opt, scheduler=None, generator=generator, info=info)


def _resume(out: Path, nets: GanNets, recipe: GanRecipe, generator: torch.Generator,
            device: torch.device) -> dict[str, Any]:
    wrapper, _ = load_checkpoint(out / "last", device=device)
    nets.encoder.load_state_dict(wrapper.encoder.state_dict())
    nets.decoder.load_state_dict(wrapper.decoder.state_dict())
    dpath = out / "last_discriminator.safetensors"
    if not dpath.is_file():
        raise CheckpointError(f"discriminator weights not found: {dpath}")
    nets.discriminator.load_state_dict(load_file(str(dpath), device=str(device)))
    load_train_state(out / "last_d", optimizer=recipe.opt_d, scheduler=None, generator=generator)
    return load_train_state(out / "last", optimizer=recipe.opt_g, scheduler=None, generator=generator)


@torch.no_grad()
def _sample_sheet(path: Path, nets: GanNets, images: tuple[torch.Tensor, torch.Tensor], step: int) -> None:
    """Frontalise the sheet's profiles in eval mode (z = 0), then restore the modes."""
    modes = [(m, m.training) for m in (nets.encoder, nets.decoder)]
    for m, _ in modes:
        m.eval()
    profile, frontal = images
    frontal_code = torch.zeros(len(profile), dtype=torch.long, device=profile.device)
    fake = nets.decoder(nets.encoder(profile), frontal_code)
    for m, mode in modes:
        m.train(mode)
    write_sheet(path, profile, fake, frontal, title=f"step {step}: CFP eval ids")


def _trim_log(path: Path, step: int) -> None:
    """Drop loss-log rows after ``step`` (written after the checkpoint a resume starts from)."""
    if not path.is_file():
        return
    if step == 0:
        path.unlink()
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _expression_path(args: argparse.Namespace, device: torch.device) -> ExpressionPath:
    """FER2013 Training faces and the frozen classifier for the optional expression path."""
    if args.expression_classifier is None:
        raise ValueError("--fer-data needs --expression-classifier (the frozen classifier of its KL term)")
    faces = load_fer2013(args.fer_data, cache_dir=args.cache_dir).split("Training").images
    classifier = load_expression_classifier(args.expression_classifier, member=args.expression_member,
                                            device=device)
    log.info("expression path: %d FER2013 Training faces, classifier %s%s", len(faces),
             args.expression_classifier,
             "" if args.expression_member is None else f" member {args.expression_member}")
    return ExpressionPath.build(faces, classifier, image_size=args.image_size, device=device,
                                w_l1=args.w_expr_l1, w_kl=args.w_expr_kl, temperature=args.expr_temp)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train; return the last loss-log row."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out: Path = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    amp_dtype = resolve_amp(args.amp, device)
    generator = seed_everything(args.seed)

    data = load_cfp(args.data, size=args.image_size, cache_dir=args.cache_dir)
    train, held_out = data.split("train"), data.split("eval")
    if len(train) == 0:
        raise ValueError(f"{args.data}: no training ids (001-450) found")
    sheet_src = held_out if len(held_out) else train
    prof_idx, front_idx = pick_sheet_rows(sheet_src, args.sample_count)
    sheet_images = (to_unit(sheet_src.images[prof_idx]).to(device),
                    to_unit(sheet_src.images[front_idx]).to(device))
    sampler = PairSampler(train, device=device, generator=generator, flip_p=args.flip_p,
                          profile_source_p=args.profile_source_p, frontal_target_p=args.frontal_target_p,
                          self_pair_p=args.self_pair_p, random_codes=args.random_codes)
    nets = build_nets(args, sampler.num_identities)
    for m in (nets.encoder, nets.decoder, nets.discriminator):
        m.to(device).train()
    opt_g = torch.optim.Adam([*nets.encoder.parameters(), *nets.decoder.parameters()], lr=args.lr_g,
                             betas=tuple(args.betas))
    opt_d = torch.optim.Adam(nets.discriminator.parameters(), lr=args.lr_d, betas=tuple(args.betas))
    weights = LossWeights(adv=args.w_adv, pose=args.w_pose, identity=args.w_id, l1=args.w_l1)
    recipe = GanRecipe(nets, opt_g=opt_g, opt_d=opt_d, weights=weights, amp_dtype=amp_dtype,
                       train_decoder_on_reconstruction=args.train_decoder_on_reconstruction)
    expression = _expression_path(args, device) if args.fer_data else None
    steps_per_epoch = max(1, math.ceil(len(train) / args.batch_size))
    total = args.steps or args.epochs * steps_per_epoch
    ckpt_every = args.checkpoint_every or steps_per_epoch

    step, wall_before = 0, 0.0
    if args.resume and (out / "last.safetensors").is_file():
        info = _resume(out, nets, recipe, generator, device)
        step, wall_before = info["step"], info["wall_time_s"]
        log.info("resumed %s at step %d", out, step)
    elif args.resume:
        log.warning("--resume given but %s has no last checkpoint; starting fresh", out)
    _trim_log(out / "losses.jsonl", step)
    (out / "args.json").write_text(json.dumps(resolved_args(args), indent=2) + "\n")
    log.info("CFP %s: %d training photos of %d ids, sheet from %d eval photos; %d steps (%d/epoch), "
             "device %s, amp %s", args.data, len(train), sampler.num_identities, len(held_out), total,
             steps_per_epoch, device, amp_dtype)

    end = total if args.step_budget <= 0 else min(total, step + args.step_budget)
    sums: dict[str, float] = defaultdict(float)
    count, t0, last_row = 0, time.perf_counter(), {}
    run_start = time.perf_counter()
    while step < end:
        for path, draw in (("gen", sampler.generation), ("rec", sampler.reconstruction)):
            for _ in range(args.n_critic):
                for k, v in recipe.d_step(draw(args.batch_size)).items():
                    sums[f"{path}/{k}"] += v / args.n_critic
            for k, v in recipe.g_step(draw(args.batch_size)).items():
                sums[f"{path}/{k}"] += v
        if expression is not None:
            for k, v in expression.step(nets, opt_g, args.batch_size, generator, amp_dtype=amp_dtype).items():
                sums[f"fer/{k}"] += v
        step += 1
        count += 1
        wall = wall_before + time.perf_counter() - run_start
        if step % args.log_every == 0 or step == end:
            dt = time.perf_counter() - t0
            last_row = {"step": step, "epoch": step / steps_per_epoch,
                        **{k: v / count for k, v in sorted(sums.items())},
                        "s_per_step": dt / count, "wall_time_s": wall}
            with open(out / "losses.jsonl", "a") as fh:
                fh.write(json.dumps(last_row) + "\n")
            log.info("step %d/%d: gen d %.3f g %.3f | rec d %.3f g %.3f l1 %.3f |%s %.2f s/step", step,
                     total, last_row.get("gen/d_loss", 0), last_row.get("gen/g_loss", 0),
                     last_row.get("rec/d_loss", 0), last_row.get("rec/g_loss", 0),
                     last_row.get("rec/g_l1", 0),
                     "" if expression is None else
                     f" fer l1 {last_row['fer/e_l1']:.3f} kl {last_row['fer/e_kl']:.3f} "
                     f"agree {last_row['fer/e_agree']:.3f} |", dt / count)
            sums.clear()
            count, t0 = 0, time.perf_counter()
        if step % args.sample_every == 0 or step == end:
            sheet = out / "samples" / f"step_{step:06d}.png"
            _sample_sheet(sheet, nets, sheet_images, step)
            (out / "samples" / "latest.png").write_bytes(sheet.read_bytes())
        if step % ckpt_every == 0 or step == end:
            info = {"step": step, "wall_time_s": wall, "total_steps": total}
            _save(out, "last", nets, recipe, generator, args, info, data.fingerprint)
    if step >= total:
        wall = wall_before + time.perf_counter() - run_start
        info = {"step": step, "wall_time_s": wall, "total_steps": total}
        _save(out, "final", nets, recipe, generator, args, info, data.fingerprint,
              half=args.half_checkpoint, full=False)
        log.info("finished %d steps; wrote %s", step, out / "final.safetensors")
    return last_row
