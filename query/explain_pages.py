"""Explanation pages of query results and audit examples (the workflows behind ``--explain`` options).

Each page is one :class:`~forvalue.engine.explain.Explanation` rendered by
:mod:`forvalue.present.explain_html`; these functions choose what to explain, run the
explainer and write the pages and their index.
"""

from __future__ import annotations

import html
from pathlib import Path

from forvalue.present.explain_html import _STYLE, safe_name, write_explanation
from forvalue.schemas.config import DataConfig, ModelConfig
from forvalue.schemas.errors import ForValueError
from forvalue.storage.files import FOLDER, OutputPathError, check_outputs, write_text

# Written into every folder of explanation pages: a folder that holds other files without it is not written into.
PAGES_MARK = ".forvalue-pages"


def pages_folder(folder: str | Path) -> Path:
    """``folder`` for explanation pages, refused (:class:`OutputPathError`) when it holds files and is not a folder
    of pages forvalue wrote (its :data:`PAGES_MARK`): the pages and ``index.html`` replace files of the same names
    (hostile pass: ``--explain-dir`` wrote into any folder, where ``distill --out`` refuses one that is not empty)."""
    folder = Path(folder)
    if folder.is_dir() and not (folder / PAGES_MARK).is_file() and any(folder.iterdir()):
        raise OutputPathError(
            f"explanation pages {folder}: a folder holding other files (the pages and index.html would replace files "
            "of the same names); choose a new or empty folder"
        )
    return folder


def report_pages_folder(report: str | Path, inputs) -> Path:
    """The folder of an audit report's explanation pages (``REPORT`` with ``.explain`` for ``.html``), checked with
    the report against ``inputs`` (the store, the validation files) and :func:`pages_folder`: the command checks it
    before the audit runs, the report before the pages are explained."""
    folder = Path(report).with_suffix(".explain")
    check_outputs({"report": (report, (".html",)), "explanation pages": (folder, (FOLDER,))}, list(inputs))
    return pages_folder(folder)


def _mark(folder: Path) -> None:
    write_text(folder / PAGES_MARK, "explanation pages written by forvalue; the folder may be written again\n")


def explain_query_results(
    store, runner, validation, top, n: int, folder, data: DataConfig = DataConfig(), batch_size=8, variant=None
):
    """Pages of the top ``n`` results of a query (``top``) in ``folder``; ``top`` with a column naming each page.

    ``store``: a path, a storage Store or a :func:`forvalue.open` handle.

    ``variant``: the query's :class:`~forvalue.schemas.config.VariantConfig` (its center, validation tokens,
    whitening).
    """
    from forvalue.engine.explain import Explainer
    from forvalue.engine.validation import data_for_store, load_validation_samples
    from forvalue.engine.variant import variant_options
    from forvalue.session import open_nonempty

    store = open_nonempty(store)  # a path, a storage Store or a forvalue.open handle
    check_outputs({"explanation pages": (folder, (FOLDER,))}, [store.path, *validation])
    pages_folder(folder)
    samples = load_validation_samples(validation, data_for_store(data, store.manifest))
    options = {} if variant is None else variant_options(variant)
    explainer = Explainer(store, runner, samples, data, batch_size, **options)
    mean = None if variant is None else getattr(variant, "aggregate", "none") == "mean"
    return explain_top_results(top, explainer, n, folder, mean=mean)


def explain_top_results(top, explainer, n: int, folder: str | Path, top_pairs: int = 20, mean: bool | None = None):
    """Write one page per result of rank <= ``n`` of a query's ``top`` table into ``folder``, and an index page.

    Parameters
    ----------
    top : pyarrow.Table
        :attr:`forvalue.QueryResult.top` (rows grouped by validation sample, ranks from 1).
    explainer : forvalue.engine.explain.Explainer
        Over the query's validation samples, in the same order (checked by id: other validation files are
        refused, their pages would explain other samples).
    n : int
    folder : path
        Created if needed; pages are named ``<validation #>-<rank>-<train id>.html``.
    mean : bool, optional
        Whether the query ranked by the mean over its validation samples (``--aggregate mean``: the pages explain
        the score against the mean). None: a result whose one column is named ``mean`` while no validation sample
        has that id.

    Returns
    -------
    pyarrow.Table
        ``top`` with a column ``explanation``: the page's file name inside ``folder`` (None
        for ranks above ``n``).
    """
    import pyarrow as pa

    rows = top.to_pylist()
    column, wanted = -1, []
    for r in rows:
        column += r["rank"] == 1
        if r["rank"] <= n:
            wanted.append((column, r))
    by_column: dict[int, list[dict]] = {}
    for column, r in wanted:
        by_column.setdefault(column, []).append(r)
    names, links = {}, []
    ids = [smp.id for smp in explainer.samples]
    if mean is None:  # (a validation sample may be named 'mean': the query's setting decides where it is known)
        mean = "mean" not in ids and set(by_column) <= {0} and all(r["validation_id"] == "mean" for r in rows)
    if not mean:
        for column, group in by_column.items():
            vid = group[0]["validation_id"]
            if column >= len(ids) or ids[column] != vid:
                got = f"'{ids[column]}'" if column < len(ids) else "nothing"
                raise ForValueError(
                    f"the result's validation sample #{column + 1} is '{vid}', the validation files give {got} there; "
                    "give the validation files the query ran on"
                )
    folder = pages_folder(folder)
    _mark(folder)
    for column, group in by_column.items():
        val_index = None if mean else column
        explanations = explainer.explain_many([r["train_id"] for r in group], val_index, top_pairs)
        for r, e in zip(group, explanations):
            name = f"{column:03d}-{r['rank']:02d}-{safe_name(r['train_id'])}.html"
            write_explanation(e, folder / name)
            names[(column, r["rank"])] = name
            links.append(
                f"<li>validation <code>{html.escape(str(r['validation_id']))}</code>, rank {r['rank']}: "
                f"<a href='{html.escape(name, quote=True)}'>{html.escape(str(r['train_id']))}</a> "
                f"(score {e.score:.6g})</li>"
            )
    index = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>explanations</title>{_STYLE}</head><body>"
        f"<h1>Explanations of the top {n} results</h1><ul>{''.join(links)}</ul></body></html>"
    )
    write_text(folder / "index.html", index)
    column, out = -1, []
    for r in rows:
        column += r["rank"] == 1
        out.append(names.get((column, r["rank"])))
    return top.append_column("explanation", pa.array(out, pa.string()))


def explain_audit_examples(
    store,
    validation,
    name: str,
    folder: str | Path,
    n_examples: int = 10,
    data: DataConfig = DataConfig(),
    device: str = "auto",
    top_pairs: int = 20,
) -> dict[str, str]:
    """Pages explaining the top and bottom ``n_examples`` of audit ``name`` (what its report lists).

    Each page explains the raw score against the mean of the validation samples (the audit's
    ``score_mean`` with ``normalize='none'``), in the audit's score variant (its ``center``, ``whiten`` and
    ``validation_tokens`` settings). The validation encodings come from the store's
    validation cache (filled by the audit, so no forward pass runs for them); the model is
    loaded for its tokenizer.

    Returns
    -------
    dict
        Training id -> the page's file name inside ``folder``.
    """
    from forvalue.engine.explain import Explainer
    from forvalue.engine.validation import (
        data_for_store,
        encode_validation_cached,
        load_validation_samples,
        store_hidden_basis,
    )
    from forvalue.engine.variant import variant_options
    from forvalue.session import load_store_runner, open_nonempty
    from forvalue.storage.audits import ValidationCache, read_audit

    check_outputs({"explanation pages": (folder, (FOLDER,))}, [getattr(store, "path", store), *validation])
    pages_folder(folder)

    store = open_nonempty(store)
    table, meta = read_audit(store, name)
    settings = meta.get("settings", {})
    options = variant_options(settings)
    tokens = options["validation_tokens"]
    rows = sorted(table.select(["id", "rank"]).to_pylist(), key=lambda r: r["rank"])
    chosen = [("top", r) for r in rows[:n_examples]] + [("bottom", r) for r in rows[-n_examples:][::-1]]
    data = data_for_store(data, store.manifest)
    samples = load_validation_samples(validation, data)
    runner = load_store_runner(store, ModelConfig(device=device))
    val, _ = encode_validation_cached(
        samples,
        store.manifest,
        data,
        lambda: runner,
        ValidationCache(store),
        tokens=tokens,
        basis=store_hidden_basis(store),
    )
    explainer = Explainer(store, runner, samples, data, val=val, **options)
    unique = list(dict.fromkeys(r["id"] for _, r in chosen))
    _mark(pages_folder(folder))
    pages = {}
    for sid, e in zip(unique, explainer.explain_many(unique, None, top_pairs)):
        where, row = next((w, r) for w, r in chosen if r["id"] == sid)
        pages[sid] = f"{where}-{row['rank']:06d}-{safe_name(sid)}.html"
        write_explanation(e, Path(folder) / pages[sid])
    return pages
