"""Inputs at scale: peak memory and rows per second of reading samples, per input format and row count.

For each row count in ``--sizes`` and each format in ``--formats`` the suite writes generated
rows (prompt-completion rows of ~130 bytes, 10% of them repeating the row before; the
``messages`` format writes 2-turn conversations), then reads them in a fresh Python process with
:func:`forvalue.indexer.data.iter_samples`: parsing, validation, content-hash ids and the
numbering of repeats, as the first stage of ``index build`` does (no model). It reports the
peak RSS of the read itself (the high-water mark ``VmHWM`` after the imports is reset through
``/proc/self/clear_refs``, then read at the end) and rows per second. Memory that grows with the
row count is the repeat numbering's key table (8 bytes per distinct row, at 25-50% load).

Formats: ``jsonl``, ``jsonl.gz``, ``jsonl.zst``, ``parquet`` (a folder of 8 shards),
``arrow`` (a ``datasets`` save_to_disk folder, written with pyarrow), ``messages`` (a
``.jsonl.zst`` of conversations).

    python -m tools.bench_inputs --sizes 10000,100000,1000000 --out runs/inputs.md
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
import time
from pathlib import Path

from tools.common import emit, human_bytes, md_table, run_module

FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "arrow", "messages")
SHARDS = 8


def _row(i: int, conversational: bool) -> dict:
    j = i - 1 if i % 10 == 9 else i  # every 10th row repeats the row before it
    prompt = f"Solve the following math problem. Ana has {j} apples and buys {j % 97} more. How many now? ->"
    answer = f" Answer: {j + j % 97}"
    if conversational:
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
    return {"prompt": prompt, "completion": answer}


def write_data(fmt: str, n: int, folder: Path) -> tuple[Path, int]:
    """Write ``n`` generated rows in ``fmt`` under ``folder``; returns the input path and the uncompressed bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    conversational = fmt == "messages"
    rows = (_row(i, conversational) for i in range(n))
    if fmt in ("parquet", "arrow"):
        target = folder / f"{fmt}_{n}"
        target.mkdir()
        per = -(-n // SHARDS)
        size, files = 0, []
        for k in range(SHARDS):
            part = [_row(i, False) for i in range(k * per, min(n, (k + 1) * per))]
            size += sum(len(json.dumps(r)) + 1 for r in part)
            table = pa.Table.from_pylist(part)
            if fmt == "parquet":
                pq.write_table(table, target / f"train-{k:05d}-of-{SHARDS:05d}.parquet")
            else:
                name = f"data-{k:05d}-of-{SHARDS:05d}.arrow"
                with pa.OSFile(str(target / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
                    for batch in table.to_batches(max_chunksize=1000):
                        w.write_batch(batch)
                files.append({"filename": name})
        if fmt == "arrow":
            (target / "state.json").write_text(json.dumps({"_data_files": files}))
        return target, size
    suffix = {"jsonl": "jsonl", "jsonl.gz": "jsonl.gz", "jsonl.zst": "jsonl.zst", "messages": "jsonl.zst"}[fmt]
    path = folder / f"{fmt.replace('.', '_')}_{n}.{suffix}"
    size = 0
    with path.open("wb") as raw:
        if suffix.endswith(".gz"):
            sink = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6)
        elif suffix.endswith(".zst"):
            import zstandard

            sink = zstandard.ZstdCompressor().stream_writer(raw)
        else:
            sink = raw
        for r in rows:
            line = (json.dumps(r) + "\n").encode()
            size += len(line)
            sink.write(line)
        if sink is not raw:
            sink.close()
    return path, size


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def child(path: str) -> None:
    """Runs in a fresh process: import, reset the RSS high-water mark, read every sample, report."""
    import gzip  # noqa: F401  (the readers' modules are imported before the baseline, as in a build)

    import pyarrow.parquet  # noqa: F401
    import zstandard  # noqa: F401

    from forvalue.indexer.data import iter_samples
    from forvalue.schemas.config import DataConfig

    base = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    start = time.perf_counter()
    rows = repeats = 0
    for s in iter_samples([path], DataConfig()):
        rows += 1
        repeats += s.occurrence > 0
    seconds = time.perf_counter() - start
    out = {
        "rows": rows,
        "repeats": repeats,
        "seconds": seconds,
        "base_kb": base,
        "hwm_kb": _status_kb("VmHWM") if reset else None,
        "end_kb": _status_kb("VmRSS"),
    }
    print("INPUTS_RESULT " + json.dumps(out), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="row counts, comma-separated")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}")
    ap.add_argument("--workdir", type=Path, default=None, help="where the generated data goes (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child)
        return
    from tools.common import START_LOAD, _loadavg, cpu_model

    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    formats = [f for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise SystemExit(f"error: unknown format {bad[0]!r}; choose from {', '.join(FORMATS)}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_inputs_"))
    table = []
    started = time.perf_counter()
    for n in sizes:
        for fmt in formats:
            t0 = time.perf_counter()
            path, size = write_data(fmt, n, work)
            written = time.perf_counter() - t0
            disk = sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())
            proc = run_module("tools.bench_inputs", ["--child", path], capture_output=True, text=True)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("INPUTS_RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"error: reading {path} failed: {proc.stderr.strip().splitlines()[-1:]}")
            r = json.loads(lines[-1].split(" ", 1)[1])
            assert r["rows"] == n, (r, n)
            grow = None if r["hwm_kb"] is None else (r["hwm_kb"] - r["base_kb"]) * 1024
            table.append(
                [
                    fmt,
                    f"{n:,}",
                    human_bytes(size),
                    human_bytes(disk),
                    f"{r['repeats']:,}",
                    human_bytes(r["base_kb"] * 1024),
                    "n/a" if grow is None else human_bytes(grow),
                    "n/a" if grow is None else f"{grow / n:.0f}",
                    f"{n / r['seconds']:,.0f}",
                    f"{written:.0f}",
                ]
            )
            print(" | ".join(table[-1]), flush=True)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    text = (
        "Reading samples (parse, validate, ids, repeat numbering; no model), fresh process per row: peak RSS of the "
        "read above the RSS after imports.\n\n"
        + md_table(
            [
                "format",
                "rows",
                "data (uncompressed)",
                "on disk",
                "repeats numbered",
                "RSS after imports",
                "peak RSS growth while reading",
                "bytes / row",
                "rows / s",
                "write s",
            ],
            table,
        )
        + f"\n\nMachine: {cpu_model()}, load avg at start {START_LOAD}, at end {_loadavg()}; total "
        f"{time.perf_counter() - started:.0f} s.\n"
    )
    emit(text, args.out)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
