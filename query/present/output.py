"""Write results in formats other tools read: JSONL, CSV or Parquet (by file suffix), and the score sink.

Files are written to a temporary name beside the target and renamed into place, so a result
file is whole or absent, never half written.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa

from forvalue.schemas.errors import ForValueError

FORMATS = (".jsonl", ".csv", ".parquet")


def check_output_path(path: str | Path | None, formats: tuple[str, ...] = FORMATS) -> None:
    """Refuse an unknown output format or an unwritable folder up front (before a long job runs)."""
    if path is None or str(path) == "-":
        return
    path = Path(path)
    if path.suffix.lower() not in formats:
        raise ForValueError(f"{path}: unknown output format '{path.suffix}'; use one of {', '.join(formats)}")
    if path.is_dir():
        raise ForValueError(f"{path}: is a folder; give a file name ending in {' or '.join(formats)}")
    if path.exists() and not path.is_file():  # a device, pipe or socket: an atomic rename would replace it
        raise ForValueError(f"{path}: exists and is not a regular file (a device, pipe or socket); give a file path")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ForValueError(f"{path}: {parent} is a file, not a folder; choose another output path")
    if not os.access(parent, os.W_OK):
        raise ForValueError(f"{path}: cannot write into {parent}; choose a writable folder")


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_text_atomic(text: str, path: str | Path, formats: tuple[str, ...] = (".html",)) -> Path:
    """Write ``text`` (UTF-8) to ``path`` (parent folders created), atomically; the path is checked first."""
    check_output_path(path, formats)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_jsonl_atomic(rows: Iterable[dict], path: str | Path) -> None:
    """Write ``rows`` as JSONL to ``path`` (parent folders created), atomically.

    The path is checked first (:func:`check_output_path`): a ``.jsonl`` name, not a folder, device or pipe.
    """
    check_output_path(path, (".jsonl",))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_table(table: pa.Table, path: str | Path | None) -> None:
    """Write ``table`` to ``path`` (format from its suffix); JSONL on stdout when ``path`` is None or '-'."""
    if path is None or str(path) == "-":
        for row in table.to_pylist():
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    check_output_path(path)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        write_jsonl_atomic(table.to_pylist(), path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        if suffix == ".csv":
            import pyarrow.csv as pcsv

            pcsv.write_csv(table, tmp)
        else:
            import pyarrow.parquet as pq

            pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ScoreWriter:
    """Streams a full score matrix to Parquet, one row group per scored block (the score sink).

    Rows are training samples (``train_id``, ``train_label``), columns validation samples
    (float64, repeated ids made unique as ``id#1``...). The file is renamed into place on
    :meth:`close`; :meth:`abort` removes the partial file.
    """

    def __init__(self, path: str | Path, columns: list[str]):
        import pyarrow.parquet as pq

        check_output_path(path, (".parquet",))
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _tmp(self.path)
        unique = _unique_names(columns)
        self.schema = pa.schema(
            [("train_id", pa.string()), ("train_label", pa.string())] + [(c, pa.float64()) for c in unique]
        )
        try:
            self.writer = pq.ParquetWriter(str(self.tmp), self.schema)
        except BaseException:  # e.g. a full disk: leave no partial file
            self.tmp.unlink(missing_ok=True)
            raise

    def write(self, ids: list, labels: list, scores: np.ndarray) -> None:
        """Append a block: ``scores`` float64 of shape ``(len(ids), n_columns)``."""
        arrays = [pa.array(ids, pa.string()), pa.array(labels, pa.string())]
        arrays += [pa.array(scores[:, j]) for j in range(scores.shape[1])]
        self.writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))

    def close(self) -> None:
        try:
            self.writer.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001  (closing flushes; on a full disk that fails too, the file goes anyway)
            pass
        self.tmp.unlink(missing_ok=True)


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        out.append(name if count == 0 else f"{name}#{count}")
    return out
