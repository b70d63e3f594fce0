"""Write results in formats other tools read: JSONL, CSV or Parquet (by file suffix), and the score sink.

Every file goes through the one atomic writer of :mod:`forvalue.storage.files` (temporary name
beside the target, renamed into place), so a result file is whole or absent, never half written,
and never lands inside a store.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa

from forvalue.storage.files import STDOUT, TableSink, atomic_path, check_outputs, unique_columns
from forvalue.storage.files import write_table as _write_table

FORMATS = (".jsonl", ".csv", ".parquet")
SCORE_COLUMNS = ("train_id", "train_label")


def check_output_path(
    path: str | Path | None, formats: tuple[str, ...] = FORMATS, inputs: Iterable = (), what: str = "output"
) -> None:
    """Refuse an output path the policy forbids (:func:`forvalue.storage.files.check_outputs`) up front."""
    check_outputs({what: (path, (*formats, STDOUT))}, inputs)


def write_jsonl_atomic(rows: Iterable[dict], path: str | Path) -> None:
    """Write ``rows`` as JSONL to ``path`` (parent folders created), atomically.

    The path is checked first (:func:`check_output_path`): a ``.jsonl`` name, not a folder, device or pipe.
    """
    check_outputs({"output": (path, (".jsonl",))})
    with atomic_path(path) as tmp:
        with tmp.open("w", encoding="utf-8", errors="backslashreplace") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_table(table: pa.Table, path: str | Path | None) -> None:
    """Write ``table`` to ``path`` (format from its suffix); JSONL on stdout when ``path`` is None or '-'."""
    if path is None or str(path) == "-":
        for row in table.to_pylist():
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    check_output_path(path)
    if Path(path).suffix.lower() == ".jsonl":
        write_jsonl_atomic(table.to_pylist(), path)
        return
    _write_table(table, path)


class ScoreWriter:
    """Streams a full score matrix to Parquet, one row group per scored block (the score sink).

    Rows are training samples (``train_id``, ``train_label``), columns validation samples
    (float64; a repeated id, or one equal to ``train_id``/``train_label``, becomes ``id#1``...).
    The file is renamed into place on :meth:`close`; :meth:`abort` removes the partial file.
    """

    def __init__(self, path: str | Path, columns: list[str]):
        check_output_path(path, (".parquet",))
        self.path = Path(path)
        unique = unique_columns(SCORE_COLUMNS, columns)
        self.schema = pa.schema([(c, pa.string()) for c in SCORE_COLUMNS] + [(c, pa.float64()) for c in unique])
        self.sink = TableSink(self.path, self.schema)

    def write(self, ids: list, labels: list, scores: np.ndarray) -> None:
        """Append a block: ``scores`` float64 of shape ``(len(ids), n_columns)``."""
        arrays = [pa.array(ids, pa.string()), pa.array(labels, pa.string())]
        arrays += [pa.array(scores[:, j]) for j in range(scores.shape[1])]
        self.sink.write(pa.Table.from_arrays(arrays, schema=self.schema))

    def close(self) -> None:
        self.sink.close()

    def abort(self) -> None:
        self.sink.abort()
