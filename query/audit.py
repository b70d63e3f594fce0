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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from forvalue.present.output import write_jsonl_atomic
from forvalue.schemas.config import AuditConfig, DataConfig, EngineConfig, ModelConfig
from forvalue.schemas.errors import ForValueError
from forvalue.storage.audits import ValidationCache, label_column, list_audits, read_audit, write_audit
from forvalue.storage.store import Store


@dataclass
class AuditSummary:
    """Outcome of :func:`run_audit`: the audit's name and version, counts, time and its split, the scan's form."""

    name: str
    version: int
    n_train: int
    n_validation: int
    encoded_now: int
    flagged: int
    seconds: float
    validation_sha256: str
    encode_seconds: float = 0.0  # validation encoding (cache look-up, model load and forward passes of new samples)
    scan_seconds: float = 0.0  # scoring the store
    write_seconds: float = 0.0  # flags, ranks and the audit table
    form: str = "token"  # "gform" (aggregates as one matrix each) or "token" (per-validation-sample scores)


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
) -> AuditSummary:
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
    runner : Runner, optional
        An already loaded runner of the store's model.
    engine : EngineConfig, optional
        ``EngineConfig(engine="ray", ...)`` scores the store on Ray actors (docs/scale.md); the
        audit table is the single-process one.

    Returns
    -------
    AuditSummary
        With the time split (``encode_seconds``, ``scan_seconds``, ``write_seconds``) and the scan's
        ``form``; the audit's metadata records the split, the form and whether ``score_max`` was computed.

    Example
    -------
    >>> cfg = forvalue.AuditConfig(flag_fraction=0.05)                       # doctest: +SKIP
    >>> s = forvalue.run_audit("runs/store", ["val.jsonl"], "v1", cfg)       # doctest: +SKIP
    >>> s.flagged                                                                                       # doctest: +SKIP
    """
    # the scoring stack (torch) is imported here, not at module level: listing and showing audits loads no model
    from forvalue.api import _open, load_store_runner
    from forvalue.engine.validation import data_for_store, encode_validation_cached, load_validation_samples
    from forvalue.indexer.runner import resolve_device
    from forvalue.storage.audits import check_audit_name

    check_audit_name(name)  # before the model loads or anything is scored
    started = time.perf_counter()
    store = _open(store)
    data = data_for_store(data, store.manifest)
    samples = load_validation_samples(validation, data)
    loaded = {}

    def get_runner():
        if "runner" not in loaded:
            loaded["runner"] = runner or load_store_runner(store, replace(model or ModelConfig(), device=config.device))
        return loaded["runner"]

    if model is not None and model.path is not None:
        get_runner()  # an explicit model is always checked against the manifest
    val, encoded_now = encode_validation_cached(
        samples, store.manifest, data, get_runner, ValidationCache(store), config.batch_size
    )
    device = loaded["runner"].device if loaded else resolve_device(config.device)
    val_labels = [s.label for s in samples]
    groups = sorted({l for l in val_labels if l is not None})
    encoded_at = time.perf_counter()
    # aggregates in the G-form, or per-sample scores in bounded token-form blocks (forvalue.engine.gform)
    from forvalue.engine.gform import audit_scan

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
    if flag_score is None:  # "label": mean against the validation samples of the sample's own label
        flag_score = np.array([by_label[l][j] if l in by_label else mean[j] for j, l in enumerate(labels)])
    flagged = np.zeros(len(mean), bool)
    if config.flag_fraction:
        n_flag = int(round(config.flag_fraction * len(mean)))
        flagged[np.argsort(flag_score, kind="stable")[:n_flag]] = True
    if config.flag_threshold is not None:
        flagged |= flag_score < config.flag_threshold
    columns = {
        "id": pa.array(ids, pa.string()),
        "label": pa.array(labels, pa.string()),
        "score_mean": pa.array(mean),
        "score_max": pa.array(maximum, pa.float64()) if maximum is not None else pa.nulls(len(mean), pa.float64()),
        "rank": pa.array(rank),
        "flag_score": pa.array(flag_score),
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
        "settings": asdict(config),
        "validation_labels": groups,
        "flagged": int(flagged.sum()),
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
    return AuditSummary(
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
    )


def audits(store: str | Path) -> list[dict]:
    """Metadata of every audit of a store (name, version, created, counts, validation hash), by name.

    Example
    -------
    >>> [(a["name"], a["version"]) for a in forvalue.audits("runs/store")]   # doctest: +SKIP
    [('v1', 1)]
    """
    return list_audits(Store.open(store))


def load_audit(store: str | Path | Store, name: str) -> tuple[pa.Table, dict]:
    """The audit table (one row per training sample) and its metadata.

    Returns
    -------
    (pyarrow.Table, dict)
        Columns ``id``, ``label``, ``score_mean``, ``rank``, ``flagged`` (and per-label/group
        columns of the audit); the metadata as :func:`audits` lists it.

    Example
    -------
    >>> table, meta = forvalue.load_audit("runs/store", "v1")   # doctest: +SKIP
    >>> table.to_pandas().sort_values("rank").head()              # doctest: +SKIP
    """
    store = store if isinstance(store, Store) else Store.open(store)
    return read_audit(store, name)


def audit_summary(store: str | Path | Store, name: str, n_examples: int = 5) -> dict:
    """What ``forvalue audit show`` prints: metadata, mean-score percentiles, top and bottom examples.

    Returns
    -------
    dict
        The audit's metadata plus ``percentiles`` (``{"min", "p10", "median", "p90", "max"}``
        of ``score_mean``), ``top`` and ``bottom`` (lists of ``n_examples`` rows with ``id``,
        ``label``, ``score_mean``, ``rank``, ``flagged``; bottom is worst first).

    Example
    -------
    >>> s = forvalue.audit_summary("runs/store", "v1")            # doctest: +SKIP
    >>> s["percentiles"]["median"], s["bottom"][0]["id"]          # doctest: +SKIP
    """
    table, meta = load_audit(store, name)
    q = np.percentile(table.column("score_mean").to_numpy(), [0, 10, 50, 90, 100])
    rows = sorted(table.select(["id", "label", "score_mean", "rank", "flagged"]).to_pylist(), key=lambda r: r["rank"])
    n = max(0, n_examples)
    return {
        **meta,
        "percentiles": dict(zip(("min", "p10", "median", "p90", "max"), map(float, q))),
        "top": rows[:n],
        "bottom": rows[::-1][:n],
    }


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    return r


def compare_audits(store: str | Path, a: str, b: str, n_moved: int = 10) -> dict:
    """Spearman rank correlation of two audits' mean scores, biggest rank moves, newly flagged ids.

    Returns
    -------
    dict
        ``common`` (samples in both), ``spearman``, ``moved`` (``n_moved`` dicts ``id``, ``rank_a``,
        ``rank_b``), ``newly_flagged``, ``no_longer_flagged`` and ``scores`` (two float arrays,
        shape ``(common,)``).

    Example
    -------
    >>> c = forvalue.compare_audits("runs/store", "v1", "v2")   # doctest: +SKIP
    >>> round(c["spearman"], 3), c["newly_flagged"][:3]          # doctest: +SKIP
    """
    st = Store.open(store)
    ta, _ = read_audit(st, a)
    tb, _ = read_audit(st, b)
    da = {r["id"]: r for r in ta.select(["id", "score_mean", "rank", "flagged"]).to_pylist()}
    db_ = {r["id"]: r for r in tb.select(["id", "score_mean", "rank", "flagged"]).to_pylist()}
    common = [i for i in da if i in db_]
    if len(common) < 2:
        raise ForValueError(f"audits '{a}' and '{b}' share fewer than 2 training samples; nothing to compare")
    sa = np.array([da[i]["score_mean"] for i in common])
    sb = np.array([db_[i]["score_mean"] for i in common])
    spearman = float(np.corrcoef(_ranks(sa), _ranks(sb))[0, 1])
    moves = sorted(common, key=lambda i: -abs(da[i]["rank"] - db_[i]["rank"]))[:n_moved]
    return {
        "a": a,
        "b": b,
        "common": len(common),
        "spearman": spearman,
        "moved": [{"id": i, "rank_a": da[i]["rank"], "rank_b": db_[i]["rank"]} for i in moves],
        "newly_flagged": [i for i in common if db_[i]["flagged"] and not da[i]["flagged"]],
        "no_longer_flagged": [i for i in common if da[i]["flagged"] and not db_[i]["flagged"]],
        "scores": (sa, sb),
    }


def parse_amount(text: str, total: int, flag: str = "--top") -> int:
    """``'10%'`` -> that share of ``total`` (rounded), ``'100'`` -> 100.

    A percentage above 100% is refused; ``--top`` must select at least one sample.
    """
    from forvalue.schemas.amounts import parse_share

    share, n = parse_share(text, total, flag)
    if flag == "--top" and n == 0:
        raise ForValueError(f"{flag} '{text}' selects no sample (of {total}); give a larger count or percentage")
    return min(n, total)


def select_subset(
    store: str | Path,
    audit: str,
    top: str | None = None,
    drop_bottom: str | None = None,
    output: str | Path | None = None,
) -> list[dict]:
    """Training rows (id, prompt, response or text, label) chosen by an audit, best first.

    Parameters
    ----------
    top, drop_bottom : str
        Exactly one: keep the best ``N`` or ``N%``, or drop the worst ``N`` or ``N%``.
    output : path, optional
        Also write the rows as JSONL (ready for fine-tuning), atomically: the file appears
        whole or not at all.

    Example
    -------
    >>> rows = forvalue.select_subset("runs/store", "v1", top="50%", output="subset.jsonl")  # doctest: +SKIP
    """
    from forvalue.storage.files import check_outputs

    if (top is None) == (drop_bottom is None):
        raise ForValueError("give exactly one of --top or --drop-bottom")
    check_outputs({"output": (output, (".jsonl",))}, [store])
    st = Store.open(store)
    table, _ = read_audit(st, audit)
    rows = sorted(table.select(["id", "rank"]).to_pylist(), key=lambda r: r["rank"])
    n = len(rows)
    keep = (
        rows[: parse_amount(top, n)] if top is not None else rows[: n - parse_amount(drop_bottom, n, "--drop-bottom")]
    )
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
    return rows
