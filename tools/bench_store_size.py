"""Benchmark of the store size: bytes on disk per scored token vs the ``d * 2``-byte floor.

Builds small real stores with the default model (SmolLM2-135M-Instruct, d=576) over
``--samples`` generated rows (the three DataInf tasks round-robin), one per ``--top-m``
value and ``--hidden-dtypes`` entry, and reports the folder size per scored token, split
per column group with Lance's own per-field statistics, next to the floor (float16
hidden state alone, ``2 d`` bytes) and the uncompressed payload (``2 d + 8 m + 12``).

Usage::

    python -m tools.bench store_size --out DIR [-- --samples 100 --top-m 8,32,128 --hidden-dtypes float16 --device cpu]
    python -m tools.bench_store_size [--samples 100] ... [--out FILE]       # the same suite on its own
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from tools.bench_build import make_rows, write_rows
from tools.common import add_common_args, apply_threads, emit, machine_info, md_table, quiet_transformers, resolve

ERROR_COLUMNS = ("topk_ids", "topk_probs", "target_ids", "target_probs", "tail_mass")


def column_bytes(store_path: Path) -> dict[str, int]:
    """Bytes on disk per top-level column, from Lance's data statistics."""
    import lance

    ds = lance.dataset(str(store_path / "samples.lance"))
    by_id = {f.id: f.bytes_on_disk for f in ds.stats.data_stats().fields}
    out = {}
    for field in ds.lance_schema.fields():
        ids = [field.id()] + [c.id() for c in field.children()]
        out[field.name()] = sum(by_id.get(i, 0) for i in ids)
    return out


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_store_size", description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--top-m", default="8,32,128")
    p.add_argument("--hidden-dtypes", default="float16", help="comma-separated: float16, float32")
    p.add_argument("--batch-size", type=int, default=8)
    add_common_args(p)
    args = p.parse_args(argv)
    apply_threads(args.threads)
    device = resolve(args.device)
    quiet_transformers()
    from forvalue.indexer.build import build_index
    from forvalue.indexer.model_runner import load_runner
    from forvalue.schemas.config import BuildConfig, EncodeConfig, ModelConfig

    runner = load_runner(ModelConfig(device=str(device)))
    d = runner.hidden_size
    floor = 2 * d
    rows = []
    with tempfile.TemporaryDirectory(prefix="forvalue-bench-size-") as tmp:
        data = write_rows(make_rows(args.samples), Path(tmp) / "train.jsonl")
        for hidden_dtype in args.hidden_dtypes.split(","):
            for m in [int(x) for x in args.top_m.split(",")]:
                store = Path(tmp) / f"store-{hidden_dtype}-{m}"
                config = BuildConfig(
                    model=ModelConfig(device=str(device)),
                    encode=EncodeConfig(top_m=m, hidden_dtype=hidden_dtype),
                    batch_size=args.batch_size,
                    progress=False,
                )
                report = build_index([data], store, config, runner=runner)
                t = report.tokens_scored
                total = folder_bytes(store)
                cols = column_bytes(store)
                hidden = cols["hidden"]
                errors = sum(cols[c] for c in ERROR_COLUMNS)
                data_total = sum(cols.values())
                other = data_total - hidden - errors
                overhead = total - data_total
                hidden_raw = (2 if hidden_dtype == "float16" else 4) * d
                payload = hidden_raw + 8 * m + 12
                rows.append(
                    [
                        hidden_dtype,
                        m,
                        report.written,
                        t,
                        f"**{total / t:.0f}**",
                        f"{total / t / floor:.3f}",
                        f"{hidden / t:.0f}",
                        f"{errors / t:.1f} (raw {8 * m + 12})",
                        f"{other / t:.1f}",
                        f"{overhead / t:.1f}",
                        payload,
                        f"{total / t / payload:.3f}",
                    ]
                )
                print(f"  {hidden_dtype} m={m}: {total / t:.0f} B/token", file=sys.stderr, flush=True)
                shutil.rmtree(store, ignore_errors=True)
    text = "\n".join(
        [
            "## Store size benchmark (`python -m tools.bench store_size`)",
            "",
            machine_info(device),
            "",
            f"Real stores built with SmolLM2-135M-Instruct (d={d}) over {args.samples} generated samples "
            f"(3 DataInf tasks round-robin, whole text scored). Floor = float16 hidden state alone = 2d = {floor} "
            "bytes "
            "per scored token. Column bytes come from Lance's per-field statistics; 'Lance metadata' is the rest of "
            "the "
            "store folder (manifests, version and transaction files, manifest.json) and is a fixed cost per commit, "
            "so it shrinks per token on bigger stores. Uncompressed payload = hidden + 8m + 12 "
            "(top-m ids int32 + probs float32, target id + prob, tail mass).",
            "",
            md_table(
                [
                    "hidden",
                    "top_m",
                    "samples",
                    "scored tokens",
                    "bytes/token on disk",
                    "x floor (2d)",
                    "hidden B/token",
                    "sparse errors B/token",
                    "ids/text/scalars B/token",
                    "Lance metadata B/token",
                    "uncompressed payload B/token",
                    "disk / payload",
                ],
                rows,
            ),
            "",
        ]
    )
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
