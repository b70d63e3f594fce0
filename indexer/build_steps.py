"""The steps of a build shared by the single-process build (:mod:`forvalue.indexer.build`) and the
Ray build (:mod:`forvalue.indexer.ray_build`): the report, the manifest, which samples are new,
tokenizing and checking them, and the sketch column. :mod:`forvalue.indexer.build` re-exports them.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, replace
from typing import Iterator

import numpy as np
import pyarrow as pa

from forvalue.indexer.data import Sample, data_format
from forvalue.indexer.encoder import EncodedSample
from forvalue.indexer.images import ImageError
from forvalue.indexer.low_rank import check_rank, fit_hidden_basis, project_encoded
from forvalue.indexer.sketch import SketchSpec, fit_heavy_ids, get_sketcher
from forvalue.indexer.tokenize import TokenizedSample
from forvalue.schemas.config import BuildConfig, DataConfig, EncodeConfig
from forvalue.schemas.errors import BadValuesError, ConfigError, InputDataError
from forvalue.schemas.hidden_codec import resolve_block
from forvalue.schemas.manifest import MANIFEST_FILE, Manifest
from forvalue.schemas.tables import SAMPLES_TABLE, ids_dtype_for
from forvalue.storage.sketch_basis import fit_basis, load_basis, load_heavy_ids, publish_basis, publish_heavy_ids

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
    hidden_block = 0
    check_rank(encode.hidden_rank, runner.hidden_size, encode.sketch_hidden_cols if encode.sketch_dim else None)
    if encode.hidden_dtype == "int8":
        try:
            hidden_block = resolve_block(encode.int8_block, encode.hidden_rank or runner.hidden_size)
        except ValueError as exc:
            raise ConfigError("int8_block", str(exc)) from None
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
        sketch_heavy_ids=encode.sketch_heavy_ids if encode.sketch_dim else 0,
        hidden_block=hidden_block,
        ids_dtype=ids_dtype_for(runner.vocab_size),
        probs_dtype=encode.probs_dtype,
        sketch_dtype="float16",
        hidden_rank=encode.hidden_rank,
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


def fresh_samples(
    samples: Iterator[Sample], config: BuildConfig, stored: set[str], report: BuildReport
) -> Iterator[Sample]:
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


def store_basis(
    store_path, spec: SketchSpec | None, encoded: list[EncodedSample]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The fitted sketch basis and heavy ids of a store, each fitted and published first if it has none.

    ``encoded``: the rows about to be written (as stored), fitted from only when the store has no basis
    (or no heavy ids) yet; the basis is published before the heavy ids, and both before the first row
    that uses them. ``(None, None)`` for stores without a fitted sketch; heavy ids None without them.
    """
    if spec is None or spec.basis != "fitted":
        return None, None
    basis = load_basis(store_path)
    if basis is None:
        _refuse_over_rows(store_path, _sketch_lost("basis (sketch_basis.npy)", store_path))
        hidden = np.concatenate([e.hidden for e in encoded])[:BASIS_FIT_TOKENS]
        basis = publish_basis(store_path, fit_basis(hidden, spec.hidden_cols))
    if not spec.heavy:
        return basis, None
    heavy = load_heavy_ids(store_path)
    if heavy is None:
        _refuse_over_rows(store_path, _sketch_lost("vocabulary (sketch_vocab.npy)", store_path))
        entries = [e.entries() for e in encoded]
        tokens = (
            np.concatenate([e.hidden for e in encoded])[:BASIS_FIT_TOKENS],
            np.concatenate([i for i, _ in entries])[:BASIS_FIT_TOKENS],
            np.concatenate([v for _, v in entries])[:BASIS_FIT_TOKENS],
        )
        heavy = publish_heavy_ids(store_path, fit_heavy_ids(*tokens, basis, spec.heavy, spec.vocab_size))
    return basis, heavy


def _refuse_over_rows(store_path, message: str) -> None:
    """A file a store publishes before its first row (sketch basis and vocabulary, a low-rank store's hidden basis),
    missing while the table holds rows, was lost: one fitted now from the rows being appended would differ from the
    one the stored rows were made with (silently wrong candidates or scores, and 'index check' clean after).
    Refused with ``message``."""
    from forvalue.schemas.errors import StoreError
    from forvalue.storage.store import Store

    if Store.open(store_path).count():
        raise StoreError(f"{store_path}: {message}")


def _sketch_lost(what: str, store_path) -> str:
    """A lost sketch file's refusal: 'index sketch --rebuild' refits it over all rows."""
    return (
        f"the sketch {what} is missing but the store holds sketched rows; "
        f"run 'forvalue index sketch --store {store_path} --rebuild' before adding rows"
    )


def stored_encodings(store_path, manifest: Manifest, encoded: list[EncodedSample]) -> list[EncodedSample]:
    """``encoded`` as the store keeps them: unchanged for a full-width store; for a low-rank store projected
    onto its hidden basis (:mod:`forvalue.indexer.low_rank`), fitted from ``encoded`` and published first
    when the store has none yet (the first write batch, at most :data:`BASIS_FIT_TOKENS` tokens)."""
    if not manifest.hidden_rank or not encoded:
        return encoded
    from forvalue.storage.hidden_basis import publish_hidden_basis, published_hidden_basis

    found = published_hidden_basis(store_path, manifest)
    if found is None:
        # (unlike a sketch basis it cannot be refitted: the stored rows are its coordinates)
        _refuse_over_rows(
            store_path,
            "the hidden basis (hidden_basis.npz) is missing but the store holds rows stored in it; restore the file "
            "from a copy of the store (the rows cannot be scored or extended without it)",
        )
        hidden = np.concatenate([e.hidden for e in encoded])[:BASIS_FIT_TOKENS]
        fitted = fit_hidden_basis(hidden, manifest.hidden_rank, where="the first write batch")
        found = publish_hidden_basis(store_path, *fitted, manifest)
    return project_encoded(encoded, found[0], manifest)


def sketch_column(
    encoded: list[EncodedSample],
    spec: SketchSpec,
    basis: np.ndarray | None = None,
    heavy_ids: np.ndarray | None = None,
) -> pa.FixedSizeListArray:
    """The ``sketch`` column (``forvalue.indexer.sketch``) of a list of encodings."""
    entries = [e.entries() for e in encoded]
    z = get_sketcher(spec, basis, heavy_ids=heavy_ids).sketch(
        np.concatenate([e.hidden for e in encoded]),
        np.concatenate([i for i, _ in entries]),
        np.concatenate([v for _, v in entries]),
        np.array([len(e.hidden) for e in encoded]),
    )
    return pa.FixedSizeListArray.from_arrays(pa.array(z.ravel(), pa.float32()), spec.dim)  # cast on append


def refuse_empty_new_store(store_path, report: BuildReport, inputs: list, config: BuildConfig) -> None:
    """A new store that a whole (unsharded) build left without a row, though rows were read (none has a scored
    token, or all are bad): removed (:func:`_discard_new_store`) and refused in one line, instead of exit 0 and an
    empty store whose manifest fixed the token rule resolved from data that had none to score (hostile pass).
    Called by the single-process and the Ray build, under the writer lease."""
    if config.shard != (0, 1) or not report.read or report.total_rows:
        return
    _discard_new_store(store_path)
    raise InputDataError(
        inputs[0] if len(inputs) == 1 else ", ".join(map(str, inputs)),
        f"nothing was stored: of {report.read} rows, {report.no_scored_tokens} have no scored token (tokens "
        f"scored: '{config.encode.score_tokens}'; e.g. conversations without an assistant turn) and "
        f"{report.bad_skipped} are bad (NaN/inf or an unreadable image)",
    )


def _discard_new_store(store_path) -> None:
    """Remove what a build that stored no row created (a local folder; the lease files stay, which a later build
    into the folder ignores): the table first, the manifest last, so that a kill on the way leaves a folder a
    re-run resumes (a manifest without a table), never files without their manifest. Without it the empty
    store stayed."""
    import shutil

    from forvalue.storage.location import RemotePath

    if isinstance(store_path, RemotePath):
        return
    shutil.rmtree(store_path / f"{SAMPLES_TABLE}.lance", ignore_errors=True)
    for entry in sorted(store_path.iterdir(), key=lambda e: e.name == MANIFEST_FILE):  # the manifest last
        if entry.name.startswith(".writer."):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def finish_build(store, report: BuildReport, started: float, progress: bool = False) -> BuildReport:
    """Extend the prefilter index to every committed row; complete ``report`` (totals, seconds since ``started``)."""
    if store.manifest.sketch_dim and report.written:
        from forvalue.storage.faiss_index import ensure

        ensure(store, progress=progress)  # extends (or builds) the prefilter index to cover every committed row
    report.total_rows = store.count()
    report.seconds = time.perf_counter() - started
    return report
