"""Audit scan time against validation-set size: the G-form vs the token form vs a plain read (issue 15).

On a synthetic store (``tools.make_synthetic_store``: no model; its ``validation.npz`` holds the
validation encodings, so no encoding time is in any number) this times, for each validation-set
size ``n`` (the first ``n`` validation samples):

* the G-form audit scan (``forvalue.engine.scan.audit_scan(form="gform")``, the mean aggregate,
  building ``Gbar`` included) over the whole store;
* the token-form scan (``form="token"``, what every audit ran before: all per-sample scores, their
  mean and max) over the first ``--token-rows * min(sizes) / n`` stored rows (at least 64), scaled
  linearly to the whole store (its cost is linear in stored rows; the full scan at 1,000 validation
  samples would take hours);
* a plain read of the same columns (``Store.scan``, nothing decoded) and a read + decode
  (``forvalue.storage.rows.decode_block``): the I/O floor;
* one more G-form row at the largest size with ``--labels`` label aggregates (topic mod K), as an
  audit of a labelled validation set scores ``1 + K`` matrices.

Every G-form scan is checked against the token form on the rows both scored (max relative
difference printed). Peak RSS is the process's high-water mark after each step.

    python -m tools.bench gform --out runs/bench                       # makes a 100k-row store first
    python -m tools.bench_gform --store runs/s100k --sizes 10 100 1000 10000 --out gform.md
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np

from forvalue.engine.plan import choose_form
from forvalue.engine.scan import audit_scan
from forvalue.engine.validation import ValidationSet
from forvalue.indexer.data import Sample
from forvalue.schemas.tables import SCORING_COLUMNS
from forvalue.storage.rows import decode_block
from forvalue.storage.store import Store
from tools.common import add_common_args, apply_threads, emit, machine_info, md_table, resolve, run_module


def load_validation(path: Path, n: int, labels: int = 0) -> tuple[ValidationSet, list]:
    """The first ``n`` samples of a ``validation.npz``; labels = ``topic % labels`` (None without)."""
    z = np.load(path)
    lengths = z["lengths"].astype(np.int64)
    if n > lengths.size:
        raise SystemExit(
            f"{path} holds {lengths.size} validation samples, fewer than {n}; make the store with --n-val {n}"
        )
    tokens = int(lengths[:n].sum())
    topics = z["topics"][:n]
    val_labels = [f"t{int(t) % labels}" for t in topics] if labels else [None] * n
    samples = [
        Sample(id=f"v{j}", prompt=None, response=None, text="synthetic", label=val_labels[j], source="validation.npz")
        for j in range(n)
    ]
    val = ValidationSet(
        samples,
        z["hidden"][:tokens].astype(np.float32),
        z["ids"][:tokens].astype(np.int64),
        z["values"][:tokens].astype(np.float32),
        lengths[:n],
        z["sq_norms"][:n].astype(np.float64),
    )
    return val, val_labels


class _Head:
    """The first ``rows`` rows of a store, with the Store methods audit_scan uses."""

    def __init__(self, store: Store, rows: int):
        self.store, self.rows, self.manifest = store, rows, store.manifest

    def count(self) -> int:
        return min(self.rows, self.store.count())

    def scan(self, columns, batch_size=1024):
        left = self.count()
        for batch in self.store.scan(columns, batch_size=batch_size):
            if left <= 0:
                return
            yield batch.slice(0, left)
            left -= batch.num_rows


def peak_rss() -> str:
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def plain_read(store: Store, read_rows: int, decode: bool) -> tuple[float, float, int]:
    start, cpu, tokens = time.perf_counter(), time.process_time(), 0
    for batch in store.scan(SCORING_COLUMNS + ["id", "label"], batch_size=read_rows):
        if decode:
            tokens += decode_block(batch, store.manifest.hidden_size).hidden.shape[0]
        else:
            tokens += int(batch.column("n_scored").to_numpy().sum())
    return time.perf_counter() - start, time.process_time() - cpu, tokens


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=None, help="a synthetic store (default: make one under --workdir)")
    p.add_argument(
        "--workdir", type=Path, default=Path("runs/gform.work"), help="where the store is made without --store"
    )
    p.add_argument("--rows", type=int, default=100_000, help="rows of the store made under --workdir")
    p.add_argument("--hidden-size", type=int, default=256, help="d of the store made under --workdir")
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    p.add_argument(
        "--token-rows",
        type=int,
        default=2048,
        help="stored rows the token form is timed on at the smallest size (fewer at larger sizes; then scaled)",
    )
    p.add_argument("--labels", type=int, default=10, help="label aggregates in the extra G-form row (0: no such row)")
    p.add_argument("--read-rows", type=int, default=1024)
    p.add_argument(
        "--vocab-blocks",
        type=int,
        nargs="+",
        default=None,
        help="instead: score the largest size (with --labels) with Gbar forced into B vocabulary blocks, one gather "
        "per block (before issue 27) against one gather over the table built block by block (now)",
    )
    p.add_argument("--blocks-rows", type=int, default=20_000, help="stored rows the --vocab-blocks runs score")
    add_common_args(p)
    a = p.parse_args(argv)
    apply_threads(a.threads)
    device = resolve(a.device)
    if a.store is None:
        a.store = a.workdir / f"synthetic_{a.rows}"
        if not (a.store / "validation.npz").exists() or Store.open(a.store).count() < a.rows:
            made = run_module(
                "tools.make_synthetic_store",
                [
                    "--out",
                    a.store,
                    "--rows",
                    a.rows,
                    "--hidden-size",
                    a.hidden_size,
                    "--sketch-dim",
                    0,
                    "--n-val",
                    max(a.sizes),
                ],
            )
            if made.returncode:
                raise SystemExit("making the synthetic store failed")
    store = Store.open(a.store)
    total, m = store.count(), store.manifest
    npz = a.store / "validation.npz"
    if a.vocab_blocks:
        return blocks_main(a, store, npz, device)

    read_s, read_cpu, tokens = plain_read(store, a.read_rows, decode=False)
    decode_s, decode_cpu, _ = plain_read(store, a.read_rows, decode=True)
    print(
        f"plain read {read_s:.1f}s (cpu {read_cpu:.1f}s), read + decode {decode_s:.1f}s (cpu {decode_cpu:.1f}s)",
        flush=True,
    )
    rows, wall, cpu = [], {}, {}
    cases = [(n, 0) for n in a.sizes] + ([(max(a.sizes), a.labels)] if a.labels else [])
    for n, labels in cases:
        val, val_labels = load_validation(npz, n, labels)
        groups = sorted({l for l in val_labels if l is not None})
        start, start_cpu = time.perf_counter(), time.process_time()
        g = audit_scan(store, val, val_labels, groups, device, read_rows=a.read_rows, form="gform")
        g_s, g_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        if not labels:
            wall[n], cpu[n] = g_s, g_cpu
        # the token form's work grows with n: fewer rows for larger sets (>= 64), scaled to the store
        head = _Head(store, max(64, a.token_rows * min(a.sizes) // n))
        start, start_cpu = time.perf_counter(), time.process_time()
        t = audit_scan(head, val, val_labels, groups, device, read_rows=a.read_rows, form="token")
        scale = total / head.count()
        t_s, t_cpu = (time.perf_counter() - start) * scale, (time.process_time() - start_cpu) * scale
        both = t.mean.size
        diff = max(
            [np.abs(g.mean[:both] - t.mean).max() / np.abs(t.mean).max()]
            + [np.abs(g.by_label[k][:both] - t.by_label[k]).max() / np.abs(t.by_label[k]).max() for k in groups]
        )
        rows.append(
            [
                f"{n:,}" + (f" ({labels} labels: {1 + len(groups)} matrices)" if labels else ""),
                f"{int(val.lengths.sum()):,}",
                choose_form(val, 1 + len(groups)),
                f"{g_s:.0f} / {g_cpu:.0f}",
                f"{g_cpu / read_cpu:.2f}",
                f"{t_s:.0f} / {t_cpu:.0f} ({head.count()} rows)",
                f"{t_cpu / g_cpu:.0f}x",
                f"{diff:.1e}",
                peak_rss(),
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    table = md_table(
        [
            "validation samples",
            "validation tokens",
            "cost model picks",
            "G-form scan: wall / CPU s",
            "G-form CPU / plain-read CPU",
            "token form: wall / CPU s (scaled from)",
            "token / G-form (CPU)",
            "max rel. diff",
            "peak RSS",
        ],
        rows,
    )
    lo, hi = min(a.sizes), max(a.sizes)
    goals = [
        f"G-form scan at {n:,} / at {lo:,} validation samples: wall {wall[n] / wall[lo]:.2f}, CPU "
        f"{cpu[n] / cpu[lo]:.2f} (goal <= 1.5 at 1,000)"
        for n in a.sizes
        if n != lo
    ]
    goals.append(
        f"G-form throughput / plain-read throughput (CPU) at {lo:,}: {read_cpu / cpu[lo]:.0%}, at {hi:,}: "
        f"{read_cpu / cpu[hi]:.0%}; against read + decode: {decode_cpu / cpu[lo]:.0%}, "
        f"{decode_cpu / cpu[hi]:.0%}"
        f" (goal >= 50% of plain read); wall: {read_s / wall[lo]:.0%}, {read_s / wall[hi]:.0%}"
    )
    text = (
        f"Store {a.store.name}: {total:,} samples, {tokens:,} scored tokens, d = {m.hidden_size}, top-m {m.top_m}, "
        f"hidden {m.hidden_dtype}; read_rows {a.read_rows}. Plain read of the scoring columns {read_s:.1f} s wall / "
        f"{read_cpu:.1f} s CPU, read + decode {decode_s:.1f} s / {decode_cpu:.1f} s. CPU = the process's CPU time "
        "(all threads): on a shared machine the steadier measure of work.\n\n"
        f"{table}\n\n" + "\n".join(f"- {g}" for g in goals) + f"\n\n{machine_info(device)}\n"
    )
    emit(text, a.out)


def _scan_time(head, read_rows: int, score) -> tuple[float, float, np.ndarray]:
    start, start_cpu = time.perf_counter(), time.process_time()
    parts = [score(decode_block(b, head.manifest.hidden_size)) for b in head.scan(SCORING_COLUMNS, read_rows)]
    return time.perf_counter() - start, time.process_time() - start_cpu, np.concatenate(parts)


def blocks_main(a, store: Store, npz: Path, device) -> None:
    """Scan time of a G-form whose Gbar takes B vocabulary blocks: per-block gathers vs one gather (issue 27)."""
    import torch

    from forvalue.engine.gform import BlockedGForm, GFormScorer, aggregate_weights, vocab_union

    n = max(a.sizes)
    val, val_labels = load_validation(npz, n, a.labels)
    groups = sorted({l for l in val_labels if l is not None})
    weights = aggregate_weights(val_labels, groups)
    head = _Head(store, a.blocks_rows)
    n_vocab = vocab_union(val).size
    per_row = GFormScorer.estimate_bytes(1, weights.shape[1], val.hidden.shape[1]) // 2
    rows = []
    for b in a.vocab_blocks:
        budget = per_row * (-(-n_vocab // b) + 1)
        start = time.perf_counter()
        new = BlockedGForm(val, weights, device, budget=budget)
        build_s = time.perf_counter() - start
        step = -(-n_vocab // b)
        vocab = vocab_union(val)
        # before: one scorer per block, each gathering every stored token's entries (its own zero row for the rest)
        old_parts = [
            GFormScorer(val, weights, device, torch.float32, vocab[lo : lo + step]) for lo in range(0, n_vocab, step)
        ]
        old_s, old_cpu, old = _scan_time(
            head, a.read_rows, lambda blk, parts=old_parts: sum(p.score(blk) for p in parts)
        )
        new_s, new_cpu, got = _scan_time(head, a.read_rows, new.score)
        diff = float(np.abs(got - old).max() / np.abs(old).max())
        rows.append(
            [
                f"{new.blocks}",
                f"{build_s:.1f}",
                f"{old_s:.1f} / {old_cpu:.1f}",
                f"{new_s:.1f} / {new_cpu:.1f}",
                f"{old_cpu / new_cpu:.2f}x",
                f"{diff:.1e}",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    table = md_table(
        [
            "vocabulary blocks",
            "build s (now)",
            "per-block gathers: wall / CPU s",
            "one gather: wall / CPU s",
            "speed-up (CPU)",
            "max rel. diff",
        ],
        rows,
    )
    text = (
        f"Store {a.store.name}: the first {head.count():,} of {store.count():,} samples, "
        f"d = {store.manifest.hidden_size}, top-m {store.manifest.top_m}; {n:,} validation samples, {a.labels} labels "
        f"({weights.shape[1]} matrices), "
        f"|V_u| = {n_vocab:,}; both scorers score the same decoded batches, one after the other.\n\n{table}\n\n"
        f"{machine_info(device)}\n"
    )
    emit(text, a.out)


if __name__ == "__main__":
    main()
