"""The index build pipeline: data files -> tokenized samples -> forward pass -> store.

Nothing is kept in memory across write batches except the set of stored ids (to skip
them when a build resumes), so peak memory does not grow with the corpus. Each write
batch is one atomic commit: after a crash the next run skips what was committed and
writes the rest, so no sample is lost or stored twice.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from forvalue.schemas.config import BuildConfig, DataConfig, EncodeConfig, EngineConfig
from forvalue.schemas.errors import BadValuesError
from forvalue.schemas.manifest import MANIFEST_FILE, Manifest
from forvalue.storage.sketch_basis import load_basis, publish_basis
from forvalue.storage.rows import encoded_to_arrow
from forvalue.storage.store import Store, WriterLease

from forvalue.indexer.data import Sample, check_inputs, data_format, iter_samples
from forvalue.indexer.encoder import EncodedSample, encode_stream
from forvalue.indexer.images import ImageError
from forvalue.indexer.sketch import SketchSpec, fit_basis, get_sketcher
from forvalue.indexer.tokenize import TokenizedSample

# Hidden states (tokens) used to fit a store's sketch basis: the first ones written.
BASIS_FIT_TOKENS = 200_000


@dataclass
class BuildReport:
    """Counts of one build run (also printed by the CLI).

    ``repeats_kept`` / ``repeats_dropped``: rows of this worker's shard, new to the store, that
    repeat an earlier row's content (no id column), kept as their own samples or dropped by
    ``dedupe``. ``duplicate_ids``: rows whose id column repeats an earlier row's id (the first is kept).
    """

    store: str
    read: int = 0
    written: int = 0
    already_stored: int = 0
    duplicate_ids: int = 0
    repeats_kept: int = 0
    repeats_dropped: int = 0
    other_shard: int = 0
    truncated: int = 0
    no_scored_tokens: int = 0
    bad_skipped: int = 0
    tokens_scored: int = 0
    total_rows: int = 0
    seconds: float = 0.0
    max_length: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def manifest_for(runner, data: DataConfig, encode: EncodeConfig) -> Manifest:
    """The manifest describing vectors that ``runner`` produces with these settings.

    A vision-language runner (``runner.model_kind == "vlm"``)
    always scores response tokens with its chat template, and records its image settings.
    ``score_tokens="auto"`` should be resolved from the data first (:func:`resolve_score_tokens`);
    left unresolved it is recorded as ``all``.
    """
    ident = runner.identity
    model_kind = runner.model_kind
    vlm = model_kind == "vlm"
    extra = runner.manifest_fields()
    return Manifest(
        model_path=ident.path,
        model_weights_sha256=ident.weights_sha256,
        adapter_path=ident.adapter_path,
        adapter_sha256=ident.adapter_sha256,
        tokenizer_sha256=ident.tokenizer_sha256,
        dtype=ident.dtype,
        hidden_size=runner.hidden_size,
        vocab_size=runner.vocab_size,
        top_m=min(encode.top_m, runner.vocab_size),
        score_tokens="response" if vlm else ("all" if encode.score_tokens == "auto" else encode.score_tokens),
        chat_template=data.chat_template or vlm,
        max_length=data.max_length,
        hidden_dtype=encode.hidden_dtype,
        lowest_likelihood_ratio=encode.lowest_likelihood_ratio,
        model_kind=model_kind,
        image_column=data.image_column if vlm else None,
        image_max_pixels=extra.get("image_max_pixels"),
        processor_sha256=extra.get("processor_sha256"),
        sketch_dim=encode.sketch_dim or None,
        sketch_vocab_buckets=encode.sketch_vocab_buckets,
        sketch_hidden_cols=encode.sketch_hidden_cols,
        sketch_seed=encode.sketch_seed,
        sketch_basis=encode.sketch_basis,
    )


def resolve_score_tokens(config: BuildConfig, inputs: list) -> BuildConfig:
    """``config`` with ``score_tokens="auto"`` resolved: ``assistant`` when the first row of ``inputs`` is a
    conversation (TRL conversational format), else ``all``."""
    if config.encode.score_tokens != "auto":
        return config
    tokens = "assistant" if data_format(inputs, config.data) == "conversational" else "all"
    return replace(config, encode=replace(config.encode, score_tokens=tokens))


def in_shard(sample_id: str, shard: tuple[int, int]) -> bool:
    """Stable assignment of ids to ``shard = (index, count)`` for parallel workers."""
    index, count = shard
    if count == 1:
        return True
    return int(hashlib.sha1(sample_id.encode()).hexdigest()[:8], 16) % count == index


def build_index(inputs: Iterable[str | Path], store_path: str | Path, config: BuildConfig = BuildConfig(), runner=None,
                engine: EngineConfig | None = None) -> BuildReport:
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
    >>> cfg = forvalue.BuildConfig(batch_size=8, data=forvalue.DataConfig(max_length=512))   # doctest: +SKIP
    >>> report = forvalue.build_index(["train.jsonl"], "runs/store", cfg)                    # doctest: +SKIP
    >>> report.written, report.tokens_scored                                                 # doctest: +SKIP
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
    existing = (Path(store_path) / MANIFEST_FILE).exists()
    lease = WriterLease.acquire(store_path, config.shard) if existing else None
    try:
        runner = runner if runner is not None else load_runner(config.model)
        store = Store.create(store_path, manifest_for(runner, config.data, config.encode))
        lease = lease or WriterLease.acquire(store_path, config.shard)
        return _build(inputs, store, config, runner, started)
    finally:
        if lease is not None:
            lease.release()


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
    if store.manifest.sketch_dim and report.written:
        from forvalue.storage.faiss_index import ensure

        ensure(store)  # extends (or builds) the prefilter index to cover every committed row
    report.total_rows = store.count()
    report.seconds = time.perf_counter() - started
    return report


def finite_or_skipped(enc: EncodedSample, config: BuildConfig, report: BuildReport) -> bool:
    """True when ``enc`` holds finite values; else counts it as bad, or raises with ``on_bad="error"``."""
    if enc.finite:
        return True
    if config.encode.on_bad == "error":
        raise BadValuesError(
            f"{enc.tokenized.sample.source}: model output has NaN or inf (sample '{enc.tokenized.sample.id}'); "
            "check --dtype (float16 overflows often) or pass --on-bad skip to skip and count such samples"
        )
    report.bad_skipped += 1
    return False


def _new_samples(samples: Iterator[Sample], runner, config: BuildConfig, stored: set[str], report: BuildReport) -> Iterator[TokenizedSample]:
    for sample in fresh_samples(samples, config, stored, report):
        tok = tokenize_counted(sample, runner, config, report)
        if tok is not None:
            yield tok


def fresh_samples(samples: Iterator[Sample], config: BuildConfig, stored: set[str],
                  report: BuildReport) -> Iterator[Sample]:
    """The samples of ``samples`` this build encodes: in its shard, not stored, the first row of their id.

    What is skipped is counted in ``report``; shared by the single-process and the Ray build.
    """
    seen: set[str] = set()  # ids met in this run's inputs (a repeated id keeps its first row)
    for sample in samples:
        report.read += 1
        if not in_shard(sample.id, config.shard):
            report.other_shard += 1
            continue
        if sample.occurrence and config.dedupe:
            report.repeats_dropped += 1
            continue
        if sample.id in stored:
            report.already_stored += 1
            continue
        if sample.id in seen:
            report.duplicate_ids += 1
            continue
        seen.add(sample.id)
        report.repeats_kept += sample.occurrence > 0
        yield sample


def tokenize_counted(sample: Sample, runner, config: BuildConfig, report: BuildReport) -> TokenizedSample | None:
    """``sample`` tokenized, or None (counted in ``report``) when it has no scored token or a bad image is skipped."""
    data = config.data
    try:
        tok = runner.tokenize(sample, config.encode.score_tokens, data.max_length, data.chat_template)
    except ImageError:  # a missing or undecodable image: a bad row like NaN/inf outputs
        if config.encode.on_bad == "error":
            raise
        report.bad_skipped += 1
        return None
    report.truncated += tok.truncated
    if tok.n_scored == 0:
        report.no_scored_tokens += 1
        return None
    return tok


def _flush(store: Store, pending: list[EncodedSample], report: BuildReport) -> None:
    if not pending:
        return
    spec = SketchSpec.from_manifest(store.manifest)
    basis = store_basis(store.path, spec, lambda: np.concatenate([e.hidden for e in pending]))
    sketch = sketch_column(pending, spec, basis) if spec is not None else None
    committed = store.append(encoded_to_arrow(pending, store.manifest.hidden_dtype, sketch))
    report.written += committed
    report.already_stored += len(pending) - committed  # committed meanwhile by another writer (dropped at commit)
    report.tokens_scored += sum(len(e.hidden) for e in pending)
    pending.clear()


def store_basis(store_path, spec: SketchSpec | None, hidden_sample) -> np.ndarray | None:
    """The fitted sketch basis of a store, fitted and published first if it has none.

    ``hidden_sample()`` returns hidden states ``(N, d)`` to fit from (the rows about to be
    written); only called when the store has no basis yet. None for stores without a
    fitted sketch.
    """
    if spec is None or spec.basis != "fitted":
        return None
    basis = load_basis(store_path)
    if basis is None:
        basis = publish_basis(store_path, fit_basis(hidden_sample()[:BASIS_FIT_TOKENS], spec.hidden_cols))
    return basis


def sketch_column(encoded: list[EncodedSample], spec: SketchSpec, basis: np.ndarray | None = None) -> pa.FixedSizeListArray:
    """The ``sketch`` column (``forvalue.indexer.sketch``) of a list of encodings."""
    entries = [e.entries() for e in encoded]
    z = get_sketcher(spec, basis).sketch(
        np.concatenate([e.hidden for e in encoded]), np.concatenate([i for i, _ in entries]),
        np.concatenate([v for _, v in entries]), np.array([len(e.hidden) for e in encoded]),
    )
    return pa.FixedSizeListArray.from_arrays(pa.array(z.ravel(), pa.float32()), spec.dim)
