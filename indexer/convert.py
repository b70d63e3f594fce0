"""``forvalue index convert``: rewrite a store in a more compact encoding, without a forward pass.

(In the indexer: like a build it writes a store, and it sketches rows with :mod:`forvalue.indexer.sketch`.)

What the stored rows hold is re-encoded, never recomputed from the model: hidden states are cast or
quantized (:mod:`forvalue.schemas.hidden_codec`), the sparse errors packed (uint16/uint32 ids, float16
probabilities) and, with ``top_m``, cut to the ``top_m`` most likely tokens (the dropped mass moves to
``tail_mass``; the target is always kept). ``sq_norm`` and the sketch are recomputed from the new stored
values, so every score of the new store is exact on what it holds. The sketch basis is the source's (a
resumed conversion keeps the output's sketch, which ``index sketch`` may have rebuilt since).

``hidden_rank`` (the low-rank tier, :mod:`forvalue.indexer.low_rank`) fits the hidden basis to the first
:data:`~forvalue.indexer.build_steps.BASIS_FIT_TOKENS` stored tokens of the source, publishes it in the output
and stores every row's projection; a fitted sketch basis is then fitted again, to the projected values of the
same tokens (a sketch lives in the stored coordinates). A low-rank source keeps its basis (its rank cannot
change: the discarded directions are gone).

Safety: the output takes the writer lease; it may not be the source, inside it, or a non-empty folder
that is not a store; an existing output is resumed only when it is a conversion of the same source with
the same settings (``convert.json``; checked under the lease, so a convert creating it at that moment is
never misread), so a re-run after a crash or kill appends exactly the rows still missing (each batch is
one atomic Lance commit, ids already there are skipped). What the source must provide (samples, its
bases, enough tokens for the rank) is read before the output is touched: a refused convert leaves none.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from forvalue.schemas.errors import ConfigError, StoreError
from forvalue.schemas.hidden_codec import DEFAULT_BLOCK, resolve_block
from forvalue.schemas.manifest import PACKAGE_VERSION, Manifest
from forvalue.schemas.tables import SCHEMA_VERSION, SCORING_COLUMNS, ids_dtype_for
from forvalue.storage.files import publish_if_absent
from forvalue.storage.location import RemotePath, check_reachable, check_store_name, store_location
from forvalue.storage.rows import decode_block
from forvalue.storage.sketch_basis import (
    heavy_ids_fit,
    load_basis,
    load_heavy_ids,
    publish_basis,
    publish_heavy_ids,
)
from forvalue.storage.store import Store, WriterLease, is_empty_folder

CONVERT_FILE = "convert.json"
# The columns copied as they are (the rest are re-encoded).
_TEXT_COLUMNS = ["id", "label", "prompt", "response", "text", "n_tokens", "truncated"]


def target_manifest(
    source: Manifest,
    hidden_dtype: str | None = None,
    int8_block: int | None = None,
    top_m: int | None = None,
    hidden_rank: int | None = None,
) -> Manifest:
    """The manifest of the conversion of a store with ``source`` (None: keep the source's setting)."""
    from forvalue.indexer.low_rank import check_rank

    dtype = hidden_dtype or source.hidden_dtype
    _check_whole("hidden_rank", hidden_rank)  # (a negative rank: check_rank's line, with the bounds)
    _check_whole("top_m", top_m, 1)
    _check_whole("int8_block", int8_block, 0)
    rank = source.hidden_rank if hidden_rank is None else hidden_rank
    if source.hidden_rank and rank != source.hidden_rank:
        raise ConfigError(
            "hidden_rank",
            f"the source store keeps hidden states at rank {source.hidden_rank} (the other directions are gone); "
            f"convert the full-width store it came from to get rank {rank}",
        )
    sketch_cols = source.sketch_hidden_cols if source.sketch_dim else None
    if rank and sketch_cols is not None and 0 < rank <= source.hidden_size and rank < sketch_cols:
        raise ConfigError(  # (a convert keeps the source's sketch: its columns cannot be lowered here)
            "hidden_rank",
            f"must be at least the source store's sketch hidden columns ({sketch_cols}), got {rank}; raise "
            "--hidden-rank, or first re-sketch the source with 'forvalue index sketch --sketch-hidden-cols'",
        )
    check_rank(rank, source.hidden_size, sketch_cols)
    if dtype not in ("float16", "float32", "int8"):
        raise ConfigError("hidden_dtype", f"must be one of float16, float32, int8, got '{dtype}'")
    if int8_block and dtype != "int8":
        raise ConfigError(
            "int8_block", f"is for int8 hidden states and this conversion keeps {dtype}; add --hidden-dtype int8"
        )
    if top_m is not None and not 1 <= top_m <= source.top_m:
        raise ConfigError(
            "top_m", f"must be between 1 and the source store's top-m {source.top_m} (it keeps no more), got {top_m}"
        )
    block = 0
    if dtype == "int8":
        wanted = int8_block if int8_block is not None else (source.hidden_block or DEFAULT_BLOCK)
        try:
            block = resolve_block(wanted, rank or source.hidden_size)
        except ValueError as exc:
            raise ConfigError("int8_block", str(exc)) from None
    return dataclasses.replace(
        source,
        hidden_dtype=dtype,
        hidden_block=block,
        top_m=top_m or source.top_m,
        ids_dtype=ids_dtype_for(source.vocab_size),
        probs_dtype="float16",
        sketch_dtype="float16",
        hidden_rank=rank,
        schema_version=SCHEMA_VERSION,
        package_version=PACKAGE_VERSION,
    )


def _check_whole(field: str, value, low: int | None = None) -> None:
    """Refuse (ConfigError) a setting given through the API that is not a whole number (at least ``low``)."""
    import numbers

    if value is None:
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or (low is not None and value < low):
        bound = "" if low is None else f" of at least {low}"
        raise ConfigError(field, f"must be a whole number{bound}, got {value!r}")


@dataclasses.dataclass
class ConvertReport:
    """What one ``convert_store`` run did (also printed by the CLI)."""

    source: str
    out: str
    rows: int = 0
    written: int = 0
    already_converted: int = 0
    tokens: int = 0
    seconds: float = 0.0
    source_bytes_per_token: float | None = None
    out_bytes_per_token: float | None = None
    hidden_rank: int = 0
    energy_kept: float | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _refuse_out(source: Path, out: Path) -> None:
    if isinstance(source, RemotePath) or isinstance(out, RemotePath):  # compared as URIs
        src, dst = (p if isinstance(p, RemotePath) else p.resolve() for p in (source, out))
        if type(src) is not type(dst):
            return
    else:
        src, dst = source.resolve(), out.resolve()
    if dst == src:
        raise StoreError(f"{out}: --out is the source store; give a new folder for the converted store")
    if src in dst.parents:
        raise StoreError(f"{out}: --out is inside the source store {source}; give a folder outside it")
    if dst in src.parents:
        raise StoreError(f"{out}: --out holds the source store {source}; give a new folder for the converted store")


def _check_resume(out: Path, identity: dict, target: Manifest) -> None:
    """Refuse an existing output that is not a conversion of the same source with the same settings."""
    if not (out / "manifest.json").exists():
        return
    try:
        recorded = json.loads((out / CONVERT_FILE).read_text())
    except (OSError, ValueError):
        if _killed_before_identity(out, target):
            return
        raise StoreError(
            f"{out}: is a store that 'index convert' did not write; give a new folder for the converted store"
        ) from None
    if recorded != identity:
        raise StoreError(
            f"{out}: holds a conversion of another store or with other settings ({CONVERT_FILE}); "
            "give a new folder, or re-run with the settings of that conversion to resume it"
        )


def convert_store(
    source: str | Path,
    out: str | Path,
    hidden_dtype: str | None = None,
    int8_block: int | None = None,
    top_m: int | None = None,
    block_rows: int = 512,
    progress: bool = True,
    hidden_rank: int | None = None,
) -> ConvertReport:
    """Write the store ``source`` into ``out`` in the compact encoding (see the module docstring).

    Parameters
    ----------
    hidden_dtype : {"float16", "float32", "int8"}, optional
        Storage of the hidden states (default: the source's).
    int8_block : int, optional
        Channels per int8 scale (0 = one per token; default: the source's, else one per token).
    top_m : int, optional
        Keep only the ``top_m`` most likely tokens per position (at most the source's).
    hidden_rank : int, optional
        Store hidden states as ``hidden_rank`` coordinates in a basis fitted to the source's hidden states
        (the low-rank tier; 0 = full width; default: the source's).

    Returns
    -------
    ConvertReport

    Raises
    ------
    StoreError, ConfigError
        A bad source or output (one line naming the path), a setting the source cannot give.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    _check_whole("write_every", block_rows, 1)
    source, out = store_location(source), store_location(out)
    src = Store.open(source)
    _refuse_out(source, out)
    check_store_name(out)
    check_reachable(out)
    manifest = target_manifest(src.manifest, hidden_dtype, int8_block, top_m, hidden_rank)
    identity = {
        "source": str(source if isinstance(source, RemotePath) else source.resolve()),
        "hidden_dtype": manifest.hidden_dtype,
        "hidden_block": manifest.hidden_block,
        "top_m": manifest.top_m,
    }
    if manifest.hidden_rank:  # (absent for full width: conversions written before the low-rank tier resume)
        identity["hidden_rank"] = manifest.hidden_rank
    if out.is_file() if isinstance(out, RemotePath) else (out.exists() and not out.is_dir()):
        raise StoreError(f"{out}: exists and is not a folder; give a new folder for the converted store")
    if out.is_dir() and not is_empty_folder(out) and not (out / "manifest.json").exists():
        raise StoreError(f"{out}: folder is not empty and not a forvalue store; give a new folder")
    if (out / CONVERT_FILE).exists():  # another conversion's output: refused before any work (checked again below)
        _check_resume(out, identity, manifest)
    if not src.count():
        raise StoreError(
            f"{source}: the store holds no samples, nothing to convert; add some with 'forvalue index add' first"
        )
    # what is read from the source and can fail is read before the output is touched: a refused convert
    # leaves no half-made store that would block the corrected re-run
    hidden = _hidden_basis(src, out, manifest)
    source_basis = None if manifest.hidden_rank and not src.manifest.hidden_rank else _source_sketch_basis(src)
    source_heavy = _source_heavy_ids(src)  # vocabulary ids: the same in a low-rank output
    out.mkdir(parents=True, exist_ok=True)
    with WriterLease.acquire(out, sharded=False):
        # checked while holding the lease: another convert creating this output is its lease error, never
        # its half-written folder misread as a store 'index convert' did not write
        _check_resume(out, identity, manifest)
        dst = Store.create(out, _with_output_sketch(out, manifest))
        _publish_identity(out, identity)
        projection, energy = _publish_hidden_basis(src, out, dst.manifest, hidden)
        if projection is None:
            basis = load_basis(out) if source_basis is None else publish_basis(out, source_basis)
        else:
            basis = _fit_sketch_basis(src, out, dst.manifest, projection)
        heavy = load_heavy_ids(out) if source_heavy is None else publish_heavy_ids(out, source_heavy)
        sketcher = _sketcher(dst.manifest, basis, heavy)
        done = dst.ids()
        report = ConvertReport(str(source), str(out), rows=src.count(), already_converted=len(done))
        columns = _TEXT_COLUMNS + SCORING_COLUMNS + ["tail_mass"]
        bar = tqdm(total=report.rows, desc="convert", unit="sample", disable=not progress)

        def todo():
            for batch in src.scan(columns, batch_size=block_rows):
                ids = batch.column("id").to_pylist()
                keep = [j for j, sample_id in enumerate(ids) if sample_id not in done]
                part = batch.take(pa.array(keep, pa.int64())) if len(keep) < batch.num_rows else batch
                yield batch.num_rows, (part if keep else None)

        def encode(item):
            _, part = item
            return None if part is None else convert_rows(part, src.manifest, dst.manifest, sketcher, projection)

        # batches are encoded by a few threads (numpy and torch release the GIL) and appended here, in order:
        # one commit per batch as before, so a kill leaves whole batches, and a re-run skips them
        try:
            for (seen, part), rows in in_order(encode, todo(), workers=convert_workers()):
                if rows is not None:
                    report.written += dst.append(rows)
                    report.tokens += int(np.asarray(part.column("n_scored")).sum())
                bar.update(seen)
        finally:
            bar.close()  # (before an interruption's error line, which stays the last line)
        if dst.manifest.sketch_dim and dst.count():
            from forvalue.storage.faiss_index import ensure

            ensure(dst)
    report.seconds = round(time.perf_counter() - started, 3)
    report.hidden_rank = manifest.hidden_rank
    report.energy_kept = None if energy is None else round(float(energy[-1]), 6)
    report.source_bytes_per_token = _bytes_per_token(src)
    report.out_bytes_per_token = _bytes_per_token(Store.open(out))
    return report


def convert_workers() -> int:
    """Threads encoding batches during a conversion: the machine's cores, at most 4."""
    import os

    return max(1, min(4, os.cpu_count() or 1))


def in_order(fn, items, workers: int):
    """``(item, fn(item))`` for each of ``items``, in their order, ``fn`` run by ``workers`` threads at most
    ``workers + 1`` items ahead of the consumer (an error is raised at its item; the rest are not started)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    if workers <= 1:
        for item in items:
            yield item, fn(item)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="forvalue-convert") as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append((item, pool.submit(fn, item)))
                if len(pending) > workers:
                    item, future = pending.popleft()
                    yield item, future.result()
            while pending:
                item, future = pending.popleft()
                yield item, future.result()
        finally:
            for _, future in pending:
                future.cancel()


_SKETCH_FIELDS = (
    "sketch_dim",
    "sketch_vocab_buckets",
    "sketch_hidden_cols",
    "sketch_seed",
    "sketch_basis",
    "sketch_heavy_ids",
)


def _with_output_sketch(out: Path, target: Manifest) -> Manifest:
    """``target`` with the sketch of an output being resumed: 'index sketch' may have rebuilt it since (the
    sketch is computed from the stored values, so the rows still to convert take the output's)."""
    if not (out / "manifest.json").exists():
        return target
    existing = Manifest.load(out / "manifest.json")
    return dataclasses.replace(target, **{name: getattr(existing, name) for name in _SKETCH_FIELDS})


def _killed_before_identity(out: Path, target: Manifest) -> bool:
    """Whether ``out`` is what this conversion leaves when killed between its manifest and ``convert.json``:
    exactly the target's manifest and no rows (adopting it loses nothing)."""
    try:
        if Manifest.load(out / "manifest.json") != target:
            return False
    except (StoreError, OSError, ValueError):
        return False
    try:
        return Store.open(out).count() == 0
    except StoreError:  # killed before its table was created (Store.create makes it)
        return not (out / "samples.lance").exists()


def _publish_identity(out: Path, identity: dict) -> None:
    path = out / CONVERT_FILE
    if path.exists():
        return
    publish_if_absent(path, json.dumps(identity, indent=2, sort_keys=True).encode())


def _fit_tokens(src: Store) -> np.ndarray:
    """The first :data:`~forvalue.indexer.build_steps.BASIS_FIT_TOKENS` stored hidden states of ``src``, as read."""
    from forvalue.indexer.build_steps import BASIS_FIT_TOKENS
    from forvalue.schemas.tables import HIDDEN_SCALE_COLUMN
    from forvalue.storage.rows import hidden_values

    columns = ["hidden"] + ([HIDDEN_SCALE_COLUMN] if src.manifest.hidden_dtype == "int8" else [])
    parts, have = [], 0
    for batch in src.scan(columns, batch_size=1024):
        parts.append(hidden_values(batch, src.manifest.stored_width))
        have += len(parts[-1])
        if have >= BASIS_FIT_TOKENS:
            break
    width = src.manifest.stored_width
    return np.concatenate(parts)[:BASIS_FIT_TOKENS] if parts else np.zeros((0, width), np.float32)


def _source_values(hidden: np.ndarray, target: Manifest) -> np.ndarray:
    """Decoded source hidden states as a full-width store of the target's dtype would hold them."""
    return hidden.astype(np.float16) if target.hidden_dtype in ("float16", "int8") else hidden


def _hidden_basis(src: Store, out: Path, target: Manifest) -> tuple[np.ndarray, np.ndarray] | None:
    """``(basis, energy)`` of a low-rank target, read or fitted but not yet published (None for a full-width
    target): a low-rank source's own basis, the one a previous run published in ``out``, else one fitted to the
    source's first tokens (raises ConfigError when they are fewer than the rank)."""
    from forvalue.indexer.low_rank import fit_hidden_basis
    from forvalue.storage.hidden_basis import load_hidden_basis, published_hidden_basis

    if not target.hidden_rank:
        return None
    if src.manifest.hidden_rank:
        return load_hidden_basis(src.path, src.manifest)
    found = published_hidden_basis(out, target)
    if found is None:
        found = fit_hidden_basis(_source_values(_fit_tokens(src), target), target.hidden_rank, str(src.path))
    return found


def _publish_hidden_basis(
    src: Store, out: Path, target: Manifest, hidden: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Publish ``hidden`` (:func:`_hidden_basis`) in ``out`` unless one is there; ``(basis to project rows onto,
    energy)``: None, None when the rows keep their width (a full-width target, or a low-rank source whose basis
    is copied)."""
    from forvalue.storage.hidden_basis import publish_hidden_basis

    if hidden is None:
        return None, None
    basis, energy = publish_hidden_basis(out, *hidden, target)
    return (None if src.manifest.hidden_rank else basis), energy


def _fit_sketch_basis(src: Store, out: Path, target: Manifest, projection: np.ndarray) -> np.ndarray | None:
    """The fitted sketch basis of a low-rank conversion: fitted to the projected values of the source's first
    tokens (or the one a previous run published)."""
    from forvalue.indexer.low_rank import stored_projection
    from forvalue.storage.sketch_basis import fit_basis

    if not target.sketch_dim or target.sketch_basis != "fitted":
        return None
    basis = load_basis(out)
    if basis is None:
        values, _ = stored_projection(_source_values(_fit_tokens(src), target), projection, target)
        basis = publish_basis(out, fit_basis(values, target.sketch_hidden_cols))
    return basis


def _source_sketch_basis(src: Store) -> np.ndarray | None:
    """The source's fitted sketch basis (None when its sketch has none), copied into a full-width output."""
    if not src.manifest.sketch_dim or src.manifest.sketch_basis != "fitted":
        return None
    basis = load_basis(src.path)
    if basis is None:
        raise StoreError(
            f"{src.path}: the store's sketch basis is missing; run 'forvalue index sketch --store {src.path} --rebuild'"
        )
    return basis


def _source_heavy_ids(src: Store) -> np.ndarray | None:
    """The source sketch's heavy vocabulary ids (None when it has none), copied into the output."""
    if not src.manifest.sketch_dim or not getattr(src.manifest, "sketch_heavy_ids", 0):
        return None
    heavy = load_heavy_ids(src.path)
    if heavy is None:
        raise StoreError(
            f"{src.path}: the store's sketch vocabulary (sketch_vocab.npy) is missing; run 'forvalue index sketch "
            f"--store {src.path} --rebuild'"
        )
    count, vocab = src.manifest.sketch_heavy_ids, src.manifest.vocab_size
    if not heavy_ids_fit(heavy, count, vocab):
        # checked before the output exists: a bad list copied there would be kept by every re-run (publish if absent)
        raise StoreError(
            f"{src.path}: the store's sketch vocabulary (sketch_vocab.npy) holds {heavy.size} ids, its sketch needs "
            f"{count} distinct ids below {vocab}; run 'forvalue index sketch --store {src.path} --rebuild'"
        )
    return heavy


def _sketcher(manifest: Manifest, basis, heavy_ids=None):
    from forvalue.indexer.sketch import SketchSpec, get_sketcher

    spec = SketchSpec.from_manifest(manifest)
    return None if spec is None else get_sketcher(spec, basis, heavy_ids=heavy_ids)


def _bytes_per_token(store: Store) -> float | None:
    tokens = sum(int(np.asarray(b.column(0)).sum()) for b in store.scan(["n_scored"], batch_size=65536))
    if not tokens:
        return None
    total = sum(f.stat().st_size for f in store.path.rglob("*") if f.is_file())
    return round(total / tokens, 1)


def convert_rows(
    batch: pa.RecordBatch, source: Manifest, target: Manifest, sketcher=None, projection: np.ndarray | None = None
) -> pa.Table:
    """The rows of ``batch`` (a store with ``source``'s rows) encoded as a store with ``target`` keeps them
    (``projection``: the hidden basis of a low-rank conversion of a full-width store)."""
    from forvalue.indexer.sparse_errors import SparseErrors
    from forvalue.schemas.tables import error_entries
    from forvalue.storage.rows import stored_rows

    block = decode_block(batch, source.stored_width)
    n = int(block.lengths.sum())
    topk_ids = _flat(batch, "topk_ids").reshape(n, -1).astype(np.int64)
    topk_probs = _flat(batch, "topk_probs").reshape(n, -1).astype(np.float32)
    target_ids = _flat(batch, "target_ids").astype(np.int64)
    target_probs = _flat(batch, "target_probs").astype(np.float32)
    tail = _flat(batch, "tail_mass").astype(np.float64)
    m = target.top_m
    if m < topk_ids.shape[1]:  # the dropped top tokens' mass (never the target's, kept apart) joins the tail
        dropped = np.where(topk_ids[:, m:] == target_ids[:, None], 0.0, topk_probs[:, m:])
        tail = tail + dropped.sum(axis=1)
        topk_ids, topk_probs = topk_ids[:, :m], topk_probs[:, :m]
    errors = SparseErrors(topk_ids, topk_probs, target_ids, target_probs, tail.astype(np.float32)).stored_as(
        target.probs_dtype
    )
    hidden = _source_values(block.hidden, target)
    offsets = np.concatenate([[0], np.cumsum(block.lengths)])
    parts = []
    for r in range(block.lengths.size):
        rows = slice(int(offsets[r]), int(offsets[r + 1]))
        if projection is not None:
            from forvalue.indexer.low_rank import stored_projection

            h, codes = stored_projection(hidden[rows], projection, target)
        else:
            h, codes = _stored_hidden(hidden[rows], target)
        parts.append((h, codes, errors.select(rows)))
    h_all = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, target.stored_width), np.float32)
    ids, vals = error_entries(errors.topk_ids, errors.topk_probs, errors.target_ids, errors.target_probs)
    sq_norms = self_scores(h_all, ids, vals, block.lengths)
    sketch = None
    if sketcher is not None:
        z = sketcher.sketch(h_all.astype(np.float32), ids, vals, block.lengths)
        sketch = pa.FixedSizeListArray.from_arrays(pa.array(z.ravel(), pa.float32()), target.sketch_dim)
    return stored_rows(batch, parts, np.array(sq_norms), target, sketch)


def _stored_hidden(hidden: np.ndarray, target: Manifest):
    """``(values as stored, int8 codes or None)`` of one row's hidden states."""
    if target.hidden_dtype != "int8":
        return hidden, None
    from forvalue.schemas.hidden_codec import dequantize, quantize

    codes = quantize(hidden, target.hidden_block)
    return dequantize(*codes), codes


def _flat(batch, name: str) -> np.ndarray:
    column = batch.column(name)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False)


def self_scores(
    hidden: np.ndarray, ids: np.ndarray, values: np.ndarray, lengths: np.ndarray, budget: int = 1 << 24
) -> np.ndarray:
    """``||G_r||_F^2 = sum_{k, k' in r} <e_k, e_k'> <h_k, h_k'>`` of every row ``r`` of a block, float64 ``(rows,)``.

    The same sum as :func:`forvalue.indexer.sparse_errors.pair_score` of a row with itself (the Gram form, in
    float64), batched: rows are padded to their chunk's longest row and densified over their own error
    vocabulary, chunks holding at most ``budget`` elements, and scored with two batched matrix products.
    """
    import torch

    lengths = np.asarray(lengths, np.int64)
    n_rows = lengths.size
    out = np.zeros(n_rows)
    if n_rows == 0 or hidden.shape[0] == 0:
        return out
    row_of = np.repeat(np.arange(n_rows), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    position = np.arange(hidden.shape[0]) - starts[row_of]
    width = int(ids.max()) + 1
    keys = (row_of[:, None] * width + ids).ravel()
    unique, inverse = np.unique(keys, return_inverse=True)
    first = np.searchsorted(unique, np.arange(n_rows) * width)
    vocab = np.diff(np.append(first, unique.size))  # distinct error ids per row
    entry_row = np.repeat(row_of, ids.shape[1])
    local = inverse.ravel() - first[entry_row]
    entry_pos = np.repeat(position, ids.shape[1])
    flat_values = values.ravel().astype(np.float64)
    h64 = torch.from_numpy(np.ascontiguousarray(hidden, np.float64))
    r0 = 0
    while r0 < n_rows:
        r1 = r0 + 1
        while r1 < n_rows:
            length, size = lengths[r0 : r1 + 1].max(), vocab[r0 : r1 + 1].max()
            if (r1 + 1 - r0) * length * max(size, length, hidden.shape[1]) > budget:
                break
            r1 += 1
        length, size = int(lengths[r0:r1].max()), int(vocab[r0:r1].max())
        tokens = slice(int(starts[r0]), int(starts[r1 - 1] + lengths[r1 - 1]))
        entries = slice(tokens.start * ids.shape[1], tokens.stop * ids.shape[1])
        e = torch.zeros((r1 - r0, length, size), dtype=torch.float64)
        index = tuple(
            torch.from_numpy(np.ascontiguousarray(a))
            for a in (entry_row[entries] - r0, entry_pos[entries], local[entries])
        )
        e.index_put_(index, torch.from_numpy(flat_values[entries]), accumulate=True)
        h = torch.zeros((r1 - r0, length, hidden.shape[1]), dtype=torch.float64)
        h[torch.from_numpy(row_of[tokens] - r0), torch.from_numpy(position[tokens])] = h64[tokens]
        gram = torch.bmm(e, e.transpose(1, 2)) * torch.bmm(h, h.transpose(1, 2))
        out[r0:r1] = gram.sum(dim=(1, 2)).numpy()
        r0 = r1
    return out
