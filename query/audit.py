"""Validation-set audits: value every training sample, flag the lowest, compare audits, select subsets.

An audit scores every stored training sample against a validation set (mean over the
validation samples, the mean per validation label when labels exist, and the max over
validation samples) and saves the result as a versioned Lance table inside the store. The
aggregates are scored in the G-form (one matrix per aggregate, a scan flat in the number of
validation samples) when that is cheaper; the max needs per-sample scores, so it is computed
when the token form runs anyway or ``flag_by='max'`` asks for it, else ``score_max`` is null
(forvalue.engine.gform, docs/gform.md). Validation encodings are
cached by content hash, so re-running an audit with an unchanged validation set runs no
forward pass, and editing a few validation samples re-encodes only those.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from forvalue.metrics import spearman
from forvalue.present.output import write_jsonl_atomic
from forvalue.results import AuditComparison, AuditInfo, AuditRun, AuditSummary, Pricing, Selection
from forvalue.schemas.config import AuditConfig, DataConfig, EngineConfig, ModelConfig
from forvalue.schemas.errors import ConfigError, ForValueError
from forvalue.session import storage_of
from forvalue.storage.audits import ValidationCache, label_column, list_audits, read_audit, write_audit
from forvalue.storage.store import Store


def validation_hash(samples) -> str:
    """SHA-256 of a validation set's contents, independent of row order (hex string)."""
    rows = [
        [s.prompt, s.response, s.text, s.label]
        + ([s.image.content_sha256()] if s.image is not None else [])
        + ([[list(t) for t in s.messages], s.context_turns] if s.messages is not None else [])
        for s in samples
    ]
    try:
        ordered = sorted(rows)
    except TypeError:  # text rows beside prompt/response rows: None and str do not compare
        ordered = sorted(rows, key=lambda row: json.dumps(row, ensure_ascii=False, default=str))
    payload = json.dumps(ordered, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def run_audit(
    store: str | Path | Store,
    validation: Iterable[str | Path] | Sequence[dict],
    name: str,
    config: AuditConfig = AuditConfig(),
    data: DataConfig = DataConfig(),
    model: ModelConfig | None = None,
    runner=None,
    engine: EngineConfig | None = None,
) -> AuditRun:
    """Score every training sample against ``validation`` and save audit ``name`` in the store.

    Parameters
    ----------
    store : path or Store
    validation : paths or dict rows
        Read with the column names of ``data``; max length and chat template come from the store.
    name : str
        Audit name; re-using it writes a new version of ``audit_NAME``.
    config : AuditConfig
    model : ModelConfig, optional
        Overrides of the store's model (refused if it is not the same model).
    runner : Runner or a function returning one, optional
        The store's model already loaded, or a loader called only if a validation sample needs encoding.
    engine : EngineConfig, optional
        ``EngineConfig(engine="ray", ...)`` scores the store on Ray actors (docs/scale.md); the
        audit table is the single-process one.

    Returns
    -------
    AuditRun
        With the time split (``encode_seconds``, ``scan_seconds``, ``write_seconds``) and the scan's
        ``form``; the audit's metadata records the split, the form and whether ``score_max`` was computed.

    :meth:`forvalue.Store.audit` calls it.
    """
    # the scoring stack (torch) is imported here, not at module level: listing and showing audits loads no model
    from forvalue.engine.validation import (
        data_for_store,
        encode_validation_cached,
        load_validation_samples,
        store_hidden_basis,
    )
    from forvalue.indexer.runner import resolve_device
    from forvalue.session import get_runner as resolve_runner
    from forvalue.session import open_nonempty
    from forvalue.storage.audits import check_audit_name

    check_audit_name(name)  # before the model loads or anything is scored
    started = time.perf_counter()
    store = open_nonempty(store)
    data = data_for_store(data, store.manifest)
    samples = load_validation_samples(validation, data)
    if config.flag_by == "label" and not any(s.label is not None for s in samples):
        raise ConfigError(
            "flag_by",
            f"'label' compares each training sample with the validation samples of its own label, and none of the "
            f"{len(samples)} validation samples has a label (give --label-column, or flag by 'mean')",
        )
    loaded = {}

    def get_runner():
        if "runner" not in loaded:
            loaded["runner"] = resolve_runner(runner, store, model, config.device)
        return loaded["runner"]

    if model is not None and model.path is not None:
        get_runner()  # an explicit model is always checked against the manifest
    from forvalue.engine.variant import apply_variant, resolve_auto

    encoded_counts: dict = {}

    def encode(tokens: str):
        val, encoded_counts[tokens] = encode_validation_cached(
            samples,
            store.manifest,
            data,
            get_runner,
            ValidationCache(store),
            config.batch_size,
            tokens,
            store_hidden_basis(store),
        )
        return val

    # auto settings: chosen by the validation samples' own labels
    config, val, auto_settings = resolve_auto(config, store, encode, [s.label for s in samples])
    encoded_now = max(encoded_counts.values(), default=0)  # samples (auto positions encode each one twice)
    val = apply_variant(val, store, config.center, config.whiten)  # centred / whitened scores (docs/variants.md)
    device = loaded["runner"].device if loaded else resolve_device(config.device)
    val_labels = [s.label for s in samples]
    groups = sorted({l for l in val_labels if l is not None})
    encoded_at = time.perf_counter()
    # aggregates in the G-form, or per-sample scores in bounded token-form blocks (forvalue.engine.gform)
    from forvalue.engine.scan import audit_scan

    options = dict(normalize=config.normalize, read_rows=config.read_rows, need_max=config.flag_by == "max")
    if engine is not None and engine.engine == "ray":  # the same scan on Ray actors (forvalue.engine.ray_scan)
        from forvalue.engine.ray_scan import ray_audit_scan

        scan = ray_audit_scan(
            store,
            val,
            val_labels,
            groups,
            config.device,
            engine,
            progress=config.progress,
            desc=f"audit {name}",
            **options,
        )
    else:
        scan = audit_scan(
            store, val, val_labels, groups, device, progress=config.progress, desc=f"audit {name}", **options
        )
    scanned_at = time.perf_counter()
    ids, labels, mean, maximum, by_label = scan.ids, scan.labels, scan.mean, scan.maximum, scan.by_label
    order = np.argsort(-mean, kind="stable")
    rank = np.empty(len(mean), np.int64)
    rank[order] = np.arange(1, len(mean) + 1)
    flag_score = {"mean": mean, "max": maximum}.get(config.flag_by)
    unjudged: dict = {}  # --flag-by label: labels no validation sample has, and their rows
    if flag_score is None:  # "label": mean against the validation samples of the sample's own label
        # a row whose label no validation sample has cannot be judged by it: no flag score (null), never flagged;
        # before, it took its overall mean, a lower scale than own-label means, and whole such labels were flagged
        flag_score = np.array([by_label[l][j] if l in by_label else np.nan for j, l in enumerate(labels)])
        unjudged = dict(
            sorted(Counter("(no label)" if l is None else str(l) for l in labels if l not in by_label).items())
        )
    judged = np.flatnonzero(~np.isnan(flag_score))
    flagged = np.zeros(len(mean), bool)
    if config.flag_fraction:  # of the rows that can be judged
        n_flag = int(round(config.flag_fraction * judged.size))
        flagged[judged[np.argsort(flag_score[judged], kind="stable")[:n_flag]]] = True
    if config.flag_threshold is not None:
        flagged |= flag_score < config.flag_threshold  # (NaN compares False)
    columns = {
        "id": pa.array(ids, pa.string()),
        "label": pa.array(labels, pa.string()),
        "score_mean": pa.array(mean),
        "score_max": pa.array(maximum, pa.float64()) if maximum is not None else pa.nulls(len(mean), pa.float64()),
        "rank": pa.array(rank),
        "flag_score": pa.array(flag_score, from_pandas=True),  # (NaN: null, a row its label cannot judge)
        "flagged": pa.array(flagged),
    }
    for g in groups:
        columns[label_column(g)] = pa.array(by_label[g])  # '.', '%' and control characters as %XX
    vhash = validation_hash(samples)
    meta = {
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "validation_sha256": vhash,
        "n_validation": len(samples),
        "n_train": len(ids),
        "store_version": store.version(),
        "settings": asdict(config),  # auto settings: what was chosen (auto_settings has the choice)
        "validation_labels": groups,
        "flagged": int(flagged.sum()),
        # --flag-by label: rows left unflagged because no validation sample has their label, by label
        "unjudged_labels": unjudged,
        **({"auto_settings": auto_settings} if auto_settings is not None else {}),
        "scan_form": scan.form,
        "scan_passes": scan.passes,
        "score_max_computed": maximum is not None,
        # the time split; the table's own write comes after this record (AuditSummary.write_seconds has it all)
        "seconds": {
            "encode": round(encoded_at - started, 3),
            "scan": round(scanned_at - encoded_at, 3),
            "rank_flag": round(time.perf_counter() - scanned_at, 3),
        },
    }
    version = write_audit(store, name, pa.table(columns), meta)
    done = time.perf_counter()
    return AuditRun(
        name,
        version,
        len(ids),
        len(samples),
        encoded_now,
        int(flagged.sum()),
        done - started,
        vhash,
        encode_seconds=encoded_at - started,
        scan_seconds=scanned_at - encoded_at,
        write_seconds=done - scanned_at,
        form=scan.form,
        auto_settings=auto_settings,
        unjudged_labels=unjudged,
    )


def audits(store: str | Path | Store) -> list[AuditInfo]:
    """Metadata of every audit of a store, by name (:attr:`forvalue.Store.audits` lists them)."""
    store = storage_of(store)
    return [AuditInfo.from_meta(m) for m in list_audits(store)]


def load_audit(store: str | Path | Store, name: str) -> tuple[pa.Table, dict]:
    """The audit table (one row per training sample: ``id``, ``label``, ``score_mean``, ``rank``, ``flagged``
    and per-label columns) and its metadata."""
    store = storage_of(store)
    return read_audit(store, name)


def audit_summary(store: str | Path | Store, name: str, n_examples: int = 5) -> AuditSummary:
    """What ``forvalue audit show`` prints: metadata, mean-score percentiles, top and bottom examples."""
    table, meta = load_audit(store, name)
    q = np.percentile(table.column("score_mean").to_numpy(), [0, 10, 50, 90, 100])
    rows = sorted(table.select(["id", "label", "score_mean", "rank", "flagged"]).to_pylist(), key=lambda r: r["rank"])
    n = max(0, n_examples)
    return AuditSummary(
        info=AuditInfo.from_meta(meta),
        percentiles=dict(zip(("min", "p10", "median", "p90", "max"), map(float, q))),
        top=rows[:n],
        bottom=rows[::-1][:n],
    )


def compare_audits(store: str | Path | Store, a: str, b: str, n_moved: int = 10) -> AuditComparison:
    """Spearman rank correlation of two audits' mean scores, biggest rank moves, newly flagged ids.

    :meth:`forvalue.Audit.compare` calls it.
    """
    st = storage_of(store)
    ta, _ = read_audit(st, a)
    tb, _ = read_audit(st, b)
    da = {r["id"]: r for r in ta.select(["id", "score_mean", "rank", "flagged"]).to_pylist()}
    db_ = {r["id"]: r for r in tb.select(["id", "score_mean", "rank", "flagged"]).to_pylist()}
    common = [i for i in da if i in db_]
    if len(common) < 2:
        raise ForValueError(f"audits '{a}' and '{b}' share fewer than 2 training samples; nothing to compare")
    sa = np.array([da[i]["score_mean"] for i in common])
    sb = np.array([db_[i]["score_mean"] for i in common])
    rho = spearman(sa, sb)
    moved = [i for i in common if da[i]["rank"] != db_[i]["rank"]]  # (an audit against itself moved none)
    moves = sorted(moved, key=lambda i: -abs(da[i]["rank"] - db_[i]["rank"]))[:n_moved]
    return AuditComparison(
        a=a,
        b=b,
        common=len(common),
        spearman=rho,
        moved=[{"id": i, "rank_a": da[i]["rank"], "rank_b": db_[i]["rank"]} for i in moves],
        newly_flagged=[i for i in common if db_[i]["flagged"] and not da[i]["flagged"]],
        no_longer_flagged=[i for i in common if da[i]["flagged"] and not db_[i]["flagged"]],
        scores=(sa, sb),
    )


def parse_amount(text: str, total: int, flag: str = "--top") -> int:
    """``'10%'`` -> that share of ``total`` (rounded), ``'100'`` -> 100.

    A percentage above 100% is refused; ``--top`` must select at least one sample.
    """
    from forvalue.schemas.amounts import parse_share

    share, n = parse_share(text, total, flag)
    if flag == "--top" and n == 0:
        raise ForValueError(f"{flag} '{text}' selects no sample (of {total}); give a larger count or percentage")
    if flag == "--drop-bottom" and n >= total:  # an empty training file, exit 0, where --top 0 is refused
        raise ForValueError(f"{flag} '{text}' drops every sample (of {total}); give a smaller count or percentage")
    return min(n, total)


def rows_from_data(ids: list[str], data, data_config: DataConfig, source: str) -> list[dict]:
    """The training rows of ``ids`` (in that order) read from the data files ``data``, in the files' own shape: a
    conversation keeps its turns (TRL ``messages``, or ``prompt`` / ``completion`` turns), a prompt / response row
    its two fields, a text row its text; a repeated id its first row. ``source`` ends the refusal of ids the files
    lack ("give the files {source}")."""
    from forvalue.indexer.data import iter_samples
    from forvalue.indexer.readers import check_paths

    wanted = {i: k for k, i in enumerate(ids)}
    check_paths(data)
    out: list[dict | None] = [None] * len(ids)
    for s in iter_samples(data, data_config):
        k = wanted.get(s.id)
        if k is not None and out[k] is None:
            row = {"id": s.id, "prompt": s.prompt, "response": s.response, "text": s.text, "label": s.label}
            if s.messages is not None:  # a conversation: its turns as TRL messages, the prompt's turns apart
                turns = [{"role": r, "content": c} for r, c in s.messages]
                if s.context_turns:
                    row.update(prompt=turns[: s.context_turns], completion=turns[s.context_turns :])
                else:
                    row["messages"] = turns
            out[k] = {key: val for key, val in row.items() if val is not None}
    missing = [ids[k] for k in range(len(ids)) if out[k] is None]
    if missing:
        raise ForValueError(
            f"{len(missing)} selected ids are not in the data files (e.g. '{missing[0]}'); give the files {source} "
            "(same --id-column)"
        )
    return out


def select_subset(
    store: str | Path | Store,
    audit: str,
    top: str | None = None,
    drop_bottom: str | None = None,
    output: str | Path | None = None,
    drop_flagged: bool = False,
    data=None,
    data_config: DataConfig = DataConfig(),
) -> Selection:
    """Training rows (id, prompt, response or text, label) chosen by an audit, best first (by ``rank``: the
    mean score).

    Parameters
    ----------
    top, drop_bottom : str
        Keep the best ``N`` or ``N%``, or drop the worst ``N`` or ``N%`` (by the mean score).
    drop_flagged : bool
        Instead: keep every row the audit did not flag (flagged by its ``--flag-by`` score: with ``label``, the
        rows lowest against their own label's validation samples). Exactly one of the three.
    output : path, optional
        Also write the rows as JSONL (ready for fine-tuning), atomically: the file appears
        whole or not at all.
    data : paths, optional
        The data files the store was built from: the rows are read from them in their own shape (a conversation
        keeps its turns; without them each row is the store's ``prompt`` / ``response`` or ``text``, and a
        conversation comes out as its rendered text).

    :meth:`forvalue.Audit.select` calls it.
    """
    from forvalue.indexer.readers import as_paths
    from forvalue.storage.files import check_outputs

    if (top is not None) + (drop_bottom is not None) + bool(drop_flagged) != 1:
        raise ForValueError("give exactly one of --top, --drop-bottom or --drop-flagged")
    st = storage_of(store)
    data = as_paths(data) if data is not None else []
    check_outputs({"output": (output, (".jsonl",))}, [st.path, *data])
    table, _ = read_audit(st, audit)
    rows = sorted(table.select(["id", "rank", "flagged"]).to_pylist(), key=lambda r: r["rank"])
    n = len(rows)
    if drop_flagged:
        keep = [r for r in rows if not r["flagged"]]
        if not keep:
            raise ForValueError(f"audit '{audit}' flagged every sample (of {n}); --drop-flagged would keep none")
    elif top is not None:
        keep = rows[: parse_amount(top, n)]
    else:
        keep = rows[: n - parse_amount(drop_bottom, n, "--drop-bottom")]
    if data:
        rows = rows_from_data([r["id"] for r in keep], data, data_config, "the store was built from")
    else:
        wanted = {r["id"]: k for k, r in enumerate(keep)}
        out: list[dict | None] = [None] * len(keep)
        for batch in st.scan(["id", "prompt", "response", "text", "label"], batch_size=8192):
            for row in batch.to_pylist():
                k = wanted.get(row["id"])
                if k is not None:
                    out[k] = {key: v for key, v in row.items() if v is not None}
        rows = [r for r in out if r is not None]
    if output is not None:
        write_jsonl_atomic(rows, output)
    return Selection(rows, total=n, output=Path(output) if output is not None else None)


def write_audit_report(
    store: str | Path | Store,
    name: str,
    out: str | Path,
    n_examples: int = 10,
    pricing: Pricing | None = None,
    explanations: dict[str, str] | None = None,
) -> Path:
    """Write the HTML report of audit ``name`` (:func:`forvalue.present.report.audit_page`) to ``out``, atomically."""
    from forvalue.present.report import audit_page
    from forvalue.storage.files import check_outputs, write_text

    store = storage_of(store)
    check_outputs({"report": (out, (".html",))}, [store.path])
    table, meta = read_audit(store, name)
    rows = sorted(table.select(["id", "rank"]).to_pylist(), key=lambda r: r["rank"])
    shown = [r["id"] for r in rows[:n_examples] + rows[-n_examples:]]
    from forvalue.value_features import stored_texts

    page = audit_page(table, meta, stored_texts(store, shown), n_examples, pricing, explanations)
    return write_text(out, page)


def write_compare_report(comparison: AuditComparison, out: str | Path) -> Path:
    """Write the HTML page of a comparison (:func:`forvalue.present.report.compare_page`) to ``out``, atomically."""
    from forvalue.present.report import compare_page
    from forvalue.storage.files import check_outputs, write_text

    check_outputs({"report": (out, (".html",))})
    return write_text(out, compare_page(comparison))
