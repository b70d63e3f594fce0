"""Cached audits against mixed validation sets: is the cost flat in the number of validation samples? (issue 27)

A real SmolLM2 store of the paper's three text tasks (10 classes each, ``--per-class`` training samples per
class, labels ``task/class``); validation sets of ``--sizes`` samples drawn (seeded, nested: the 10 are in the
100, the 100 in the 1,000) from the three tasks' validation rows, so every set mixes tasks, templates and
vocabularies, as a user's does. The first audit encodes the largest set once (the validation cache); every
measured audit then finds its encodings cached and runs no forward pass.

Each size is measured twice per repetition, sizes in alternating order:

- in this process (``forvalue.audit.run_audit``, imports and caches warm): the audit's own time split,
  load (cached encodings; ``encode_seconds``) / scan / write, its wall and this process's CPU time;
- as a fresh ``forvalue audit run`` process, what a user's command costs: wall and CPU (``os.wait4``) and
  peak memory (``VmHWM``).

    python -m tools.bench mixed_audit --out DIR [-- --per-class 30 --sizes 10 100 1000 --reps 2]
    python -m tools.bench_mixed_audit --workdir DIR [--out FILE]     # the suite on its own (resumable)

Goal (issue 27): the 1,000-sample audit costs at most 1.5x the 10-sample one.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from tools.common import add_common_args, apply_threads, emit, machine_info, md_table


def write_rows(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_data(workdir: Path, per_class: int, n_val: int, seed: int) -> tuple[Path, list[dict]]:
    """``train.jsonl`` of the store and the pool the validation sets are drawn from (both seeded)."""
    from forvalue.tasks.text import TASKS, generate_task

    per_class_val = -(-n_val // (10 * len(TASKS)))  # ceil: enough validation rows for the largest set
    train, pool = [], []
    for task in TASKS:
        tr, te = generate_task(task, n_train=per_class, n_test=per_class_val, n_classes=10, seed=seed)
        train += [{**r, "label": f"{task}/{r['label']}"} for r in tr]
        pool += [{**r, "label": f"{task}/{r['label']}"} for r in te]
    random.Random(seed).shuffle(pool)
    path = workdir / "train.jsonl"
    if not path.exists():
        write_rows(train, path)
    return path, pool[:n_val]


def forms_table(store: Path, sets: dict[int, Path], reps: int) -> str:
    """CPU seconds of the G-form by gather and by pairs and of the token form on the same decoded blocks, one
    thread, alternating, best of ``reps``; max relative difference to the gather."""
    import numpy as np
    import torch

    from forvalue.engine import plan
    from forvalue.engine.gform import GFormScorer, aggregate_weights
    from forvalue.engine.scorer import ExactScorer
    from forvalue.engine.validation import data_for_store, encode_validation_cached, load_validation_samples
    from forvalue.schemas.config import DataConfig
    from forvalue.schemas.tables import SCORING_COLUMNS
    from forvalue.storage.audits import ValidationCache
    from forvalue.storage.rows import decode_block
    from forvalue.storage.store import Store

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    st = Store.open(store)
    blocks = [decode_block(b, st.manifest.stored_width) for b in st.scan(list(SCORING_COLUMNS), batch_size=1024)]
    rows, threshold = [], plan.PAIR_FORM_MIN_FLOATS
    try:
        for n, path in sets.items():
            samples = load_validation_samples([path], data_for_store(DataConfig(), st.manifest))
            val, _ = encode_validation_cached(samples, st.manifest, DataConfig(), None, ValidationCache(st))
            labels = [s.label for s in samples]
            w = aggregate_weights(labels, sorted(set(labels)))
            times: dict[str, list[float]] = {}
            out = {}
            for _ in range(reps):
                for way, floats in (("gather", 1 << 62), ("pairs", 1)):
                    plan.PAIR_FORM_MIN_FLOATS = floats
                    scorer = GFormScorer(val, w, "cpu")
                    c0 = time.process_time()
                    out[way] = np.concatenate([scorer.score(b) for b in blocks])
                    times.setdefault(way, []).append(time.process_time() - c0)
                if n <= 100:  # the token form grows with the validation set: 1,000 would take minutes
                    scorer = ExactScorer(val, torch.device("cpu"))
                    c0 = time.process_time()
                    np.concatenate([scorer.score(b) for b in blocks]) @ w
                    times.setdefault("token", []).append(time.process_time() - c0)
            diff = float(np.abs(out["pairs"] - out["gather"]).max() / np.abs(out["gather"]).max())
            token = f"{min(times['token']):.2f}" if "token" in times else "-"
            rows.append([n, w.shape[1], w.shape[1] * val.hidden.shape[1], f"{min(times['gather']):.2f}",
                         f"{min(times['pairs']):.2f}", f"{min(times['gather']) / min(times['pairs']):.2f}x", token,
                         f"{diff:.1e}"])  # fmt: skip
    finally:
        plan.PAIR_FORM_MIN_FLOATS = threshold
        torch.set_num_threads(threads)
    return "\n".join(
        [
            f"The G-form's two ways and the token form on the same {len(blocks)} decoded blocks, one thread, CPU "
            f"seconds (best of {reps}, alternating; the audit uses pairs from A d >= {threshold}):",
            "",
            md_table(
                [
                    "validation samples",
                    "aggregates A",
                    "A d",
                    "gather s",
                    "pairs s",
                    "gather / pairs",
                    "token form s",
                    "max rel. diff",
                ],
                rows,
            ),  # fmt: skip
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.bench_mixed_audit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--workdir", type=Path, required=True, help="store, data and logs (a re-run reuses the store)")
    ap.add_argument("--model", default=None, help="model folder (default: the product's default SmolLM2-135M)")
    ap.add_argument("--per-class", type=int, default=30, help="training samples per class (3 tasks x 10 classes)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000], help="validation set sizes")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--forms",
        action="store_true",
        help="also score the store's blocks in this process with the G-form's two ways (gather, pairs) and the "
        "token form, one thread, side by side (docs/gform.md)",
    )
    add_common_args(ap)
    a = ap.parse_args(argv)
    if min(a.sizes) < 1 or a.reps < 1 or a.per_class < 1:
        ap.error("--sizes, --reps and --per-class must be >= 1")
    apply_threads(a.threads)

    from forvalue.api import build_index
    from forvalue.audit import AuditConfig, run_audit
    from forvalue.schemas.config import BuildConfig, ModelConfig
    from tools.bench_peers import run_measured

    a.workdir.mkdir(parents=True, exist_ok=True)
    train, pool = make_data(a.workdir, a.per_class, max(a.sizes), a.seed)
    sets = {}
    for n in sorted(a.sizes):
        sets[n] = a.workdir / f"val_{n}.jsonl"
        write_rows(pool[:n], sets[n])
    store = a.workdir / "store"
    done = a.workdir / "store.done.json"
    if not done.exists():  # a build cut short leaves no marker: start the store again
        import shutil

        shutil.rmtree(store, ignore_errors=True)
        t0 = time.perf_counter()
        model = ModelConfig(path=a.model, device=a.device) if a.model else ModelConfig(device=a.device)
        rep = build_index([train], store, BuildConfig(model=model, progress=False))
        done.write_text(json.dumps({"seconds": time.perf_counter() - t0, "samples": rep.written}))
    built = json.loads(done.read_text())
    cfg = AuditConfig(progress=False, device=a.device)
    t0 = time.perf_counter()
    first = run_audit(store, [sets[max(a.sizes)]], "warm", cfg)  # encodes the largest set once
    first_wall = time.perf_counter() - t0
    print(f"first audit of {max(a.sizes)}: {first_wall:.1f} s, {first.encoded_now} encoded", flush=True)

    inproc: dict[int, list[dict]] = {n: [] for n in sets}
    fresh: dict[int, list[dict]] = {n: [] for n in sets}
    for r in range(a.reps):
        order = sorted(sets) if r % 2 == 0 else sorted(sets, reverse=True)
        for n in order:
            c0, t0 = time.process_time(), time.perf_counter()
            run = run_audit(store, [sets[n]], f"mixed{n}", cfg)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if run.encoded_now:
                raise SystemExit(f"audit of {n} encoded {run.encoded_now} samples: the cache was not used")
            inproc[n].append(
                dict(
                    wall=wall,
                    cpu=cpu,
                    load=run.encode_seconds,
                    scan=run.scan_seconds,
                    write=run.write_seconds,
                    form=run.form,
                )
            )
            cmd = [
                str(Path(sys.executable).with_name("forvalue")),
                "audit",
                "run",
                "--store",
                str(store),
                "-v",
                str(sets[n]),
                "--name",
                f"fresh{n}",
                "--quiet",
                "--device",
                a.device,
            ]
            m = run_measured(cmd, a.workdir / "logs" / f"fresh{n}_{r}.log")
            if m["rc"] != 0:
                raise SystemExit(f"forvalue audit run failed ({m['rc']}): see {a.workdir / 'logs'}")
            fresh[n].append(m)
            print(
                f"rep {r} n {n}: in-process {wall:.2f} s wall / {cpu:.2f} s CPU (scan {run.scan_seconds:.2f}, "
                f"{run.form}); fresh process {m['wall']:.2f} / {m['cpu']:.2f} s",
                flush=True,
            )

    def best(xs: list[dict], key: str) -> float:
        return min(x[key] for x in xs)

    rows = []
    for n in sorted(sets):
        labels = len({row["label"] for row in pool[:n]})
        ip, fp = inproc[n], fresh[n]
        rows.append(
            [
                n,
                labels,
                ip[0]["form"],
                f"{best(ip, 'load'):.2f}",
                f"{best(ip, 'scan'):.2f}",
                f"{best(ip, 'write'):.2f}",
                f"{best(ip, 'wall'):.2f} / {best(ip, 'cpu'):.2f}",
                f"{best(fp, 'wall'):.2f} / {best(fp, 'cpu'):.2f}",
                f"{max(x['peak_rss'] for x in fp) / 2**30:.2f} GiB",
            ]
        )
    lo, hi = min(sets), max(sets)
    ratio = [
        f"in-process wall {best(inproc[hi], 'wall') / best(inproc[lo], 'wall'):.2f}x, "
        f"CPU {best(inproc[hi], 'cpu') / best(inproc[lo], 'cpu'):.2f}x, "
        f"scan {best(inproc[hi], 'scan') / best(inproc[lo], 'scan'):.2f}x; "
        f"fresh process wall {best(fresh[hi], 'wall') / best(fresh[lo], 'wall'):.2f}x, "
        f"CPU {best(fresh[hi], 'cpu') / best(fresh[lo], 'cpu'):.2f}x"
    ]
    forms = [forms_table(store, sets, a.reps), ""] if a.forms else []
    text = "\n".join(
        [
            f"Store: SmolLM2-135M-Instruct, the paper's three text tasks, 10 classes x {a.per_class} training samples "
            f"each ({built['samples']} samples, built in {built['seconds']:.0f} s). Validation sets: the first N of "
            f"{hi} seeded validation rows of the three tasks (seed {a.seed}), labels task/class. First audit of {hi} "
            f"(model load + {first.encoded_now} forward passes): {first_wall:.1f} s. Times: the best of {a.reps} "
            "repetitions (sizes in alternating order); load = cached encodings, write = flags, ranks and the table.",
            "",
            md_table(
                [
                    "validation samples",
                    "labels",
                    "scan form",
                    "load s",
                    "scan s",
                    "write s",
                    "in-process wall / CPU s",
                    "fresh `forvalue audit run` wall / CPU s",
                    "fresh peak",
                ],
                rows,
            ),
            "",
            f"{hi} vs {lo}: " + ratio[0] + " (goal <= 1.5x).",
            "",
            *forms,
            machine_info(a.device),
        ]
    )
    emit(text + "\n", a.out)
    (a.workdir / "result.json").write_text(json.dumps({"inproc": inproc, "fresh": fresh}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
