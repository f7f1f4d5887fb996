"""The tables of ``fer-train eval-frontalizer``: the detail table and issue #12's bars.

The bars table has one row per frontaliser (raw input, warp-only, the GAN under evaluation and
the old DR-GAN's numbers quoted from docs/frontalizer.md) and one column per bar of issue #12
section 4; it ends with a pass/fail row per measured frontaliser and a legend, one line per bar
with its rule and verdicts. :func:`measure_bars` computes the same as JSON.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["BARS", "DRGAN_QUOTED", "QUOTED_KEY", "Bar", "bars_table", "fmt", "format_table", "measure_bars",
           "row_metrics"]

QUOTED_KEY = "DR-GAN 7,100 steps (quoted)"
#: The old DR-GAN at 7,100 steps: docs/frontalizer.md, "Results after 7,100 steps" (same pairs,
#: classifier and seeded 1,000 PublicTest faces). Not re-measured: its checkpoint is lost.
DRGAN_QUOTED: dict[str, Any] = {
    "source": 'docs/frontalizer.md, "Results after 7,100 steps" (checkpoint lost; not re-measured)',
    "fp_auc": 0.6328, "fp_tar": 0.0286, "fxp_auc": 0.6256, "fxp_tar": 0.0280, "fer_acc": 0.2550,
    "agreement_all_faces": 0.2570, "fer_acc_abs_yaw_lt_15": 0.2557,
}
Metrics = dict[str, Any]
#: Bounds are inclusive; this absorbs float rounding (0.95 - 0.05 < 0.90 in binary floating point).
EPS = 1e-9


@dataclass(frozen=True)
class Bar:
    """One acceptance bar: its column, what it measures and its pass rule."""

    number: int
    column: str
    what: str
    rule: str
    value: Callable[[Metrics, Metrics, Metrics], Any]  # (row, raw, warp) -> the measured value(s)
    verdict: Callable[[Any, Metrics, Metrics], bool | None]  # (value, raw, warp) -> pass; None: n/a
    show: Callable[[Any], str]


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not math.isnan(v)


def fmt(v: Any, digits: int = 4) -> str:
    """A number for a table (``-`` for missing or NaN)."""
    return f"{v:.{digits}f}" if _num(v) else "-"


def _at_least(bound: float) -> Callable[[Any, Metrics, Metrics], bool | None]:
    return lambda v, raw, warp: (v >= bound - EPS) if _num(v) else None


def _gan_vs_warp(row: Metrics, raw: Metrics, warp: Metrics) -> tuple[float, float] | None:
    if not row.get("is_gan") or not all(_num(x) for x in (row.get("fp_auc"), row.get("fxp_tar"),
                                                           warp.get("fp_auc"), warp.get("fxp_tar"))):
        return None
    return row["fp_auc"] - warp["fp_auc"], row["fxp_tar"] - warp["fxp_tar"]


def _ff_verdict(v: Any, raw: Metrics, warp: Metrics) -> bool | None:
    return (raw["ff_auc"] - v <= 0.01 + EPS) if _num(v) and _num(raw.get("ff_auc")) else None


def _frontal_verdict(v: Any, raw: Metrics, warp: Metrics) -> bool | None:
    if not isinstance(v, dict) or not _num(v.get("found_fraction")):
        return None
    return bool(v["found_fraction"] >= 0.98 - EPS and _num(v["median_abs_yaw"])
                and v["median_abs_yaw"] <= 10 + EPS and v["within_15"] >= 0.90 - EPS)


def _show_frontal(v: Any) -> str:
    if not isinstance(v, dict):
        return "-"
    return f"{fmt(v['found_fraction'], 2)}/{fmt(v['median_abs_yaw'], 0)}/{fmt(v['within_15'], 2)}"


BARS: tuple[Bar, ...] = (
    Bar(1, "1 FP AUC", "identity: CFP FP fold 10 (ids 451-500) ROC AUC, real frontal vs the profile "
        "frontalised (dlib embedder)", ">= 0.90",
        lambda r, raw, w: r.get("fp_auc"), _at_least(0.90), fmt),
    Bar(2, "2 FxP TAR", "identity: all frontal x profile pairs of ids 451-500, TAR at FAR 1%", ">= 0.30",
        lambda r, raw, w: r.get("fxp_tar"), _at_least(0.30), fmt),
    Bar(3, "3 GAN-warp", "GAN minus warp-only on bars 1 and 2 (same run, same pairs): dAUC/dTAR",
        "both >= -0.01", _gan_vs_warp,
        lambda v, raw, w: (min(v) >= -0.01 - EPS) if v is not None else None,
        lambda v: "-" if v is None else f"{v[0]:+.3f}/{v[1]:+.3f}"),
    Bar(4, "4 FF AUC", "frontal photos unharmed: CFP FF fold 10 ROC AUC, both photos frontalised",
        "raw - value <= 0.01", lambda r, raw, w: r.get("ff_auc"), _ff_verdict, fmt),
    Bar(5, "5 agree<15", "expression: classifier agreement original vs frontalised, PublicTest faces "
        "with |yaw| < 15 deg", ">= 0.90", lambda r, raw, w: r.get("agree_lt_15"),
        _at_least(0.90), fmt),
    Bar(6, "6 FER acc", "FER accuracy on the PublicTest sample frontalised (raw: the originals)", ">= 0.70",
        lambda r, raw, w: r.get("fer_acc"), _at_least(0.70), fmt),
    Bar(7, "7 found/|yaw|/15", "looks frontal: RetinaFace on the frontalised CFP profiles of ids 451-500: "
        "found fraction / median |yaw| (deg) / fraction of found within +-15 deg",
        "found >= 0.98, median <= 10, within >= 0.90", lambda r, raw, w: r.get("frontal"),
        _frontal_verdict, _show_frontal),
    Bar(8, "8 real-vs-fake", "adversarial part: balanced test accuracy of a tiny CNN telling real CFP "
        "frontals from frontalised profiles (trained on ids 001-450, tested on 451-500)",
        "GAN <= warp-only - 0.05", lambda r, raw, w: r.get("probe"),
        lambda v, raw, w: (v <= w["probe"] - 0.05 + EPS) if _num(v) and _num(w.get("probe")) else None, fmt),
)


def row_metrics(results: dict[str, Any], key: str) -> Metrics:
    """The numbers the bars read for row ``key`` ("raw" or a frontaliser) of an evaluation's JSON."""
    m: Metrics = {"is_gan": key not in ("raw", "warp-only")}
    ident = results.get("identity", {})

    def pair(name: str, what: str) -> Any:
        return ident.get(name, {}).get(key, {}).get(what)

    m["fp_auc"] = pair("FP fold 10", "auc")
    m["fxp_tar"] = pair("all F x P pairs", "tar_at_far_1pct")
    m["ff_auc"] = pair("FF fold 10", "auc")
    fer = results.get("fer", {})
    if key == "raw":
        m["fer_acc"] = fer.get("raw_accuracy")
    else:
        entry = fer.get("by_frontaliser", {}).get(key, {})
        m["fer_acc"] = entry.get("bins", {}).get("all", {}).get("acc_frontalised")
        m["agree_lt_15"] = entry.get("agreement_abs_yaw_lt_15")
    m["frontal"] = results.get("frontal_check", {}).get(key)
    m["probe"] = results.get("realism_probe", {}).get(key, {}).get("test_accuracy")
    return m


def _quoted_metrics() -> Metrics:
    q = DRGAN_QUOTED
    return {"is_gan": False, "fp_auc": q["fp_auc"], "fxp_tar": q["fxp_tar"], "fer_acc": q["fer_acc"]}


def measure_bars(results: dict[str, Any], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Per bar: its rule, each row's value (``keys`` measured, then the quoted DR-GAN) and each
    measured frontaliser's verdict (``None``: not applicable or not measured)."""
    rows = {k: row_metrics(results, k) for k in ("raw", *keys)}
    rows[QUOTED_KEY] = _quoted_metrics()
    raw, warp = rows["raw"], rows.get("warp-only", {})
    out = []
    for bar in BARS:
        values = {k: bar.value(m, raw, warp) for k, m in rows.items()}
        verdicts = {k: bar.verdict(values[k], raw, warp) for k in keys}
        if bar.number == 8:
            verdicts["warp-only"] = None  # the reference of this bar
        out.append({"bar": bar.number, "what": bar.what, "rule": bar.rule, "values": values,
                    "shown": {k: bar.show(v) for k, v in values.items()}, "pass": verdicts})
    return out


def format_table(title: str, rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: ``rows[0]`` is the header; the first column left-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(r: Sequence[str]) -> str:
        cells = zip(r, widths, strict=True)
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))

    lines = [title, line(rows[0])]
    lines.append("-" * len(lines[-1]))
    lines += [line(r) for r in rows[1:]]
    return "\n".join(lines)


def _verdict(v: bool | None) -> str:
    return "n/a" if v is None else ("pass" if v else "FAIL")


def bars_table(bars: list[dict[str, Any]], labels: dict[str, str]) -> str:
    """The issue's one table: frontalisers x bars, pass/fail rows, then one line per bar."""
    keys = list(bars[0]["values"])
    measured = list(bars[0]["pass"])
    rows = [["", *(b.column for b in BARS)]]
    rows += [[labels.get(k, k), *(b["shown"][k] for b in bars)] for k in keys]
    rows += [[f"pass? {labels.get(k, k)}", *(_verdict(b["pass"][k]) for b in bars)] for k in measured]
    legend = [f"* {QUOTED_KEY}: {DRGAN_QUOTED['source']}.", "Bars (issue #12, section 4):"]
    for b in bars:
        verdicts = "; ".join(f"{labels.get(k, k)} {_verdict(b['pass'][k])} ({b['shown'][k]})"
                             for k in measured)
        legend.append(f"  {b['bar']}. {b['what']}; pass: {b['rule']}. -> {verdicts}")
    return format_table("Issue #12 bars", rows) + "\n" + "\n".join(legend)
