"""Loading cached validation encodings: the validation cache read with pylance vs the previous row-by-row read.

An audit of an unchanged validation set runs no forward pass: it loads the encodings from the store's
validation cache (``forvalue.storage.audits.ValidationCache``). This times, on one synthetic cache (``--entries``
encodings of ``--tokens`` tokens, d = ``--hidden-size``, 33 error entries per token) and side by side:

* ``before``: every stored row turned into Python objects (``to_batches`` + ``to_pylist``, the previous
  implementation), keeping the wanted keys;
* ``now``: :meth:`ValidationCache.get` (the key column, then ``take`` of the wanted rows, list columns turned
  into arrays without Python objects per value);

for 10 and for all of the entries, checks both return the same arrays, and times ``import lancedb`` (which the
cache no longer needs) against ``import lance`` in fresh interpreters.

    python -m tools.bench validation_cache --out runs/bench
    python -m tools.bench_validation_cache --entries 400 --tokens 40 --hidden-size 576
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tools.common import add_common_args, emit, machine_info, md_table, resolve


def _old_get(uri: str, keys) -> dict:
    import lance

    wanted, out = set(keys), {}
    for batch in lance.dataset(uri).to_batches(batch_size=4096):
        for row in batch.to_pylist():
            if row["key"] in wanted and row["key"] not in out:
                n = row["n_scored"]
                ids = np.asarray(row["ids"], np.int64).reshape(n, -1)
                hidden = np.asarray(row["hidden"], np.float32).reshape(n, -1)
                out[row["key"]] = (
                    hidden,
                    ids,
                    np.asarray(row["values"], np.float32).reshape(ids.shape),
                    row["sq_norm"],
                )
    return out


def _import_seconds(module: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    return time.perf_counter() - start


def main(argv=None) -> None:
    from forvalue.storage.audits import ValidationCache

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entries", type=int, default=400)
    p.add_argument("--tokens", type=int, default=40)
    p.add_argument("--hidden-size", type=int, default=576)
    add_common_args(p)
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)  # the cache only needs its folder; the store's own tables are not read

        class _Folder:
            path = store

        cache = ValidationCache(_Folder())
        items = {
            f"k{i}": (
                rng.normal(size=(a.tokens, a.hidden_size)).astype(np.float32),
                rng.integers(0, 49152, (a.tokens, 33)),
                rng.random((a.tokens, 33)).astype(np.float32),
                1.0,
            )
            for i in range(a.entries)
        }
        start = time.perf_counter()
        cache.put(items)
        put_s = time.perf_counter() - start
        keys, rows = list(items), []
        for n in sorted({min(10, a.entries), a.entries}):
            times = {}
            for name, fn in (("before", lambda k: _old_get(cache._uri, k)), ("now", cache.get)):
                start = time.perf_counter()
                got = fn(keys[:n])
                times[name] = time.perf_counter() - start
                assert len(got) == n
            old, new = _old_get(cache._uri, keys[:n]), cache.get(keys[:n])
            same = all(all(np.array_equal(old[k][i], new[k][i]) for i in range(3)) for k in old)
            rows.append(
                [
                    f"{n} of {a.entries}",
                    f"{times['before']:.3f}",
                    f"{times['now']:.3f}",
                    f"{times['before'] / times['now']:.1f}x",
                    "yes" if same else "NO",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    lancedb_s, lance_s = _import_seconds("lancedb"), _import_seconds("lance")
    table = md_table(["encodings loaded", "before s", "now s", "speed-up", "same arrays"], rows)
    text = (
        f"Validation cache of {a.entries} encodings ({a.tokens} tokens, d = {a.hidden_size}, 33 error entries per "
        f"token); writing them took {put_s:.2f} s.\n\n{table}\n\n`import lancedb` {lancedb_s:.2f} s, "
        f"`import lance` {lance_s:.2f} s (fresh interpreters; the cache and audit tables need only lance now).\n\n"
        f"{machine_info(resolve('cpu'))}\n"
    )
    emit(text, a.out)


if __name__ == "__main__":
    main()
