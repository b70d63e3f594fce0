"""Store tiers: float16 / int8 (per block, per token) measured against float16 (issue 26).

Part 1, real model (default SmolLM2-135M-Instruct), the paper's three DataInf tasks
(``forvalue.tasks.text.generate_task``, seed 0, ``--train-per-class`` x 10 training and
``--test-per-class`` x 10 validation samples): one float16 store is built per task (a schema-3 store:
packed errors, float16 sketches) and converted to each tier with ``forvalue index convert``
(:func:`forvalue.indexer.convert.convert_store`; a converted store holds exactly what a build of that tier
writes: tests/test_store_tiers.py). For each tier: bytes per scored token of the whole store folder
(table, sketch column, FAISS index, basis) and of each column (Arrow buffers of the table), per-validation-
sample Spearman and top-10 overlap of the exact scores against the float16 store's, AUC / recall
(``forvalue.metrics.class_retrieval``), convert time; for the low-rank tiers (int8 + ``--hidden-rank R``)
the fraction of the fitting tokens' energy the basis keeps (``STORE/hidden_basis.npz``). The first task's int8
store is also built directly to compare build times. The schema-2 float16 store (int32 ids, float32
probabilities and sketch, the layout before this issue) is produced by rewriting the float16 store's rows,
for its bytes only.

Part 2, ``--synthetic-store S`` (``python -m tools.make_synthetic_store --out S --sketch-dim 0``): convert S to
a packed float16 and an int8 store (convert throughput next to the plain read of S), then the exact audit
scan (G-form mean of ``--val`` validation samples of ``S/validation.npz``) and a plain read of each.

    python -m tools.bench store_tiers --out DIR [-- --train-per-class 90 --synthetic-store S]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tools.common import add_common_args, apply_threads, emit, machine_info, md_table, quiet_transformers

TIERS = {
    "float16": {},
    "int8 block 64": {"hidden_dtype": "int8", "int8_block": 64},
    "int8 per token": {"hidden_dtype": "int8", "int8_block": 0},
    # the low-rank tier (--hidden-rank R, forvalue.indexer.low_rank) combined with int8
    "int8 + R 256": {"hidden_dtype": "int8", "int8_block": 64, "hidden_rank": 256},
    "int8 + R 128": {"hidden_dtype": "int8", "int8_block": 64, "hidden_rank": 128},
    "int8 + R 64": {"hidden_dtype": "int8", "int8_block": 64, "hidden_rank": 64},
    # between R 128 and R 64; and the errors cut to the top 16 (at low rank they are most of the bytes)
    "int8 + R 96": {"hidden_dtype": "int8", "int8_block": 32, "hidden_rank": 96},
    "int8 + R 128, top-m 16": {"hidden_dtype": "int8", "int8_block": 64, "hidden_rank": 128, "top_m": 16},
    "int8 + R 96, top-m 16": {"hidden_dtype": "int8", "int8_block": 32, "hidden_rank": 96, "top_m": 16},
}
# what the suite runs without --tiers (the measured table of docs/benchmarks.md)
DEFAULT_TIERS = ("int8 block 64", "int8 per token", "int8 + R 256", "int8 + R 128", "int8 + R 64")


# the per-token columns whose bytes the suite reports, in table order
COLUMNS = ("hidden", "hidden_scale", "topk_ids", "topk_probs", "target_ids", "target_probs", "tail_mass", "sketch")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def column_bytes(store) -> dict[str, int]:
    """Arrow buffer bytes of each column of the table (what the column holds before Lance's own encoding)."""
    out: dict[str, int] = {}
    for batch in store.scan(store.schema().names, batch_size=4096):
        for name, col in zip(batch.schema.names, batch.columns):
            out[name] = out.get(name, 0) + col.nbytes
    return out


def tokens_of(store) -> int:
    return sum(int(np.asarray(b.column(0)).sum()) for b in store.scan(["n_scored"], batch_size=65536))


def _v2_copy(src: Path, dst: Path) -> None:
    """The float16 store rewritten in the schema-2 layout (int32 ids, float32 probabilities and sketch)."""
    import lancedb

    from forvalue.schemas.tables import samples_schema
    from forvalue.storage import faiss_index
    from forvalue.storage.store import Store

    store = Store.open(src)
    table = store.take(list(range(store.count())), store.schema().names)
    schema = samples_schema("float16", store.manifest.sketch_dim)
    if dst.exists():  # a re-run with the same --workdir: made again from the float16 store
        shutil.rmtree(dst)
    dst.mkdir()
    lancedb.connect(str(dst)).create_table("samples", table.select(schema.names).cast(schema))
    manifest = json.loads((src / "manifest.json").read_text())
    for key in ("hidden_block", "ids_dtype", "probs_dtype", "sketch_dtype"):
        manifest.pop(key, None)
    manifest["schema_version"] = 2
    (dst / "manifest.json").write_text(json.dumps(manifest))
    if (src / "sketch_basis.npy").exists():
        shutil.copy(src / "sketch_basis.npy", dst / "sketch_basis.npy")
    faiss_index.ensure(Store.open(dst))  # a Flat index of float32 sketches, as before


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from tools.bench_top_m import spearman as sp

    return sp(a, b)


def top_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    return len(set(np.argsort(-a, kind="stable")[:k]) & set(np.argsort(-b, kind="stable")[:k])) / k


def tier_validation(val_full, store):
    """The validation set as a query of ``store`` scores it: the full-width encoding (the same for every tier:
    validation samples are float16 whatever the store keeps), projected onto a low-rank store's basis."""
    from forvalue.engine.validation import project_validation, store_hidden_basis

    return project_validation(val_full, store.manifest, store_hidden_basis(store))


def exact_scores(store, val, device: str) -> tuple[np.ndarray, list[str]]:
    """``(scores (n_val, rows), train ids)`` of the exact scan (``forvalue.engine.scan.score_all``, the query's)."""
    from forvalue.engine.scan import score_all
    from forvalue.schemas.config import QueryConfig

    parts, ids = [], []
    for _, block_ids, _, scores in score_all(store, val, QueryConfig(device=device, progress=False), device):
        parts.append(scores)
        ids.extend(block_ids)
    return np.concatenate(parts).T, ids


def prefilter_recall(store, val, scores: np.ndarray, device: str, k: int = 10, candidates=(20, 50)) -> dict:
    """Recall of the exact top-``k`` (rows of ``scores``) among the prefilter's reranked top-``k``, per candidate
    count (mean over validation samples)."""
    from forvalue.engine.prefilter import prefilter_topk
    from forvalue.schemas.config import QueryConfig

    exact = [set(np.argsort(-s, kind="stable")[:k].tolist()) for s in scores]
    out = {}
    for c in candidates:
        config = QueryConfig(device=device, progress=False, top_k=k, candidates=c)
        _, rows = prefilter_topk(store, val, config, device).result()
        out[c] = float(np.mean([len(e & set(r.tolist())) / k for e, r in zip(exact, rows)]))
    return out


def real_part(args, runner, work: Path) -> str:
    from forvalue.api import build_index
    from forvalue.engine.validation import encode_validation, load_validation_samples
    from forvalue.indexer.convert import convert_store
    from forvalue.metrics import class_retrieval
    from forvalue.schemas.config import BuildConfig, DataConfig, EncodeConfig, ModelConfig
    from forvalue.storage.store import Store
    from forvalue.tasks.text import generate_task, write_jsonl

    quality_rows, size_rows, time_rows, column_rows, recall_rows = [], [], [], [], []
    for t, task in enumerate(args.tasks):
        train, test = generate_task(task, n_train=args.train_per_class, n_test=args.test_per_class, seed=0)
        folder = work / task
        folder.mkdir(parents=True, exist_ok=True)  # a re-run with the same --workdir resumes (stores are kept)
        train_path, val_path = write_jsonl(train, folder / "train.jsonl"), write_jsonl(test, folder / "val.jsonl")
        # the reference tier is float16 whatever the default of new stores is
        cfg = BuildConfig(
            model=ModelConfig(device=args.device), progress=False, encode=EncodeConfig(hidden_dtype="float16")
        )
        started = time.perf_counter()
        report = build_index([train_path], folder / "float16", cfg, runner=runner)
        build_s = {"float16": time.perf_counter() - started}
        record = folder / "build_seconds.json"  # a resumed store keeps the time of the run that wrote it
        if report.written == len(train):
            record.write_text(json.dumps(build_s))
        elif record.exists():
            build_s = json.loads(record.read_text())
        print(f"{task}: float16 build {build_s['float16']:.1f} s ({report.tokens_scored} tokens)", flush=True)
        if t == 0 and args.build_int8:
            int8 = BuildConfig(
                model=ModelConfig(device=args.device), progress=False, encode=EncodeConfig(hidden_dtype="int8")
            )
            started = time.perf_counter()
            build_index([train_path], folder / "int8-built", int8, runner=runner)
            build_s["int8 block 64"] = time.perf_counter() - started
            print(f"{task}: int8 build {build_s['int8 block 64']:.1f} s", flush=True)
        stores, convert_s, energy = {"float16": folder / "float16"}, {}, {}
        for name in args.tiers:
            opts = TIERS[name]
            out = folder / name.replace(" ", "-").replace("+", "plus")
            started = time.perf_counter()
            report = convert_store(folder / "float16", out, progress=False, **opts)
            convert_s[name] = time.perf_counter() - started
            stores[name] = out
            if report.energy_kept is not None:
                energy[name] = report.energy_kept
        _v2_copy(folder / "float16", folder / "v2")
        tokens = tokens_of(Store.open(folder / "float16"))
        n_samples = len(train)
        size_rows.append(
            (task, "float16, schema 2 (before)", f"{folder_bytes(folder / 'v2') / tokens:.0f}", "-", "-", "-")
        )
        scores, labels, vals, raw = {}, None, {}, {}
        # the validation set encoded once (what each tier's query would encode), projected per low-rank tier
        samples = load_validation_samples([val_path], DataConfig())
        val_full = encode_validation(runner, samples, Store.open(folder / "float16").manifest, DataConfig())
        for name, path in stores.items():
            store = Store.open(path)
            vals[name] = tier_validation(val_full, store)
            s, train_ids = exact_scores(store, vals[name], args.device)
            raw[name] = s
            order = {sid: j for j, sid in enumerate(train_ids)}
            ids = [r["id"] for r in train]
            scores[name] = s[:, [order[i] for i in ids]]
            labels = [r["label"] for r in train]
            total = folder_bytes(path)
            cols = column_bytes(store)
            table = sum(cols.values())
            index_bytes = folder_bytes(path / "prefilter") if (path / "prefilter").exists() else 0
            size_rows.append(
                (
                    task,
                    name,
                    f"{total / tokens:.0f}",
                    f"{total / folder_bytes(folder / 'v2'):.1%}",
                    f"{index_bytes / tokens:.0f}",
                    f"{table / tokens:.0f}",
                )
            )
            if t == 0:
                column_rows.append((name,) + tuple(f"{cols.get(c, 0) / tokens:.1f}" for c in COLUMNS))
        v2 = Store.open(folder / "v2")
        recall_stores = [("float32 sketch (schema 2)", v2, "float16"), ("float16 sketch", None, "float16")]
        recall_stores += [(f"float16 sketch, {n}", None, n) for n in args.recall_tiers if n in stores]
        for name, store, tier in recall_stores:
            store = store or Store.open(stores[tier])
            rec = prefilter_recall(store, vals[tier], raw[tier], args.device)
            recall_rows.append((task, name) + tuple(f"{rec[c]:.3f}" for c in sorted(rec)))
        val_labels = [r["label"] for r in test]
        base = class_retrieval(scores["float16"], labels, val_labels)
        for name, s in scores.items():
            m = class_retrieval(s, labels, val_labels)
            ref = scores["float16"]
            sp = [spearman(s[j], ref[j]) for j in range(len(s))]
            ov = [top_overlap(s[j], ref[j]) for j in range(len(s))]
            quality_rows.append(
                (
                    task,
                    name,
                    f"{energy[name]:.4f}" if name in energy else "-",
                    f"{m['auc_mean']:.4f} ({m['auc_mean'] - base['auc_mean']:+.4f})",
                    f"{m['recall_mean']:.4f} ({m['recall_mean'] - base['recall_mean']:+.4f})",
                    f"{np.mean(sp):.6f}",
                    f"{np.min(sp):.6f}",
                    f"{np.mean(ov):.3f}",
                    f"{np.max(np.abs(s - ref)) / np.abs(ref).max():.1e}",
                )
            )
        for name in stores:
            if name == "float16":
                time_rows.append((task, name, f"{build_s['float16']:.1f}", "-", "-"))
                continue
            rate = n_samples / convert_s[name]
            time_rows.append(
                (task, name, f"{build_s.get(name, float('nan')):.1f}" if name in build_s else "-",
                 f"{convert_s[name]:.1f}", f"{rate:.0f} samples/s, {tokens / convert_s[name]:,.0f} tokens/s")
            )  # fmt: skip
        print(md_table(["task", "tier", "energy", "AUC", "recall", "Spearman mean", "min", "top-10", "max |diff|"],
                       quality_rows[-len(scores):]), flush=True)  # fmt: skip
    return "\n\n".join(
        [
            f"Real stores: {args.train_per_class * 10} training / {args.test_per_class * 10} validation samples per "
            "task, SmolLM2-135M-Instruct (float32), whole text scored, top-m 32. Whole-store bytes per scored token "
            "(table + sketch + FAISS index + basis; 'vs before' = against the schema-2 float16 store of the same "
            "rows, the layout before this change) and the prefilter index's share:",
            md_table(
                [
                    "task",
                    "tier",
                    "bytes/token (whole store)",
                    "vs before",
                    "of which FAISS index",
                    "table columns (Arrow)",
                ],
                size_rows,
            ),  # fmt: skip
            f"Per column, bytes per scored token (Arrow buffers, task {args.tasks[0]}):",
            md_table(
                ["tier", *COLUMNS],
                column_rows,
            ),  # fmt: skip
            "Quality: exact scores of each tier against the float16 store's (per validation sample Spearman, "
            "its minimum, top-10 overlap; max |diff| relative to the largest float16 score) and class retrieval:",
            md_table(
                [
                    "task",
                    "tier",
                    "energy kept",
                    "AUC (vs float16)",
                    "recall (vs float16)",
                    "Spearman mean",
                    "Spearman min",
                    "top-10 overlap",
                    "max |diff| / max",
                ],
                quality_rows,
            ),  # fmt: skip
            "Prefilter recall of the exact top-10 (FAISS candidates reranked exactly), float32 vs float16 sketches "
            "of the same rows (a low-rank tier: its own exact top-10, sketched in its stored coordinates):",
            md_table(["task", "sketch", "recall@10, 20 candidates", "recall@10, 50 candidates"], recall_rows),
            "Build (forward pass included) and convert (from the float16 store, no forward pass) seconds:",
            md_table(["task", "tier", "build s", "convert s", "convert rate"], time_rows),
        ]
    )


def synthetic_part(args, work: Path) -> str:
    from forvalue.engine.scan import audit_scan
    from forvalue.indexer.convert import convert_store
    from forvalue.schemas.manifest import SCHEMA_VERSION
    from forvalue.storage.store import Store
    from tools.bench_gform import load_validation, plain_read

    src = Store.open(args.synthetic_store)
    val, labels = load_validation(args.synthetic_store / "validation.npz", args.val)
    read_s, _, tokens = plain_read(src, 1024, decode=False)
    n = src.count()
    current = src.manifest.schema_version >= SCHEMA_VERSION and src.manifest.hidden_dtype == "float16"
    label = "source (float16)" if current else f"source (schema {src.manifest.schema_version} float16)"
    rows = [(label, f"{folder_bytes(src.path) / tokens:.0f}", "-", f"{read_s:.1f}", "-", "-")]
    stores = {"float16": (src, None)} if current else {}  # a store in today's layout is the float16 tier itself
    tiers = [("int8 per token", {"hidden_dtype": "int8", "int8_block": 0})]
    if not current:
        tiers.insert(0, ("float16", {}))
    if args.synthetic_block64:
        tiers.append(("int8 block 64", {"hidden_dtype": "int8", "int8_block": 64}))
    for name, opts in tiers:
        # a finished conversion in --workdir is reused (convert_store resumes: it finds every row there)
        out = work / ("synth-" + name.replace(" ", "-"))
        started = time.perf_counter()
        report = convert_store(args.synthetic_store, out, progress=True, block_rows=1024, **opts)
        conv = time.perf_counter() - started if report.written else None
        print(
            f"synthetic: convert to {name} {time.perf_counter() - started:.1f} s ({report.written} rows written)",
            flush=True,
        )
        stores[name] = (Store.open(out), conv)
    results = {}
    for rep in range(args.reps):  # alternate the tiers, so load changes hit both
        for name, (store, _) in stores.items():
            r_s, _, _ = plain_read(store, 1024, decode=False)
            started = time.perf_counter()
            scan = audit_scan(store, val, labels, [], "cpu", form="gform")
            s_s = time.perf_counter() - started
            results.setdefault(name, []).append((r_s, s_s, scan.mean))
            print(f"synthetic rep {rep}: {name}: read {r_s:.1f} s, audit scan {s_s:.1f} s", flush=True)
    ref_mean = results["float16"][0][2]
    base_scan = min(r[1] for r in results["float16"])
    for name, (store, conv) in stores.items():
        read = min(r[0] for r in results[name])
        scan = min(r[1] for r in results[name])
        diff = np.max(np.abs(results[name][0][2] - ref_mean)) / np.abs(ref_mean).max()
        rows.append(
            (
                name,
                f"{folder_bytes(store.path) / tokens:.0f}",
                "-"
                if conv is None
                else f"{conv:.1f} ({n / conv:,.0f} samples/s; plain read of the source {read_s:.1f} s)",
                f"{read:.1f}",
                f"{scan:.1f} ({base_scan / scan:.2f}x float16)",
                f"{diff:.1e}",
            )
        )
    m = src.manifest
    return "\n\n".join(
        [
            f"Synthetic store {args.synthetic_store} ({n:,} samples, {tokens:,} tokens, d={m.hidden_size}, top-m "
            f"{m.top_m}, sketch D {m.sketch_dim or 'none'}), converted; exact audit scan = G-form mean of {args.val} "
            "validation samples "
            f"(validation.npz), best of {args.reps} alternating repetitions:",
            md_table(
                ["store", "bytes/token", "convert s", "plain read s", "audit scan s", "max |mean diff| / max"], rows
            ),  # fmt: skip
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--tasks", nargs="+", default=["sentence_transformations", "math_no_reasoning",
                                                  "math_with_reasoning"])  # fmt: skip
    p.add_argument("--train-per-class", type=int, default=90)
    p.add_argument("--test-per-class", type=int, default=10)
    p.add_argument("--recall-tiers", nargs="*", default=["int8 + R 64"],
                   help="tiers whose prefilter recall is measured too (their sketch: stored coordinates)")  # fmt: skip
    p.add_argument("--tiers", nargs="+", default=list(DEFAULT_TIERS), choices=[t for t in TIERS if t != "float16"],
                   help="tiers converted from the float16 store and compared with it")  # fmt: skip
    p.add_argument("--no-build-int8", dest="build_int8", action="store_false", help="skip the direct int8 build")
    p.add_argument("--no-real", dest="real", action="store_false", help="skip part 1 (the real model)")
    p.add_argument("--synthetic-store", type=Path, default=None)
    p.add_argument("--synthetic-block64", action="store_true", help="also convert the synthetic store to int8 block 64")
    p.add_argument("--val", type=int, default=10, help="validation samples of the synthetic audit")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=None, help="keep the stores here (default: a temporary folder)")
    args = p.parse_args(argv)
    apply_threads(args.threads)
    quiet_transformers()
    parts = []
    with tempfile.TemporaryDirectory(prefix="forvalue-tiers-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.real:
            from forvalue.indexer.model_runner import load_runner
            from forvalue.schemas.config import ModelConfig

            runner = load_runner(ModelConfig(device=args.device, dtype="float32"))
            parts.append(real_part(args, runner, work / "real"))
        if args.synthetic_store is not None:
            parts.append(synthetic_part(args, work))
    parts.append(machine_info(args.device))
    emit("## Store tiers (`python -m tools.bench store_tiers`)\n\n" + "\n\n".join(parts), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
