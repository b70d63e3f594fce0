"""Write result tables in formats other tools read: JSONL, CSV or Parquet (by file suffix)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa

from schemas.errors import ForValueError

FORMATS = (".jsonl", ".csv", ".parquet")


def write_table(table: pa.Table, path: str | Path | None) -> None:
    """Write ``table`` to ``path`` (format from its suffix); JSONL on stdout when ``path`` is None or '-'."""
    if path is None or str(path) == "-":
        for row in table.to_pylist():
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ForValueError(f"{path}: unknown output format '{suffix}'; use one of {', '.join(FORMATS)}")
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
