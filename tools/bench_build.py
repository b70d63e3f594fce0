"""Benchmark of the index build: throughput, overhead over a bare forward pass, peak memory.

Part 1 (real default model, SmolLM2-135M-Instruct): ``forvalue.indexer.build.build_index`` over
``--samples`` generated rows (the three DataInf tasks, round-robin, more seeds for more
rows) against the bare forward pass of the same model, ``model(input_ids,
attention_mask)`` computing the full logits, over the same length-sorted batches (same
batch size, same sort window as the encoder, tensors prepared beforehand, nothing
stored). Build and bare pass alternate (A,B,B,A,...) and medians are compared.
The build is instrumented by wrapping the functions it calls (tokenizer, decoder
forward, LM head, sparsifier, self-norm, Arrow conversion, Lance append), so the
breakdown is of the real build path.

Part 2 (peak RSS): a random-initialised Llama with SmolLM2's shapes but 2 layers
(hidden 576, vocab 49152, tied head) and the SmolLM2 tokenizer, one fresh subprocess per
corpus size in ``--rss-sizes``; the peak RSS of the build itself is measured after
resetting the high-water mark once the model is loaded (``/proc/self/clear_refs``).

Usage::

    python -m tools.bench build --out DIR [-- --samples 200 --batch-size 8 --device cpu
                                             --rss-sizes 1000,10000 --reps 3]
    python -m tools.bench_build [--samples 200] ... [--out FILE]       # the same suite on its own
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from tools.common import (
    add_common_args,
    apply_threads,
    emit,
    machine_info,
    md_table,
    median,
    quiet_transformers,
    resolve,
    run_module,
    sync,
)

TASKS = ("sentence_transformations", "math_no_reasoning", "math_with_reasoning")


# ----------------------------------------------------------------------------- data
def make_rows(n: int) -> list[dict]:
    """``n`` training rows: the three tasks round-robin, seeds 0, 1, ... for more rows."""
    from forvalue.tasks.text import generate_task

    rows: list[dict] = []
    seed = 0
    while len(rows) < n:
        per_task = [generate_task(t, n_train=90, n_test=0, seed=seed)[0] for t in TASKS]
        for group in zip(*per_task):
            for r in group:
                rows.append(
                    {"id": f"s{seed}-{r['id']}", "prompt": r["prompt"], "response": r["response"], "label": r["label"]}
                )
        seed += 1
    return rows[:n]


def write_rows(rows: list[dict], path: Path) -> Path:
    from forvalue.tasks.text import write_jsonl

    return write_jsonl(rows, path)


# ----------------------------------------------------------------------------- bare pass
def bare_batches(runner, data_path: Path, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Padded ``(ids, mask)`` batches exactly as ``encode_stream`` forms them."""
    from forvalue.indexer import encoder
    from forvalue.indexer.data import iter_samples
    from forvalue.indexer.tokenize import tokenize_sample
    from forvalue.schemas.config import DataConfig

    data = DataConfig()
    toks = [
        tokenize_sample(runner.tokenizer, s, "all", data.max_length, data.chat_template)
        for s in iter_samples([data_path], data)
    ]
    window = batch_size * encoder._SORT_WINDOW_BATCHES
    batches = []
    for w in range(0, len(toks), window):
        part = sorted(toks[w : w + window], key=lambda s: len(s.input_ids))
        for b in range(0, len(part), batch_size):
            ids, mask = encoder.pad_batch(part[b : b + batch_size], runner.pad_id)
            batches.append((ids.to(runner.device), mask.to(runner.device)))
    return batches


@torch.no_grad()
def bare_forward(model, batches, device) -> float:
    sync(device)
    start = time.perf_counter()
    for ids, mask in batches:
        logits = model(input_ids=ids, attention_mask=mask).logits
    sync(device)
    del logits
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- instrumented build
class Probe:
    """Wraps the functions the build calls and sums their wall time per run."""

    def __init__(self, device):
        self.device = device
        self.times: dict[str, float] = defaultdict(float)
        self._undo: list = []

    def wrap(self, owner, name: str, label: str, bound_instance: bool = False) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            out = original(*args, **kwargs)
            sync(self.device)
            self.times[label] += time.perf_counter() - start
            return out

        if bound_instance:
            setattr(owner, name, wrapper)
            self._undo.append(lambda: delattr(owner, name))
        else:
            setattr(owner, name, wrapper)
            self._undo.append(lambda: setattr(owner, name, original))

    def install(self, runner) -> None:
        import forvalue.indexer.build as build
        import forvalue.indexer.encoder as encoder
        from forvalue.storage.store import Store

        self.wrap(runner, "tokenize", "tokenize", bound_instance=True)
        self.wrap(runner, "hidden_states", "forward (decoder)", bound_instance=True)
        self.wrap(runner, "logits", "LM head matmul", bound_instance=True)
        self.wrap(encoder, "sparsify", "_sparsify")
        self.wrap(encoder, "self_score", "self-norm ||G||^2")
        self.wrap(build, "encoded_to_arrow", "Arrow conversion")
        self.wrap(build, "sketch_column", "prefilter sketch")  # called inside encoded_to_arrow
        self.wrap(build, "store_basis", "sketch basis (load/fit)")
        self.wrap(Store, "append", "Lance append + refresh")

    def uninstall(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def take(self) -> dict[str, float]:
        out = dict(self.times)
        self.times.clear()
        return out


def run_build(runner, data_path: Path, store_path: Path, batch_size: int, device, probe: Probe | None):
    from forvalue.indexer.build import build_index
    from forvalue.schemas.config import BuildConfig, ModelConfig

    shutil.rmtree(store_path, ignore_errors=True)
    config = BuildConfig(model=ModelConfig(device=str(device)), batch_size=batch_size, progress=False)
    sync(device)
    start = time.perf_counter()
    report = build_index([data_path], store_path, config, runner=runner)
    sync(device)
    seconds = time.perf_counter() - start
    parts = probe.take() if probe else {}
    return seconds, report, parts


def part1(args, device, workdir: Path) -> str:
    from forvalue.indexer import encoder
    from forvalue.indexer.model_runner import load_runner
    from forvalue.schemas.config import ModelConfig

    runner = load_runner(ModelConfig(device=str(device)))
    rows = make_rows(args.samples)
    # Chunks of one encoder sort window: the build forms exactly the same batches per chunk
    # as over the whole file, and a build/bare pair of one chunk runs close together in
    # time, so machine-load changes hit both sides of a pair alike.
    chunk = args.batch_size * encoder._SORT_WINDOW_BATCHES
    chunks = []
    for i, start in enumerate(range(0, len(rows), chunk)):
        path = write_rows(rows[start : start + chunk], workdir / f"chunk{i}.jsonl")
        chunks.append((path, bare_batches(runner, path, args.batch_size)))
    in_tokens = int(sum(int(m.sum()) for _, bs in chunks for _, m in bs))
    padded_tokens = int(sum(m.numel() for _, bs in chunks for _, m in bs))

    # warm-up of both paths (first-call allocations, lazy imports, Lance init)
    warm_path = write_rows(rows[: 2 * args.batch_size], workdir / "warm.jsonl")
    run_build(runner, warm_path, workdir / "warm_store", args.batch_size, device, None)
    bare_forward(runner.model, chunks[0][1][:2], device)

    probe = Probe(device)
    probe.install(runner)
    n_chunks = len(chunks)
    wall = {"build": np.zeros((args.reps, n_chunks)), "bare": np.zeros((args.reps, n_chunks))}
    cpu = {"build": np.zeros((args.reps, n_chunks)), "bare": np.zeros((args.reps, n_chunks))}
    parts_runs: list[dict[str, float]] = []
    scored = 0
    try:
        for rep in range(args.reps):
            parts_rep: dict[str, float] = defaultdict(float)
            for i, (path, batches) in enumerate(chunks):
                order = ("build", "bare") if (rep + i) % 2 == 0 else ("bare", "build")
                for what in order:
                    c0 = time.process_time()
                    if what == "build":
                        s, report, parts = run_build(runner, path, workdir / "store", args.batch_size, device, probe)
                        for k, v in parts.items():
                            parts_rep[k] += v
                        if rep == 0:
                            scored += report.tokens_scored
                    else:
                        s = bare_forward(runner.model, batches, device)
                    wall[what][rep, i], cpu[what][rep, i] = s, time.process_time() - c0
                print(
                    f"  rep {rep} chunk {i}: build {wall['build'][rep, i]:.2f} s, bare {wall['bare'][rep, i]:.2f} s, "
                    f"ratio {wall['build'][rep, i] / wall['bare'][rep, i]:.3f}",
                    file=sys.stderr,
                    flush=True,
                )
            parts_runs.append(dict(parts_rep))
    finally:
        probe.uninstall()
    shutil.rmtree(workdir / "store", ignore_errors=True)

    pair = (wall["build"] / wall["bare"]).ravel()
    pair_cpu = (cpu["build"] / cpu["bare"]).ravel()
    b = median(wall["build"].sum(axis=1))  # median over reps of a full pass over all samples
    f = median(wall["bare"].sum(axis=1))
    b_min, f_min = float(wall["build"].sum(axis=1).min()), float(wall["bare"].sum(axis=1).min())
    head = [
        f"### Index build vs bare forward pass (SmolLM2-135M-Instruct, {runner.identity.dtype})",
        "",
        f"{args.samples} samples (3 DataInf tasks round-robin), {in_tokens} input tokens "
        f"({padded_tokens} with padding), {scored} scored tokens, batch size {args.batch_size}, "
        f"top_m 32, hidden float16. Build and bare pass alternate chunk by chunk ({n_chunks} chunks of "
        f"{chunk} samples = one sort window, same batches as one build over all) for {args.reps} repetitions: "
        f"{pair.size} adjacent build/bare pairs. Seconds are the median over repetitions of the sum over chunks.",
        "",
    ]
    table1 = md_table(
        ["path", "seconds (median)", "samples/s", "input tokens/s", "scored tokens/s"],
        [
            [
                "bare forward `model(ids, mask)` (full logits)",
                f"{f:.2f}",
                f"{args.samples / f:.2f}",
                f"{in_tokens / f:.0f}",
                f"{scored / f:.0f}",
            ],
            [
                "`build_index` (end to end, incl. tokenize + store)",
                f"{b:.2f}",
                f"{args.samples / b:.2f}",
                f"{in_tokens / b:.0f}",
                f"{scored / b:.0f}",
            ],
        ],
    )
    table_ratio = md_table(
        ["build / bare ratio", "value"],
        [
            [
                "median of per-pair wall-time ratios (**headline**)",
                f"**{np.median(pair):.3f}** (min {pair.min():.3f}, max {pair.max():.3f})",
            ],
            [
                "median of per-pair CPU-time ratios (process CPU s, less sensitive to other load)",
                f"{np.median(pair_cpu):.3f} (min {pair_cpu.min():.3f}, max {pair_cpu.max():.3f})",
            ],
            ["ratio of median totals (wall)", f"{b / f:.3f}"],
            ["ratio of fastest totals (wall)", f"{b_min / f_min:.3f}"],
            ["goal", "<= 1.15"],
        ],
    )
    keys = [
        "tokenize",
        "forward (decoder)",
        "LM head matmul",
        "_sparsify",
        "self-norm ||G||^2",
        "Arrow conversion",
        "Lance append + refresh",
        "prefilter sketch",
        "sketch basis (load/fit)",
    ]
    med = {k: median([p.get(k, 0.0) for p in parts_runs]) for k in keys}
    build_total = {rep: wall["build"][rep].sum() for rep in range(args.reps)}
    bt = median(list(build_total.values()))
    softmax_topk = med["_sparsify"] - med["LM head matmul"]
    accounted = sum(med[k] for k in keys if k not in ("LM head matmul", "prefilter sketch"))
    lines = [
        ("tokenize (tokenizer calls)", med["tokenize"]),
        ("forward: decoder (`runner.hidden_states`)", med["forward (decoder)"]),
        ("LM head matmul on scored positions (`runner.logits`)", med["LM head matmul"]),
        ("softmax + top-m + target gather + to numpy (`sparsify` minus head)", softmax_topk),
        ("self-norm ||G_i||^2 (`self_score`)", med["self-norm ||G||^2"]),
        ("Arrow conversion (`encoded_to_arrow`), incl. the sketch below", med["Arrow conversion"]),
        ("  of which: prefilter sketch (`sketch_column`)", med["prefilter sketch"]),
        ("sketch basis: load, or fit + publish once (`store_basis`)", med["sketch basis (load/fit)"]),
        ("Lance append + snapshot refresh (`Store.append`)", med["Lance append + refresh"]),
        ("other (JSONL read, padding, gather, per-sample split, store open per chunk)", bt - accounted),
    ]
    table2 = md_table(
        ["build part", "seconds", "% of build", "% of bare forward"],
        [[name, f"{s:.2f}", f"{100 * s / bt:.1f}%", f"{100 * s / f:.1f}%"] for name, s in lines]
        + [["**total build**", f"{bt:.2f}", "100%", f"{100 * bt / f:.1f}%"]],
    )
    return (
        "\n".join(head)
        + "\n"
        + table1
        + "\n\n"
        + table_ratio
        + "\n\nBuild breakdown (timers wrap the product functions inside the timed builds; medians over "
        "repetitions):\n\n" + table2 + "\n"
    )


# ----------------------------------------------------------------------------- peak RSS
def make_random_model(folder: Path) -> Path:
    """Random 2-layer Llama with SmolLM2-135M shapes, saved with the SmolLM2 tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from forvalue.indexer.default_model import default_model_dir

    src = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(src)
    real = json.loads((src / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=real["vocab_size"],
        hidden_size=real["hidden_size"],
        intermediate_size=real["intermediate_size"],
        num_hidden_layers=2,
        num_attention_heads=real["num_attention_heads"],
        num_key_value_heads=real["num_key_value_heads"],
        head_dim=real.get("head_dim", 64),
        max_position_embeddings=real["max_position_embeddings"],
        tie_word_embeddings=real["tie_word_embeddings"],
        rms_norm_eps=real["rms_norm_eps"],
        bos_token_id=real["bos_token_id"],
        eos_token_id=real["eos_token_id"],
        pad_token_id=real["pad_token_id"],
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class StubRunner:
    """Cheap stand-in for a model runner, for the memory test only (``--rss-model stub``).

    Same interface and output shapes as ``CausalLMRunner`` over SmolLM2-135M (hidden 576,
    vocab 49152, real tokenizer), but the "decoder" is an embedding lookup and the head
    is rank 16, so the build's own code (sparsifier over full-vocabulary logits, self-norm,
    Arrow, Lance) runs at full size while the model costs almost nothing.
    """

    def __init__(self, tokenizer_dir: str, device: torch.device, rank: int = 16):
        from transformers import AutoTokenizer

        from forvalue.indexer.fingerprint import tokenizer_sha256
        from forvalue.indexer.model_runner import ModelIdentity

        real = json.loads((Path(tokenizer_dir) / "config.json").read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.device = device
        self.hidden_size, self.vocab_size = real["hidden_size"], real["vocab_size"]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.pad_id = int(pad)
        g = torch.Generator().manual_seed(0)
        self.embed = torch.randn(self.vocab_size, self.hidden_size, generator=g).to(device)
        self.head_a = (torch.randn(self.hidden_size, rank, generator=g) / self.hidden_size**0.5).to(device)
        self.head_b = (3.0 * torch.randn(rank, self.vocab_size, generator=g)).to(device)
        self.identity = ModelIdentity(
            path="stub",
            weights_sha256="0" * 64,
            adapter_path=None,
            adapter_sha256=None,
            tokenizer_sha256=tokenizer_sha256(self.tokenizer),
            dtype="float32",
        )

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.embed[input_ids.to(self.device)]

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden.float() @ self.head_a) @ self.head_b


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def rss_child(model_kind: str, model_dir: str, data_path: str, store_path: str, batch_size: int, device: str) -> None:
    """Runs in a fresh process: load the model, reset the RSS high-water mark, build, report."""
    from forvalue.indexer.build import build_index
    from forvalue.indexer.model_runner import load_runner
    from forvalue.schemas.config import BuildConfig, ModelConfig
    from forvalue.storage.store import Store

    dev = resolve(device)
    if model_kind == "stub":
        runner = StubRunner(model_dir, dev)
    else:
        runner = load_runner(ModelConfig(path=model_dir, device=device))
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_after_load = _status_kb("VmRSS")
    reset = True
    try:
        # Resets the mm high-water mark (VmHWM) to the current RSS. ru_maxrss also keeps
        # the peaks of exited threads, so it can stay at the model-load peak.
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        reset = False
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    trace: list[tuple[int, int, int]] = []  # (rows written, VmRSS kB, VmHWM kB) after each commit
    original_append = Store.append

    def traced_append(self, rows):
        original_append(self, rows)
        trace.append(((trace[-1][0] if trace else 0) + rows.num_rows, _status_kb("VmRSS"), _status_kb("VmHWM")))

    Store.append = traced_append
    start = time.perf_counter()
    config = BuildConfig(model=ModelConfig(path=model_dir, device=device), batch_size=batch_size, progress=False)
    report = build_index([data_path], store_path, config, runner=runner)
    sync(dev)
    out = {
        "seconds": time.perf_counter() - start,
        "written": report.written,
        "tokens": report.tokens_scored,
        "load_peak_kb": load_peak,
        "rss_after_load_kb": rss_after_load,
        "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "build_hwm_kb": _status_kb("VmHWM") if reset else None,
        "rss_end_kb": _status_kb("VmRSS"),
        "gpu_peak_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        "trace": trace,
    }
    print("RSS_RESULT " + json.dumps(out), flush=True)


def part2(args, workdir: Path) -> str:
    sizes = [int(x) for x in args.rss_sizes.split(",") if x.strip()]
    if not sizes:
        return ""
    if args.rss_model == "stub":
        from forvalue.indexer.default_model import default_model_dir

        model_dir = default_model_dir()  # tokenizer and shapes only
    else:
        model_dir = make_random_model(workdir / "random-llama-2l")
    rows_all = make_rows(max(sizes))
    results = []
    for n in sizes:
        data_path = write_rows(rows_all[:n], workdir / f"rss_{n}.jsonl")
        store = workdir / f"rss_store_{n}"
        child = [
            "--_rss-child",
            args.rss_model,
            model_dir,
            data_path,
            store,
            args.batch_size,
            args.device,
            args.threads,
        ]
        proc = run_module("tools.bench_build", child, capture_output=True, text=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RSS_RESULT ")]
        if proc.returncode != 0 or not line:
            raise SystemExit(f"RSS child for {n} samples failed:\n{proc.stderr[-3000:]}")
        r = json.loads(line[0].split(" ", 1)[1])
        r["store_bytes"] = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
        results.append((n, r))
        shutil.rmtree(store, ignore_errors=True)
        print(f"  rss {n}: { ({k: v for k, v in r.items() if k != 'trace'}) }", file=sys.stderr, flush=True)
    mib = lambda kb: "n/a" if kb is None else f"{kb / 1024:.0f}"  # noqa: E731
    gpu = results[0][1]["gpu_peak_bytes"] is not None
    rows = []
    for n, r in results:
        rows.append(
            [
                n,
                r["tokens"],
                f"{r['seconds']:.0f}",
                f"{r['tokens'] / r['seconds']:.0f}",
                f"{r['store_bytes'] / 2**20:.0f}",
                mib(r["ru_maxrss_kb"]),
                mib(r["rss_after_load_kb"]),
                mib(r["build_hwm_kb"]),
                mib(None if r["build_hwm_kb"] is None else r["build_hwm_kb"] - r["rss_after_load_kb"]),
                mib(r["rss_end_kb"]),
            ]
            + ([f"{r['gpu_peak_bytes'] / 2**20:.0f}"] if gpu else [])
        )
    headers = [
        "samples",
        "scored tokens",
        "build s",
        "tokens/s",
        "store MiB",
        "ru_maxrss (whole process) MiB",
        "RSS after model load MiB",
        "peak RSS during build MiB",
        "build peak - after load MiB",
        "RSS at end MiB",
    ]
    if gpu:
        headers.append("GPU peak allocated MiB")
    # RSS trace of the largest run, at ~10 evenly spaced points
    n_big, big = results[-1]
    trace = big["trace"]
    picks = sorted({min(len(trace) - 1, round(k * (len(trace) - 1) / 9)) for k in range(10)}) if trace else []
    trace_table = md_table(
        ["samples written", "RSS MiB", "peak so far MiB"],
        [[trace[i][0], mib(trace[i][1]), mib(trace[i][2])] for i in picks],
    )
    model_desc = (
        "Stub runner (`--rss-model stub`: embedding lookup as 'decoder', rank-16 head producing full 49152-wide "
        "float32 logits; hidden 576; SmolLM2 tokenizer), so the build's own code runs at full size while the model "
        "costs "
        "almost nothing"
        if args.rss_model == "stub"
        else "Random-initialised Llama, 2 layers, hidden 576, vocab 49152, tied head (SmolLM2-135M shapes), SmolLM2 "
        "tokenizer"
    )
    return (
        f"### Peak memory of the build vs corpus size ({args.rss_model})\n\n" + model_desc + "; "
        f"batch size {args.batch_size}, write_every 256, one fresh process per size. `ru_maxrss` is the whole-process "
        "peak (it includes the model load, whose transient peak is higher than the build's); 'peak RSS during build' "
        "is "
        "VmHWM after resetting it (`/proc/self/clear_refs`) once the model is loaded.\n\n"
        + md_table(headers, rows)
        + f"\n\nRSS during the {n_big}-sample build, after Lance commits:\n\n"
        + trace_table
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--_rss-child":
        _, kind, model_dir, data_path, store_path, batch_size, device, threads = argv
        apply_threads(int(threads))
        rss_child(kind, model_dir, data_path, store_path, int(batch_size), device)
        return 0
    p = argparse.ArgumentParser(prog="python -m tools.bench_build", description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=200, help="samples of the real-model throughput run (default 200)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions of build and bare pass (default 3)")
    p.add_argument(
        "--rss-sizes", default="1000,10000", help="comma-separated corpus sizes of the RSS part ('' to skip)"
    )
    p.add_argument(
        "--rss-model",
        choices=("llama", "stub"),
        default="llama",
        help="RSS part: random 2-layer Llama with SmolLM2 shapes (default) or a near-free stub runner with the same "
        "shapes",
    )
    p.add_argument("--skip-throughput", action="store_true", help="run only the RSS part")
    add_common_args(p)
    args = p.parse_args(argv)
    apply_threads(args.threads)
    device = resolve(args.device)
    quiet_transformers()
    out = []
    with tempfile.TemporaryDirectory(prefix="forvalue-bench-build-") as tmp:
        workdir = Path(tmp)
        if not args.skip_throughput:
            out.append(part1(args, device, workdir))
        if args.rss_sizes.strip():
            out.append(part2(args, workdir))
    head = ["## Index build benchmark (`python -m tools.bench build`)", "", machine_info(device), ""]
    emit("\n".join(head + out), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
