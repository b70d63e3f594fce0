"""The printed report and the goals it checks."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tools.bench_selection.settings import FORVALUE_METHODS, Settings
from tools.bench_selection.suite import Counts


def mean_std(xs) -> tuple[float, float, int]:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return float("nan"), float("nan"), 0
    return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else float("nan")), len(xs)


def pm(xs, digits: int = 3) -> str:
    m, sd, n = mean_std(xs)
    if n == 0:
        return "–"
    return f"{m:.{digits}f}" + (f" ± {sd:.{digits}f}" if n > 1 else "")


def group(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def beats(a: list[float], b: list[float], lower_better: bool) -> str:
    """Margin of ``a`` over ``b`` in units of ``b``'s std over seeds."""
    ma, _, _ = mean_std(a)
    mb, sb, nb = mean_std(b)
    margin = (mb - ma) if lower_better else (ma - mb)
    if nb < 2 or not sb > 0:
        return f"{margin:+.3f} (std n/a)"
    return f"{margin:+.3f} = {margin / sb:+.1f} std"


def report(rows: list[dict], s: Settings, argv: list[str], seconds: float, counts: Counts, device: str) -> str:
    from tools.common import machine_info, md_table

    lines = [
        "## Selection by value: fine-tune on what each method selects (issue 17)",
        "",
        f"Command: `python -m tools.bench_selection {' '.join(argv)}`; wall time {seconds:.0f} s; "
        f"fine-tunes run {counts.run}, reused from the cache {counts.reused}"
        + (f"; {counts.skipped} rows or parts not run yet, left out (--cached-only)" if counts.skipped else "")
        + ".",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(s).items()) + ".",
        "",
    ]
    seeds = sorted({r["seed"] for r in rows})
    lines.append(f"Seeds: {seeds} (mean ± std over seeds where there are several).")
    lines.append("")
    tgt = [r for r in rows if r["part"] == "targeted"]
    if tgt:
        lines += [
            "### Targeted selection",
            "",
            "Held-out target loss (lower is better) and exact-match accuracy after fine-tuning on the "
            "selection; in-target = share of the selection from the target; select s = the method's wall "
            "time (shared pieces such as the store build or warm-up included).",
            "",
        ]
        table = []
        for (target, k, method), rs in group(tgt, ("target", "k", "method")).items():
            table.append(
                [
                    target,
                    f"{k:g}% ({rs[0]['n']})",
                    method,
                    pm([r["loss"] for r in rs]),
                    pm([r["acc"] for r in rs]),
                    pm([r["in_target"] for r in rs], 2),
                    pm([r["select_seconds"] for r in rs], 1),
                    pm([r["train_seconds"] for r in rs], 1),
                ]
            )
        lines.append(
            md_table(
                ["target", "k (n)", "method", "target loss", "accuracy", "in-target", "select s", "train s"], table
            )
        )
        lines.append("")
    noisy = [r for r in rows if r["part"] == "noisy"]
    if noisy:
        lines += [
            "### Noisy pool",
            "",
            "Clean fraction of the selection, fine-tuned accuracy / loss on the clean evaluation set, and the "
            "mislabeled-detection AUC of the method's values (flipped should score lowest). "
            "`all (no selection)`: fine-tuned on the whole noisy pool; its detection AUC ranks by that "
            "model's per-sample loss (the loss baseline).",
            "",
        ]
        table = []
        for (noise, k, method), rs in group(noisy, ("noise", "k", "method")).items():
            table.append(
                [
                    noise,
                    f"{k:g}% ({rs[0]['n']})",
                    method,
                    pm([r["clean"] for r in rs], 2),
                    pm([r["acc"] for r in rs]),
                    pm([r["loss"] for r in rs]),
                    pm([r["detect_auc"] for r in rs]),
                    pm([r["select_seconds"] for r in rs], 1),
                ]
            )
        lines.append(
            md_table(["pool", "k (n)", "method", "clean", "accuracy", "loss", "detect AUC", "select s"], table)
        )
        lines.append("")
    br = [r for r in rows if r["part"] == "brittle"]
    if br:
        lines += [
            "### Brittleness",
            "",
            "Remove the method's top-k training samples for one validation sample the fine-tuned model "
            "answers correctly, fine-tune again (same seed and budget): change of that sample's loss, share "
            "of answers that flip, share of removed samples with the sample's class. Mean ± std over "
            "samples x seeds.",
            "",
        ]
        table = []
        for (k, method), rs in group(br, ("k", "method")).items():
            was = [r for r in rs if r["was_correct"]]
            table.append(
                [
                    k,
                    method,
                    pm([r["delta_loss"] for r in rs]),
                    f"{sum(r['flipped'] for r in was)}/{len(was)}" if was else "–",
                    pm([r["removed_same_class"] for r in rs], 2),
                    len(rs),
                ]
            )
        lines.append(md_table(["k", "method", "Δ loss", "flips", "same-class removed", "n"], table))
        lines.append("")
    lines += [
        "### Goals",
        "",
        "Margins: positive = the first method did better (lower loss, higher accuracy or clean fraction), in units "
        "of the second method's std over seeds.",
        "",
    ]
    lines += goals(rows) + ["", machine_info(device)]
    return "\n".join(lines)


def goals(rows: list[dict]) -> list[str]:
    out = []
    tgt = [r for r in rows if r["part"] == "targeted"]
    g = group(tgt, ("target", "k", "method"))
    for target, k in sorted({(r["target"], r["k"]) for r in tgt}):
        rnd = g.get((target, k, "random"), [])
        for fv in FORVALUE_METHODS:
            mine = g.get((target, k, fv), [])
            if mine and rnd:
                out.append(
                    f"- targeted {target} k={k:g}%: {fv} vs random, loss "
                    f"{beats([r['loss'] for r in mine], [r['loss'] for r in rnd], True)}, accuracy "
                    f"{beats([r['acc'] for r in mine], [r['acc'] for r in rnd], False)}."
                )
        rds = g.get((target, k, "rds"), [])
        for fv in FORVALUE_METHODS:
            mine = g.get((target, k, fv), [])
            if mine and rds:  # issue 29's bar: RDS+ beaten on the targeted selection at 10% by > 2 std
                out.append(
                    f"- targeted {target} k={k:g}%: {fv} vs rds (RDS+), loss "
                    f"{beats([r['loss'] for r in mine], [r['loss'] for r in rds], True)}."
                )
        grad = g.get((target, k, "grad"), [])
        for fv in FORVALUE_METHODS:
            mine = g.get((target, k, fv), [])
            if grad and mine:
                ratio = mean_std([r["select_seconds"] for r in grad])[0] / max(
                    mean_std([r["select_seconds"] for r in mine])[0], 1e-9
                )
                out.append(
                    f"- targeted {target} k={k:g}%: {fv} vs grad, loss "
                    f"{beats([r['loss'] for r in mine], [r['loss'] for r in grad], True)}; grad takes "
                    f"{ratio:.1f}x {fv}'s time."
                )
    noisy = [r for r in rows if r["part"] == "noisy"]
    g = group(noisy, ("noise", "k", "method"))
    for noise, k in sorted({(r["noise"], r["k"]) for r in noisy if r["k"] != 100}):
        rnd = g.get((noise, k, "random"), [])
        for fv in FORVALUE_METHODS:
            mine = g.get((noise, k, fv), [])
            if mine and rnd:
                out.append(
                    f"- noisy {noise} k={k:g}%: {fv} vs random, accuracy "
                    f"{beats([r['acc'] for r in mine], [r['acc'] for r in rnd], False)}, clean fraction "
                    f"{beats([r['clean'] for r in mine], [r['clean'] for r in rnd], False)}."
                )
    for noise in sorted({r["noise"] for r in noisy}):
        loss_auc = mean_std([r["detect_auc"] for r in noisy if r["noise"] == noise and r["k"] == 100])[0]
        for fv in FORVALUE_METHODS:
            auc = mean_std([r["detect_auc"] for r in noisy if r["noise"] == noise and r["method"] == fv])[0]
            out.append(
                f"- detection {noise}: {fv} AUC {auc:.3f} vs loss of the pool-fine-tuned model "
                f"{loss_auc:.3f}: {'beats' if auc > loss_auc else 'does not beat'} it."
            )
    br = [r for r in rows if r["part"] == "brittle"]
    g = group(br, ("k", "method"))
    for k in sorted({r["k"] for r in br}):
        fv = mean_std([r["delta_loss"] for r in g.get((k, "forvalue"), [])])[0]
        rnd = mean_std([r["delta_loss"] for r in g.get((k, "random"), [])])[0]
        ratio = fv / rnd if rnd > 0 else float("nan")
        out.append(
            f"- brittleness k={k}: removing forvalue's top-k raises the loss by {fv:+.3f}, random k by "
            f"{rnd:+.3f}" + (f" ({ratio:.1f}x)" if rnd > 0 else " (random does not raise it)") + "."
        )
    return out
