"""Write result tables in formats other tools read: JSONL, CSV or Parquet (by file suffix)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa

from forvalue.schemas.errors import ForValueError

FORMATS = (".jsonl", ".csv", ".parquet")


def check_output_path(path: str | Path | None) -> None:
    """Refuse an unknown output format up front (before a long query runs)."""
    if path is not None and str(path) != "-" and Path(path).suffix.lower() not in FORMATS:
        raise ForValueError(f"{path}: unknown output format '{Path(path).suffix}'; use one of {', '.join(FORMATS)}")


def write_table(table: pa.Table, path: str | Path | None) -> None:
    """Write ``table`` to ``path`` (format from its suffix); JSONL on stdout when ``path`` is None or '-'."""
    if path is None or str(path) == "-":
        for row in table.to_pylist():
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    check_output_path(path)
    path = Path(path)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as handle:
            for row in table.to_pylist():
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif suffix == ".csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, path)
    else:
        import pyarrow.parquet as pq

        pq.write_table(table, path)
