"""Store maintenance that loads no model.

What a store holds, whether it is sound, and its prefilter sketches and FAISS index.

Imports stay light (no torch, transformers or lancedb at module level) so that
``forvalue index info`` answers in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from forvalue.results import CheckReport, SketchReport, StoreInfo
from forvalue.schemas.errors import ForValueError, StoreError
from forvalue.storage import faiss_index
from forvalue.storage.location import lance_options
from forvalue.storage.store import Store, WriterLease


def store_info(path: str | Path) -> StoreInfo:
    """Manifest and counts of a store (no model is loaded); :meth:`forvalue.Store.info` calls it."""
    store = Store.open(path)
    rows = tokens = truncated = 0
    labels: dict[str, int] = {}
    for batch in store.scan(["n_scored", "truncated", "label"], batch_size=65536):
        rows += batch.num_rows
        tokens += int(np.asarray(batch.column("n_scored")).sum())
        truncated += int(np.asarray(batch.column("truncated")).sum())
        for label in batch.column("label").to_pylist():
            labels[str(label)] = labels.get(str(label), 0) + 1
    size = store.size_bytes()
    return StoreInfo(
        path=str(path),
        samples=rows,
        scored_tokens=tokens,
        truncated_samples=truncated,
        labels=dict(sorted(labels.items())) if len(labels) <= 50 else f"{len(labels)} distinct",
        table_version=store.version(),
        bytes_on_disk=size,
        bytes_per_token=round(size / tokens, 1) if tokens else None,
        sketch=_sketch_state(store),
        prefilter_index=_prefilter_state(store, rows),
        manifest=dict(store.manifest.__dict__),
        hidden_states=_hidden_state(store),
    )


def _hidden_basis_problems(store: Store) -> list[str]:
    """A low-rank store's basis: present, readable, of the manifest's shape and orthonormal."""
    from forvalue.storage.hidden_basis import hidden_basis_path, load_hidden_basis

    if not store.manifest.hidden_rank:
        return []
    if not hidden_basis_path(store.path).exists() and not store.count():
        return []  # killed before its first rows: the build or convert that writes them publishes the basis first
    try:
        basis, _ = load_hidden_basis(store.path, store.manifest)
    except StoreError as exc:
        return [str(exc)]
    gram = basis.astype(np.float64).T @ basis.astype(np.float64)
    if np.abs(gram - np.eye(gram.shape[0])).max() > 1e-4:
        return [f"{hidden_basis_path(store.path)}: the basis is not orthonormal; restore it from a copy of the store"]
    return []


def _hidden_state(store: Store) -> str:
    """``index info``'s line on the hidden states: dtype, int8 block, and the low-rank tier's rank and energy."""
    from forvalue.storage.hidden_basis import load_hidden_basis

    m = store.manifest
    dtype = f"int8 (a scale per {m.hidden_block} channels)" if m.hidden_dtype == "int8" else m.hidden_dtype
    if not m.hidden_rank:
        return f"{dtype}, full width ({m.hidden_size} values per token)"
    try:
        _, energy = load_hidden_basis(store.path, m)
    except StoreError as exc:
        return f"{dtype}, rank {m.hidden_rank} of {m.hidden_size}; {exc}"
    prefixes = [r for r in (16, 32, 64, 128, 256, 512) if r < m.hidden_rank]
    kept = ", ".join(f"{r}: {energy[r - 1]:.2%}" for r in prefixes)
    return (
        f"{dtype}, rank {m.hidden_rank} of {m.hidden_size} (a fitted basis, hidden_basis.npz), keeps "
        f"{energy[-1]:.2%} of the fitting tokens' energy" + (f" (the first {kept})" if kept else "")
    )


def _sketch_state(store: Store) -> str:
    m = store.manifest
    if not m.sketch_dim or not store.has_column(faiss_index.SKETCH_COLUMN):
        return "none (add with 'forvalue index sketch')"
    return (
        f"D={m.sketch_dim} (vocab buckets {m.sketch_vocab_buckets}, hidden cols {m.sketch_hidden_cols}, "
        f"{m.sketch_basis} basis"
        + (f", {m.sketch_heavy_ids} heavy ids" if getattr(m, "sketch_heavy_ids", 0) else "")
        + ")"
    )


def _prefilter_state(store: Store, rows: int) -> str:
    meta = faiss_index.describe(store)
    if meta is None:
        return "none"
    behind = f", {rows - meta['rows']} rows behind (extended on next use)" if meta["rows"] < rows else ""
    from forvalue.storage import rerank_table

    record = meta.get("rerank")
    staged = ""
    if record is not None and rerank_table.sound(record):
        folder = store.path / faiss_index.INDEX_DIR
        size = sum(seg["entries_bytes"] + seg["offsets_bytes"] for seg in record["segments"])
        wrong = rerank_table.problem(folder, record)
        staged = f"; second stage {size / 1e6:.1f} MB" if wrong is None else f"; second stage damaged ({wrong})"
    elif record is not None:
        staged = "; second stage record damaged ('index check')"
    if meta.get("from_column"):
        return f"{meta.get('factory')} over {meta['rows']} rows, made from the sketch column (no copy){staged}{behind}"
    return f"{meta.get('factory')} over {meta['rows']} rows, {meta.get('bytes', 0) / 1e6:.1f} MB{staged}{behind}"


def sketch_store(
    path,
    rebuild: bool = False,
    dim: int | None = None,
    seed: int | None = None,
    kind: str | None = None,
    vocab_buckets: int | None = None,
    hidden_cols: int | None = None,
    basis: str | None = None,
    block_rows: int = 1024,
    heavy_ids: int | None = None,
) -> SketchReport:
    """Add the ``sketch`` column to a store that lacks it (or recompute it), then build its FAISS index.

    Streams the table ``block_rows`` rows at a time (Lance ``add_columns``); the manifest records
    the new sketch spec. A fitted sketch refits its basis from the first stored hidden states.
    Takes the store's writer lease, so it refuses to run while a build appends (and a build refuses
    to start while it runs).

    :meth:`forvalue.Store.sketch` calls it.
    """
    opened = Store.open(path)  # a path that is not a store gets that message, not a lease error
    _check_sketch_args(
        sketch_dim=dim,
        sketch_seed=seed,
        sketch_vocab_buckets=vocab_buckets,
        sketch_hidden_cols=hidden_cols,
        sketch_heavy_ids=heavy_ids,
    )
    if dim == 0:  # (None: keep the store's D)
        raise StoreError(
            f"{path}: --sketch-dim 0 means no sketch, and 'index sketch' makes one; give a positive D, or leave "
            "--sketch-dim out to keep the store's"
        )
    faiss_index.check_kind(kind, dim or opened.manifest.sketch_dim or 64)  # a bad --faiss-index: before any work
    with WriterLease.acquire(path, sharded=False):
        return SketchReport(
            **_sketch_store(path, rebuild, dim, seed, kind, vocab_buckets, hidden_cols, basis, block_rows, heavy_ids)
        )


def _check_sketch_args(**given) -> None:
    """Whole numbers within the bounds of their EncodeConfig fields (None: keep the store's), else ConfigError:
    what the CLI's option types refuse, for callers of the API."""
    import numbers
    from dataclasses import fields

    from forvalue.schemas.config import EncodeConfig
    from forvalue.schemas.errors import ConfigError

    meta = {f.name: f.metadata for f in fields(EncodeConfig)}
    for name, value in given.items():
        if value is None:
            continue
        low, high = meta[name].get("min"), meta[name].get("max")
        whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if not whole or (low is not None and value < low) or (high is not None and value > high):
            raise ConfigError(name, f"must be a whole number from {low} to {high}, got {value!r}")


def _sketch_store(path, rebuild, dim, seed, kind, vocab_buckets, hidden_cols, basis, block_rows, heavy_ids) -> dict:
    """:func:`sketch_store` while holding the writer lease."""
    import dataclasses
    import time

    import pyarrow as pa

    from forvalue.engine.scorer import decode_block
    from forvalue.indexer.build import BASIS_FIT_TOKENS
    from forvalue.indexer.sketch import SketchSpec, fit_heavy_ids, get_sketcher
    from forvalue.schemas.config import EncodeConfig
    from forvalue.schemas.tables import SCORING_COLUMNS
    from forvalue.storage.sketch_basis import (
        fit_basis,
        heavy_ids_fit,
        load_basis,
        load_heavy_ids,
        publish_basis,
        publish_heavy_ids,
    )

    store = Store.open(path)
    m = store.manifest
    default = EncodeConfig()
    had = bool(m.sketch_dim)
    shape_given = vocab_buckets is not None or hidden_cols is not None or basis is not None
    new = dataclasses.replace(
        m,
        sketch_dim=dim or (m.sketch_dim if had and not shape_given else default.sketch_dim),
        sketch_seed=seed if seed is not None else (m.sketch_seed if had else default.sketch_seed),
        sketch_vocab_buckets=vocab_buckets
        or (m.sketch_vocab_buckets if had and not shape_given else default.sketch_vocab_buckets),
        sketch_hidden_cols=hidden_cols
        or (m.sketch_hidden_cols if had and not shape_given else default.sketch_hidden_cols),
        sketch_basis=basis or (m.sketch_basis if had else default.sketch_basis),
        sketch_heavy_ids=heavy_ids
        if heavy_ids is not None
        else (m.sketch_heavy_ids if had and not shape_given else default.sketch_heavy_ids),
        schema_version=max(m.schema_version, 2),
    )
    try:
        spec = SketchSpec.from_manifest(new)
    except ForValueError as exc:  # (a shape this store cannot have: name the store)
        raise StoreError(f"{path}: {exc}") from None
    report = {
        "store": str(path),
        "rows": store.count(),
        "sketch_dim": spec.dim,
        "sketch_basis": spec.basis,
        "vocab_buckets": spec.vocab_buckets,
        "hidden_cols": spec.hidden_cols,
        "heavy_ids": spec.heavy,
        "sketched": False,
    }
    started = time.perf_counter()

    def lost(load) -> bool:  # missing or unreadable: fitted again below
        try:
            return load(store.path) is None
        except StoreError:
            return True

    def unusable_heavy_ids() -> bool:  # missing, unreadable, or not spec.heavy distinct vocabulary ids
        try:
            return not heavy_ids_fit(load_heavy_ids(store.path), spec.heavy, m.vocab_size)
        except StoreError:
            return True

    missing_basis = spec.basis == "fitted" and lost(load_basis)
    missing_basis |= bool(spec.heavy) and unusable_heavy_ids()
    if rebuild or new != m or missing_basis or not store.has_column(faiss_index.SKETCH_COLUMN):
        fitted = heavy = None
        if spec.basis == "fitted":  # the basis, then the heavy ids, then the column, then the manifest
            hidden, ids, values = _first_tokens(store, BASIS_FIT_TOKENS, block_rows)
            fitted = publish_basis(store.path, fit_basis(hidden, spec.hidden_cols), replace=True)
            if spec.heavy:
                chosen = fit_heavy_ids(hidden, ids, values, fitted, spec.heavy, spec.vocab_size)
                heavy = publish_heavy_ids(store.path, chosen, replace=True)
        sketcher = get_sketcher(spec, fitted, heavy_ids=heavy)
        value_type = pa.float16() if new.sketch_dtype == "float16" else pa.float32()
        field = pa.field(faiss_index.SKETCH_COLUMN, pa.list_(value_type, spec.dim))

        def fn(batch):
            b = decode_block(batch, m.stored_width)
            z = sketcher.sketch(b.hidden, b.ids, b.values, b.lengths)
            return pa.FixedSizeListArray.from_arrays(pa.array(z.ravel(), pa.float32()).cast(value_type), spec.dim)

        read = store.columns_for(SCORING_COLUMNS)
        store.set_column(faiss_index.SKETCH_COLUMN, field, fn, read, new, batch_size=block_rows)
        report["sketched"] = True
    report["sketch_seconds"] = round(time.perf_counter() - started, 2)
    t0 = time.perf_counter()
    pre = faiss_index.ensure(store, kind=kind, rebuild=report["sketched"] or kind is not None)
    report.update(
        faiss=pre.meta.get("factory"),
        faiss_rows=pre.rows,
        faiss_seconds=round(time.perf_counter() - t0, 2),
        faiss_bytes=pre.meta.get("bytes"),
    )
    return report


def _first_tokens(store: Store, tokens: int, block_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hidden states ``(N, d)`` float32 and error ids / values ``(N, m + 1)`` of the first stored tokens (up to
    ``tokens``): what a fitted sketch's basis and heavy ids are fitted from."""
    from forvalue.engine.scorer import decode_block
    from forvalue.schemas.tables import SCORING_COLUMNS

    parts, n = [], 0
    for batch in store.scan(store.columns_for(SCORING_COLUMNS), batch_size=block_rows):
        b = decode_block(batch, store.manifest.stored_width)
        parts.append((b.hidden, b.ids, b.values))
        n += b.hidden.shape[0]
        if n >= tokens:
            break
    if not parts:
        raise ForValueError(f"{store.path}: the store is empty; nothing to fit a sketch basis from")
    hidden, ids, values = (np.concatenate(x)[:tokens] for x in zip(*parts))
    return hidden, ids, values


def check_store(path: str | Path, repair: bool = False, block_rows: int = 4096) -> CheckReport:
    """Verify a store (loads no model); with ``repair``, remove duplicate rows and rebuild a bad prefilter index.

    Checks: the table's schema agrees with the manifest (columns, hidden dtype, sketch length);
    every fragment's data files read; every row decodes (:func:`~forvalue.engine.scorer.decode_block`)
    with per-token arrays of the lengths that ``n_scored``, the hidden size and ``top_m`` imply and
    finite values; ids are unique; the prefilter index covers the rows with the store's sketch spec;
    every audit references only stored ids.

    ``repair`` takes the store's writer lease (so it refuses to run during a build), deletes every
    repeated id but its first row in storage order in one atomic Lance commit, rebuilds the prefilter
    index when rows were removed or it is unsound, then checks again. Damaged data files are reported,
    not repaired (rebuild the store, or restore it from a copy).

    :meth:`forvalue.Store.check` calls it; the result is a :class:`~forvalue.results.CheckReport`.
    """
    report = _check(Store.open(path), block_rows)
    if not repair:
        return _check_report(report)
    with WriterLease.acquire(path, sharded=False):  # (no --shard to suggest to a repair)
        store = Store.open(path)
        done = {"duplicate_rows_removed": 0, "prefilter_rebuilt": False}
        if report["duplicate_addresses"]:
            done["duplicate_rows_removed"] = store.delete_rows(report["duplicate_addresses"])
        if (
            store.manifest.sketch_dim
            and store.has_column(faiss_index.SKETCH_COLUMN)
            and store.count()
            and (done["duplicate_rows_removed"] or report["prefilter_unsound"])
        ):
            faiss_index.ensure(store, rebuild=True)  # row positions moved: the index is rebuilt, not extended
            done["prefilter_rebuilt"] = True
        from forvalue.storage.audits import remove_uncommitted

        done["uncommitted_tables_removed"] = remove_uncommitted(store)
        removed = faiss_index.remove_unused(store) if faiss_index.describe(store) is not None else 0
        done["unused_prefilter_files_removed"] = removed
        after = _check(Store.open(path), block_rows)
    after["repaired"] = done
    return _check_report(after)


def _check_report(report: dict) -> CheckReport:
    report = dict(report)
    return CheckReport(
        _duplicate_addresses=report.pop("duplicate_addresses"),
        _prefilter_unsound=report.pop("prefilter_unsound"),
        **report,
    )


def _check(store: Store, block_rows: int) -> dict:
    m = store.manifest
    problems: list[str] = []
    notes: list[str] = []
    where = str(store.path)
    problems += _schema_problems(store)
    problems += _hidden_basis_problems(store)
    first_row: dict[str, int] = {}
    duplicates: list[int] = []
    repeated: dict[str, int] = {}
    bad_rows: list[str] = []
    rows = 0
    readable = {name for name in _ROW_CHECKS if store.has_column(name)} == set(_ROW_CHECKS)
    readable &= m.hidden_dtype != "int8" or store.has_column("hidden_scale")
    columns = ["id"] + (list(_ROW_CHECKS) if readable else [])
    for fragment in store.fragments():
        files = ", ".join(f"data/{d.path}" for d in fragment.data_files())
        try:
            for batch in store.scan(columns, batch_size=block_rows, with_row_address=True, fragments=[fragment]):
                rows += batch.num_rows
                ids = batch.column("id").to_pylist()
                for sample_id, address in zip(ids, batch.column("_rowaddr").to_pylist()):
                    if sample_id in first_row:
                        duplicates.append(address)
                        repeated[sample_id] = repeated.get(sample_id, 1) + 1
                    else:
                        first_row[sample_id] = address
                if readable:
                    bad_rows += _row_problems(batch, ids, m.stored_width, m.top_m, m.hidden_block)
        except StoreError as exc:
            problems.append(
                f"{where}: fragment {fragment.fragment_id} ({files}) is unreadable: {_cause(exc)}; "
                "rebuild the store or restore it from a copy"
            )
    if repeated:
        example = next(iter(repeated))
        problems.append(
            f"{where}: {len(duplicates)} duplicate rows of {len(repeated)} ids (e.g. '{example}' stored "
            f"{repeated[example]} times); run 'forvalue index check --store {where} --repair'"
        )
    if bad_rows:
        problems.append(f"{where}: {len(bad_rows)} rows do not decode ({bad_rows[0]}); rebuild the store")
    prefilter_unsound = _prefilter_check(store, rows, problems, notes)
    problems += _audit_problems(store, first_row)
    notes += _cache_notes(store)
    return {
        "store": where,
        "rows": rows,
        "distinct_ids": len(first_row),
        "clean": not problems,
        "problems": problems,
        "notes": notes,
        "duplicate_addresses": duplicates,
        "prefilter_unsound": prefilter_unsound,
    }


# per-row list lengths, as multiples of n_scored: (column, what one scored position holds)
_ROW_CHECKS = {
    "n_scored": None,
    "sq_norm": None,
    "hidden": "hidden_size",
    "topk_ids": "top_m",
    "topk_probs": "top_m",
    "target_ids": 1,
    "target_probs": 1,
    "tail_mass": 1,
}


def _row_problems(batch, ids: list, hidden_size: int, top_m: int, hidden_block: int = 0) -> list[str]:
    """One description per row of ``batch`` whose arrays disagree with ``n_scored`` or hold non-finite values
    (``hidden_block``: channels per int8 scale, whose ``hidden_scale`` column is checked too)."""
    import pyarrow.compute as pc

    from forvalue.engine.scorer import decode_block
    from forvalue.schemas.tables import HIDDEN_SCALE_COLUMN

    n = np.asarray(batch.column("n_scored").to_numpy(zero_copy_only=False), np.int64)
    per = {"hidden_size": hidden_size, "top_m": top_m, "scales": hidden_size // hidden_block if hidden_block else 0}
    checks = dict(_ROW_CHECKS)
    if hidden_block and HIDDEN_SCALE_COLUMN in batch.schema.names:
        checks[HIDDEN_SCALE_COLUMN] = "scales"
    bad = n < 1
    why = np.where(bad, "n_scored < 1", "")
    for name, unit in checks.items():
        if unit is None:
            continue
        length = np.asarray(pc.list_value_length(batch.column(name)).fill_null(-1).to_numpy(zero_copy_only=False))
        wrong = length != n * (per[unit] if isinstance(unit, str) else unit)
        why = np.where(wrong & ~bad, f"'{name}' has the wrong length", why)
        bad |= wrong
    sq = np.asarray(batch.column("sq_norm").to_numpy(zero_copy_only=False), np.float64)
    nonfinite = ~np.isfinite(sq) | (sq < 0)
    why = np.where(nonfinite & ~bad, "sq_norm is not a finite non-negative number", why)
    bad |= nonfinite
    out = [f"row '{ids[k]}': {why[k]}" for k in np.flatnonzero(bad)]
    good = np.flatnonzero(~bad)
    if len(good):
        try:
            block = decode_block(batch.take(good), hidden_size)
        except (ValueError, TypeError, IndexError) as exc:
            return out + [f"rows '{ids[good[0]]}'..'{ids[good[-1]]}' do not decode ({exc})"]
        if not (np.isfinite(block.hidden).all() and np.isfinite(block.values).all()):
            finite = np.isfinite(block.hidden).all(axis=1) & np.isfinite(block.values).all(axis=1)
            row_of = np.repeat(good, block.lengths)
            out += [f"row '{ids[k]}': hidden states or probabilities are NaN/inf" for k in np.unique(row_of[~finite])]
    return out


def _schema_problems(store: Store) -> list[str]:
    from forvalue.schemas.tables import schema_of

    m = store.manifest
    where = str(store.path)
    expected = schema_of(m)
    actual = store.schema()
    out = []
    for field in expected:
        if field.name not in actual.names:
            if field.name == faiss_index.SKETCH_COLUMN:
                out.append(
                    f"{where}: the manifest describes a sketch (D={m.sketch_dim}) but the table has no "
                    f"'sketch' column; run 'forvalue index sketch --store {where} --rebuild'"
                )
            else:
                out.append(f"{where}: the table has no '{field.name}' column; the store is damaged, rebuild it")
        elif actual.field(field.name).type != field.type:
            fix = (  # (a sketch of another D: what an interrupted 'index sketch' leaves)
                f"run 'forvalue index sketch --store {where} --rebuild'"
                if field.name == faiss_index.SKETCH_COLUMN
                else "the store is damaged"
            )
            out.append(
                f"{where}: column '{field.name}' is {actual.field(field.name).type}, the manifest implies "
                f"{field.type} (hidden_dtype {m.hidden_dtype}, ids {m.ids_dtype}, probabilities {m.probs_dtype}, "
                f"sketch_dim {m.sketch_dim} {m.sketch_dtype}); {fix}"
            )
    if faiss_index.SKETCH_COLUMN in actual.names and not m.sketch_dim:
        out.append(
            f"{where}: the table has a 'sketch' column the manifest does not describe; "
            f"run 'forvalue index sketch --store {where} --rebuild'"
        )
    return out


def _heavy_ids_problem(store: Store) -> str | None:
    """What is wrong with the sketch's heavy ids (STORE/sketch_vocab.npy), or None."""
    from forvalue.storage.sketch_basis import heavy_ids_fit, load_heavy_ids

    m, where = store.manifest, str(store.path)
    if not getattr(m, "sketch_heavy_ids", 0):
        return None
    fix = f"run 'forvalue index sketch --store {where} --rebuild'"
    try:
        heavy = load_heavy_ids(store.path)
    except StoreError as exc:
        return str(exc)
    if heavy is None:
        return f"{where}: the sketch vocabulary (sketch_vocab.npy) is missing; {fix}"
    if not heavy_ids_fit(heavy, m.sketch_heavy_ids, m.vocab_size):
        return (
            f"{where}: the sketch vocabulary holds {heavy.size} ids, the manifest's sketch needs {m.sketch_heavy_ids} "
            f"distinct ids below {m.vocab_size} (an interrupted 'index sketch' leaves this); {fix}"
        )
    return None


def _prefilter_check(store: Store, rows: int, problems: list[str], notes: list[str]) -> bool:
    """Adds what is wrong with the prefilter index (and its sketch basis); True when it needs a rebuild."""
    from forvalue.storage.sketch_basis import load_basis

    m = store.manifest
    where = str(store.path)
    if not m.sketch_dim or not store.has_column(faiss_index.SKETCH_COLUMN):
        return False
    if m.sketch_basis == "fitted" and rows:
        try:
            basis = load_basis(store.path)
            if basis is None:
                problems.append(
                    f"{where}: the sketch basis (sketch_basis.npy) is missing; "
                    f"run 'forvalue index sketch --store {where} --rebuild'"
                )
                return False
        except StoreError as exc:
            problems.append(str(exc))
            return False
        heavy_problem = _heavy_ids_problem(store)
        if heavy_problem:
            problems.append(heavy_problem)
            return False
        if basis.shape != (m.stored_width, m.sketch_hidden_cols):
            problems.append(
                f"{where}: the sketch basis has shape {basis.shape}, the manifest's sketch needs "
                f"({m.stored_width}, {m.sketch_hidden_cols}) (an interrupted 'index sketch' leaves this); "
                f"run 'forvalue index sketch --store {where} --rebuild'"
            )
            return False
    try:
        faiss_index.check_folder(store)
    except StoreError as exc:
        problems.append(str(exc))
        return False  # (a repair cannot write there: the user removes the file)
    meta = faiss_index.describe(store)
    fix = f"run 'forvalue index check --store {where} --repair' to rebuild it"
    if meta is None:
        if (store.path / faiss_index.INDEX_DIR / faiss_index.META_FILE).exists():
            problems.append(f"{where}: the prefilter record prefilter.json is damaged; {fix}")
            return True
        if rows:
            notes.append("no prefilter index yet (built on the next build or prefiltered query)")
        return False
    try:
        if meta.get("from_column"):  # an exact float16 index, made from the sketch column when loaded
            size = meta["bytes"]
        else:
            size = (store.path / faiss_index.INDEX_DIR / meta["file"]).stat().st_size
        if size != meta["bytes"]:
            problems.append(
                f"{where}: the prefilter index file {meta['file']} has {size} bytes, not {meta['bytes']}; {fix}"
            )
            return True
    except (OSError, KeyError, TypeError):
        problems.append(f"{where}: the prefilter index file named in prefilter.json is missing; {fix}")
        return True
    if meta.get("sketch") != faiss_index._spec_of(store):
        problems.append(f"{where}: the prefilter index was built for another sketch than the store's; {fix}")
        return True
    if meta.get("rows", 0) > rows:
        problems.append(f"{where}: the prefilter index covers {meta['rows']} rows, the table holds {rows}; {fix}")
        return True
    if not meta.get("from_column") and faiss_index.load(store) is None:  # bytes changed in place: FAISS refuses it
        problems.append(f"{where}: the prefilter index file {meta['file']} does not load; {fix}")
        return True
    if _second_stage_problem(store, meta, problems, fix):
        return True
    unused = faiss_index.unused_files(store, meta)
    if unused:
        size = sum(f.stat().st_size for f in unused if f.exists())
        notes.append(
            f"{len(unused)} second-stage files ({size / 1e6:.1f} MB) that prefilter.json does not name, of writers no "
            "longer running (a query beside another that wrote the stage too, or one killed); removed on the next "
            "index update or by 'index check --repair'"
        )
    if meta.get("rows", 0) < rows:
        notes.append(f"the prefilter index covers {meta['rows']} of {rows} rows (extended on next use)")
    return False


def _second_stage_problem(store: Store, meta: dict, problems: list[str], fix: str) -> bool:
    """Adds what is wrong with the prefilter's second stage (``forvalue.storage.rerank_table``); True when it is."""
    from forvalue.storage import rerank_table

    record = meta.get("rerank")
    if record is None:  # none yet (an index of before, or no rows to fit it on): written on the index's next use
        return False
    folder = store.path / faiss_index.INDEX_DIR
    if not rerank_table.sound(record):
        why = "its record in prefilter.json is damaged"
    elif record["rows"] != meta.get("rows"):
        why = f"it covers {record['rows']} rows, the index {meta.get('rows')}"
    else:
        why = rerank_table.problem(folder, record)
        loaded = None if why else rerank_table.load(folder, record, store.manifest.vocab_size)
        if why is None and loaded is None:
            why = "its files do not load (or its record names another vocabulary than the store's)"
        elif why is None:
            why = loaded.damage()  # every entry read: ids in the vocabulary, values finite
    if why:
        problems.append(f"{store.path}: the prefilter's second stage: {why}; {fix}")
    return bool(why)


def _audit_problems(store: Store, ids: dict) -> list[str]:
    """Audits whose rows name ids the store does not hold."""
    import lance

    from forvalue.storage.audits import AUDIT_PREFIX, _tables, uncommitted_tables
    from forvalue.storage.store import translate_errors

    out = [
        f"{folder}: a table without a committed version (a run killed in its first commit; it is invisible "
        f"to audits); run 'forvalue index check --store {store.path} --repair' to remove it"
        for folder in uncommitted_tables(store)
        if folder.name.startswith(AUDIT_PREFIX)  # an uncommitted validation cache is a note (_check)
    ]
    for table in _tables(store):
        if not table.startswith(AUDIT_PREFIX):
            continue
        name = table[len(AUDIT_PREFIX) :]
        try:
            with translate_errors(store.path, f"read audit '{name}' of"):
                audit_ids = (
                    lance.dataset(str(store.path / f"{table}.lance"), storage_options=lance_options(store.path))
                    .to_table(columns=["id"])
                    .column(0)
                    .to_pylist()
                )
        except StoreError as exc:
            out.append(str(exc))
            continue
        unknown = [i for i in audit_ids if i not in ids]
        if unknown:
            out.append(
                f"{store.path}: audit '{name}' scores {len(unknown)} ids the store does not hold "
                f"(e.g. '{unknown[0]}'); re-run it with 'forvalue audit run --name {name}'"
            )
    return out


def _cache_notes(store: Store) -> list[str]:
    """An uncommitted validation cache: harmless (the next audit re-creates it); --repair drops it."""
    from forvalue.storage.audits import AUDIT_PREFIX, uncommitted_tables

    return [
        f"{folder.name} has no committed version (an audit stopped while creating it); the next audit re-creates "
        "it, --repair removes it"
        for folder in uncommitted_tables(store)
        if not folder.name.startswith(AUDIT_PREFIX)
    ]


def _cause(exc: StoreError) -> str:
    from forvalue.storage.store import short_reason

    return short_reason(exc.__cause__) if exc.__cause__ is not None else str(exc)
