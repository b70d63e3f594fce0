"""The FAISS prefilter index over the ``sketch`` column of a store.

Layout (beside the Lance table)::

    STORE/prefilter/
      prefilter.json          what the index covers: rows, table version, sketch spec, type
      index-<rows>.faiss      the FAISS index (ids = row positions in storage order)

``prefilter.json`` is replaced atomically *after* its index file is written, so it is the
commit point: a process killed at any moment leaves either the previous consistent pair or
the new one. The table is append-only, so an index that covers the first ``rows`` rows is
extended from the table (rows ``rows..count-1``) when it is behind (``index add``, a resumed
build, a build killed between its last commit and the index update); an index whose sketch
spec or type no longer matches, or that claims more rows than the table holds, is rebuilt.

Index type (``kind``): ``auto`` is ``Flat`` (exact inner product; ``SQfp16`` for float16
sketches, which holds the float16 values exactly in half the bytes) below :data:`EXACT_MAX_ROWS`
rows and ``pq`` above (:func:`pq_factory`: a scan of every row's 4-bit product codes, re-ranked by
8-bit codes; at 10^6 rows it finds more of the sketch's own candidates than inverted lists in the
same search time, docs/prefilter.md); ``flat``, ``pq``, ``ivf`` (``IVF<nlist>,SQ8``, the ``auto``
of before), ``hnsw`` or any FAISS factory string override it. The index is built from the table in blocks
of rows: memory holds the sketches of one block and the index, never hidden states.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from forvalue.schemas.errors import ForValueError, StoreError
from forvalue.storage import rerank_table
from forvalue.storage.sketch_basis import basis_sha256, load_basis, load_heavy_ids
from forvalue.storage.store import Store

INDEX_DIR = "prefilter"
META_FILE = "prefilter.json"
EXACT_MAX_ROWS = 100_000
SKETCH_COLUMN = "sketch"


def _faiss():
    try:
        import faiss
    except ImportError:  # pragma: no cover
        raise StoreError("the prefilter needs FAISS: pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


@dataclass
class PrefilterIndex:
    """A loaded FAISS index and what it covers."""

    index: object
    meta: dict = field(default_factory=dict)
    _gpu: object = None
    rerank: "rerank_table.RerankTable | None" = None  # the second stage, when built (docs/prefilter.md)

    @property
    def rows(self) -> int:
        return int(self.meta["rows"])

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)`` of the ``k`` best rows per query (rows -1 where fewer exist)."""
        faiss = _faiss()
        index = self._gpu or self.index
        if nprobe is None:
            nprobe = self.meta.get("nprobe")
        if nprobe:
            try:
                faiss.extract_index_ivf(self.index).nprobe = int(nprobe)
                if self._gpu is not None:
                    faiss.GpuParameterSpace().set_index_parameter(self._gpu, "nprobe", int(nprobe))
            except RuntimeError:
                pass
        if "HNSW" in self.meta.get("factory", ""):
            faiss.downcast_index(self.index).hnsw.efSearch = max(64, 2 * k)
        k = min(k, self.index.ntotal)
        return index.search(np.ascontiguousarray(queries, np.float32), k)

    def to_gpu(self) -> None:
        """Search on the GPU(s) when FAISS sees any (``faiss.get_num_gpus() > 0``)."""
        faiss = _faiss()
        if getattr(faiss, "get_num_gpus", lambda: 0)() > 0 and hasattr(faiss, "index_cpu_to_all_gpus"):
            try:
                self._gpu = faiss.index_cpu_to_all_gpus(self.index)
            except RuntimeError:  # an index type without GPU support (e.g. HNSW): stay on CPU
                self._gpu = None


def check_kind(kind: str | None, dim: int = 64) -> None:
    """Refuse a ``--faiss-index`` that FAISS cannot build (one line), before any work."""
    if kind is None or kind in KINDS:
        return
    try:
        _faiss().index_factory(int(dim), kind, _faiss().METRIC_INNER_PRODUCT)
    except (RuntimeError, TypeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[-1].split(": ", 1)[-1][:160] if str(exc).strip() else type(exc).__name__
        raise ForValueError(
            f"--faiss-index {kind!r}: not an index FAISS can build ({reason}); use auto, flat, pq, ivf, hnsw or a "
            "FAISS factory string such as 'IVF256,SQ8'"
        ) from None


FLAT_FACTORIES = ("Flat", "SQfp16")
KINDS = ("auto", "flat", "pq", "ivf", "hnsw")
# The ``pq`` index re-ranks this many times the candidates asked for by its 8-bit codes (at 10^6 rows and 1,000
# candidates: mean Recall@100 0.821 with 4, 0.898 with 16, 0.930 with 64; search 24 / 31 / 70 ms; docs/prefilter.md).
REFINE_FACTOR = 16


def pq_factory(dim: int) -> str:
    """``PQ<M>x4fs,Refine(SQ8)``: a scan of every row's 4-bit product codes (``M`` sub-vectors of 4 values where
    ``dim`` allows: half a byte per 4 sketch values), whose best ``REFINE_FACTOR`` x candidates are re-ranked by
    8-bit codes of the whole sketch."""
    m = next((m for m in (dim // 4, dim // 2, dim) if m and dim % m == 0), 1)
    return f"PQ{m}x4fs,Refine(SQ8)"


def ivf_lists(rows: int) -> int:
    """Inverted lists of an ``ivf`` index of ``rows`` rows: the power of two nearest ``sqrt(rows)``, at least 16."""
    return int(2 ** round(math.log2(max(16.0, math.sqrt(max(rows, 1))))))


def choose_factory(
    rows: int, kind: str = "auto", sketch_dtype: str = "float32", dim: int = 2048
) -> tuple[str, int | None]:
    """FAISS factory string and default ``nprobe`` for ``rows`` rows of ``dim`` values and a ``kind``.

    The exact (flat) index of float16 sketches is ``SQfp16``: the same inner products as ``Flat`` on the
    stored values (float16 codes hold them exactly), without a second float32 copy of the sketches.
    """
    nlist = ivf_lists(rows)
    if kind == "auto":
        kind = "flat" if rows < EXACT_MAX_ROWS else "pq"
    if kind == "flat":
        return ("SQfp16" if sketch_dtype == "float16" else "Flat"), None
    if kind == "ivf":
        return f"IVF{nlist},SQ8", max(1, nlist // 16)
    if kind == "pq":
        return pq_factory(dim), None
    if kind == "hnsw":
        return "HNSW32,Flat", None
    return kind, (max(1, nlist // 16) if kind.upper().startswith("IVF") else None)


def _index_dir(store: Store) -> Path:
    return store.path / INDEX_DIR


def describe(store: Store) -> dict | None:
    """What the saved index covers (``prefilter.json``), without loading it; None when absent or not the record
    :func:`save` writes (a damaged file is an index to rebuild, not a traceback in every reader)."""
    try:
        meta = json.loads((_index_dir(store) / META_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return meta if _sound_meta(meta) else None


def present(store: Store) -> bool:
    """Whether ``store`` has a saved index to load: a sound record whose file is there at its size (the test of the
    automatic prefilter; reading a 10^6-row index to decide, then again to query, read 2.3 GB twice)."""
    meta = describe(store)
    if meta is None:
        return False
    if meta.get("from_column"):
        return True
    try:
        path = _index_dir(store) / meta["file"]
        return path.stat().st_size == meta["bytes"]
    except (OSError, ValueError):
        return False


def _sound_meta(meta) -> bool:
    """Whether ``meta`` has the keys and types :func:`save` writes."""

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(meta, dict) or not count(meta.get("rows")) or not isinstance(meta.get("factory"), str):
        return False
    if meta.get("from_column"):
        return count(meta.get("dim"))
    return isinstance(meta.get("file"), str) and count(meta.get("bytes"))


def load(store: Store) -> PrefilterIndex | None:
    """The saved index of ``store``, or None when there is none (or it is unreadable)."""
    meta = describe(store)
    if meta is None:
        return None
    try:
        if meta.get("from_column"):
            return _from_column(store, meta)
        path = _index_dir(store) / meta["file"]
        if isinstance(path, Path):
            if path.stat().st_size != meta["bytes"]:
                return None
            index = _faiss().read_index(str(path))
        else:  # an object store: one GET
            data = path.read_bytes()
            if len(data) != meta["bytes"]:
                return None
            index = _faiss().deserialize_index(np.frombuffer(data, np.uint8))
    except (OSError, KeyError, ValueError, RuntimeError):
        return None
    if index.ntotal != meta["rows"] or index.d != store.manifest.sketch_dim:
        return None  # (another sketch width: an index of the sketches before an 'index sketch --rebuild')
    return _with_rerank(store, PrefilterIndex(index, meta))


def _with_rerank(store: Store, pre: PrefilterIndex | None) -> PrefilterIndex | None:
    """``pre`` with its second stage loaded (None when it has none or its files do not load: built again)."""
    if pre is not None and pre.meta.get("rerank"):
        pre.rerank = rerank_table.load(_index_dir(store), pre.meta["rerank"], store.manifest.vocab_size)
    return pre


def _from_column(store: Store, meta: dict) -> PrefilterIndex | None:
    """The exact float16 index of the first ``meta["rows"]`` rows, made from the sketch column (no file of its own)."""
    faiss = _faiss()
    rows, dim = int(meta["rows"]), int(meta["dim"])
    if rows > store.count() or dim != store.manifest.sketch_dim:
        return None  # (a description of the sketches before an 'index sketch --rebuild' at another width)
    index = faiss.index_factory(dim, meta["factory"], faiss.METRIC_INNER_PRODUCT)
    added = 0
    for batch in store.scan([SKETCH_COLUMN], batch_size=16384):
        col = batch.column(0)
        if col.null_count:
            return None
        block = col.flatten().to_numpy(zero_copy_only=False).reshape(batch.num_rows, -1)[: rows - added]
        if block.shape[1] != dim:  # the column rewritten at another width since the manifest was read
            return None
        index.add(block.astype(np.float32))
        added += block.shape[0]
        if added >= rows:
            break
    return _with_rerank(store, PrefilterIndex(index, meta)) if added == rows else None


def save(store: Store, pre: PrefilterIndex, index_changed: bool = True) -> None:
    """Write the index file, then commit by replacing ``prefilter.json``; old files are removed.

    ``index_changed=False``: the FAISS index is the one loaded from its file (only the second stage changed), which
    is kept rather than written again.

    An exact index of float16 sketches (``SQfp16``) holds nothing the sketch column does not: only
    ``prefilter.json`` is written (``from_column``) and :func:`load` makes the index from the column.
    """
    faiss = _faiss()
    folder = _index_dir(store)
    folder.mkdir(exist_ok=True)
    if pre.meta.get("factory") == "SQfp16":
        name, meta = None, dict(pre.meta, file=None, bytes=0, from_column=True)
    elif not index_changed and pre.meta.get("file") and (folder / pre.meta["file"]).exists():
        name, meta = pre.meta["file"], dict(pre.meta)  # only the second stage changed: the FAISS file stays
    else:
        from forvalue.storage.files import atomic_path

        name = f"index-{pre.rows}-{os.getpid()}-{time.time_ns()}.faiss"
        with atomic_path(folder / name, inside_store=True) as tmp:
            faiss.write_index(pre.index, str(tmp))
            size = tmp.stat().st_size
        meta = dict(pre.meta, file=name, bytes=size)
    from forvalue.storage.files import write_text

    write_text(folder / META_FILE, json.dumps(meta, indent=2, sort_keys=True), inside_store=True)
    pre.meta = meta
    for old in folder.glob("index-*.faiss"):
        if old.name != name:
            old.unlink(missing_ok=True)
    remove_unused(store, meta)


def remove_unused(store: Store, meta: dict | None = None) -> int:
    """Remove :func:`unused_files`; how many went (a folder by such a name, or a file that cannot be removed, is
    left: ``index check`` notes it)."""
    removed = 0
    for old in unused_files(store, meta):
        try:
            old.unlink(missing_ok=True)
            removed += 1
        except OSError:
            pass
    return removed


def unused_files(store: Store, meta: dict | None = None) -> list:
    """Second-stage files (and temporary ones) that ``prefilter.json`` (or ``meta``) does not name and whose writer
    is this process or no longer runs (:func:`forvalue.storage.rerank_table.abandoned`): removed on each commit and
    by ``index check --repair``."""
    folder = _index_dir(store)
    meta = describe(store) if meta is None else meta
    keep = rerank_table.files((meta or {}).get("rerank") or None)
    found = [*folder.glob(f"{rerank_table.FILE_PREFIX}*"), *folder.glob(f".{rerank_table.FILE_PREFIX}*.tmp")]
    return [p for p in found if p.name not in keep and rerank_table.abandoned(p)]


def _sketch_blocks(store: Store, start: int, block_rows: int):
    for batch in store.scan_from(start, [SKETCH_COLUMN], batch_size=block_rows):
        col = batch.column(0)
        if col.null_count:
            raise StoreError(
                f"{store.path}: {col.null_count} rows have no sketch; run 'forvalue index sketch --rebuild'"
            )
        yield col.flatten().to_numpy(zero_copy_only=False).reshape(batch.num_rows, -1).astype(np.float32, copy=False)


def _spec_of(store: Store) -> dict:
    m = store.manifest
    spec = {
        "dim": m.sketch_dim,
        "vocab_buckets": m.sketch_vocab_buckets,
        "hidden_cols": m.sketch_hidden_cols,
        "seed": m.sketch_seed,
    }
    if m.sketch_basis != "gaussian":  # (older indexes have no such keys and stay valid for gaussian stores)
        spec.update(basis=m.sketch_basis, basis_sha256=basis_sha256(load_basis(store.path)))
    if getattr(m, "sketch_heavy_ids", 0):  # (older indexes have no such key: stores without heavy ids)
        heavy = load_heavy_ids(store.path)
        spec.update(heavy_ids=m.sketch_heavy_ids, heavy_sha256=None if heavy is None else basis_sha256(heavy))
    return spec


def build(
    store: Store, kind: str = "auto", block_rows: int = 16384, train_rows: int | None = None, seed: int = 0
) -> PrefilterIndex:
    """A new index over every row of ``store`` (not saved)."""
    faiss = _faiss()
    if not store.manifest.sketch_dim or not store.has_column(SKETCH_COLUMN):
        raise StoreError(f"{store.path}: the store has no sketches; run 'forvalue index sketch --store {store.path}'")
    rows = store.count()
    dim = int(store.manifest.sketch_dim)
    factory, nprobe = choose_factory(rows, kind, store.manifest.sketch_dtype, dim)
    started = time.perf_counter()
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if "Refine" in factory:  # (saved with the index)
        faiss.downcast_index(index).k_factor = float(REFINE_FACTOR)
        base = faiss.downcast_index(faiss.downcast_index(index).base_index)
        if hasattr(base, "pq"):  # 16 centroids per sub-vector: no warning per sub-vector on a small store
            base.pq.cp.min_points_per_centroid = 1
    if "IVF" in factory:  # nor one for the lists of a small store (the build refuses fewer rows than lists)
        faiss.extract_index_ivf(index).cp.min_points_per_centroid = 1
    if not index.is_trained:
        nlist = faiss.extract_index_ivf(index).nlist if "IVF" in factory else 16 if factory.startswith("PQ") else 256
        n_train = min(rows, train_rows or max(64 * nlist, 50_000))
        if n_train < nlist:
            raise StoreError(f"{store.path}: {rows} rows are too few to train '{factory}'; use --faiss-index flat")
        index.train(training_sketches(store, n_train, block_rows, seed))
    trained = time.perf_counter()
    pre = PrefilterIndex(
        index, {"rows": 0, "factory": factory, "kind": kind, "nprobe": nprobe, "dim": dim, "sketch": _spec_of(store)}
    )
    extend(store, pre, block_rows)
    pre.meta.update(train_seconds=round(trained - started, 3), add_seconds=round(time.perf_counter() - trained, 3))
    return pre


def training_sketches(store: Store, n: int, block_rows: int = 16384, seed: int = 0) -> np.ndarray:
    """The float32 sketches of ``n`` rows of ``store`` drawn at random (``seed``), in row order, read in takes of
    ``block_rows``: what an index is trained on."""
    dim = int(store.manifest.sketch_dim)
    pick = np.sort(np.random.default_rng(seed).choice(store.count(), n, replace=False))
    train = []
    for first in range(0, n, block_rows):
        col = store.take(pick[first : first + block_rows].tolist(), [SKETCH_COLUMN]).column(0).combine_chunks()
        train.append(col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), dim).astype(np.float32))
    return np.concatenate(train)


def extend(store: Store, pre: PrefilterIndex, block_rows: int = 16384) -> int:
    """Add the table's rows ``pre.rows ..`` to the index (not its second stage: :func:`extend_rerank`); returns how
    many were added."""
    start = pre.rows
    added = 0
    for block in _sketch_blocks(store, start, block_rows):
        pre.index.add(block)
        added += block.shape[0]
    pre.meta.update(rows=start + added, table_version=store.version())
    return added


def extend_rerank(store: Store, pre: PrefilterIndex, progress: bool | None = None) -> bool:
    """Bring the second stage (:mod:`forvalue.storage.rerank_table`) to the index's rows: extended from its own
    rows, or written whole when it has none or its files did not load. Its files are written now; the record in
    ``pre.meta`` is committed by :func:`save`. Returns whether it changed."""
    current = pre.rerank if pre.rerank is not None and pre.rerank.rows <= pre.rows else None
    if current is not None and current.rows == pre.rows:
        return False
    if store.manifest.stored_width < rerank_table.COLS:  # one value per token (--hidden-rank 1): no second stage
        return pre.meta.pop("rerank", None) is not None
    folder = _index_dir(store)
    folder.mkdir(exist_ok=True)
    started = time.perf_counter()
    record = rerank_table.extend(store, folder, None if current is None else current.record, pre.rows, progress)
    if record is None:  # no tokens to fit its basis on yet
        return pre.meta.pop("rerank", None) is not None
    pre.meta["rerank"] = record
    pre.rerank = rerank_table.load(folder, record, store.manifest.vocab_size)
    if pre.rerank is None:  # (not expected: its files were just written) queried without it, not committed
        pre.meta.pop("rerank")
        return False
    pre.meta["rerank_seconds"] = round(time.perf_counter() - started, 3)
    return True


def check_folder(store: Store) -> None:
    """``STORE/prefilter`` that exists but is not a folder is one line (no index could ever be written there)."""
    folder = _index_dir(store)
    if folder.exists() and not folder.is_dir():
        raise StoreError(f"{folder}: is a file, not the prefilter's folder; remove it (the index is built again)")


# what leaves a manifest and a sketch column that disagree: a rebuild killed between them, or one that finished while
# this command read the store (then it is gone on the next run; 'index check' is clean)
_SKETCH_CHANGING = "an 'index sketch' interrupted, or one that ended while this command ran, leaves this"


def check_sketch_column_kept(store: Store, then: str = "") -> None:
    """The manifest's sketch without its column in the table (an 'index sketch --rebuild' killed between dropping
    and writing it) is one line naming the repair; ``then`` ends it (what the caller would do after)."""
    if store.manifest.sketch_dim and not store.has_column(SKETCH_COLUMN):
        raise StoreError(
            f"{store.path}: the manifest describes a sketch (D={store.manifest.sketch_dim}) but the table has no "
            f"'sketch' column ({_SKETCH_CHANGING}); run the command again, and if it says this again, run "
            f"'forvalue index sketch --store {store.path} --rebuild'{then}"
        )


def _check_sketch_column(store: Store) -> None:
    """A sketch column of another length than the manifest's D (an interrupted 'index sketch') is one line."""
    schema = store.schema()
    if SKETCH_COLUMN not in schema.names:
        return
    size = getattr(schema.field(SKETCH_COLUMN).type, "list_size", None)
    if size is not None and size != store.manifest.sketch_dim:
        raise StoreError(
            f"{store.path}: the stored sketches have {size} values, the manifest's D is {store.manifest.sketch_dim} "
            f"({_SKETCH_CHANGING}); run the command again, and if it says this again, run 'forvalue index sketch "
            f"--store {store.path} --rebuild'"
        )


def ensure(
    store: Store, kind: str | None = None, persist: bool = True, rebuild: bool = False, progress: bool | None = None
) -> PrefilterIndex:
    """The store's index, brought up to date with the table.

    Rebuilt when missing, unreadable, of another sketch spec, covering more rows than the
    table, when ``rebuild``, or when ``kind`` (None: keep the saved kind, else ``auto``)
    now selects another FAISS type; extended when it covers fewer rows. Saved when it
    changed and ``persist`` (a read-only store is simply not updated on disk). ``progress``: a bar while the
    second stage is written (None: on a terminal only, after 2 s).
    """
    _check_sketch_column(store)
    check_folder(store)
    pre = None if rebuild else load(store)
    rows = store.count()
    if pre is not None:
        want_kind = kind or pre.meta.get("kind", "auto")
        outgrown = (
            want_kind == "auto"
            and pre.meta.get("factory") in FLAT_FACTORIES
            and choose_factory(rows, "auto")[0] not in FLAT_FACTORIES
        )
        stale = pre.meta.get("sketch") != _spec_of(store) or pre.rows > rows or outgrown
        if stale or (kind is not None and kind != pre.meta.get("kind")):
            pre = None
    changed, index_changed = False, True
    if pre is None:
        if kind is None:  # a rebuild (unreadable file, --rebuild, check --repair) keeps the kind the user chose
            saved = (describe(store) or {}).get("kind")
            try:
                check_kind(saved, int(store.manifest.sketch_dim or 64))  # (a factory string for another D: auto)
                kind = saved if isinstance(saved, str) and saved else None
            except ForValueError:
                kind = None
        pre = build(store, kind or "auto")
        changed = True
    elif pre.rows < rows:
        extend(store, pre)
        changed = True
    else:
        index_changed = False
    if persist:  # (its files are written now; a store that cannot be written is queried without it)
        try:
            changed = extend_rerank(store, pre, progress) or changed
        except OSError:
            pre.rerank = None
    if changed and persist:
        try:
            save(store, pre, index_changed)
        except OSError:
            pass
    return pre
