"""``fer-train eval-frontalizer``: identity preservation, expression preservation, accuracy per yaw.

Prints one table and writes the numbers as JSON (and, with ``--update-card``, into the
frontaliser's card), plus a sample sheet (profile | frontalised | real frontal, CFP ids
451-500) for ``docs/``:

1. Identity (CFP eval ids 451-500, :mod:`training.gan.identity`): ROC AUC and TAR at FAR 1% of
   frontal-profile pairs scored by dlib's face recogniser, with the raw profile crop and with
   the frontalised one; also D_p's pose accuracy on those photos.
2. Expression preservation (FER2013 PublicTest, first ``--limit`` faces): classifier accuracy
   on the original faces and on frontalised ones, and how often the two predictions agree.
3. Accuracy per estimated |yaw| bin, with and without frontalising; ``frontalize_helps`` in
   the JSON lists the bins where it raised accuracy beyond chance (more faces fixed than
   broken, one-sided exact McNemar p < 0.05): what the service's ``auto`` policy uses.

``--yaw-check`` also runs the detector on the raw CFP eval photos and reports the yaw
estimate per pose class, validating :func:`facemodels.face.pose.estimate_yaw`.

``--warp-only`` evaluates the warp-only baseline (:mod:`facemodels.frontalizer.warp`, no
checkpoint) with the same metrics and inputs (:mod:`training.gan.warp_eval`), plus its pose fit
on CFP. Identity also reports CFP's frontal-frontal fold 10 (both photos frontalised), where
the protocol files are present.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from facemodels.checkpoint import load_checkpoint, update_card
from facemodels.device import resolve_device
from facemodels.face.pose import estimate_yaw
from facemodels.frontalizer.model import Frontalizer, default_cfg, frontalize_faces
from facemodels.frontalizer.warp import MeshWarp
from facemodels.predict import predict_probs
from training.data.aligned_views import align_views, detect_face_landmarks
from training.data.cfp import CfpDataset, load_cfp
from training.gan.fer_eval import FerFrontaliser, FerResult, evaluate_fer, gan_fer_frontaliser
from training.gan.identity import (
    DlibEmbedder,
    Embedder,
    all_pairs,
    protocol_pairs,
    roc_auc,
    tar_at_far,
    verification_scores,
)
from training.gan.sheets import pick_sheet_rows, write_sheet
from training.gan.warp_eval import WarpFrontaliser, cfp_crop_landmarks, pose_fit_summary
from training.runtime import cache_root

__all__ = ["CfpFrontaliser", "evaluate_identity", "get_args_parser", "main", "yaw_check"]

log = logging.getLogger(__name__)
Row = tuple[str, str, str, str]
#: CFP crops -> uint8 ``(N, S, S)`` frontal faces in the same framing.
CfpFrontaliser = Callable[[CfpDataset], Tensor]
WARP_OUTPUT = Path("runs/warp_only_eval.json")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate the frontaliser (identity, expression, yaw)",
                                add_help=add_help)
    p.add_argument("checkpoint", type=Path, nargs="?", default=Path("runs/frontalizer/final"))
    p.add_argument("--warp-only", action="store_true",
                   help="evaluate the warp-only baseline (facemodels.frontalizer.warp) instead of a "
                        "checkpoint (the checkpoint argument is ignored)")
    p.add_argument("--data", default="../shared/data/cfp", help="CFP folder")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--classifier", type=Path, default=Path("checkpoints/default"),
                   help="expression classifier checkpoint")
    p.add_argument("--fer-data", default="../shared/data/fer2013")
    p.add_argument("--limit", type=int, default=1000,
                   help="a seeded random sample of N FER2013 PublicTest faces (0 = all 3589)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit sample")
    p.add_argument("--skip-identity", action="store_true")
    p.add_argument("--skip-fer", action="store_true")
    p.add_argument("--yaw-check", action="store_true", help="validate the yaw estimate on raw CFP photos")
    p.add_argument("--sheet", type=Path, default=None,
                   help="profile | frontalised | real frontal (default docs/frontalizer_samples.png, "
                        "with --warp-only docs/frontalizer_warp_samples.png)")
    p.add_argument("--fer-sheet", type=Path, default=None,
                   help="FER2013 original | frontaliser input | frontalised (default "
                        "docs/frontalizer_fer_samples.png, with --warp-only "
                        "docs/frontalizer_warp_fer_samples.png)")
    p.add_argument("--sample-count", type=int, default=8)
    p.add_argument("--output", type=Path, default=None,
                   help=f"JSON (default: beside the checkpoint; with --warp-only {WARP_OUTPUT})")
    p.add_argument("--update-card", action="store_true", help="store the metrics in the checkpoint card")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    return p


def evaluate_identity(model: Frontalizer | CfpFrontaliser, data_root: Path, frontal: CfpDataset,
                      profile: CfpDataset, embedder: Embedder) -> dict[str, Any]:
    """AUC and TAR@FAR=1% of frontal-profile pairs, raw vs frontalised profile crops.

    ``model`` is the GAN or any :data:`CfpFrontaliser` (the warp-only baseline). Where CFP's
    frontal-frontal protocol is present, its fold 10 is scored too, raw and with both photos
    frontalised.
    """
    if isinstance(model, Frontalizer):
        gan = model

        def run(d: CfpDataset) -> Tensor:
            return frontalize_faces(gan, d.images, out_size=gan.cfg.image_size)
    else:
        run = model
    front_emb = embedder.embed(frontal.images.numpy())
    raw_emb = embedder.embed(profile.images.numpy())
    fake_emb = embedder.embed(run(profile).numpy())
    # name -> (pairs, same, {label: (first member's embeddings, second member's)})
    pair_sets = {}
    for name, (pairs, same) in (
            ("FP fold 10", protocol_pairs(data_root, list(frontal.paths), list(profile.paths))),
            ("all F x P pairs", all_pairs(frontal.identity.numpy(), profile.identity.numpy()))):
        pair_sets[name] = (pairs, same, {"raw": (front_emb, raw_emb), "frontalised": (front_emb, fake_emb)})
    if (data_root / "Protocol" / "Split" / "FF").is_dir():
        pairs, same = protocol_pairs(data_root, list(frontal.paths), list(frontal.paths), split="FF")
        ff_emb = embedder.embed(run(frontal).numpy())
        pair_sets["FF fold 10"] = (pairs, same, {"raw": (front_emb, front_emb),
                                                 "frontalised": (ff_emb, ff_emb)})
    result: dict[str, Any] = {"embedder": embedder.name}
    for name, (pairs, same, variants) in pair_sets.items():
        entry = {"same": int(same.sum()), "different": int((~same).sum())}
        for label, (a, b) in variants.items():
            s = verification_scores(a, b, pairs)
            entry[label] = {"auc": roc_auc(s, same), "tar_at_far_1pct": tar_at_far(s, same, 0.01)}
        result[name] = entry
    return result


def yaw_check(data: CfpDataset, detector: Any) -> dict[str, dict[str, float]]:
    """Yaw estimates from the detector on the raw photos of ``data``, per pose class."""
    root = Path(data.source)
    yaws = np.full(len(data), np.nan)
    for i, rel in enumerate(data.paths):
        img = cv2.imread(str(root / rel))
        if img is None:
            continue
        dets = detector.detect([cv2.cvtColor(img, cv2.COLOR_BGR2RGB)])[0]
        if dets:
            yaws[i] = estimate_yaw(np.asarray(dets[0].landmarks))
    out = {}
    for cls, name in enumerate(("frontal", "left_profile", "right_profile")):
        y = yaws[(data.pose == cls).numpy()]
        found = y[~np.isnan(y)]
        if not len(found):
            continue
        p5, p50, p95 = np.percentile(found, [5, 50, 95])
        out[name] = {"n": len(y), "found": len(found), "p5": p5, "median": p50, "p95": p95,
                     "abs_lt_15": float((np.abs(found) < 15).mean()),
                     "abs_ge_45": float((np.abs(found) >= 45).mean())}
    return out


def _aligned_control(res: FerResult, classifier: torch.nn.Module, faces: Tensor,
                     landmarks: list[np.ndarray | None]) -> FerResult:
    """``res`` with its frontalised faces replaced by the plain 2D alignment of the originals
    (the service's classifier crop; unchanged where no landmarks): separates what the warp
    does from what the change of framing does."""
    aligned = torch.from_numpy(align_views(faces.numpy(), landmarks))
    pred = predict_probs(classifier, aligned).argmax(1)
    return dataclasses.replace(res, pred_front=pred, frontalised=aligned)


def _fmt(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.4f}"


def _print_table(title: str, rows: list[Row]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(4)]

    def line(r: Row) -> str:
        cells = zip(r, widths, strict=True)
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))

    lines = [title, line(rows[0])]
    lines.append("-" * len(lines[-1]))
    lines += [line(r) for r in rows[1:]]
    print("\n".join(lines))


@dataclasses.dataclass
class _Subject:
    """The frontaliser under evaluation (the GAN or the warp-only baseline), as ``main`` uses it."""

    label: str  # its column in the table
    title: str  # the table's title
    sheet: Path  # CFP sample sheet: profile | frontalised | real frontal
    sheet_title: str
    cfp_header: tuple[str, str, str]
    fer_sheet: Path  # FER2013 sample sheet: original | input | frontalised
    fer_header: tuple[str, str, str]
    agreement_label: str  # the table row of the FER prediction agreement
    output: Path  # default JSON path
    cfp: CfpDataset  # CFP evaluation ids, framed at the frontaliser's input size
    cfp_run: CfpFrontaliser
    fer_run: FerFrontaliser
    results: dict[str, Any]  # the JSON so far (what the setup measured) ...
    rows: list[Row]  # ... and its table rows
    card: dict[str, Any] | None = None  # the checkpoint's card, for --update-card
    aligned_control: bool = False  # also report the FER faces only 2D-aligned (no warp)


def _cfp_eval(args: argparse.Namespace, size: int) -> CfpDataset:
    cfp = load_cfp(args.data, size=size, cache_dir=args.cache_dir).split("eval")
    if len(cfp) == 0:
        raise ValueError(f"{args.data}: no evaluation ids (451-500)")
    return cfp


def _gan_setup(args: argparse.Namespace, device: torch.device) -> _Subject:
    """The GAN checkpoint ``args.checkpoint``, and D_p's pose accuracy on the CFP eval photos."""
    model, card = load_checkpoint(args.checkpoint, device=device)
    if card["arch"] != "frontalizer":
        raise ValueError(f"{args.checkpoint} is a {card['arch']!r}, not a frontalizer")
    gan: Frontalizer = model
    size = gan.cfg.image_size
    cfp = _cfp_eval(args, size)

    def cfp_run(d: CfpDataset) -> Tensor:
        return frontalize_faces(gan, d.images, out_size=size)

    with torch.inference_mode():
        pose_pred = gan.pose_logits(gan.preprocess(cfp.images)).argmax(1).cpu()
    pose_acc = float((pose_pred == cfp.pose).float().mean())
    steps = card.get("steps_trained")
    return _Subject(
        label="with frontaliser", title=f"Frontaliser {args.checkpoint} ({steps} steps)",
        sheet=args.sheet or Path("docs/frontalizer_samples.png"),
        sheet_title=f"{args.checkpoint.name}, {steps} steps: CFP ids 451-500",
        cfp_header=("profile in", "frontalised", "real frontal"),
        fer_sheet=args.fer_sheet or Path("docs/frontalizer_fer_samples.png"),
        fer_header=("FER original", "frontaliser input", "frontalised"),
        agreement_label="FER agreement original vs frontalised",
        output=Path(str(args.checkpoint) + "_eval.json"),
        cfp=cfp, cfp_run=cfp_run, fer_run=gan_fer_frontaliser(gan),
        results={"checkpoint": str(args.checkpoint), "steps_trained": steps, "cfp_pose_accuracy": pose_acc},
        rows=[("CFP 451-500 D_p pose accuracy", _fmt(pose_acc), "", str(len(cfp)))], card=card)


def _warp_setup(args: argparse.Namespace, get_detector: Callable[[], Any]) -> _Subject:
    """The warp-only baseline at the GAN's input size, with the detector's landmarks on the CFP
    eval photos and its pose fit there."""
    if args.update_card:
        raise ValueError("--update-card stores metrics in a checkpoint's card; --warp-only has none")
    size = default_cfg().image_size
    cfp = _cfp_eval(args, size)
    warp = MeshWarp(size)
    landmarks = cfp_crop_landmarks(cfp, get_detector())
    found = int(np.isfinite(landmarks).all((1, 2)).sum())
    wf = WarpFrontaliser(warp, dict(zip(cfp.paths, landmarks, strict=True)))
    fit = pose_fit_summary(warp, cfp, landmarks)
    rows: list[Row] = [("CFP 451-500 photos with landmarks", "", f"{found}", str(len(cfp)))]
    for cls, v in fit.items():
        spread = f"{v['yaw_p5']:.0f}/{v['yaw_median']:.0f}/{v['yaw_p95']:.0f}"
        rows.append((f"warp fit {cls} yaw p5/median/p95", "", spread, f"{v['found']}/{v['n']}"))
        rows.append((f"warp fit {cls} rms / eye-mouth", "", f"{v['rms_over_eye_mouth_median']:.3f}",
                     f"{v['found']}/{v['n']}"))
    return _Subject(
        label="warp-only", title="Warp-only baseline (facemodels.frontalizer.warp)",
        sheet=args.sheet or Path("docs/frontalizer_warp_samples.png"),
        sheet_title="warp-only (no learning): CFP ids 451-500",
        cfp_header=("profile in", "warp-only", "real frontal"),
        fer_sheet=args.fer_sheet or Path("docs/frontalizer_warp_fer_samples.png"),
        fer_header=("FER original", "warp input", "warp-only"),
        agreement_label="FER agreement original vs warped", output=WARP_OUTPUT,
        cfp=cfp, cfp_run=wf.cfp, fer_run=wf.fer,
        results={"frontaliser": "warp-only", "method": "facemodels.frontalizer.warp.MeshWarp",
                 "warp": {"size": size, "mesh_y_scale": warp.y_scale, "pose_fit": fit,
                          "cfp_landmarks_found": found, "cfp_photos": len(cfp)}},
        rows=rows, aligned_control=True)


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    detector = None

    def get_detector() -> Any:
        nonlocal detector
        if detector is None:
            from facemodels.face.detector import RetinaFaceDetector  # the serving detector

            detector = RetinaFaceDetector.from_cache(cache_root(), score_threshold=0.5, max_side=320,
                                                     device=device)
        return detector

    subject = _warp_setup(args, get_detector) if args.warp_only else _gan_setup(args, device)
    cfp, results = subject.cfp, subject.results
    frontal, profile = cfp.subset(cfp.pose == 0), cfp.subset(cfp.pose != 0)
    rows: list[Row] = [("metric", "without", subject.label, "n"), *subject.rows]

    p_idx, f_idx = pick_sheet_rows(cfp, args.sample_count)
    write_sheet(subject.sheet, cfp.images[p_idx], subject.cfp_run(cfp.subset(p_idx)), cfp.images[f_idx],
                title=subject.sheet_title, header=subject.cfp_header)

    if not args.skip_identity:
        ident = evaluate_identity(subject.cfp_run, Path(cfp.source), frontal, profile, DlibEmbedder())
        results["identity"] = ident
        for pair_name in ("FP fold 10", "all F x P pairs", "FF fold 10"):
            if pair_name not in ident:
                continue
            e = ident[pair_name]
            n = f"{e['same']}+/{e['different']}-"
            raw, fr = e["raw"], e["frontalised"]
            rows.append((f"identity {pair_name}: ROC AUC", _fmt(raw["auc"]), _fmt(fr["auc"]), n))
            rows.append((f"identity {pair_name}: TAR@FAR=1%", _fmt(raw["tar_at_far_1pct"]),
                         _fmt(fr["tar_at_far_1pct"]), n))

    if not args.skip_fer:
        from training.data.fer2013 import load_fer2013

        classifier, ccard = load_checkpoint(args.classifier, device=device)
        fer = load_fer2013(args.fer_data, cache_dir=args.cache_dir).split("PublicTest")
        n = len(fer) if args.limit <= 0 else min(args.limit, len(fer))
        # PublicTest is stored class by class: a prefix would hold only the first classes.
        pick = torch.randperm(len(fer), generator=torch.Generator().manual_seed(args.seed))[:n].sort().values
        faces, labels = fer.images[pick], fer.labels[pick]
        fer_landmarks = detect_face_landmarks(faces.numpy(), get_detector())
        res = evaluate_fer(subject.fer_run, classifier, faces, labels, fer_landmarks)
        k = min(args.sample_count, n)
        write_sheet(subject.fer_sheet, faces[:k], res.inputs[:k], res.frontalised[:k], scale=3,
                    header=subject.fer_header, title="FER2013 PublicTest")
        discordant = res.discordant()
        bins = {bin_name: {"n": k, "acc": a, "acc_frontalised": b, "fixed": discordant[bin_name][0],
                           "broke": discordant[bin_name][1], "mcnemar_p": discordant[bin_name][2]}
                for bin_name, k, a, b in res.rows()}
        results["fer"] = {"classifier": str(args.classifier), "classifier_arch": ccard["arch"],
                          "split": "PublicTest", "faces": n, "sample_seed": args.seed,
                          "agreement": res.agreement, "bins": bins,
                          "frontalize_helps": [r.to_json() for r in res.helps()],
                          "helps_rule": "McNemar one-sided p < 0.05"}
        for bin_name, k, a, b in res.rows():
            row_label = "FER PublicTest accuracy" if bin_name == "all" else f"  |yaw| {bin_name}"
            rows.append((row_label, _fmt(a), _fmt(b), str(k)))
        rows.append((subject.agreement_label, "", _fmt(res.agreement), str(n)))
        if subject.aligned_control:  # the warp's output framing without the 3D warp
            control = _aligned_control(res, classifier, faces, fer_landmarks)
            results["fer"]["aligned_control"] = {
                "what": "the same faces 2D-aligned to the FER template (align_face, as served), no warp",
                "agreement": control.agreement,
                "bins": {b: {"n": k, "acc": acc} for b, k, _, acc in control.rows()}}
            for bin_name, k, _, acc in control.rows():
                row_label = ("FER 2D-aligned only (control) accuracy" if bin_name == "all"
                             else f"  2D-aligned |yaw| {bin_name}")
                rows.append((row_label, "", _fmt(acc), str(k)))
    if args.yaw_check:
        yc = yaw_check(cfp, get_detector())
        results["yaw_check"] = yc
        for cls_name, v in yc.items():
            spread = f"{v['p5']:.0f}/{v['median']:.0f}/{v['p95']:.0f}"
            rows.append((f"CFP {cls_name} yaw p5/median/p95", spread, "", f"{v['found']}/{v['n']}"))

    _print_table(f"\n{subject.title}; sheet {subject.sheet}", rows)
    out = args.output or subject.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    if args.update_card and subject.card is not None:
        metrics = dict(subject.card.get("metrics", {}))
        keys = ("cfp_pose_accuracy", "identity")
        metrics["CFP-eval-ids-451-500"] = {k: results[k] for k in keys if k in results}
        if "fer" in results:
            metrics["FER2013-PublicTest"] = results["fer"]
        update_card(args.checkpoint, metrics=json.loads(json.dumps(metrics, default=float)))
    return results
