"""forvalue against Bergson, side by side: same model folder, same data, same metrics (issue 29).

    python -m tools.bench peers --out runs/b                                  # 90/10 per class (paper sizes)
    python -m tools.bench peers --out runs/b -- --n-train 10 --n-test 2       # what fits a loaded 2-core CPU

Bergson is installed, pinned (``bergson==2.5.1``), into its own virtual environment under
``WORKDIR/venv`` on first use, never into the product's: ``pip install torch==2.14.1
torchvision==0.29.1 bergson==2.5.1`` (Bergson pulls torchvision, whose wheel brings a CUDA torch:
about 6.3 GB in the venv; on this machine pip takes torch and torchvision from local disk and the rest
from the package index). ``--bergson-python`` points at an existing interpreter instead.

Tasks: the paper's three (``sentence_transformations``, ``math_no_reasoning``,
``math_with_reasoning``), ``mislabeled_math`` with ``--noise`` of the training labels flipped, and
``shared_template`` (:func:`tools.generate_tasks.shared_template_task`: the ten transformations behind
one prompt template, the class visible in the response only). Both tools see the whole text
(prompt + response) of every row.

Per tool and task, each step runs as its own process and is measured from outside: wall and CPU seconds
(user + system, ``os.wait4``), peak resident memory (the child's ``VmHWM``); store bytes are the store folder's size.

- forvalue: ``forvalue.build`` (one forward pass) and an exact query (``run_query``, raw score; a
  second process gives the ``--normalize cosine`` scores, timed but not in the headline).
- Bergson: ``bergson build TRAIN_INDEX --model DIR --dataset train.jsonl --projection_dim P`` (its
  README's command; per-module projection P x P of 210 modules, fp32), and for the query the same
  command on the validation set (the gradient collection its ``score``/``query`` perform), then the
  inner products of the two stores (raw, and unit-normalised as ``bergson query --unit_norm``), timed
  in this process and added. P = 16 (README) and P matched to forvalue's store bytes per sample.

Metrics from each (n_val, n_train) score matrix: the paper's AUC / recall at class size
(:func:`forvalue.metrics.class_retrieval`) and, on the mislabeled task, detection AUC of the flag score
forvalue's ``audit --flag-by label`` uses (mean score over the validation samples of the training
sample's own label; low = suspicious), computed identically for every tool.

Every step's result is cached under ``--workdir`` (``results/TASK/STEP.json`` and the score matrices);
a killed run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BERGSON_VERSION = "2.5.1"
PEER_PINS = ("torch==2.14.1", "torchvision==0.29.1", f"bergson=={BERGSON_VERSION}")
TASKS = ("sentence_transformations", "math_no_reasoning", "math_with_reasoning", "mislabeled_math", "shared_template")


# --------------------------------------------------------------------------- measuring a process


def _vm_hwm(pid: int) -> int:
    """The process's own peak resident memory so far (``VmHWM`` of /proc/PID/status), bytes; 0 if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def run_measured(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run ``cmd`` to completion; ``{"wall", "cpu", "peak_rss", "rc"}`` (seconds, seconds, bytes).

    CPU comes from ``os.wait4`` on the child itself, so other processes on the machine do not count. Peak
    memory is the child's own ``VmHWM``, polled every 50 ms (a high-water mark: a poll misses nothing but the
    last 50 ms): Linux's ``ru_maxrss`` of a child carries the parent's resident size at the fork, so a small
    child of a large parent would read as large.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        peak = 0
        while True:
            peak = max(peak, _vm_hwm(proc.pid))
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "wall": wall,
        "cpu": ru.ru_utime + ru.ru_stime,
        "peak_rss": peak or ru.ru_maxrss * 1024,  # Linux reports ru_maxrss in KiB
        "rc": proc.returncode,
    }


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# --------------------------------------------------------------------------- metrics


def detection_auc(scores: np.ndarray, train_labels: list, val_labels: list, flipped: list) -> float:
    """AUC of ``-flag`` for the flipped samples; flag = mean score over validation samples of the own label.

    Training samples whose label no validation sample carries get the mean over all validation samples
    (``--flag-by label`` leaves them unflagged; the AUC needs a value for each).
    """
    from forvalue.metrics import roc_auc

    scores = np.asarray(scores, np.float64)
    val_labels = np.asarray(val_labels, dtype=object)
    flag = np.empty(scores.shape[1])
    for i, label in enumerate(train_labels):
        rows = val_labels == label
        flag[i] = scores[rows, i].mean() if rows.any() else scores[:, i].mean()
    return roc_auc(-flag, np.asarray(flipped, bool))


def quality(scores: np.ndarray, train: list[dict], val: list[dict]) -> dict:
    """AUC / recall (clean tasks, labels as given) and detection AUC (rows with ``flipped``)."""
    from forvalue.metrics import class_retrieval

    out: dict = {}
    if any("flipped" in r for r in train):
        out["detect_auc"] = detection_auc(
            scores, [r["label"] for r in train], [r["label"] for r in val], [r["flipped"] for r in train]
        )
    else:
        out.update(class_retrieval(scores, [r["label"] for r in train], [r["label"] for r in val]))
    return out


def cosine(scores: np.ndarray, val_norms: np.ndarray, train_norms: np.ndarray) -> np.ndarray:
    return scores / np.maximum(np.outer(val_norms, train_norms), 1e-30)


def matched_projection(fv_bytes_per_sample: float, n_modules: int, itemsize: int) -> int:
    """Bergson's per-module projection P whose P*P*n_modules*itemsize bytes per sample come closest to forvalue's."""
    return max(1, round(math.sqrt(fv_bytes_per_sample / (n_modules * itemsize))))


# --------------------------------------------------------------------------- data


def task_rows(task: str, n_train: int, n_test: int, seed: int, noise: float) -> tuple[list[dict], list[dict]]:
    from forvalue.tasks.text import generate_task
    from tools.generate_tasks import shared_template_task

    if task == "shared_template":
        train, test = shared_template_task(n_train, n_test, seed)
    else:
        train, test = generate_task(task, n_train=n_train, n_test=n_test, seed=seed, noise_rate=noise)
    keep = ("id", "prompt", "response", "label", "flipped")
    rows = []
    for split in (train, test):
        rows.append([{k: r[k] for k in keep if k in r} | {"text": r["prompt"] + r["response"]} for r in split])
    return rows[0], rows[1]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- the peer's venv


def ensure_bergson(workdir: Path, python: str | None) -> tuple[str, dict]:
    """The Bergson interpreter and the install's facts (installed on first use, then reused)."""
    facts_path = workdir / "venv.json"
    if python:
        return python, {"python": python, "installed_by": "--bergson-python"}
    venv = workdir / "venv"
    py = venv / "bin" / "python"
    if facts_path.exists() and py.exists():
        return str(py), json.loads(facts_path.read_text())
    _log(f"peers: installing {' '.join(PEER_PINS)} into {venv} (about 6 GB, a few minutes)")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *PEER_PINS], check=True)
    facts = {"pins": list(PEER_PINS), "install_seconds": time.perf_counter() - t0, "venv_bytes": folder_bytes(venv)}
    facts["versions"] = subprocess.run(
        [str(py), "-c", "import bergson,torch,torchvision,transformers;from importlib.metadata import version as v;"
         "print(v('bergson'),torch.__version__,torchvision.__version__,transformers.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    facts_path.write_text(json.dumps(facts))
    return str(py), facts


def bergson_versions(py: str) -> dict:
    out = subprocess.run(
        [py, "-c", "from importlib.metadata import version as v;import json;"
         "print(json.dumps({p: v(p) for p in ('bergson','torch','torchvision','transformers')}))"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    return json.loads(out.stdout) if out.returncode == 0 else {}


# --------------------------------------------------------------------------- workers (own processes)


def worker_main(argv: list[str]) -> int:
    """``python -m tools.bench_peers --worker fv-build DATA STORE MODEL`` / ``fv-query STORE VAL OUT.npy NORMALIZE``."""
    kind = argv[0]
    if kind == "fv-build":
        import forvalue
        from forvalue import BuildConfig, ModelConfig

        forvalue.build([argv[1]], argv[2], BuildConfig(model=ModelConfig(path=argv[3]), progress=False))
        return 0
    if kind == "fv-query":
        from forvalue import QueryConfig
        from forvalue.api import run_query

        res = run_query(
            argv[1], [argv[2]], QueryConfig(progress=False, exact=True, normalize=argv[4]), keep_scores=True
        )
        np.save(argv[3], np.asarray(res.scores, np.float64))
        Path(argv[3]).with_suffix(".ids.json").write_text(json.dumps(list(res.train_ids)))
        return 0
    raise SystemExit(f"unknown worker {kind!r}")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Peers:
    def __init__(self, args, bergson_py: str | None):
        self.args, self.bergson_py = args, bergson_py
        self.work: Path = args.workdir
        self.model = args.model or str(_default_model())

    def tag(self, task: str) -> str:
        """The cache folder name of a task: its sizes, seed, model (and noise) are part of it."""
        a = self.args
        noise = f"-noise{a.noise:g}" if task.startswith("mislabeled_") else ""
        threads = f"-t{a.threads}" if a.threads > 0 else ""  # timings at another thread count are other results
        return f"{task}-{a.n_train}x{a.n_test}-seed{a.seed}{noise}-{Path(self.model).name}{threads}"

    def _threads(self, env: dict) -> dict:
        """``--threads N``: every child of both tools runs N intra-op threads (torch reads ``OMP_NUM_THREADS``),
        so CPU seconds on a loaded machine are work, not threads spinning while they wait for a core."""
        if self.args.threads > 0:
            env = {**env, "OMP_NUM_THREADS": str(self.args.threads), "MKL_NUM_THREADS": str(self.args.threads)}
        return env

    def _step(self, task: str, name: str, fn) -> dict:
        path = self.work / "results" / self.tag(task) / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        _log(f"peers: {task}: {name} ...")
        res = fn()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res))
        _log(f"peers: {task}: {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in res.items() if isinstance(v, float)))
        return res

    def _fv_env(self) -> dict:
        from tools.common import ROOT

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        return self._threads(env)

    def forvalue(self, task: str, train: list[dict], val: list[dict], tdir: Path) -> dict:
        store = tdir / "fv-store"

        def build():
            shutil.rmtree(store, ignore_errors=True)
            rows = [{k: r[k] for k in ("id", "prompt", "response", "label")} for r in train]
            data = write_jsonl(rows, tdir / "fv-train.jsonl")
            cmd = [sys.executable, "-m", "tools.bench_peers", "--worker", "fv-build", str(data), str(store), self.model]
            m = run_measured(cmd, tdir / "fv-build.log", env=self._fv_env())
            _check(m, tdir / "fv-build.log")
            return {**m, "store_bytes": folder_bytes(store)}

        def query(normalize: str):
            def run():
                vrows = [{k: r[k] for k in ("id", "prompt", "response", "label")} for r in val]
                vfile = write_jsonl(vrows, tdir / "fv-val.jsonl")
                out = tdir / f"fv-scores-{normalize}.npy"
                cmd = [sys.executable, "-m", "tools.bench_peers", "--worker", "fv-query", str(store), str(vfile)]
                m = run_measured(cmd + [str(out), normalize], tdir / f"fv-query-{normalize}.log", env=self._fv_env())
                _check(m, tdir / f"fv-query-{normalize}.log")
                ids = json.loads(out.with_suffix(".ids.json").read_text())
                order = {i: k for k, i in enumerate(ids)}
                scores = np.load(out)[:, [order[r["id"]] for r in train]]
                return {**m, **quality(scores, train, val)}

            return run

        b = self._step(task, "forvalue-build", build)
        raw = self._step(task, "forvalue-query-raw", query("none"))
        cos = self._step(task, "forvalue-query-cosine", query("cosine"))
        return {"build": b, "query": raw, "cosine": cos}

    def bergson(self, task: str, train: list[dict], val: list[dict], tdir: Path, p: int) -> dict:
        env = self._threads({**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        env.pop("PYTHONPATH", None)
        bergson = [self.bergson_py, "-m", "bergson", "build"]

        def collect(rows, name):
            folder = tdir / name
            data = write_jsonl([{"id": r["id"], "text": r["text"]} for r in rows], tdir / f"bergson-{name}.jsonl")
            cmd = bergson + [str(folder), "--model", self.model, "--dataset", str(data)]
            cmd += ["--projection_dim", str(p), "--overwrite", "true"] + self.args.bergson_args
            m = run_measured(cmd, tdir / f"{name}.log", env=env)
            _check(m, tdir / f"{name}.log")
            return m, folder

        def build():
            m, folder = collect(train, f"bergson-p{p}-train")
            info = json.loads((folder / "info.json").read_text())
            return {**m, "store_bytes": folder_bytes(folder), "n_modules": len(info["grad_sizes"]),
                    "itemsize": np.dtype(info.get("base_dtype", "float32")).itemsize}  # fmt: skip

        def query():
            m, vfolder = collect(val, f"bergson-p{p}-val")
            t0, c0 = time.perf_counter(), time.process_time()
            g_train = _load_grads(tdir / f"bergson-p{p}-train")
            g_val = _load_grads(vfolder)
            scores = g_val @ g_train.T
            cos = cosine(scores, np.linalg.norm(g_val, axis=1), np.linalg.norm(g_train, axis=1))
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            np.save(tdir / f"bergson-p{p}-scores.npy", scores)
            np.save(tdir / f"bergson-p{p}-scores-cos.npy", cos)
            q = quality(scores, train, val)
            qc = {f"cos_{k}": v for k, v in quality(cos, train, val).items()}
            return {**m, "wall": m["wall"] + dt, "cpu": m["cpu"] + dc, "score_seconds": dt, **q, **qc}

        return {
            "build": self._step(task, f"bergson-p{p}-build", build),
            "query": self._step(task, f"bergson-p{p}-query", query),
        }

    def lds_scores(self, lds_dir: Path) -> list[Path]:
        """Bergson's score matrices (raw and cosine) for the LDS suite's pool and validation set."""

        def rows(name):
            out = [json.loads(line) for line in (lds_dir / name).read_text().splitlines() if line.strip()]
            return [r | {"text": r["prompt"] + r["response"]} for r in out]

        pool, val = rows("pool.jsonl"), rows("val.jsonl")
        tdir = self.work / "tasks" / f"lds-{len(pool)}x{len(val)}-{Path(self.model).name}"
        tdir.mkdir(parents=True, exist_ok=True)
        p = self.args.projection
        self.bergson(tdir.name, pool, val, tdir, p)
        written = []
        for suffix in ("", "-cos"):
            dst = lds_dir / f"bergson-p{p}{suffix}.npy"
            shutil.copyfile(tdir / f"bergson-p{p}-scores{suffix}.npy", dst)
            written.append(dst)
        return written

    def run_task(self, task: str) -> dict:
        a = self.args
        train, val = task_rows(task, a.n_train, a.n_test, a.seed, a.noise)
        tdir = self.work / "tasks" / self.tag(task)
        tdir.mkdir(parents=True, exist_ok=True)
        out = {"task": task, "n_train": len(train), "n_val": len(val), "tools": {}}
        out["tools"]["forvalue"] = fv = self.forvalue(task, train, val, tdir)
        if self.bergson_py:
            readme = self.bergson(task, train, val, tdir, a.projection)
            out["tools"][f"bergson P={a.projection}"] = readme
            b = readme["build"]
            p = matched_projection(fv["build"]["store_bytes"] / len(train), b["n_modules"], b["itemsize"])
            if p != a.projection:
                out["tools"][f"bergson P={p} (matched)"] = self.bergson(task, train, val, tdir, p)
        return out


def _load_grads(folder: Path) -> np.ndarray:
    """Bergson's ``gradients.bin`` as float64 (num_grads, total) (its ``load_gradients`` layout: info.json)."""
    info = json.loads((folder / "info.json").read_text())
    dtype = np.dtype(info.get("base_dtype", "float32"))
    shape = (info["num_grads"], sum(info["grad_sizes"].values()))
    return np.fromfile(folder / "gradients.bin", dtype=dtype).reshape(shape).astype(np.float64)


def _check(m: dict, log: Path) -> None:
    if m["rc"] != 0:
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise RuntimeError(f"step failed (exit {m['rc']}), see {log}:\n{tail}")


def _default_model() -> Path:
    from forvalue.indexer.default_model import default_model_dir

    return default_model_dir()


# --------------------------------------------------------------------------- report


def _fmt_ret(q: dict, prefix: str = "") -> str:
    if f"{prefix}detect_auc" in q:
        return f"detect {q[f'{prefix}detect_auc']:.4f}"
    if f"{prefix}auc_mean" not in q:
        return "-"
    return f"{q[f'{prefix}auc_mean']:.4f} / {q[f'{prefix}recall_mean']:.4f}"


def render(results: list[dict], facts: dict) -> str:
    """The markdown tables of a run (pure: also what the tests check on made-up results)."""
    from tools.common import human_bytes, md_table

    rows, ratio_rows = [], []
    for r in results:
        for tool, t in r["tools"].items():
            b, q = t["build"], t["query"]
            cos = t["cosine"] if "cosine" in t else q
            rows.append(
                [
                    r["task"],
                    tool,
                    f"{b['wall']:.1f} / {b['cpu']:.1f}",
                    human_bytes(b["peak_rss"]),
                    human_bytes(b["store_bytes"]),
                    f"{q['wall']:.1f} / {q['cpu']:.1f}",
                    human_bytes(q["peak_rss"]),
                    _fmt_ret(q),
                    _fmt_ret(cos, "" if "cosine" in t else "cos_"),
                ]
            )
        fv = r["tools"].get("forvalue")
        for tool, t in r["tools"].items():
            if tool == "forvalue" or fv is None:
                continue
            ratio_rows.append(
                [
                    r["task"],
                    tool,
                    f"{t['build']['wall'] / fv['build']['wall']:.2f}x",
                    f"{t['build']['cpu'] / fv['build']['cpu']:.2f}x",
                    f"{t['query']['wall'] / fv['query']['wall']:.2f}x",
                    f"{t['query']['cpu'] / fv['query']['cpu']:.2f}x",
                    f"{t['build']['peak_rss'] / fv['build']['peak_rss']:.2f}x",
                    f"{t['build']['store_bytes'] / fv['build']['store_bytes']:.2f}x",
                ]
            )
    head = [
        "task",
        "tool",
        "build wall / CPU s",
        "build peak",
        "store",
        "query wall / CPU s",
        "query peak",
        "AUC / recall (raw)",
        "AUC / recall (cosine)",
    ]
    out = [md_table(head, rows)]
    if ratio_rows:
        out += [
            "",
            "Bergson / forvalue (same task, same run):",
            "",
            md_table(
                ["task", "tool", "build wall", "build CPU", "query wall", "query CPU", "build peak", "store bytes"],
                ratio_rows,
            ),
        ]
    if facts:
        out += ["", "Peer environment: " + ", ".join(f"{k} {v}" for k, v in facts.items())]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1:])
    from tools.common import add_common_args, emit, machine_info

    ap = argparse.ArgumentParser(prog="python -m tools.bench_peers", description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--workdir", type=Path, required=True, help="venv, stores, cached results (resumable)")
    ap.add_argument("--model", default=None, help="model folder both tools load (default: converted SmolLM2-135M)")
    ap.add_argument("--tasks", nargs="*", default=list(TASKS), choices=TASKS, help="(none: only --lds-workdir)")
    ap.add_argument("--n-train", type=int, default=90, help="training samples per class (paper: 90)")
    ap.add_argument("--n-test", type=int, default=10, help="validation samples per class (paper: 10)")
    ap.add_argument("--noise", type=float, default=0.2, help="mislabeled_math: fraction of flipped labels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--projection", type=int, default=16, help="Bergson's per-module projection (README: 16)")
    ap.add_argument("--bergson-python", default=None, help="an interpreter with bergson installed (skip the venv)")
    ap.add_argument("--no-bergson", action="store_true", help="forvalue only")
    ap.add_argument("--bergson-args", nargs="*", default=[], help="more flags for `bergson build`")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--lds-workdir",
        type=Path,
        default=None,
        help="also score the LDS suite's pool (DIR/pool.jsonl, DIR/val.jsonl of `tools.bench lds`) with Bergson at "
        "--projection and write DIR/bergson-pP.npy and DIR/bergson-pP-cos.npy for its --extra",
    )
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    facts: dict = {}
    py = None
    if not args.no_bergson:
        py, install = ensure_bergson(args.workdir, args.bergson_python)
        facts = {**bergson_versions(py), **{k: v for k, v in install.items() if k in ("install_seconds",)}}
        if "venv_bytes" in install:
            facts["venv size"] = f"{install['venv_bytes'] / 2**30:.1f} GiB"
    peers = Peers(args, py)
    started = time.perf_counter()
    if args.lds_workdir is not None:
        if py is None or not (args.lds_workdir / "pool.jsonl").is_file():
            ap.error(f"--lds-workdir {args.lds_workdir}: needs Bergson and the LDS suite's pool.jsonl there")
        for t in peers.lds_scores(args.lds_workdir):
            _log(f"peers: wrote {t} (pass it to the lds suite as --extra NAME={t})")
    results = [peers.run_task(t) for t in args.tasks]
    text = "\n".join(
        [
            f"## Against Bergson (peers): {args.n_train} train / {args.n_test} validation samples per class, "
            f"10 classes, model {Path(peers.model).name}",
            "",
            render(results, facts),
            "",
            f"Whole run {time.perf_counter() - started:.0f} s (cached steps count their first run). "
            + machine_info(args.device),
        ]
    )
    emit(text, args.out)
    if args.json:
        args.json.write_text(json.dumps({"facts": facts, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
