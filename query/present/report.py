"""Self-contained HTML reports of audits (plots embedded as PNG data URIs)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from forvalue.storage.files import check_outputs, write_text
from forvalue.storage.store import Store


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _texts(store: Store, ids: list[str]) -> dict[str, str]:
    wanted, out = set(ids), {}
    for batch in store.scan(["id", "prompt", "response", "text"], batch_size=8192):
        for r in batch.to_pylist():
            if r["id"] in wanted:
                out[r["id"]] = r["text"] if r["text"] is not None else f"{r['prompt']}{r['response']}"
    return out


def _examples_table(title: str, rows: list[dict], texts: dict[str, str], links: dict[str, str] | None = None) -> str:
    def why(sid) -> str:
        return f"<td><a href='{html.escape(links[sid], quote=True)}'>tokens</a></td>" if sid in links else "<td></td>"

    links = links or {}
    body = "".join(
        f"<tr><td>{r['rank']}</td><td>{html.escape(str(r['id']))}</td><td>{html.escape(str(r['label']))}</td>"
        f"<td>{r['score_mean']:.4g}</td><td>{'yes' if r['flagged'] else ''}</td>"
        f"<td><pre>{html.escape(texts.get(r['id'], '')[:400])}</pre></td>{why(r['id']) if links else ''}</tr>"
        for r in rows
    )
    return (
        f"<h2>{html.escape(title)}</h2><table><tr><th>rank</th><th>id</th><th>label</th><th>mean score</th>"
        f"<th>flagged</th><th>text</th>{'<th>why</th>' if links else ''}</tr>{body}</table>"
    )


_STYLE = """<style>body{font-family:sans-serif;margin:2em;max-width:1100px}
table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:4px;vertical-align:top}pre{white-space:pre-wrap;margin:0}
img{max-width:100%}</style>"""


def pricing_section(rows: list[dict], confidence: float = 0.95) -> str:
    """HTML of a pricing table (:func:`forvalue.pricing.price`): bar chart of shares with intervals, and the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["group"] for r in rows]
    share = np.array([r["share"] for r in rows])
    err = np.array([[r["share"] - r["share_low"] for r in rows], [r["share_high"] - r["share"] for r in rows]])
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(rows)), 3.2))
    ax.bar(range(len(rows)), share * 100, yerr=np.clip(err, 0, None) * 100, capsize=4, color="#4477aa")
    many = len(rows) > 6
    ax.set_xticks(range(len(rows)), names, rotation=45 if many else 0, ha="right" if many else "center")
    ax.set_ylabel("share of positive value (%)")
    pct = f"{confidence:.0%}"
    body = "".join(
        f"<tr><td>{r['rank']}</td><td>{html.escape(r['group'])}</td><td>{r['n']}</td><td>{r['total']:.4g}</td>"
        f"<td>{r['mean']:.4g}</td><td>{r['share']:.1%}</td><td>[{r['share_low']:.1%}, {r['share_high']:.1%}]</td>"
        f"<td>[{r['total_low']:.4g}, {r['total_high']:.4g}]</td></tr>"
        for r in rows
    )
    return (
        f"<h2>Value per provider group</h2><p>Share = the group's share of the positive total value; error bars "
        f"and intervals: {pct} bootstrap (samples resampled within each group).</p><img src='{_png(fig)}'>"
        f"<table><tr><th>rank</th><th>group</th><th>n</th><th>total</th><th>mean</th><th>share</th>"
        f"<th>{pct} share</th><th>{pct} total</th></tr>{body}</table>"
    )


def pricing_report(rows: list[dict], out: str | Path, title: str, confidence: float = 0.95) -> Path:
    """Write a self-contained HTML page with the pricing section only (e.g. for estimated values)."""
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{_STYLE}</head>"
        f"<body><h1>{html.escape(title)}</h1>{pricing_section(rows, confidence)}</body></html>"
    )
    check_outputs({"report": (out, (".html",))})
    return write_text(out, page)


def _timing(meta: dict) -> str:
    """The audit's validation-set size and time split (audits written before the split was recorded: the size only)."""
    sec = meta.get("seconds")
    if not sec:
        return f"<p>Validation set: {meta['n_validation']} samples; time split not recorded for this audit.</p>"
    form = {"gform": "G-form: one matrix per aggregate", "token": "token form: per-validation-sample scores"}
    how = form.get(meta.get("scan_form"), str(meta.get("scan_form")))
    passes = meta.get("scan_passes", 1)
    return (
        f"<p>Validation set: {meta['n_validation']} samples. Time: encode {sec['encode']:.2f} s, scan "
        f"{sec['scan']:.2f} s ({html.escape(how)}{f', {passes} passes over the store' if passes > 1 else ''}), "
        f"ranks and flags {sec['rank_flag']:.2f} s (writing the table follows).</p>"
    )


def audit_report(
    store_path: str | Path,
    name: str,
    out: str | Path,
    n_examples: int = 10,
    pricing: list[dict] | None = None,
    confidence: float = 0.95,
    explanations: dict[str, str] | None = None,
) -> Path:
    """Write an HTML report of audit ``name``: score histogram, per-label box plots, top and bottom examples.

    ``pricing`` (rows of :func:`forvalue.pricing.price`) adds the value-per-group section;
    ``explanations`` (training id -> link relative to the report, from
    :func:`forvalue.present.explain_html.explain_audit_examples`) links each example to its token-level page.
    """
    from forvalue.audit import load_audit

    table, meta = load_audit(store_path, name)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    store = Store.open(store_path)
    scores = table.column("score_mean").to_numpy()
    flagged = table.column("flagged").to_numpy(zero_copy_only=False)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.hist(scores, bins=50, color="#4477aa")
    if flagged.any():
        ax.axvline(scores[flagged].max(), color="#cc3311", linestyle="--", label="flag cut")
        ax.legend()
    ax.set_xlabel("mean score against the validation set")
    ax.set_ylabel("training samples")
    hist = _png(fig)
    labels = table.column("label").to_pylist()
    groups = sorted({str(l) for l in labels})
    box = ""
    if 1 < len(groups) <= 40:
        lab = np.array([str(l) for l in labels])
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(groups)), 3.5))
        ax.boxplot([scores[lab == g] for g in groups])
        ax.set_xticks(range(1, len(groups) + 1), groups, rotation=45, ha="right")
        ax.set_ylabel("mean score")
        box = f"<h2>Scores by training label</h2><img src='{_png(fig)}'>"
    rows = sorted(table.select(["id", "label", "score_mean", "rank", "flagged"]).to_pylist(), key=lambda r: r["rank"])
    top, bottom = rows[:n_examples], rows[-n_examples:][::-1]
    texts = _texts(store, [r["id"] for r in top + bottom])
    summary = (
        f"<p>{meta['n_train']} training samples scored against {meta['n_validation']} validation samples "
        f"(validation set sha256 {meta['validation_sha256'][:12]}…); {meta['flagged']} flagged; "
        f"settings: {html.escape(str(meta['settings']))}; created {meta['created']}.</p>{_timing(meta)}"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>audit {html.escape(meta['name'])}</title>{_STYLE}"
        f"</head><body><h1>Audit {html.escape(meta['name'])}</h1>{summary}<h2>Score distribution</h2>"
        f"<img src='{hist}'>{box}{pricing_section(pricing, confidence) if pricing else ''}"
        f"{_examples_table('Most valuable', top, texts, explanations)}"
        f"{_examples_table('Least valuable (flag candidates)', bottom, texts, explanations)}</body></html>"
    )
    check_outputs({"report": (out, (".html",))})
    return write_text(out, page)


def compare_report(comparison: dict, out: str | Path) -> Path:
    """Write an HTML page with the scatter of two audits' scores and the biggest moves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sa, sb = comparison["scores"]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(sa, sb, s=6, alpha=0.6)
    ax.set_xlabel(f"audit {comparison['a']}: mean score")
    ax.set_ylabel(f"audit {comparison['b']}: mean score")
    moved = "".join(
        f"<tr><td>{html.escape(m['id'])}</td><td>{m['rank_a']}</td><td>{m['rank_b']}</td></tr>"
        for m in comparison["moved"]
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>compare</title>{_STYLE}</head><body>"
        f"<h1>Audit {html.escape(comparison['a'])} vs {html.escape(comparison['b'])}</h1>"
        f"<p>{comparison['common']} common samples, Spearman rank correlation {comparison['spearman']:.4f}; "
        f"{len(comparison['newly_flagged'])} newly flagged.</p><img src='{_png(fig)}'>"
        f"<h2>Moved most</h2><table><tr><th>id</th><th>rank {html.escape(comparison['a'])}</th>"
        f"<th>rank {html.escape(comparison['b'])}</th></tr>{moved}</table></body></html>"
    )
    check_outputs({"report": (out, (".html",))})
    return write_text(out, page)
