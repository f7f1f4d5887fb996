"""``fer-train refiner``: train the warp refiner GAN (issue #12, sections 2 and 3).

G is :class:`facemodels.frontalizer.refiner.FrontalRefiner` on top of the warp-only frontaliser
(it starts as warp-only exactly). D is a PatchGAN critic with pose and identity heads. Each step
draws the three streams of :mod:`training.gan.refiner_data` (rotate-and-render, real CFP
profiles, near-frontal faces as they are), runs G once on all of them, takes one D step on the
detached fakes and one G step:

* streams 1 and 3 (pixel targets): L1 on the face mask, perceptual features and ``T^2`` KL of a
  frozen expression teacher (not the evaluation classifier), identity (cosine to the target's
  embedding);
* stream 2 (CFP profiles): identity (cosine to the person's frontal centroid), D's pose (frontal)
  and identity heads, a weak symmetry term;
* streams 1 and 2: the adversarial hinge term (small weight); all: flow smoothness, mask sparsity.

The identity embedder is trained here first (phase 0) on CFP training ids (frontals aligned, plus
warp-only frontalised profiles), then frozen; dlib stays evaluation-only. An EMA of G is kept for
selection and export. Selection uses held-out *training* data only (CFP ids 426-450, held-out
FER2013 Training faces): never PublicTest, never ids 451-500.

The run lives in ``$FER_CACHE_DIR/runs/<name>`` (outside the checkout). ``state/`` holds the
whole training state as safetensors + JSON (G, EMA, D, embedder, both optimisers with RNG,
``state.json``; 13.7 MB at the default widths), swapped in atomically every
``--save-every`` steps; the command resumes from it when present, and ``--resume-from DIR``
takes any such folder, e.g. a snapshot committed to the repository. ``best`` and ``last`` are
the EMA G as an ordinary ``frontal_refiner`` checkpoint (safetensors + card).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from facemodels.atomic import save_safetensors_atomically, write_text_atomically
from facemodels.checkpoint import CheckpointError, save_checkpoint, weights_path
from facemodels.frontalizer.refiner import REFINER_ARCH, FrontalRefiner, default_cfg
from facemodels.frontalizer.warp import MeshWarp
from training.ema import WeightAverage
from training.gan.losses import d_hinge
from training.gan.refiner_data import (
    RefinerData,
    RefinerStreams,
    RotateRenderer,
    StreamBatch,
    ValSet,
    aligned_targets,
    build_refiner_data,
    cached_cfp_landmarks,
    cached_fer_landmarks,
)
from training.gan.refiner_losses import (
    CosFaceHead,
    ExpressionTeacher,
    IdentityEmbedder,
    PatchCritic,
    RefinerWeights,
    flow_smoothness,
    identity_distance,
    masked_l1,
    symmetry_l1,
)
from training.runtime import cache_root, resolved_args, seed_everything
from training.train_state import load_train_state, save_train_state

__all__ = ["RefinerRun", "get_args_parser", "load_state", "main", "save_state", "train"]

log = logging.getLogger(__name__)
STATE_FORMAT = 1
#: Arguments that shape the networks: a resumed state must have been made with the same.
ARCH_ARGS = ("image_size", "width", "max_flow", "d_width", "embed_width", "embed_dim")
SIZE = 64


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the warp refiner GAN (warp-only frontaliser + U-Net)",
                                add_help=add_help)
    p.add_argument("--name", default="refiner", help="run folder under $FER_CACHE_DIR/runs")
    p.add_argument("--run-dir", type=Path, default=None, help="run folder (overrides --name)")
    p.add_argument("--resume-from", type=Path, default=None,
                   help="a state folder to resume from (a run's state/ or a committed snapshot); "
                        "default: the run's own state/ when present")
    p.add_argument("--cfp-data", default="../shared/data/cfp")
    p.add_argument("--fer-data", default="../shared/data/fer2013")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="datasets cache (default under $FER_CACHE_DIR)")
    p.add_argument("--fer-faces", type=int, default=12000,
                   help="FER2013 Training faces (a fixed seeded sample) to detect landmarks on")
    p.add_argument("--fer-val", type=int, default=300, help="near-frontal FER2013 Training faces held out")
    p.add_argument("--val-first-id", type=int, default=426, help="CFP ids from here to 450 are held out")
    p.add_argument("--near-frontal-yaw", type=float, default=20.0, help="|yaw| below this is near-frontal")
    p.add_argument("--image-size", type=int, default=SIZE, choices=[SIZE], help="output side (64 only)")
    p.add_argument("--width", type=int, default=16, help="G (U-Net) base width")
    p.add_argument("--max-flow", type=float, default=3.0, help="flow bound, output pixels")
    p.add_argument("--d-width", type=int, default=32)
    p.add_argument("--embed-width", type=int, default=32)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--steps", type=int, default=10000, help="total G steps of the run")
    p.add_argument("--step-budget", type=int, default=0, help="stop after N steps now; resume later")
    p.add_argument("--batch-size", type=int, default=32, help="G batch over the three streams")
    p.add_argument("--render-share", type=float, default=0.5, help="share of stream 1 (rotate-and-render)")
    p.add_argument("--profile-share", type=float, default=0.25, help="share of stream 2 (CFP profiles)")
    p.add_argument("--lr-g", type=float, default=2e-4)
    p.add_argument("--lr-d", type=float, default=2e-4)
    p.add_argument("--betas", type=float, nargs=2, default=(0.5, 0.999))
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--embedder-steps", type=int, default=2000,
                   help="phase 0: identity embedder steps (cosine-decayed learning rate)")
    p.add_argument("--embedder-batch", type=int, default=64)
    p.add_argument("--embedder-lr", type=float, default=1e-3)
    p.add_argument("--expression-classifier", type=Path, default=Path("results/weights/ensemble_2026-11-25"),
                   help="frozen teacher for the KL and perceptual terms (not checkpoints/default, "
                        "the evaluation classifier)")
    p.add_argument("--expression-member", type=int, default=2, help="ensemble member (-1: the whole model)")
    p.add_argument("--expr-temp", type=float, default=2.0)
    for name, value in RefinerWeights().to_dict().items():
        p.add_argument(f"--w-{name.replace('_', '-')}", type=float, default=value,
                       help=f"G loss weight ({name})")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--save-every", type=int, default=100, help="steps between state saves")
    p.add_argument("--eval-every", type=int, default=500, help="steps between selection evaluations")
    p.add_argument("--val-renders", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = default)")
    p.add_argument("--seed", type=int, default=0)
    return p


# --------------------------------------------------------------------------- networks and state


@dataclass
class RefinerRun:
    """Everything that trains, plus what the state records."""

    g: FrontalRefiner
    ema: WeightAverage
    d: PatchCritic
    embedder: IdentityEmbedder
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    generator: torch.Generator
    info: dict[str, Any]

    @staticmethod
    def build(args: argparse.Namespace, num_identities: int, generator: torch.Generator) -> RefinerRun:
        g = FrontalRefiner(default_cfg(args.image_size), width=args.width, max_flow=args.max_flow)
        d = PatchCritic(num_identities, width=args.d_width)
        emb = IdentityEmbedder(width=args.embed_width, dim=args.embed_dim)
        betas = tuple(args.betas)
        info = {"format": STATE_FORMAT, "step": 0, "wall_time_s": 0.0, "embedder_trained": False,
                "arch": {k: getattr(args, k) for k in ARCH_ARGS}, "num_identities": num_identities,
                "best": None, "baseline": None}
        return RefinerRun(g=g, ema=WeightAverage(g, args.ema_decay), d=d, embedder=emb,
                          opt_g=torch.optim.Adam(g.parameters(), lr=args.lr_g, betas=betas),
                          opt_d=torch.optim.Adam(d.parameters(), lr=args.lr_d, betas=betas),
                          generator=generator, info=info)

    def modules(self) -> dict[str, nn.Module]:
        return {"g": self.g, "g_ema": self.ema.module, "d": self.d, "embedder": self.embedder}


def _tensors(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_state(folder: Path, run: RefinerRun) -> None:
    """Write the whole state to ``folder`` (built beside it, then swapped in)."""
    folder = Path(folder)
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, module in run.modules().items():
        save_safetensors_atomically(tmp / f"{name}.safetensors", _tensors(module))
    info = {**run.info, "ema_updates": run.ema.num_updates}
    save_train_state(tmp / "opt_g", optimizer=run.opt_g, scheduler=None, generator=run.generator, info=info)
    save_train_state(tmp / "opt_d", optimizer=run.opt_d, scheduler=None, generator=run.generator, info=info)
    write_text_atomically(tmp / "state.json", json.dumps(info, indent=1) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _state_folder(folder: Path) -> Path:
    """``folder``, or the previous state when a save was cut off between its two renames."""
    if (folder / "state.json").is_file():
        return folder
    old = folder.with_name(f".{folder.name}.old")
    if (old / "state.json").is_file():
        log.warning("%s is incomplete; resuming from the previous state %s", folder, old)
        return old
    raise CheckpointError(f"no refiner state in {folder} (expected state.json and *.safetensors)")


def load_state(folder: Path, run: RefinerRun) -> dict[str, Any]:
    """Restore a state written by :func:`save_state` into ``run``; return its info.

    Raises:
        CheckpointError: missing or corrupt files, or networks of another shape.
    """
    folder = _state_folder(Path(folder))
    try:
        info = json.loads((folder / "state.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{folder / 'state.json'} is unreadable: {e}") from e
    if info.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{folder}: state format {info.get('format')!r}, expected {STATE_FORMAT}")
    if info["arch"] != run.info["arch"] or info["num_identities"] != run.info["num_identities"]:
        raise CheckpointError(f"{folder} was made with {info['arch']} and {info['num_identities']} ids; "
                              f"this run has {run.info['arch']} and {run.info['num_identities']}")
    for name, module in run.modules().items():
        path = folder / f"{name}.safetensors"
        try:
            module.load_state_dict(load_file(str(path)))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot load ({e})") from e
    load_train_state(folder / "opt_d", optimizer=run.opt_d, scheduler=None, generator=run.generator)
    load_train_state(folder / "opt_g", optimizer=run.opt_g, scheduler=None, generator=run.generator)
    run.ema.num_updates = int(info.pop("ema_updates"))
    run.info = info
    return info


def state_size(folder: Path) -> int:
    """Bytes on disk of a state folder."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


# --------------------------------------------------------------------------- phase 0: identity embedder


def _unit(x: Tensor) -> Tensor:
    return x / 127.5 - 1.0


def _augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Flip, shift by up to 2 px and change contrast/brightness (``[-1, 1]`` images)."""
    n = x.shape[0]
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    shift = torch.randint(-2, 3, (2,), generator=g).tolist()
    x = torch.roll(F.pad(x, (2, 2, 2, 2), mode="replicate"), shifts=shift, dims=(2, 3))[..., 2:-2, 2:-2]
    a = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)
    b = 0.2 * torch.rand(n, 1, 1, 1, generator=g) - 0.1
    return (x * a + b).clamp(-1, 1)


def _train_faces(data: RefinerData, warp: MeshWarp) -> tuple[Tensor, Tensor]:
    """Phase 0's faces: CFP training-id frontals aligned and profiles warp-frontalised, ``[-1, 1]``."""
    fr = data.frontal.subset(data.frontal.identity >= 0)
    pr = data.profile
    frontal = _unit(aligned_targets(warp, fr.images, fr.landmarks))
    profile = _unit(torch.from_numpy(warp.frontalize(pr.images.numpy(), pr.landmarks))[:, None].float())
    return torch.cat([frontal, profile]), torch.cat([fr.identity, pr.identity])


def train_embedder(run: RefinerRun, data: RefinerData, warp: MeshWarp,
                   args: argparse.Namespace) -> dict[str, float]:
    """Train the identity embedder with a CosFace head on CFP training ids; leave it frozen."""
    faces, labels = _train_faces(data, warp)
    emb, g = run.embedder, run.generator
    head = CosFaceHead(emb.dim, data.num_identities)
    opt = torch.optim.Adam([*emb.parameters(), *head.parameters()], lr=args.embedder_lr)
    total = max(1, args.embedder_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
    emb.train().requires_grad_(True)
    started, sums, count, row = time.perf_counter(), defaultdict(float), 0, {}
    for step in range(1, args.embedder_steps + 1):
        idx = torch.randint(len(faces), (args.embedder_batch,), generator=g)
        x, y = _augment(faces[idx], g), labels[idx]
        logits = head(emb(x), y)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        sums["loss"] += loss.item()
        sums["acc"] += (logits.argmax(1) == y).float().mean().item()
        count += 1
        if step % args.log_every == 0 or step == args.embedder_steps:
            row = {k: v / count for k, v in sums.items()}
            log.info("embedder %d/%d: loss %.3f acc %.3f (%.2f s/step)", step, args.embedder_steps,
                     row["loss"], row["acc"], (time.perf_counter() - started) / step)
            sums.clear()
            count = 0
    emb.eval().requires_grad_(False)
    run.info["embedder_trained"] = True
    return {**row, "s_per_step": (time.perf_counter() - started) / max(1, args.embedder_steps)}


@torch.no_grad()
def centroids(embedder: IdentityEmbedder, faces: Tensor, labels: Tensor, num: int) -> Tensor:
    """Per class, the normalised mean embedding of its faces (``[-1, 1]`` images)."""
    emb = torch.cat([embedder(c) for c in faces.split(256)]) if len(faces) else torch.zeros(0, embedder.dim)
    out = torch.zeros(num, embedder.dim).index_add_(0, labels, emb)
    return F.normalize(out, dim=1)


# --------------------------------------------------------------------------- one step


@dataclass
class StepContext:
    """What a step needs besides the run."""

    streams: RefinerStreams
    warp: MeshWarp
    teacher: ExpressionTeacher
    centroids: Tensor  # (K, D) per training id
    weights: RefinerWeights
    sizes: tuple[int, int, int]  # render, profile, frontal
    temperature: float


def _alpha(warp: MeshWarp) -> Tensor:
    return torch.from_numpy(warp.raster.alpha)[None, None]


def train_step(run: RefinerRun, ctx: StepContext) -> dict[str, float]:
    """One D step on detached fakes, then one G step; returns the named losses."""
    n1, n2, n3 = ctx.sizes
    w, warp = ctx.weights, ctx.warp
    batches = [ctx.streams.render(n1), ctx.streams.profiles(n2), ctx.streams.frontals(n3)]
    src = torch.cat([b.src for b in batches])
    fields = warp.fields(np.concatenate([b.landmarks for b in batches]))
    run.g.train()
    out = run.g.refine(src, fields, warp)
    fake = _unit(out.faces)
    adv_fake = fake[:n1 + n2]

    # D: real frontals (CFP + FER2013, aligned) against the fakes of streams 1 and 2; pose and
    # identity heads on real frontals and real CFP profiles
    real, real_id = ctx.streams.real_frontals(n1 + n2)
    prof, prof_pose, prof_id = ctx.streams.real_profiles(max(1, n2))
    d_real, d_fake, d_prof = run.d(real), run.d(adv_fake.detach()), run.d(prof)
    pose_logits = torch.cat([d_real.pose, d_prof.pose])
    pose_true = torch.cat([torch.zeros(len(real), dtype=torch.long), prof_pose])
    id_logits, id_true = torch.cat([d_real.identity, d_prof.identity]), torch.cat([real_id, prof_id])
    has_id = id_true >= 0
    d_adv = d_hinge(d_real.patches, d_fake.patches)
    d_pose = F.cross_entropy(pose_logits, pose_true)
    d_id = F.cross_entropy(id_logits[has_id], id_true[has_id]) if has_id.any() else d_adv.new_zeros(())
    run.opt_d.zero_grad(set_to_none=True)
    (d_adv + d_pose + d_id).backward()
    run.opt_d.step()

    # G
    run.d.requires_grad_(False)
    critic = run.d(adv_fake)
    run.d.requires_grad_(True)
    rows_t = torch.cat([torch.arange(n1), torch.arange(n1 + n2, n1 + n2 + n3)])
    target = _unit(torch.cat([batches[0].target, batches[2].target]))
    fake_t = fake[rows_t]
    alpha = _alpha(warp)
    l1 = masked_l1(fake_t, target, 0.9 * alpha + 0.1)
    with torch.no_grad():
        t_logits, t_feats = ctx.teacher(target)
        emb_target = run.embedder(target)
    f_logits, f_feats = ctx.teacher(fake_t)
    perceptual = ctx.teacher.perceptual(f_feats, t_feats)
    expr = ctx.teacher.kl(f_logits, t_logits, ctx.temperature)
    emb_fake = run.embedder(fake)
    prof_ids = batches[1].identity
    known = prof_ids >= 0
    ident = identity_distance(emb_fake[rows_t], emb_target)
    if known.any():
        ident = ident + identity_distance(emb_fake[n1:n1 + n2][known], ctx.centroids[prof_ids[known]])
    g_adv = -critic.patches.mean()
    g_pose = F.cross_entropy(critic.pose, torch.zeros(n1 + n2, dtype=torch.long))
    g_did = F.cross_entropy(critic.identity[n1:][known], prof_ids[known]) if known.any() else l1.new_zeros(())
    sym = symmetry_l1(fake[n1:n1 + n2], alpha) if n2 else l1.new_zeros(())
    tv = flow_smoothness(out.flow)
    mask = out.mask.mean()
    loss = (w.l1 * l1 + w.perceptual * perceptual + w.expr * expr + w.identity * ident + w.adv * g_adv
            + w.pose * g_pose + w.d_identity * g_did + w.symmetry * sym + w.flow_tv * tv + w.mask * mask)
    run.opt_g.zero_grad(set_to_none=True)
    loss.backward()
    run.opt_g.step()
    run.ema.update(run.g)
    agree = (f_logits.argmax(1) == t_logits.argmax(1)).float().mean()
    return {"d_adv": d_adv.item(), "d_pose": d_pose.item(), "d_id": d_id.item(),
            "d_real": d_real.patches.mean().item(), "d_fake": d_fake.patches.mean().item(),
            "g_loss": loss.item(), "g_l1": l1.item(), "g_perc": perceptual.item(), "g_expr": expr.item(),
            "g_id": ident.item(), "g_adv": g_adv.item(), "g_pose": g_pose.item(), "g_did": g_did.item(),
            "g_sym": sym.item(), "g_tv": tv.item(), "g_mask": mask.item(), "expr_agree": agree.item(),
            "flow_abs": out.flow.abs().mean().item()}


# --------------------------------------------------------------------------- selection


@torch.no_grad()
def _refine(model: FrontalRefiner, batch: StreamBatch, warp: MeshWarp, chunk: int = 128) -> Tensor:
    model.eval()
    outs = []
    for s in range(0, len(batch), chunk):
        fields = warp.fields(batch.landmarks[s:s + chunk])
        outs.append(_unit(model.refine(batch.src[s:s + chunk], fields, warp).faces))
    return torch.cat(outs)


@torch.no_grad()
def evaluate_selection(model: FrontalRefiner, val: ValSet, warp: MeshWarp, teacher: ExpressionTeacher,
                       embedder: IdentityEmbedder) -> dict[str, float]:
    """Selection metrics on held-out training data; ``score`` = profile identity cosine + teacher
    agreement on FER2013 renders - masked L1 on all renders."""
    alpha = _alpha(warp)
    out = {}
    fake = _refine(model, val.render, warp)
    target = _unit(val.render.target)
    out["render_l1"] = masked_l1(fake, target, alpha).item()
    t_pred, f_pred = teacher(target)[0].argmax(1), teacher(fake)[0].argmax(1)
    fer = val.render_is_fer
    out["render_fer_agree"] = (t_pred == f_pred)[fer].float().mean().item() if fer.any() else float("nan")
    out["render_id_cos"] = 1 - identity_distance(embedder(fake), embedder(target)).item()
    fake_f = _refine(model, val.frontal_fer, warp)
    out["frontal_fer_l1"] = masked_l1(fake_f, _unit(val.frontal_fer.target), alpha).item()
    persons = torch.unique(val.frontal_cfp_person)
    if len(val.profile) and len(persons):
        lookup = {int(p): i for i, p in enumerate(persons.tolist())}
        labels = torch.tensor([lookup[int(p)] for p in val.frontal_cfp_person.tolist()])
        cent = centroids(embedder, _unit(val.frontal_cfp), labels, len(persons))
        keep = torch.tensor([int(p) in lookup for p in val.profile.person.tolist()])
        prof = _refine(model, val.profile, warp)[keep]
        rows = torch.tensor([lookup[int(p)] for p in val.profile.person[keep].tolist()])
        out["profile_id_cos"] = 1 - identity_distance(embedder(prof), cent[rows]).item()
    else:
        out["profile_id_cos"] = float("nan")
    agree = 0.0 if math.isnan(out["render_fer_agree"]) else out["render_fer_agree"]
    pid = 0.0 if math.isnan(out["profile_id_cos"]) else out["profile_id_cos"]
    out["score"] = pid + agree - out["render_l1"]
    return out


# --------------------------------------------------------------------------- the loop


def _sizes(args: argparse.Namespace) -> tuple[int, int, int]:
    n1 = max(1, round(args.batch_size * args.render_share))
    n2 = max(1, round(args.batch_size * args.profile_share))
    n3 = max(1, args.batch_size - n1 - n2)
    return n1, n2, n3


def _trim_log(path: Path, step: int) -> None:
    """Drop log rows after ``step`` (written after the state a resume starts from)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def _append(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def _export(run_dir: Path, stem: str, run: RefinerRun, args: argparse.Namespace,
            metrics: dict[str, Any]) -> Path:
    """The EMA G as a ``frontal_refiner`` checkpoint (safetensors + card)."""
    return save_checkpoint(run_dir / stem, run.ema.module, arch=REFINER_ARCH,
                           model_kwargs={"width": args.width, "max_flow": args.max_flow},
                           train_args=resolved_args(args), metrics=metrics,
                           extra={"steps_trained": run.info["step"],
                                  "wall_time_s": round(run.info["wall_time_s"], 1),
                                  "weights_are": "EMA of G", "train_ids": "CFP 001-425, FER2013 Training",
                                  "selection_data": "CFP ids 426-450 and held-out FER2013 Training faces"})


def train(args: argparse.Namespace, data: RefinerData, teacher_model: nn.Module,
          run_dir: Path) -> dict[str, Any]:
    """Train (or resume) the refiner in ``run_dir``; return the last log row."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    generator = seed_everything(args.seed)
    warp = MeshWarp(args.image_size)
    renderer = RotateRenderer(warp)
    run = RefinerRun.build(args, data.num_identities, generator)
    state_dir = run_dir / "state"
    source = args.resume_from or (state_dir if (state_dir / "state.json").is_file()
                                  or state_dir.with_name(".state.old").is_dir() else None)
    if source is not None:
        load_state(source, run)
        log.info("resumed from %s at step %d", source, run.info["step"])
    _trim_log(run_dir / "losses.jsonl", run.info["step"])
    _trim_log(run_dir / "selection.jsonl", run.info["step"])
    write_text_atomically(run_dir / "args.json", json.dumps(resolved_args(args), indent=2) + "\n")
    log.info("%s", data.describe())
    log.info("G %d params, D %d, embedder %d; run folder %s", *(sum(p.numel() for p in m.parameters())
                                                            for m in (run.g, run.d, run.embedder)), run_dir)

    if not run.info["embedder_trained"]:
        run.info["embedder"] = train_embedder(run, data, warp, args)
        save_state(state_dir, run)
    run.embedder.eval().requires_grad_(False)
    teacher = ExpressionTeacher(teacher_model)
    faces, labels = _train_faces(data, warp)
    frontal_rows = torch.arange(int((data.frontal.identity >= 0).sum()))
    cent = centroids(run.embedder, faces[frontal_rows], labels[frontal_rows], data.num_identities)
    ctx = StepContext(streams=RefinerStreams(data, warp, renderer, generator), warp=warp, teacher=teacher,
                      centroids=cent, weights=RefinerWeights(**{k: getattr(args, f"w_{k}") for k in
                                                                 RefinerWeights().to_dict()}),
                      sizes=_sizes(args), temperature=args.expr_temp)
    val = ValSet.build(data, warp, renderer, renders=args.val_renders)
    if run.info["baseline"] is None:  # step 0: G is warp-only
        run.info["baseline"] = evaluate_selection(run.g, val, warp, teacher, run.embedder)
        log.info("warp-only baseline on the selection set: %s", _fmt(run.info["baseline"]))

    step = run.info["step"]
    end = args.steps if args.step_budget <= 0 else min(args.steps, step + args.step_budget)
    wall0, started = run.info["wall_time_s"], time.perf_counter()
    sums: dict[str, float] = defaultdict(float)
    count, t0, row = 0, time.perf_counter(), {}
    while step < end:
        for k, v in train_step(run, ctx).items():
            sums[k] += v
        step += 1
        count += 1
        run.info["step"] = step
        run.info["wall_time_s"] = wall0 + time.perf_counter() - started
        if step % args.log_every == 0 or step == end:
            row = {"step": step, **{k: v / count for k, v in sorted(sums.items())},
                   "s_per_step": (time.perf_counter() - t0) / count}
            _append(run_dir / "losses.jsonl", row)
            log.info("step %d/%d: g %.3f (l1 %.3f id %.3f expr %.3f agree %.2f) d_adv %.3f flow %.2f px "
                     "mask %.3f | %.2f s/step", step, args.steps, row["g_loss"], row["g_l1"], row["g_id"],
                     row["g_expr"], row["expr_agree"], row["d_adv"], row["flow_abs"], row["g_mask"],
                     row["s_per_step"])
            sums.clear()
            count, t0 = 0, time.perf_counter()
        if step % args.eval_every == 0 or step == end:
            metrics = evaluate_selection(run.ema.module, val, warp, teacher, run.embedder)
            _append(run_dir / "selection.jsonl", {"step": step, **metrics})
            log.info("selection at step %d: %s (warp-only %.4f)", step, _fmt(metrics),
                     run.info["baseline"]["score"])
            card = {"selection (held-out training data)": metrics, "warp_only_baseline": run.info["baseline"]}
            best = run.info["best"]
            if best is None or metrics["score"] > best["score"]:
                run.info["best"] = {"step": step, **metrics}
                _export(run_dir, "best", run, args, card)
            _export(run_dir, "last", run, args, card)
        if step % args.save_every == 0 or step == end:
            save_state(state_dir, run)
    if step >= args.steps:
        _export(run_dir, "final", run, args, {"selection (held-out training data)": run.info["best"],
                                              "warp_only_baseline": run.info["baseline"]})
        log.info("finished %d steps; best step %s; wrote %s", step, (run.info["best"] or {}).get("step"),
                 run_dir / "final.safetensors")
    log.info("state %s: %.1f MB", state_dir, state_size(_state_folder(state_dir)) / 1e6)
    return row


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())


# --------------------------------------------------------------------------- the command


def _check_teacher(path: Path) -> None:
    """The teacher must not be the evaluation classifier (``checkpoints/default``)."""
    if weights_path(path).resolve() == weights_path(Path("checkpoints/default")).resolve():
        raise ValueError("--expression-classifier must not be checkpoints/default: it grades the result")


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Load CFP and FER2013 with their landmarks (cached), the teacher, then :func:`train`."""
    from training.data._cache import default_cache_dir
    from training.data.cfp import load_cfp
    from training.data.fer2013 import load_fer2013
    from training.gan.expression import load_expression_classifier, refuse_grader_as_teacher

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device != "cpu":
        raise ValueError("the refiner trains on the CPU (the warp's pose fit and the renderer are numpy/CPU)")
    _check_teacher(args.expression_classifier)
    member = None if args.expression_member < 0 else args.expression_member
    teacher = load_expression_classifier(args.expression_classifier, member=member)
    refuse_grader_as_teacher(teacher, "checkpoints/default")
    run_dir = args.run_dir or cache_root() / "runs" / args.name
    cache = args.cache_dir or default_cache_dir()
    detector = None

    def get_detector() -> Any:
        nonlocal detector
        if detector is None:
            from facemodels.face.detector import RetinaFaceDetector  # the serving detector

            detector = RetinaFaceDetector.from_cache(cache_root(), score_threshold=0.5, max_side=320)
        return detector

    cfp = load_cfp(args.cfp_data, size=args.image_size, cache_dir=cache).split("train")
    cfp_lm = cached_cfp_landmarks(cfp, get_detector, cache)
    fer = load_fer2013(args.fer_data, cache_dir=cache).split("Training")
    order = torch.randperm(len(fer), generator=torch.Generator().manual_seed(0))
    wanted = order[:args.fer_faces].sort().values
    fer_lm = cached_fer_landmarks(fer.images.numpy(), wanted.numpy(), get_detector, cache, fer.fingerprint)
    data = build_refiner_data(cfp, cfp_lm, fer.images, fer_lm, val_ids=range(args.val_first_id, 451),
                              fer_val=args.fer_val, near_frontal_yaw=args.near_frontal_yaw, seed=0)
    return train(args, data, teacher, run_dir)
