"""Write score explanations (:class:`forvalue.engine.explain.Explanation`): self-contained HTML pages, JSONL, Parquet.

The page shades every token of both texts by its contribution to the score (a diverging scale
per text: red raises the score, blue lowers it, white is zero; tokens that are not predicted
are grey), with a legend, the value on hover and the top token pairs. It has no scripts and
no external assets: one file that opens anywhere. All text is escaped.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np

from forvalue.present.output import check_output_path

FORMATS = (".html", ".jsonl", ".parquet")
# Validation samples drawn on a page explaining a mean (the largest parts first).
MAX_VALIDATION_SHOWN = 20


def row_schema():
    """The Arrow schema of :meth:`~forvalue.engine.explain.Explanation.rows`."""
    import pyarrow as pa

    text, pos = pa.string(), pa.int32()
    return pa.schema(
        [
            ("kind", text),
            ("validation_id", text),
            ("train_id", text),
            ("validation_position", pos),
            ("validation_token", text),
            ("train_position", pos),
            ("train_token", text),
            ("contribution", pa.float64()),
            ("score", pa.float64()),
        ]
    )


_POS = (178, 24, 43)  # #b2182b
_NEG = (33, 102, 172)  # #2166ac

_STYLE = """<style>
body{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}
.text{font-family:monospace;font-size:14px;line-height:1.9;white-space:pre-wrap;word-break:break-word;
border:1px solid #ccc;padding:10px;background:#fafafa}
.tok{border-radius:2px}.ctx{color:#999}
.legend{display:flex;align-items:center;gap:8px;font-size:12px;margin:6px 0}
.bar{width:260px;height:14px;border:1px solid #999;
background:linear-gradient(to right,rgb(33,102,172),rgb(255,255,255),rgb(178,24,43))}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}
td.num{text-align:right;font-family:monospace}code{background:#eee;padding:0 3px;white-space:pre}
</style>"""


def _colour(value: float, scale: float) -> tuple[str, str]:
    """Background and text colour of a token with contribution ``value`` on a scale of ``+-scale``."""
    a = 0.0 if scale <= 0 else min(1.0, abs(value) / scale)
    end = _POS if value >= 0 else _NEG
    rgb = tuple(round(255 + (c - 255) * a) for c in end)
    return f"rgb({rgb[0]},{rgb[1]},{rgb[2]})", "#fff" if a > 0.6 else "#222"


def _fmt(value: float) -> str:
    return f"{value:+.4g}"


def _side_html(title: str, side, score: float) -> str:
    per_token = side.per_token()
    predicted = np.zeros(len(side.pieces), bool)
    predicted[side.positions] = True
    scale = float(np.abs(per_token).max()) if per_token.size else 0.0
    spans = []
    for t, (piece, value) in enumerate(zip(side.pieces, per_token)):
        text = html.escape(piece)
        if not predicted[t]:
            spans.append(f"<span class='ctx' title='token {t}: not scored (context)'>{text}</span>")
            continue
        share = f" ({value / score:.1%} of the score)" if score else ""
        bg, fg = _colour(value, scale)
        tip = html.escape(f"token {t} {piece!r}: {_fmt(value)}{share}", quote=True)
        spans.append(f"<span class='tok' style='background:{bg};color:{fg}' title='{tip}'>{text}</span>")
    legend = (
        f"<div class='legend'><span>{_fmt(-scale)}</span><span class='bar'></span><span>{_fmt(scale)}</span>"
        f"<span>contribution per token (sum {_fmt(float(side.contributions.sum()))}); grey: context, not scored"
        f"</span></div>"
    )
    note = f"<p><em>{html.escape(side.note)}</em></p>" if side.note else ""
    label = f" [{html.escape(str(side.label))}]" if side.label is not None else ""
    return (
        f"<h2>{html.escape(title)} <code>{html.escape(side.sample_id)}</code>{label}</h2>{note}{legend}"
        f"<div class='text'>{''.join(spans)}</div>"
    )


def explanation_html(e, title: str | None = None) -> str:
    """The page of explanation ``e`` as one HTML string (no scripts, no external assets)."""
    if e.aggregate == "mean":
        who = f"the mean of {len(e.validation)} validation samples"
    else:
        who = f"validation sample '{e.validation_id}'"
    title = title or f"Why '{e.train.sample_id}' scores {e.score:.4g} for {who}"
    pairs = (
        "".join(
            f"<tr><td class='num'>{_fmt(p['contribution'])}</td><td class='num'>{p['contribution'] / e.score:.1%}</td>"
            f"<td><code>{html.escape(repr(p['validation_token']))}</code> #{p['validation_position']}"
            f"{' of ' + html.escape(p['validation_id']) if e.aggregate == 'mean' else ''}</td>"
            f"<td><code>{html.escape(repr(p['train_token']))}</code> #{p['train_position']}</td>"
            f"<td class='num'>{p['hidden_dot']:.4g}</td><td class='num'>{p['error_dot']:.4g}</td></tr>"
            for p in e.pairs
        )
        if e.score
        else ""
    )
    head = (
        f"<p>S(v, i) = &lt;G<sub>v</sub>, G<sub>i</sub>&gt; = <b>{e.score:.6g}</b> (cosine {e.cosine:.4f}) "
        f"= &sum;<sub>k</sub> &sum;<sub>k'</sub> &lt;h<sub>vk</sub>, h<sub>ik'</sub>&gt; &lt;e<sub>vk</sub>, "
        f"e<sub>ik'</sub>&gt;. Each token is shaded by the part of the score carried by the position that "
        f"predicts it (red raises the score, blue lowers it; each text's tokens sum to the score; hover a "
        f"token for its value).</p>"
    )
    shown = sorted(e.validation, key=lambda s: -abs(float(s.contributions.sum())))[:MAX_VALIDATION_SHOWN]
    sides = [_side_html("Validation sample", s, e.score) for s in shown]
    if len(shown) < len(e.validation):
        rest = e.score - sum(float(s.contributions.sum()) for s in shown)
        sides.append(
            f"<p><em>{len(e.validation) - len(shown)} more validation samples not shown (the "
            f"{len(shown)} above carry the largest parts; the others sum to {_fmt(rest)}).</em></p>"
        )
    body = (
        f"<h1>{html.escape(title)}</h1>{head}{''.join(sides)}{_side_html('Training sample', e.train, e.score)}"
        f"<h2>Top token pairs</h2><p>The largest terms &lt;h<sub>vk</sub>, h<sub>ik'</sub>&gt; "
        f"&lt;e<sub>vk</sub>, e<sub>ik'</sub>&gt; of the double sum.</p><table><tr><th>contribution</th>"
        f"<th>share</th><th>validation token</th><th>training token</th><th>&lt;h, h&gt;</th><th>&lt;e, e&gt;</th>"
        f"</tr>{pairs}</table>"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{_STYLE}</head>"
        f"<body>{body}</body></html>"
    )


def write_explanation(e, path: str | Path) -> Path:
    """Write explanation ``e`` to ``path``, the format by its suffix.

    ``.html``: the self-contained page; ``.jsonl`` / ``.parquet``: the rows of
    :meth:`~forvalue.engine.explain.Explanation.rows` (one per token of each side, one per top pair).

    :meth:`forvalue.Explanation.save` calls it.
    """
    import pyarrow as pa

    from forvalue.present.output import write_table
    from forvalue.storage.files import write_text

    check_output_path(path, FORMATS, inputs=e.inputs)  # never over the files it was computed from
    path = Path(path)
    if path.suffix.lower() != ".html":
        write_table(pa.Table.from_pylist(e.rows(), schema=row_schema()), path)
        return path
    return write_text(path, explanation_html(e))


def safe_name(text: str) -> str:
    """``text`` reduced to a file-name-safe stem (letters, digits, ``-``, ``_``, ``.``), at most 60 characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:60].strip("._") or "sample"
