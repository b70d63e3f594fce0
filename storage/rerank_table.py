"""The files of the prefilter's second stage (:mod:`forvalue.storage.rerank_rows`) beside the FAISS index.

Layout (in ``STORE/prefilter/``, named by the ``rerank`` record of ``prefilter.json``)::

    rerank-basis-<tag>.npy                 U, float32 (d, 2)
    rerank-<first>-<rows>-<tag>.offsets.npy   int64 (rows + 1): row r's entries are [offsets[r], offsets[r + 1])
    rerank-<first>-<rows>-<tag>.entries       raw records (int32 id, 2 x float16 values; float32 where needed)

A segment covers rows ``first .. first + rows - 1`` (row positions in storage order, as in the FAISS index).
The table is append-only, so the second stage grows like the index: ``index add`` (or any query that finds
the index behind) writes one more segment for the new rows; past :data:`MAX_SEGMENTS` they are merged into one.
Every file is written whole under a temporary name and renamed (:func:`forvalue.storage.files.atomic_path`)
*before* ``prefilter.json`` names it; ``prefilter.json`` is the commit point (``forvalue.storage.faiss_index``),
and files it does not name are removed after each commit. A kill at any moment leaves the previous record and
its files, or the new ones.

Entries are read by memory map (a store on an object store: read whole once), so a query touches only the
pages of its candidates' rows; at 10^6 rows of 263 entries the entries file is ~2.1 GB.
"""

from __future__ import annotations

import io
import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forvalue.schemas.errors import ForValueError, StoreError
from forvalue.schemas.tables import SCORING_COLUMNS
from forvalue.storage.files import atomic_path, process_ended, write_bytes
from forvalue.storage.rerank_rows import COLS, bag_scores, entry_dtype, packed, row_entries
from forvalue.storage.rows import decode_block
from forvalue.storage.sketch_basis import basis_sha256, fit_basis, load_basis

# Segments kept before an extension merges them all into one.
MAX_SEGMENTS = 8
# Rows decoded per block while building.
BLOCK_ROWS = 2048
FILE_PREFIX = "rerank-"


@dataclass
class Segment:
    """One segment's rows: ``offsets`` (``rows + 1``, int64) into ``entries`` (structured records)."""

    first: int
    offsets: np.ndarray
    entries: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.offsets.size - 1)

    def gather(self, local: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids int64, values float32 (n, c), counts)`` of rows ``local`` (positions in the segment), in order."""
        lo = self.offsets[local]
        counts = self.offsets[local + 1] - lo
        pos = np.repeat(lo - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))
        if self.entries.dtype.itemsize == 8:  # one 8-byte gather, then the fields (faster than a structured gather)
            got = np.asarray(self.entries).view(np.int64)[pos].view(self.entries.dtype)
        else:
            got = np.asarray(self.entries)[pos]
        return got["id"].astype(np.int64), got["v"].astype(np.float32), counts


@dataclass
class RerankTable:
    """A loaded second stage: its basis and segments (rows ``0 .. rows - 1``)."""

    basis: np.ndarray
    segments: list[Segment]
    record: dict
    folder: object = None  # the store's prefilter folder (for messages)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.segments)

    @property
    def vocab_size(self) -> int:
        return int(self.record["vocab_size"])

    def score(self, rows: np.ndarray, table: np.ndarray) -> np.ndarray:
        """``s2`` of ``rows`` (row positions, any order) against one validation table ``G_v U`` (``(vocab, c)``,
        :func:`forvalue.storage.rerank_rows.validation_table`): float64, in the order given."""
        rows = np.asarray(rows, np.int64)
        out = np.zeros(rows.size, np.float64)
        if not rows.size:
            return out
        if rows.min() < 0 or rows.max() >= self.rows:
            raise ForValueError(f"second stage: rows {rows.min()}..{rows.max()} outside its {self.rows} rows")
        seg_of = np.searchsorted(np.array([s.first for s in self.segments], np.int64), rows, side="right") - 1
        for s, seg in enumerate(self.segments):
            sel = np.flatnonzero(seg_of == s) if len(self.segments) > 1 else np.arange(rows.size)
            if sel.size:
                ids, values, counts = seg.gather(rows[sel] - seg.first)
                bad = (
                    "ids outside the vocabulary"
                    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size)
                    else None
                )
                if bad is None and not np.isfinite(values).all():  # (NaN scores sort anywhere: rows silently lost)
                    bad = "values that are not finite"
                if bad is not None:
                    store = self.folder.parent if self.folder is not None else "STORE"
                    raise StoreError(
                        f"{self.folder}/{self.record['segments'][s]['entries']}: the prefilter's second stage holds "
                        f"{bad} (a damaged file); run 'forvalue index check --store {store} --repair'"
                    )
                out[sel] = bag_scores(ids, values, counts, table)
        return out

    def damage(self) -> str | None:
        """What is wrong with the entries (every one read): ids outside the vocabulary or values not finite."""
        for seg, rec in zip(self.segments, self.record["segments"]):
            for first in range(0, seg.entries.size, 1 << 22):
                part = np.asarray(seg.entries[first : first + (1 << 22)])
                if part.size and (part["id"].min() < 0 or part["id"].max() >= self.vocab_size):
                    return f"the second-stage file {rec['entries']} holds ids outside the vocabulary"
                if not np.isfinite(part["v"]).all():
                    return f"the second-stage file {rec['entries']} holds values that are not finite"
        return None


def _tag() -> str:
    return f"{os.getpid()}-{time.time_ns()}"


def _save_npy(path, array: np.ndarray) -> int:
    """Write ``array`` as ``.npy`` at ``path`` atomically; its size in bytes."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_bytes(path, buffer.getvalue(), inside_store=True)
    return len(buffer.getvalue())


def _read_npy(path) -> np.ndarray:
    return np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)


def _basis(store, hidden: np.ndarray) -> np.ndarray | None:
    """The second stage's basis: the store's fitted sketch basis when it has at least :data:`COLS` columns (the
    second stage then holds the sketch's hidden subspace without its collisions), else :data:`COLS` directions fitted
    from ``hidden`` (the first block's tokens); None without tokens or with fewer stored values than :data:`COLS`."""
    m = store.manifest
    width = m.stored_width
    if width < COLS:
        return None
    if getattr(m, "sketch_basis", None) == "fitted" and (m.sketch_hidden_cols or 0) >= COLS:
        sketch = load_basis(store.path)
        if sketch is not None and sketch.shape == (width, m.sketch_hidden_cols):
            return sketch
    if hidden.ndim != 2 or hidden.shape[0] == 0:
        return None
    return fit_basis(hidden, COLS)


def _widen(records: np.ndarray) -> np.ndarray:
    wide = entry_dtype(records.dtype["v"].shape[0], wide=True)
    if records.dtype == wide:
        return records
    out = np.empty(records.size, wide)
    out["id"], out["v"] = records["id"], records["v"]
    return out


def _blocks(store, start: int, rows: int, block_rows: int):
    """Decoded blocks of the table's rows ``start .. rows - 1`` (no row past ``rows``, whatever was appended)."""
    done = start
    for batch in store.scan_from(start, SCORING_COLUMNS, batch_size=block_rows):
        take = min(batch.num_rows, rows - done)
        if take <= 0:
            break
        yield decode_block(batch.slice(0, take), store.manifest.stored_width)
        done += take


def _write_segment(folder, first: int, rows: int, cols: int, parts) -> dict:
    """Write the segment of rows ``first .. first + rows - 1`` from ``parts`` (``(counts, records)`` per block, in
    row order); returns its entry of the record."""
    name = f"{FILE_PREFIX}{first}-{rows}-{_tag()}"
    offsets, big = [np.zeros(1, np.int64)], False
    with atomic_path(folder / f"{name}.entries", inside_store=True) as tmp:
        with open(tmp, "wb") as out:
            for counts, records in parts:
                if records.dtype == entry_dtype(cols, wide=True) and not big:  # a value past float16: float32 whole
                    big = True
                    out.flush()
                    earlier = _widen(np.fromfile(tmp, entry_dtype(cols)))
                    out.seek(0)
                    out.truncate()
                    earlier.tofile(out)
                np.ascontiguousarray(_widen(records) if big else records).tofile(out)
                offsets.append(offsets[-1][-1] + np.cumsum(counts))
    offsets = np.concatenate(offsets)
    if offsets.size - 1 != rows:
        raise ForValueError(f"{folder}: the second stage read {offsets.size - 1} rows, not {rows} (the table changed?)")
    dtype = "float32" if big else "float16"
    return {
        "first": first,
        "rows": rows,
        "offsets": f"{name}.offsets.npy",
        "offsets_bytes": _save_npy(folder / f"{name}.offsets.npy", offsets),
        "entries": f"{name}.entries",
        "entries_bytes": int(offsets[-1]) * entry_dtype(cols, wide=big).itemsize,
        "dtype": dtype,
    }


def extend(
    store, folder, record: dict | None, rows: int, progress: bool | None = False, block_rows: int | None = None
) -> dict | None:
    """Write the second stage's files for the table's rows ``record['rows'] .. rows - 1`` (all ``rows`` without a
    ``record``) into ``folder``; returns the record naming them (not committed: the caller writes it into
    ``prefilter.json``). None when its basis cannot be fitted (no rows yet, a stored width below 2). ``progress``:
    a bar (None: on a terminal only), shown after 2 s.
    """
    from tqdm.auto import tqdm

    start = 0 if record is None else int(record["rows"])
    if record is not None and start >= rows:
        return record
    vocab = int(store.manifest.vocab_size)
    blocks = _blocks(store, start, rows, block_rows or BLOCK_ROWS)
    if record is None:
        first = next(blocks, None)
        basis = None if first is None else _basis(store, first.hidden)
        if basis is None:
            return None
        blocks = itertools.chain([first], blocks)
    else:
        try:
            basis = _read_npy(folder / record["basis"]).astype(np.float32)
        except (OSError, ValueError):  # removed or replaced meanwhile (another writer's commit): written whole
            return extend(store, folder, None, rows, progress, block_rows)

    def parts():
        with tqdm(
            total=rows - start,
            desc="prefilter second stage",
            unit="sample",
            delay=2.0,
            disable=None if progress is None else not progress,
        ) as bar:
            for block in blocks:
                counts, ids, values = row_entries(block.hidden, block.ids, block.values, block.lengths, basis, vocab)
                bar.update(counts.size)
                yield counts, packed(ids, values)

    segment = _write_segment(folder, start, rows - start, basis.shape[1], parts())
    if record is None:
        record = {"cols": int(basis.shape[1]), "rows": 0, "segments": [], "vocab_size": vocab}
        record["basis"] = f"{FILE_PREFIX}basis-{_tag()}.npy"
        record["basis_sha256"] = basis_sha256(basis)
        _save_npy(folder / record["basis"], basis)
    record = dict(record, rows=rows, segments=[*record["segments"], segment])
    if len(record["segments"]) <= MAX_SEGMENTS:
        return record
    merged = _merged(folder, record, vocab)
    # segments removed meanwhile (another writer merged them and committed): written whole
    return merged if merged is not None else extend(store, folder, None, rows, progress, block_rows)


def _merged(folder, record: dict, vocab_size: int) -> dict | None:
    """The record with all its segments written again as one; None when they do not load."""
    table = load(folder, record, vocab_size)
    if table is None:
        return None

    def parts():
        for seg in table.segments:
            yield np.diff(seg.offsets), np.asarray(seg.entries)

    return dict(record, segments=[_write_segment(folder, 0, table.rows, table.basis.shape[1], parts())])


# An unnamed second-stage file on an object store whose writer's process cannot be asked is left this long.
ORPHAN_SECONDS = 6 * 3600


def abandoned(path) -> bool:
    """Whether a second-stage file that ``prefilter.json`` does not name (or a temporary one) may be removed:
    written by this process (a record it replaced), or by one that no longer runs (killed before its commit).
    Another running writer's files (sharded build workers extend the index at once, each committing its own
    record) are left to it; on an object store, files older than :data:`ORPHAN_SECONDS` by their name's clock."""
    import re

    match = re.search(r"-(\d+)-(\d+)\.(?:offsets\.npy|entries|npy)$", path.name)
    temporary = re.search(r"\.(\d+)\.[0-9a-f]+\.tmp$", path.name)  # a writer's file before its rename
    if match is None and temporary is None:
        return False
    if temporary is not None:  # ``.NAME.PID.HEX.tmp`` (forvalue.storage.files.temp_name), NAME holding its own clock
        pid, inner = int(temporary.group(1)), re.search(r"-(\d+)-(\d+)\.", path.name)
        written_ns = int(inner.group(2)) if inner else 0
    else:
        pid, written_ns = int(match.group(1)), int(match.group(2))
    if pid == os.getpid():
        return True
    if not isinstance(path, Path):
        return time.time_ns() - written_ns > ORPHAN_SECONDS * 1e9
    return process_ended(pid)


def files(record: dict | None) -> set[str]:
    """The file names a record uses."""
    if not record:
        return set()
    names = {record["basis"]}
    for seg in record["segments"]:
        names |= {seg["offsets"], seg["entries"]}
    return names


def sound(record) -> bool:
    """Whether ``record`` has the keys and types :func:`extend` writes (a damaged ``prefilter.json``: no)."""

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    try:
        if not (count(record["cols"]) and record["cols"] >= COLS and count(record["rows"])):
            return False
        if not isinstance(record["basis"], str):
            return False
        if not count(record["vocab_size"]):
            return False
        first = 0
        for seg in record["segments"]:
            names = (seg["offsets"], seg["entries"])
            if seg["first"] != first or not count(seg["rows"]) or not all(isinstance(n, str) for n in names):
                return False
            if seg["dtype"] not in ("float16", "float32"):
                return False
            if not count(seg["entries_bytes"]) or not count(seg["offsets_bytes"]):
                return False
            first += seg["rows"]
        return first == record["rows"]
    except (KeyError, TypeError):
        return False


def problem(folder, record: dict) -> str | None:
    """What is wrong with the files of a sound record (missing, another size), or None."""
    for seg in record["segments"]:
        for key in ("offsets", "entries"):
            path = folder / seg[key]
            try:
                size = path.stat().st_size
            except (OSError, FileNotFoundError):
                return f"the second-stage file {seg[key]} is missing"
            if isinstance(path, Path) and not path.is_file():
                return f"the second-stage file {seg[key]} is not a file"
            if size != seg[f"{key}_bytes"]:
                return f"the second-stage file {seg[key]} has {size} bytes, not {seg[f'{key}_bytes']}"
    if not (folder / record["basis"]).exists():
        return f"the second-stage basis {record['basis']} is missing"
    return None


def load(folder, record, vocab_size: int) -> RerankTable | None:
    """The second stage a record names, or None when it is not sound (or of another vocabulary than the store's
    ``vocab_size``), or its files are missing, of another size, unreadable or inconsistent (offsets that do not
    rise from 0 to the entries' count): then it is built again. Ids out of the vocabulary are found where rows are
    scored (:meth:`RerankTable.score`) and by ``index check``, which reads every entry."""
    if not sound(record) or record["vocab_size"] != vocab_size or problem(folder, record) is not None:
        return None
    try:
        basis = _read_npy(folder / record["basis"]).astype(np.float32)
        if basis_sha256(basis) != record["basis_sha256"] or basis.shape[1:] != (record["cols"],):
            return None
        segments = []
        for seg in record["segments"]:
            offsets = _read_npy(folder / seg["offsets"])
            dtype = entry_dtype(record["cols"], wide=seg["dtype"] == "float32")
            path = folder / seg["entries"]
            if offsets.shape != (seg["rows"] + 1,) or offsets.dtype.kind not in "iu" or offsets[0] != 0:
                return None
            if int(offsets[-1]) * dtype.itemsize != seg["entries_bytes"] or (np.diff(offsets) < 0).any():
                return None
            if seg["entries_bytes"] == 0:
                entries = np.zeros(0, dtype)
            elif isinstance(path, Path):
                entries = np.memmap(path, dtype, mode="r")
            else:  # an object store: one GET
                entries = np.frombuffer(path.read_bytes(), dtype)
            if entries.size != int(offsets[-1]):
                return None
            segments.append(Segment(int(seg["first"]), offsets.astype(np.int64), entries))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return RerankTable(basis, segments, record, folder)
