"""The index build pipeline: data files -> tokenized samples -> forward pass -> store.

Nothing is kept in memory across write batches except the set of stored ids (to skip
them when a build resumes), so peak memory does not grow with the corpus. Each write
batch is one atomic commit: after a crash the next run skips what was committed and
writes the rest, so no sample is lost or stored twice.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Iterator

from forvalue.indexer.build_steps import (  # noqa: F401  (re-exported: the public names of a build live here)
    BASIS_FIT_TOKENS,
    BuildReport,
    finish_build,
    finite_or_skipped,
    fresh_samples,
    in_shard,
    manifest_for,
    refuse_empty_new_store,
    resolve_score_tokens,
    sketch_column,
    store_basis,
    stored_encodings,
    tokenize_counted,
)
from forvalue.indexer.data import Sample, check_inputs, iter_samples
from forvalue.indexer.encoder import EncodedSample, encode_stream
from forvalue.indexer.sketch import SketchSpec
from forvalue.indexer.tokenize import TokenizedSample
from forvalue.schemas.config import BuildConfig, EngineConfig
from forvalue.schemas.manifest import MANIFEST_FILE
from forvalue.schemas.tables import SAMPLES_TABLE
from forvalue.storage.location import check_reachable, store_location
from forvalue.storage.rows import encoded_to_arrow
from forvalue.storage.store import Store, WriterLease


def build_index(
    inputs: Iterable[str | Path],
    store_path: str | Path,
    config: BuildConfig = BuildConfig(),
    runner=None,
    engine: EngineConfig | None = None,
) -> BuildReport:
    """Encode every new sample of ``inputs`` and append it to the store at ``store_path``.

    Parameters
    ----------
    inputs : iterable of path
        Data files or ``datasets`` folders (see :func:`forvalue.indexer.data.iter_samples`).
    store_path : path
        Created if missing; an existing store must have the same manifest.
    config : BuildConfig
    runner : optional
        A loaded model runner (reused across calls, e.g. in tests); loaded from
        ``config.model`` when None.
    engine : EngineConfig, optional
        ``EngineConfig(engine="ray", ...)`` encodes on a pool of Ray actors and commits their Lance
        fragments from this process (:mod:`forvalue.indexer.ray_build`); default: this process.

    Returns
    -------
    BuildReport
        Counts (``read``, ``written``, ``already_stored``, ``skipped``...), tokens scored, seconds.

    Example
    -------
    >>> cfg = forvalue.BuildConfig(model=forvalue.ModelConfig(path=model_path), batch_size=8, progress=False)
    >>> report = build_index([train_path], "new-store", cfg)          # forvalue.build(...) calls this
    >>> report.written, report.total_rows
    (12, 12)
    """
    from forvalue.indexer.model_runner import load_runner

    started = time.perf_counter()
    if engine is not None and engine.engine == "ray":
        from forvalue.indexer.ray_build import ray_build_index

        return ray_build_index(inputs, store_path, config, engine)
    inputs = list(inputs)
    check_inputs(inputs, config.data)  # a bad or empty input fails here, before the model loads or a store is made
    config = resolve_score_tokens(config, inputs)
    # The writer lease (one unsharded writer, or sharded workers of distinct shards), taken before the
    # model loads when the store exists; a new store is leased right after it is created.
    store_path = store_location(store_path)
    check_reachable(store_path)  # an object store: no bucket, denied or unreachable is one line, now
    existing = (store_path / MANIFEST_FILE).exists()
    lease = WriterLease.acquire(store_path, config.shard) if existing else None
    try:
        if existing:
            _check_sketch_column(store_path)
        runner = runner if runner is not None else load_runner(config.model)
        store = Store.create(store_path, manifest_for(runner, config.data, config.encode))
        lease = lease or WriterLease.acquire(store_path, config.shard)
        report = _build(inputs, store, config, runner, started)
        if not existing:
            refuse_empty_new_store(store_path, report, inputs, config)  # (under the lease: no other writer in it)
        return report
    finally:
        if lease is not None:
            lease.release()


def _check_sketch_column(store_path) -> None:
    """An existing table without the sketch column its manifest describes (an 'index sketch --rebuild' killed
    between dropping and writing it) cannot take new rows: say so before the model loads (the append failed
    after the first batch's forward pass with Lance's schema message; hostile pass)."""
    from forvalue.schemas.errors import ForValueError
    from forvalue.storage.faiss_index import check_sketch_column_kept

    if not (store_path / f"{SAMPLES_TABLE}.lance").is_dir():  # a build killed before its first rows: it resumes
        return
    try:
        store = Store.open(store_path)
    except ForValueError:  # a table a concurrent sharded worker is creating (its folder before its first version),
        return  # or a problem the build itself meets and names (the suite's sharded-workers test hit the former)
    check_sketch_column_kept(store, then=" before adding rows")


def _build(inputs: list, store: Store, config: BuildConfig, runner, started: float) -> BuildReport:
    """The build proper, run while holding the store's writer lease."""
    from tqdm.auto import tqdm

    report = BuildReport(store=str(store.path), max_length=config.data.max_length)
    stored = store.ids()
    bar = tqdm(desc="indexing", unit="sample", disable=not config.progress)
    tokenized = _new_samples(iter_samples(inputs, config.data), runner, config, stored, report)
    pending: list[EncodedSample] = []
    for enc in encode_stream(runner, tokenized, config.encode, config.batch_size, training=True):
        bar.update(1)
        if not finite_or_skipped(enc, config, report):
            continue
        pending.append(enc)
        if len(pending) >= config.write_every:
            _flush(store, pending, report)
    _flush(store, pending, report)
    bar.close()
    return finish_build(store, report, started, config.progress)


def _new_samples(
    samples: Iterator[Sample], runner, config: BuildConfig, stored: set[str], report: BuildReport
) -> Iterator[TokenizedSample]:
    for sample in fresh_samples(samples, config, stored, report):
        tok = tokenize_counted(sample, runner, config, report)
        if tok is not None:
            yield tok


def _flush(store: Store, pending: list[EncodedSample], report: BuildReport) -> None:
    if not pending:
        return
    spec = SketchSpec.from_manifest(store.manifest)
    rows = stored_encodings(store.path, store.manifest, pending)  # projected in a low-rank store
    basis, heavy = store_basis(store.path, spec, rows)
    sketch = sketch_column(rows, spec, basis, heavy) if spec is not None else None
    committed = store.append(encoded_to_arrow(rows, store.manifest, sketch))
    report.written += committed
    report.already_stored += len(pending) - committed  # committed meanwhile by another writer (dropped at commit)
    report.tokens_scored += sum(len(e.hidden) for e in pending)
    pending.clear()
