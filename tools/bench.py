"""The one benchmark runner: ``python -m tools.bench SUITE... --out DIR``.

Runs each named suite in its own fresh Python process (``python -m tools.<module>``, as a
standalone run would, so timings and memory peaks stay comparable with docs/benchmarks.md) and
writes its markdown to ``DIR/<suite>.md`` (the quality suite also ``DIR/quality.json``). Options
after ``--`` go to every named suite unchanged; ``SUITE --help`` shows a suite's own options.

    python -m tools.bench --list                               # the suites, their runtimes and docs sections
    python -m tools.bench store_size query --out runs/bench    # two quick suites
    python -m tools.bench quality --out runs/q -- --tasks math_no_reasoning --methods forvalue emb
    python -m tools.bench quality --help                       # the quality suite's own options

Exit status: 0 when every suite succeeded, 1 when one failed (the others still run), 2 for a
usage error (unknown suite, missing ``--out``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Suite:
    """One benchmark suite: its module under ``tools`` and what the runner hands it."""

    module: str
    what: str
    runtime: str  # on the 2-core development CPU, from docs/benchmarks.md; "not recorded" where it is not
    docs: str  # where its numbers are recorded
    needs: str = ""  # required suite options the runner cannot supply (given after --)
    workdir_option: str = ""  # a required work folder option the runner fills with DIR/<suite>.work
    json: bool = False  # also writes --json DIR/<suite>.json


SUITES: dict[str, Suite] = {
    "build": Suite(
        "bench_build",
        "index build vs bare forward pass, build breakdown, peak RSS vs corpus size",
        "~7 min for 256 samples x 2 reps without the RSS part (-- --rss-sizes ''); the RSS part at "
        "1,000 + 10,000 samples took 580 s + 3243 s more (stub runner)",
        "docs/benchmarks.md: Index build vs bare forward pass; Peak memory of the build",
    ),
    "query": Suite(
        "bench_query",
        "exact query: training tokens scored per second vs a plain matmul",
        "not recorded in the docs; 249 s in a re-run on 2026-12-02 (load ~1.5)",
        "docs/benchmarks.md: Query throughput (exact scan)",
    ),
    "quality": Suite(
        "bench_quality",
        "paper Table 1 protocol: For-Value vs Emb, TracIn, DataInf; detection; reproducibility",
        "66 min (3946 s) with the defaults",
        "docs/benchmarks.md: Quality: the paper's protocol",
        json=True,
    ),
    "top_m": Suite(
        "bench_top_m",
        "top-m sparse errors vs the dense full-vocabulary score",
        "not recorded in the docs; 116 s in a re-run on 2026-12-02 (load ~1.6)",
        "docs/benchmarks.md: Top-m sparse errors vs the dense full-vocabulary score",
    ),
    "store_size": Suite(
        "bench_store_size",
        "bytes on disk per scored token vs the 2d floor",
        "not recorded in the docs; 55 s in a re-run on 2026-12-02 (load ~1)",
        "docs/benchmarks.md: Store size",
    ),
    "prefilter": Suite(
        "bench_prefilter",
        "FAISS prefilter + exact rerank vs the exact scan (synthetic store)",
        "~10 min on the 1M-sample store with 20 validation samples (FAISS build 102 s, exact scans 160-183 s + "
        "62 s); with 100: the exact scan 30 min at load ~6 (keep it with --exact-cache), 400 queries 3 min; making "
        "the store (python -m tools.make_synthetic_store, two workers) 41 min",
        "docs/prefilter.md: Synthetic 1M-sample store; docs/benchmarks.md: Prefilter (FAISS)",
        needs="--store DIR (python -m tools.make_synthetic_store --out DIR --rows N)",
    ),
    "sketch_levers": Suite(
        "bench_sketch_levers",
        "prefilter levers (sketch shape, candidates, two stages, adaptive stop): recall against the exact top-k",
        "71 min on a 100k-sample store, 100 validation samples, 6 shapes, at load ~20; 10.6 min at load 3-5 "
        "(docs/prefilter.md)",
        "docs/prefilter.md: Levers",
        needs="--store DIR (python -m tools.make_synthetic_store --out DIR --rows N)",
    ),
    "index_kinds": Suite(
        "bench_index_kinds",
        "FAISS index types over one sketch column (exact ceiling, sq8, IVF, product codes with re-rank): candidate "
        "recall against the exact top-k, search latency, build time, bytes",
        "~9 min on the 10^6-sample store with 100 validation samples and 3 index types (column read 66-100 s, "
        "searches at 1,000 / 2,000 / 5,000 candidates); the exact top-k once before, 532 s",
        "docs/prefilter.md: Index types at 10^6",
        needs="--store DIR --exact-cache X.npz (python -m tools.bench_prefilter --store DIR --exact-only ...)",
    ),
    "store_tiers": Suite(
        "bench_store_tiers",
        "compact store tiers (float16 / int8 / low-rank / top-m): bytes per token, Spearman / top-10 vs float16, "
        "AUC / recall, build and convert time, audit scan of a synthetic store",
        "~14 min for the three paper tasks at 30 / 10 per class with 5 tiers (load 4-5); the synthetic part on the "
        "10^6-sample store 21 min (convert 392 s, two alternating read + scan repetitions), 50k at d = 1536 6 min",
        "docs/benchmarks.md: Store tiers",
        workdir_option="--workdir",
    ),
    "sketch_real": Suite(
        "bench_sketch_real",
        "prefilter sketch variants on a real-model store of the paper's tasks",
        "not recorded (a 900-sample build plus exact and sketched scores)",
        "docs/prefilter.md: Real model, benchmark tasks",
        workdir_option="--workdir",
    ),
    "audit": Suite(
        "bench_audit",
        "mislabeled-sample detection and the cost of a repeated audit",
        "not recorded (first audits 68 s and 24 s, on two 300-sample builds)",
        "docs/benchmarks.md: Audits: mislabeled data and repeated audits",
    ),
    "vlm": Suite(
        "bench_vlm",
        "vision-language valuation on generated shapes/captions (tiny offline Qwen2-VL)",
        "~1 min as recorded (six 160-image builds of 6-10 s each); 11 s in a re-run on 2026-12-02",
        "docs/vlm.md: The generated image task; docs/benchmarks.md: Vision-language models",
    ),
    "probe": Suite(
        "bench_probe",
        "For-Value settings (top_m, scored tokens, normalize) on one task",
        "not recorded",
        "docs/benchmarks.md: Quality: earlier runs (recall probes)",
        needs="--task TASK",
    ),
    "offsets": Suite(
        "analyse_offsets",
        "per-training-sample offsets in a quality run's score matrices (no model)",
        "seconds (reads the score matrices of a quality --workdir)",
        "docs/benchmarks.md: Why the generated tasks changed",
        needs="WORKDIR (a quality suite's -- --workdir folder)",
    ),
    "startup": Suite(
        "bench_startup",
        "start-up of the commands that load no model (info, check, audit list/show, select)",
        "about 1 min (a tiny-model store, then 11 commands x 5 fresh processes)",
        "docs/benchmarks.md: Start-up of the commands that load no model",
    ),
    "distill": Suite(
        "bench_distill",
        "distilled value models: estimated vs exact values, estimate vs build throughput",
        "about 30 min",
        "docs/benchmarks.md: Distilled value models",
    ),
    "inputs": Suite(
        "bench_inputs",
        "reading inputs at scale: peak RSS and rows/s per format (JSONL plain/.gz/.zst, "
        "Parquet shards, datasets Arrow folder, conversations) at 10^4-10^6 rows, no model",
        "430-540 s with the defaults (10^4, 10^5, 10^6 rows x 6 formats; load 8-14)",
        "docs/benchmarks.md: Reading inputs at scale; docs/data-formats.md",
    ),
    "selection": Suite(
        "bench_selection",
        "LoRA fine-tunes on what each method selects: targeted, noisy pool, brittleness (issue 17)",
        "designed for < 2 h with SmolLM2-135M (3 seeds); -- --quick < 10 min; resumable from DIR/selection.work",
        "docs/selection.md; docs/benchmarks.md: Selection by value",
        workdir_option="--workdir",
        json=True,
    ),
    "variants": Suite(
        "bench_variants",
        "score variants (centred, validation response tokens, cosine; --probes: whitened, IDF, ...) x the paper's "
        "and the hard tasks: AUC / recall",
        "hard tasks at 90 + 10 per class: ~20 s per variant and task after a 900-sample build (~5 min idle); "
        "the builds dominate",
        "docs/variants.md: Measured; docs/benchmarks.md: Score variants",
        workdir_option="--workdir",
    ),
    "validation_cache": Suite(
        "bench_validation_cache",
        "loading cached validation encodings: pylance take + arrays vs the previous row-by-row read; lancedb import",
        "about 15 s (400 encodings of 40 tokens, d = 576)",
        "docs/benchmarks.md: Loading cached validation encodings",
    ),
    "gform": Suite(
        "bench_gform",
        "audit scan time vs validation-set size: G-form vs token form vs plain read (issue 15)",
        "measure ~10 min on a 100k-sample synthetic store (making it first: ~35 min at load ~13, resumable "
        "in DIR/gform.work)",
        "docs/gform.md; docs/benchmarks.md: Audits at any validation-set size",
        workdir_option="--workdir",
    ),
    "mixed_audit": Suite(
        "bench_mixed_audit",
        "cached audits against 10 / 100 / 1,000 validation samples mixing the paper's three tasks, on a "
        "900-sample real-model store: load / scan / write, in-process and as a fresh command (issue 27)",
        "~3 min with the store and cache made (-- --forms --reps 3, load ~2); the first run builds the 900-sample "
        "store (1035 s) and encodes 1,000 validation samples (726 s) at load ~5",
        "docs/benchmarks.md: Mixed validation sets on a real-model store; docs/gform.md",
        workdir_option="--workdir",
    ),
    "lds": Suite(
        "bench_lds",
        "linear datamodeling score: For-Value raw/cosine vs gradient cosine, BM25, RDS+, Emb over M random "
        "50% subsets, each a LoRA fine-tune of the model (issue 29)",
        "-- --quick (60-sample pool, M = 20): 45 min at load 10-12 on the 2 cores (118 s per fine-tune), "
        "< 10 min only on a quiet machine; M = 50 with 30 validation samples (-- --quick --subsets 50 --classes 10 "
        "--per-class 2): 48 min in 4 processes (--reverse) at load 14-28; the 300-sample default not measured",
        "docs/benchmarks.md: Linear datamodeling score (LDS)",
        workdir_option="--workdir",
        json=True,
    ),
    "peers": Suite(
        "bench_peers",
        "Bergson 2.5.1 side by side with forvalue (same model folder, same data): build/query time, peak "
        "memory, store bytes, AUC/recall, detection AUC; Bergson in its own venv under the work folder (issue 29)",
        "first use installs Bergson (~2 min from local wheels, 6.1 GiB); per task at 20 train / 10 validation "
        "samples 10-25 min at load 10-14 (forvalue 3 steps, Bergson 2 projections x 2 steps, each a fresh "
        "process); the paper sizes (900/100) not measured",
        "docs/benchmarks.md: Against Bergson (peers)",
        workdir_option="--workdir",
        json=True,
    ),
    "cluster": Suite(
        "bench_cluster",
        "an s3:// store (local moto server): two Ray nodes vs one (build, audit, exact query) and the "
        "object store's read rate vs local disk",
        "not recorded yet",
        "docs/scale.md: Measured: two nodes and an object store",
    ),
    "ray": Suite(
        "bench_ray",
        "--engine ray on one machine: build throughput (plain vs 1 actor x T threads vs T "
        "actors x 1 thread), Ray's start-up and re-run costs, audit scan single-process vs Ray (issue 14)",
        "445 s with -- --samples 32 (load ~14 on the 2 cores; 4 builds of 32 real-model samples, 2 audits)",
        "docs/scale.md: Measured; docs/benchmarks.md: Scale-out on Ray",
    ),
}


def list_suites() -> str:
    """The ``--list`` text: one block per suite."""
    lines = ["suites (runtime on the 2-core development CPU, as recorded in docs/benchmarks.md):", ""]
    for name, s in SUITES.items():
        lines.append(f"{name:<12} python -m tools.{s.module}: {s.what}")
        lines.append(f"{'':<12} runtime: {s.runtime}")
        lines.append(f"{'':<12} recorded in: {s.docs}")
        if s.needs:
            lines.append(f"{'':<12} needs after --: {s.needs}")
    return "\n".join(lines)


def suite_args(name: str, suite: Suite, out: Path, extra: list[str]) -> list[str]:
    """The suite's own command line: ``extra`` plus the output files under ``out`` it was not given."""
    args = list(extra)

    def given(option: str) -> bool:
        return any(a == option or a.startswith(option + "=") for a in args)

    if not given("--out"):
        args += ["--out", str(out / f"{name}.md")]
    if suite.json and not given("--json"):
        args += ["--json", str(out / f"{name}.json")]
    if suite.workdir_option and not given(suite.workdir_option):
        args += [suite.workdir_option, str(out / f"{name}.work")]
    return args


def main(argv: list[str] | None = None) -> int:
    from tools.common import run_module

    argv = sys.argv[1:] if argv is None else list(argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    ap = argparse.ArgumentParser(
        prog="python -m tools.bench",
        description=__doc__.split("\n")[0],
        epilog="Options after -- go to every named suite; SUITE --help shows them.",
        add_help=False,
    )
    ap.add_argument("suites", nargs="*", metavar="SUITE", help="one or more of: " + ", ".join(SUITES))
    ap.add_argument("--out", type=Path, help="folder for the suites' markdown (DIR/<suite>.md) and JSON")
    ap.add_argument("--list", action="store_true", help="list the suites with their runtimes and exit")
    ap.add_argument("-h", "--help", action="store_true", help="this help, or with SUITE the suite's own options")
    args = ap.parse_args(argv)

    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        print(
            f"error: unknown suite {unknown[0]!r}; choose from {', '.join(SUITES)} (python -m tools.bench --list)",
            file=sys.stderr,
        )
        return 2
    if args.list:
        print(list_suites())
        return 0
    if args.help:
        if not args.suites:
            ap.print_help()
            return 0
        return max(run_module(f"tools.{SUITES[s].module}", ["--help"]).returncode for s in args.suites)
    if not args.suites:
        print("error: name at least one suite (python -m tools.bench --list)", file=sys.stderr)
        return 2
    if args.out is None:
        print("error: --out DIR is required: the folder the suites write their markdown to", file=sys.stderr)
        return 2

    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.suites:
        suite = SUITES[name]
        cmd = suite_args(name, suite, args.out, extra)
        print(f"== {name}: python -m tools.{suite.module} {' '.join(cmd)}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        rc = run_module(f"tools.{suite.module}", cmd).returncode
        status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        print(
            f"== {name}: {status} in {time.perf_counter() - started:.0f} s -> {args.out / (name + '.md')}",
            file=sys.stderr,
            flush=True,
        )
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"error: {len(failed)} suite(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
