"""Value new data with a value model only (no LLM), streaming; read values files; select by values.

``estimate`` reports its throughput against the store's build throughput; ``select_by_values`` turns
estimated values into a training subset, as :meth:`forvalue.Audit.select` does for audits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from forvalue.results import Selection
from forvalue.schemas.config import DataConfig
from forvalue.schemas.errors import ForValueError
from forvalue.storage.files import TableSink
from forvalue.value_model import (
    ValueModel,
)


@dataclass
class EstimateReport:
    """Outcome of :func:`estimate`: counts, time, throughput against the store's build."""

    n: int
    seconds: float
    samples_per_s: float
    build_samples_per_s: float | None
    speedup: float | None
    output: str | None
    table: pa.Table | None = None
    duplicate_ids: int = 0  # rows whose id repeats an earlier row's (the first is valued, as the build keeps it)


def estimate(
    data: Sequence[str | Path],
    value_model: str | Path | ValueModel,
    output: str | Path | None = None,
    data_config: DataConfig = DataConfig(),
    group_column: str | None = None,
    block: int = 1024,
    progress: bool = False,
) -> EstimateReport:
    """Value every sample of ``data`` with a value model only (no LLM), streaming.

    Parameters
    ----------
    data : paths
        Any input the build reads; ids follow the build's rules (``id`` column, else content hash).
    value_model : path or ValueModel
    output : path, optional
        ``.parquet``, ``.csv`` or ``.jsonl`` with columns ``id``, ``value``, ``value_vs_label:L``
        (when the model has labels) and ``group_column`` (when given). Without it the table is
        returned in the report.
    group_column : str, optional
        A column of the data files naming each sample's provider, copied to the output (data pricing).

    Returns
    -------
    EstimateReport

    Example
    -------
    >>> st = forvalue.open(store_path)
    >>> _ = st.audit([validation_path], "v1", forvalue.AuditConfig(progress=False))
    >>> _ = st.audits["v1"].distill("vm")
    >>> forvalue.estimate([train_path], "vm", output="values.parquet").n
    12
    """
    from forvalue.indexer.data import check_inputs, iter_samples_with
    from forvalue.indexer.readers import as_paths
    from forvalue.storage.files import check_outputs

    data = as_paths(data)
    model_path = [] if isinstance(value_model, ValueModel) else [value_model]
    check_outputs({"output": (output, (".parquet", ".csv", ".jsonl"))}, [*data, *model_path])
    vm = value_model if isinstance(value_model, ValueModel) else ValueModel.load(value_model)
    if group_column in ("id", *vm.output_columns):
        raise ForValueError(
            f"--group-column {group_column}: the values file has its own '{group_column}' column; "
            "name the provider column differently"
        )
    check_inputs(data, data_config)  # as the build: an empty file is one line, not "0 values" and exit 0
    started = time.perf_counter()
    sink = TableSink(Path(output)) if output is not None else None
    extra = [group_column] if group_column else []
    fields = [pa.field("id", pa.string())] + [pa.field(c, pa.float64()) for c in vm.output_columns]
    fields += [pa.field(c, pa.string()) for c in extra]
    schema = pa.schema(fields)
    kept: list[pa.Table] = []
    n = 0
    from tqdm.auto import tqdm

    bar = tqdm(desc="estimate", unit="sample", disable=not progress, delay=1.0)  # shown only on long runs

    def flush(samples, groups):
        values = vm.predict([s.full_text for s in samples])
        cols = {"id": [s.id for s in samples]}
        cols.update({c: values[:, j] for j, c in enumerate(vm.output_columns)})
        for c in extra:
            cols[c] = [g[c] for g in groups]
        t = pa.table(cols, schema=schema)
        if sink is not None:
            sink.write(t)
        else:
            kept.append(t)
        bar.update(len(samples))

    seen: set[str] = set()  # the build's id rule: a repeated id keeps its first row (a values file of unique ids)
    duplicates = 0
    try:
        samples, groups = [], []
        for sample, extras in iter_samples_with(data, data_config, extra):
            if sample.id in seen:
                duplicates += 1
                continue
            seen.add(sample.id)
            samples.append(sample)
            groups.append(extras)
            if len(samples) >= block:
                flush(samples, groups)
                n += len(samples)
                samples, groups = [], []
        if samples:
            flush(samples, groups)
            n += len(samples)
        if sink is not None:
            sink.close(schema)
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    rate = n / seconds if seconds > 0 else float("inf")
    build = vm.meta.get("store", {}).get("build_samples_per_s")
    return EstimateReport(
        n,
        seconds,
        rate,
        build,
        rate / build if build else None,
        str(output) if output is not None else None,
        None if sink is not None else (pa.concat_tables(kept) if kept else schema.empty_table()),
        duplicates,
    )


# -- values files and selection ----------------------------------------------------------------------------
def _read_values_jsonl(path: Path) -> pa.Table:
    """A JSONL values file, parsed line by line with the data reader's checks (Arrow's JSON reader crashes
    on deeply nested input)."""
    from forvalue.indexer.readers import json_row

    rows = []
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            row = json_row(path, lineno, raw)
            if row is not None:
                rows.append(row)
    if not rows:
        raise ForValueError(f"{path}: holds no values")
    try:
        return pa.Table.from_pylist(rows)
    except (OverflowError, pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise ForValueError(f"{path}: not a readable jsonl values file ({str(exc).splitlines()[0]})") from None


def read_values(path: str | Path, column: str = "value") -> pa.Table:
    """A values file written by :func:`estimate` (.parquet, .csv or .jsonl), checked: ``id`` + ``column``."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ForValueError(f"{path}: not a regular file (a folder, pipe or device); give the values file itself")
    if not path.is_file():
        raise ForValueError(f"{path}: no such values file; write one with 'forvalue estimate ... -o FILE.parquet'")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        elif suffix == ".csv":
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(column_types={"id": pa.string()}))
        elif suffix == ".jsonl":
            table = _read_values_jsonl(path)
        else:
            raise ForValueError(f"{path}: unknown values format '{path.suffix}'; use .parquet, .csv or .jsonl")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ForValueError(f"{path}: not a readable {suffix[1:]} values file ({str(exc).splitlines()[0]})") from None
    for c in ("id", column):
        if c not in table.column_names:
            raise ForValueError(f"{path}: field '{c}': missing column (has: {', '.join(table.column_names)})")
    values = table.column(column)
    if not pa.types.is_floating(values.type) and not pa.types.is_integer(values.type):
        raise ForValueError(f"{path}: field '{column}': expected numbers, got {values.type}")
    if values.null_count or not np.isfinite(values.to_numpy(zero_copy_only=False).astype(np.float64)).all():
        raise ForValueError(f"{path}: field '{column}': missing or non-finite values")
    id_type = table.column("id").type
    if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type) or pa.types.is_integer(id_type)):
        raise ForValueError(f"{path}: field 'id': expected text ids, got {id_type}")
    ids = table.column("id").cast(pa.string()).to_pylist()
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ForValueError(f"{path}: field 'id': duplicate id '{dup}'")
    return table.set_column(table.column_names.index("id"), "id", pa.array(ids, pa.string()))


def select_by_values(
    values: str | Path,
    data: Sequence[str | Path],
    top: str | None = None,
    drop_bottom: str | None = None,
    output: str | Path | None = None,
    data_config: DataConfig = DataConfig(),
    column: str = "value",
) -> Selection:
    """Training rows of ``data`` chosen by estimated values, best first (as :meth:`forvalue.Audit.select`).

    Example
    -------
    >>> st = forvalue.open(store_path)
    >>> _ = st.audit([validation_path], "v1", forvalue.AuditConfig(progress=False)).distill("vm")
    >>> _ = forvalue.estimate([train_path], "vm", output="values.parquet")
    >>> forvalue.select_by_values("values.parquet", [train_path], top="25%", output="subset.jsonl")
    Selection(3 of 12 samples -> subset.jsonl)
    """
    from forvalue.audit import parse_amount, rows_from_data
    from forvalue.indexer.readers import as_paths
    from forvalue.present.output import write_jsonl_atomic
    from forvalue.storage.files import check_outputs

    data = as_paths(data)
    if (top is None) == (drop_bottom is None):
        raise ForValueError("give exactly one of --top or --drop-bottom")
    check_outputs({"output": (output, (".jsonl",))}, [values, *data])
    table = read_values(values, column)
    ids = table.column("id").to_pylist()
    v = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    order = np.argsort(-v, kind="stable")
    n = len(ids)
    keep = (
        order[: parse_amount(top, n)] if top is not None else order[: n - parse_amount(drop_bottom, n, "--drop-bottom")]
    )
    out = rows_from_data([ids[j] for j in keep], data, data_config, "the values were estimated from")
    if output is not None:
        write_jsonl_atomic(out, output)
    return Selection(out, total=n, output=Path(output) if output is not None else None)
