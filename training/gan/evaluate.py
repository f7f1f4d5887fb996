"""``fer-train eval-frontalizer``: raw vs warp-only vs a GAN frontaliser, against issue #12's bars.

One run measures, on the same faces and pairs, the raw input, the warp-only frontaliser and the
checkpoint given (its card's ``arch`` decides: a ``frontal_refiner`` on the warp, or the old
DR-GAN ``frontalizer``; ``--warp-only``: warp-only alone). It logs two tables, a detail table
(metric x frontaliser) and the issue's one table (frontaliser x bar, with pass/fail; the old
DR-GAN's numbers there are quoted from docs/frontalizer.md, :mod:`training.gan.eval_report`),
writes the numbers as JSON (and, with ``--update-card``, the checkpoint's own numbers into its
card, where the service's ``frontalize=auto`` reads ``frontalize_helps``) and two sample sheets.

1. Identity (CFP eval ids 451-500, :mod:`training.gan.identity`): ROC AUC and TAR at FAR 1% of
   frontal-profile pairs (FP fold 10 and all pairs) scored by dlib's face recogniser, with the raw
   and the frontalised profile; FF fold 10 with both photos frontalised.
2. Expression (FER2013 PublicTest, a seeded ``--limit`` sample): classifier accuracy on the
   original and the frontalised faces, per estimated |yaw| bin; agreement of the two predictions;
   ``frontalize_helps``: the bins where frontalising raised accuracy beyond chance (more faces
   fixed than broken, one-sided exact McNemar p < 0.05).
3. Looks frontal (:func:`training.gan.output_checks.frontal_check`): RetinaFace on the frontalised
   CFP profiles. 4. Realism (:func:`training.gan.output_checks.realism_probe`): a tiny CNN telling
   real CFP frontals from frontalised profiles (trained on ids 001-450, tested on 451-500).

``--yaw-check`` also runs the detector on the raw CFP eval photos and reports the yaw estimate
per pose class, validating :func:`facemodels.face.pose.estimate_yaw`. Setup of the frontalisers:
:mod:`training.gan.eval_subjects`.
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

from facemodels.checkpoint import load_checkpoint, update_card
from facemodels.device import resolve_device
from facemodels.face.pose import estimate_yaw
from facemodels.frontalizer.model import Frontalizer, frontalize_faces
from facemodels.predict import predict_probs
from training.data.aligned_views import align_views, detect_face_landmarks
from training.data.cfp import CfpDataset
from training.gan.eval_report import DRGAN_QUOTED, QUOTED_KEY, bars_table, fmt, format_table, measure_bars
from training.gan.eval_subjects import WARP_OUTPUT, CfpFrontaliser, Subject, setup_subject
from training.gan.fer_eval import YAW_BINS, FerResult, evaluate_fer
from training.gan.identity import DlibEmbedder, Embedder, identity_scores
from training.gan.output_checks import FRONTAL_CHECK_HOW, frontal_check, realism_probe_seeds
from training.gan.sheets import pick_sheet_rows, pick_yaw_rows, write_sheet
from training.runtime import cache_root

__all__ = ["CfpFrontaliser", "evaluate_identity", "get_args_parser", "main", "yaw_check"]

log = logging.getLogger(__name__)
Row = list[str]


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate the frontaliser (identity, expression, yaw)",
                                add_help=add_help)
    p.add_argument("checkpoint", type=Path, nargs="?", default=Path("runs/frontalizer/final"),
                   help="a frontal_refiner or frontalizer (DR-GAN) checkpoint; warp-only is measured "
                        "beside it")
    p.add_argument("--warp-only", action="store_true",
                   help="evaluate the warp-only baseline (facemodels.frontalizer.warp) alone (the "
                        "checkpoint argument is ignored)")
    p.add_argument("--data", default="../shared/data/cfp", help="CFP folder")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--classifier", type=Path, default=Path("checkpoints/default"),
                   help="expression classifier checkpoint")
    p.add_argument("--fer-data", default="../shared/data/fer2013")
    p.add_argument("--limit", type=int, default=1000,
                   help="a seeded random sample of N FER2013 PublicTest faces (0 = all 3589)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit sample and of the realism probe")
    p.add_argument("--skip-identity", action="store_true")
    p.add_argument("--skip-fer", action="store_true")
    p.add_argument("--skip-frontal-check", action="store_true", help="skip bar 7 (RetinaFace on the outputs)")
    p.add_argument("--skip-realism", action="store_true", help="skip bar 8 (the real-vs-frontalised probe)")
    p.add_argument("--probe-steps", type=int, default=400, help="training steps of the realism probe (bar 8)")
    p.add_argument("--yaw-check", action="store_true", help="validate the yaw estimate on raw CFP photos")
    p.add_argument("--sheet", type=Path, default=None,
                   help="profile in | warp-only | GAN | real frontal (default "
                        "docs/frontalizer_refiner_samples.png for a refiner, docs/frontalizer_samples.png "
                        "for a DR-GAN, "
                        "docs/frontalizer_warp_samples.png with --warp-only)")
    p.add_argument("--fer-sheet", type=Path, default=None,
                   help="FER2013 faces binned by |yaw|: original | warp-only | GAN (default "
                        "docs/frontalizer_{refiner_,,warp_}fer_samples.png as --sheet)")
    p.add_argument("--sample-count", type=int, default=8,
                   help="people on the CFP sheet; FER faces per |yaw| bin on the FER sheet: half of it")
    p.add_argument("--output", type=Path, default=None,
                   help=f"JSON (default: beside the checkpoint; with --warp-only {WARP_OUTPUT})")
    p.add_argument("--update-card", action="store_true", help="store the metrics in the checkpoint card")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    return p


def evaluate_identity(model: Frontalizer | CfpFrontaliser, data_root: Path, frontal: CfpDataset,
                      profile: CfpDataset, embedder: Embedder) -> dict[str, Any]:
    """AUC and TAR@FAR=1% of CFP pairs, raw (``"raw"``) vs frontalised (``"frontalised"``).

    ``model`` is the DR-GAN or any :data:`CfpFrontaliser`; see
    :func:`training.gan.identity.identity_scores` (several frontalisers at once).
    """
    if isinstance(model, Frontalizer):
        gan = model

        def run(d: CfpDataset) -> torch.Tensor:
            return frontalize_faces(gan, d.images, out_size=gan.cfg.image_size)
    else:
        run = model
    return identity_scores({"frontalised": run}, data_root, frontal, profile, embedder)


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


def _aligned_control(res: FerResult, classifier: torch.nn.Module, faces: torch.Tensor,
                     landmarks: list[np.ndarray | None]) -> FerResult:
    """``res`` with its frontalised faces replaced by the plain 2D alignment of the originals
    (the service's classifier crop; unchanged where no landmarks): separates what the warp
    does from what the change of framing does."""
    aligned = torch.from_numpy(align_views(faces.numpy(), landmarks))
    pred = predict_probs(classifier, aligned).argmax(1)
    return dataclasses.replace(res, pred_front=pred, frontalised=aligned)


def _fer(args: argparse.Namespace, subject: Subject, device: torch.device, detector: Any) -> list[Row]:
    """Expression rows (accuracy per |yaw| bin, agreement, the 2D control) and the FER sheet."""
    from training.data.fer2013 import load_fer2013

    keys = [c.key for c in subject.candidates]
    classifier, ccard = load_checkpoint(args.classifier, device=device)
    fer = load_fer2013(args.fer_data, cache_dir=args.cache_dir).split("PublicTest")
    n = len(fer) if args.limit <= 0 else min(args.limit, len(fer))
    # PublicTest is stored class by class: a prefix would hold only the first classes.
    pick = torch.randperm(len(fer), generator=torch.Generator().manual_seed(args.seed))[:n].sort().values
    faces, labels = fer.images[pick], fer.labels[pick]
    landmarks = detect_face_landmarks(faces.numpy(), detector)
    res = {c.key: evaluate_fer(c.fer_run, classifier, faces, labels, landmarks) for c in subject.candidates}
    first = res[keys[0]]
    rows_of = {k: r.rows() for k, r in res.items()}
    entry: dict[str, Any] = {
        "classifier": str(args.classifier), "classifier_arch": ccard["arch"], "split": "PublicTest",
        "faces": n, "sample_seed": args.seed, "raw_accuracy": rows_of[keys[0]][0][2],
        "by_frontaliser": {k: r.summary() for k, r in res.items()}}
    subject.results["fer"] = entry
    rows: list[Row] = []
    for i, (bin_name, k, acc, _) in enumerate(rows_of[keys[0]]):
        label = "FER PublicTest accuracy" if bin_name == "all" else f"  |yaw| {bin_name}"
        rows.append([label, fmt(acc), *(fmt(rows_of[key][i][3]) for key in keys), str(k)])
    rows.append(["FER agreement original vs frontalised", "", *(fmt(r.agreement) for r in res.values()),
                 str(n)])
    agree15 = {k: r.agreement_below(YAW_BINS[1]) for k, r in res.items()}
    rows.append(["  agreement |yaw| <15°", "", *(fmt(a) for a, _ in agree15.values()),
                 str(agree15[keys[0]][1])])
    control = _aligned_control(first, classifier, faces, landmarks)  # the output framing without the warp
    entry["aligned_control"] = {
        "what": "the same faces 2D-aligned to the FER template (align_face, as served), no warp",
        "agreement": control.agreement, "bins": {b: {"n": k, "acc": acc} for b, k, _, acc in control.rows()}}
    for bin_name, k, _, acc in control.rows():
        label = ("FER 2D-aligned only (control) accuracy" if bin_name == "all"
                 else f"  2D-aligned |yaw| {bin_name}")
        rows.append([label, "", fmt(acc), *([""] * (len(keys) - 1)), str(k)])
    idx = torch.from_numpy(pick_yaw_rows(first.yaw, YAW_BINS, max(1, args.sample_count // 2)))
    if len(idx):
        write_sheet(subject.fer_sheet, faces[idx], *(r.frontalised[idx] for r in res.values()), scale=2,
                    header=("FER original", *(c.label for c in subject.candidates)),
                    row_labels=[f"yaw {first.yaw[i]:+.0f}" for i in idx.tolist()],
                    title="FER2013 PublicTest by |yaw|")
    return rows


def _realism(args: argparse.Namespace, subject: Subject, get_detector: Callable[[], Any]) -> list[Row]:
    """Bar 8: the probe per row, trained on ids 001-450 and tested on 451-500 (profiles with landmarks)."""
    train = subject.cfp_all.split("train")
    if len(train) == 0:
        log.warning("realism probe skipped: no CFP training ids (001-450) under %s", args.data)
        return []
    subject.add_landmarks(train, get_detector)

    def split(d: CfpDataset) -> tuple[CfpDataset, CfpDataset]:
        has = torch.tensor([bool(np.isfinite(subject.cfp_landmarks[p]).all()) for p in d.paths])
        return d.subset(d.pose == 0), d.subset((d.pose != 0) & has)

    (tr_f, tr_p), (te_f, te_p) = split(train), split(subject.cfp)
    if min(len(tr_f), len(tr_p), len(te_f), len(te_p)) == 0:
        log.warning("realism probe skipped: it needs frontal photos and profiles with landmarks in both "
                    "splits (train %d+%d, eval %d+%d)", len(tr_f), len(tr_p), len(te_f), len(te_p))
        return []
    runs = {"raw": lambda d: d.images} | {c.key: c.cfp_run for c in subject.candidates}
    seeds = tuple(args.seed + i for i in range(3))
    out = {k: realism_probe_seeds(tr_f.images.numpy(), run(tr_p).numpy(), te_f.images.numpy(),
                                  run(te_p).numpy(), seeds=seeds, steps=args.probe_steps, name=k)
           for k, run in runs.items()}
    subject.results["realism_probe"] = out
    keys = [c.key for c in subject.candidates]
    n = f"{out['raw']['test_real']}+{out['raw']['test_fake']}"
    return [["real-vs-frontalised probe, balanced test acc", fmt(out["raw"]["test_accuracy"]),
             *(fmt(out[k]["test_accuracy"]) for k in keys), n]]


def _frontal_rows(subject: Subject, detector: Any) -> list[Row]:
    """Bar 7: the detector on the raw and the frontalised CFP eval profiles."""
    profile = subject.cfp.subset(subject.cfp.pose != 0)
    out: dict[str, Any] = {"raw": frontal_check(profile.images.numpy(), detector)}
    for c in subject.candidates:
        out[c.key] = frontal_check(c.cfp_run(profile).numpy(), detector)
    subject.results["frontal_check"] = out | {"how": FRONTAL_CHECK_HOW}
    cols = ["raw", *(c.key for c in subject.candidates)]
    n = str(len(profile))
    return [["CFP profiles out: face found", *(fmt(out[k]["found_fraction"]) for k in cols), n],
            ["CFP profiles out: median |yaw|", *(fmt(out[k]["median_abs_yaw"], 1) for k in cols), n],
            ["CFP profiles out: |yaw| <= 15 (of found)", *(fmt(out[k]["within_15"]) for k in cols), n]]


def _card_metrics(subject: Subject, key: str) -> dict[str, Any]:
    """The checkpoint's own numbers in the shape the service and older cards use."""
    res, metrics = subject.results, dict((subject.card or {}).get("metrics", {}))
    cfp: dict[str, Any] = {k: res[k] for k in ("cfp_pose_accuracy",) if k in res}
    if "identity" in res:
        cfp["identity"] = {name: ({"same": e["same"], "different": e["different"], "raw": e["raw"],
                                   "frontalised": e[key]} if isinstance(e, dict) else e)
                           for name, e in res["identity"].items()}
    for name in ("frontal_check", "realism_probe"):
        if name in res:
            cfp[name] = {k: res[name][k] for k in (key, "warp-only", "raw") if k in res[name]}
    metrics["CFP-eval-ids-451-500"] = cfp
    if "fer" in res:
        fer = res["fer"]
        common = {k: v for k, v in fer.items() if k not in ("by_frontaliser", "aligned_control")}
        metrics["FER2013-PublicTest"] = common | fer["by_frontaliser"][key]
    metrics["eval-frontalizer-bars"] = [{"bar": b["bar"], "rule": b["rule"], "value": b["values"][key],
                                         "warp_only": b["values"]["warp-only"], "pass": b["pass"][key]}
                                        for b in res["bars"]]
    return json.loads(json.dumps(metrics, default=float))


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

    subject = setup_subject(args, device, get_detector)
    cfp, results, cands = subject.cfp, subject.results, subject.candidates
    keys = [c.key for c in cands]
    labels = {"raw": "raw input", **{c.key: c.label for c in cands}, QUOTED_KEY: "DR-GAN 7,100 steps*"}
    results["rows"] = {k: labels[k] for k in ("raw", *keys)}
    frontal, profile = cfp.subset(cfp.pose == 0), cfp.subset(cfp.pose != 0)
    rows: list[Row] = [["metric", "raw", *(c.label for c in cands), "n"]]
    rows += [[m, raw, *(v.get(k, "") for k in keys), n] for m, raw, v, n in subject.rows]

    p_idx, f_idx = pick_sheet_rows(cfp, args.sample_count)
    sheet_profiles = cfp.subset(p_idx)
    write_sheet(subject.sheet, cfp.images[p_idx], *(c.cfp_run(sheet_profiles) for c in cands),
                cfp.images[f_idx], title=f"{subject.title}: CFP ids 451-500",
                header=("profile in", *(c.label for c in cands), "real frontal"))

    if not args.skip_identity:
        ident = identity_scores({c.key: c.cfp_run for c in cands}, Path(cfp.source), frontal, profile,
                                DlibEmbedder())
        results["identity"] = ident
        for pair_name in ("FP fold 10", "all F x P pairs", "FF fold 10"):
            if pair_name in ident:
                e = ident[pair_name]
                n = f"{e['same']}+/{e['different']}-"
                for what, metric in (("ROC AUC", "auc"), ("TAR@FAR=1%", "tar_at_far_1pct")):
                    values = (fmt(e[k][metric]) for k in ("raw", *keys))
                    rows.append([f"identity {pair_name}: {what}", *values, n])
    if not args.skip_fer:
        rows += _fer(args, subject, device, get_detector())
    if not args.skip_frontal_check:
        rows += _frontal_rows(subject, get_detector())
    if not args.skip_realism:
        rows += _realism(args, subject, get_detector)
    if args.yaw_check:
        yc = yaw_check(cfp, get_detector())
        results["yaw_check"] = yc
        for cls_name, v in yc.items():
            spread = f"{v['p5']:.0f}/{v['median']:.0f}/{v['p95']:.0f}"
            rows.append([f"CFP {cls_name} yaw p5/median/p95", spread, *([""] * len(keys)),
                         f"{v['found']}/{v['n']}"])

    bars = measure_bars(results, keys)
    results["bars"] = bars
    results["quoted"] = {QUOTED_KEY: DRGAN_QUOTED}
    log.info("\n%s", format_table(f"{subject.title}; sheets {subject.sheet}, {subject.fer_sheet}", rows))
    log.info("\n%s", bars_table(bars, labels))
    out = args.output or subject.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    log.info("wrote %s", out)
    key = subject.checkpoint_key
    if args.update_card and key is not None:
        update_card(args.checkpoint, metrics=_card_metrics(subject, key))
        log.info("stored the %s metrics in the card of %s", key, args.checkpoint)
    return results
