"""A hostile user's pass over the CLI: many odd commands, each checked for the reliability promises.

Every case runs the real ``forvalue`` CLI in this process (click's runner, the tiny offline model, or
SmolLM2-135M with ``--real``) against a store with audits and a value model, and must end with exit
status 0 or 2; on 2 stderr is one ``error:`` line; never a traceback, never more than ``--timeout``
seconds; afterwards every input file and the store are byte for byte as before (unless the case
writes to the store on purpose, then ``index check`` must find it clean) and no half-written or
temporary file is left. Prints one line per failure and the counts quoted in docs/reliability.md:

    .venv/bin/python -m tools.hostile_pass [--real]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path


def _rows(n, start=0):
    words = ["the quick brown fox", "reverse the words", "solve the math problem", "cats and dogs"]
    return [
        {"id": f"s{i}", "prompt": f"{words[i % 4]} {i} ->", "response": f" answer {i * 7}", "label": f"c{i % 3}"}
        for i in range(start, start + n)
    ]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and not f.is_symlink() and not f.name.endswith(".lock") and not f.is_fifo():
            try:
                out[str(f.relative_to(folder))] = f.read_bytes()
            except OSError:
                pass
    return out


class Timeout(Exception):
    pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", action="store_true", help="SmolLM2-135M (the default model) instead of the tiny one")
    ap.add_argument("--timeout", type=int, default=120)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--kills", type=int, default=5, help="kill -9 / Ctrl-C rounds per killed command (0: none)")
    a = ap.parse_args(argv)
    from click.testing import CliRunner

    from forvalue.cli import main as cli_main

    work = Path(tempfile.mkdtemp(prefix="hostile-"))
    if a.real:
        from forvalue.indexer.default_model import default_model_dir

        model = str(default_model_dir())
    else:
        from tools.tiny_models import make_model_dir

        model = str(make_model_dir(work / "tiny"))
    os.chdir(work)
    data = work / "in"
    data.mkdir()
    train = _jsonl(data / "train.jsonl", _rows(24))
    val = _jsonl(data / "val.jsonl", [{**r, "id": f"v{k}"} for k, r in enumerate(_rows(3, start=100))])
    runner = CliRunner()

    def run(*args):
        return runner.invoke(cli_main, [str(x) for x in args])

    store = work / "S"
    for args in (
        [
            "index",
            "build",
            train,
            "--store",
            store,
            "--model",
            model,
            "--device",
            "cpu",
            "--quiet",
            "--write-every",
            "8",
        ],
        ["audit", "run", "--store", store, "-v", val, "--name", "a", "--device", "cpu", "--quiet"],
        [
            "audit",
            "run",
            "--store",
            store,
            "-v",
            val,
            "--name",
            "b",
            "--device",
            "cpu",
            "--quiet",
            "--normalize",
            "cosine",
        ],
        ["distill", "--store", store, "--audit", "a", "--out", work / "vm", "--ngram-dim", "1024"],
        ["estimate", train, "--value-model", work / "vm", "-o", data / "values.parquet"],
    ):
        r = run(*args)
        assert r.exit_code == 0, (args, r.output, r.exception)
    S, V, T, VM, VAL = store, val, train, work / "vm", data / "values.parquet"
    q = ["query", "--store", S, "--device", "cpu", "--quiet"]

    def fifo(name):
        p = work / name
        if not p.exists():
            os.mkfifo(p)
        return p

    def file(name, text, binary=False):
        p = work / name
        p.write_bytes(text) if binary else p.write_text(text)
        return p

    def link(name, target):
        p = work / name
        if p.is_symlink() or p.exists():
            p.unlink()
        p.symlink_to(target)
        return p

    # helpers that need the work folder
    def _ds(name, state):
        d = work / f"ds_{name}"
        d.mkdir(exist_ok=True)
        (d / "state.json").write_text(state)
        return d

    def _loop():
        d = work / "loop"
        d.mkdir(exist_ok=True)
        if not (d / "self").exists():
            (d / "self").symlink_to(d)
        _jsonl(d / "a.jsonl", _rows(1))
        return d

    def _pq(name, cols):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(cols), work / name)
        return work / name

    def _model_with(name, config):
        d = work / f"model_{name}"
        if not d.exists():
            shutil.copytree(model, d)
        (d / "config.json").write_text(config)
        return d

    def _converted(name, *flags):  # a conversion of the store, made once (the cases then read or write it)
        out = work / name
        if not out.exists():
            r = run("index", "convert", "--store", S, "--out", out, "--quiet", *flags)
            assert r.exit_code == 0, (name, r.output)
        return out

    def _empty_store():  # what a build killed before its first commit leaves
        from forvalue.storage.store import Store

        d = work / "empty_store"
        if not d.exists():
            Store.create(d, Store.open(S).manifest)
        return d

    (work / "ro").mkdir(exist_ok=True)
    big = "x" * 300
    cv = ["index", "convert", "--store", S, "--quiet"]
    # (name, args, writes_store); each lambda builds its files when run
    cases = [
        # outputs
        ("output through ..", lambda: [*q, "-v", V, "-o", f"{S}/../S/new.jsonl"], False),
        ("output empty string", lambda: [*q, "-v", V, "-o", ""], False),
        ("output hidden suffixless", lambda: [*q, "-v", V, "-o", work / ".jsonl"], False),
        ("output under a file", lambda: [*q, "-v", V, "-o", f"{T}/x.jsonl"], False),
        ("output upper-case suffix", lambda: [*q, "-v", V, "-o", work / "OUT.JSONL"], False),
        ("output .jsonl.gz", lambda: [*q, "-v", V, "-o", work / "o.jsonl.gz"], False),
        (
            "output name with newline",
            lambda: ["select", "--store", S, "--audit", "a", "--top", "2", "-o", work / "a\nb.jsonl"],
            False,
        ),
        ("output name too long", lambda: [*q, "-v", V, "-o", work / f"{big}.jsonl"], False),
        ("output symlink to store manifest", lambda: [*q, "-v", V, "-o", link("m.jsonl", S / "manifest.json")], False),
        ("output symlink to input", lambda: ["estimate", T, "--value-model", VM, "-o", link("t.jsonl", T)], False),
        ("output dangling symlink", lambda: [*q, "-v", V, "-o", link("d.jsonl", work / "nowhere" / "x.jsonl")], False),
        ("output /dev/stdout", lambda: [*q, "-v", V, "-o", "/dev/stdout"], False),
        ("output /proc file", lambda: [*q, "-v", V, "-o", "/proc/self/x.jsonl"], False),
        (
            "all-scores same as -o via ./",
            lambda: [*q, "-v", V, "-o", work / "x.parquet", "--all-scores", "./x.parquet"],
            False,
        ),
        (
            "explain folder exists as a file",
            lambda: [*q, "-v", V, "-o", work / "t.jsonl", "--explain", "1", "--explain-dir", file("f.txt", "x")],
            False,
        ),
        (
            "report inside the input folder",
            lambda: [
                "audit",
                "show",
                "--store",
                S,
                "a",
                "--report",
                data / "r.html",
                "--data",
                data,
                "--group-column",
                "label",
            ],
            False,
        ),
        ("distill into a non-model folder", lambda: ["distill", "--store", S, "--audit", "a", "--out", data], False),
        ("distill onto a file", lambda: ["distill", "--store", S, "--audit", "a", "--out", T], False),
        (
            "distill into the store's table",
            lambda: ["distill", "--store", S, "--audit", "a", "--out", S / "samples.lance"],
            False,
        ),
        ("demo into the store", lambda: ["demo", "--workdir", S, "--model", model, "--device", "cpu"], False),
        (
            "estimate report == -o",
            lambda: [
                "estimate",
                T,
                "--value-model",
                VM,
                "-o",
                work / "v.parquet",
                "--group-column",
                "label",
                "--report",
                work / "v.parquet",
            ],
            False,
        ),
        (
            "explain -o the store manifest",
            lambda: ["explain", "--store", S, "-v", V, "--train-id", "s1", "-o", S / "manifest.json"],
            False,
        ),
        ("select -o the values file", lambda: ["select", "--values", VAL, "--data", T, "--top", "2", "-o", VAL], False),
        (
            "output into a read-only folder",
            lambda: (os.chmod(work / "ro", 0o555), [*q, "-v", V, "-o", work / "ro" / "x.jsonl"])[1],
            False,
        ),
        # inputs
        ("validation empty", lambda: [*q, "-v", file("e.jsonl", "")], False),
        ("validation blank lines", lambda: [*q, "-v", file("bl.jsonl", "\n\n  \n")], False),
        (
            "validation BOM + CRLF",
            lambda: [*q, "-v", file("bom.jsonl", b'\xef\xbb\xbf{"prompt":"a","response":" b"}\r\n', True)],
            False,
        ),
        (
            "validation 5 MB line",
            lambda: [*q, "-v", _jsonl(work / "long.jsonl", [{"prompt": "word " * 1_000_000, "response": " x"}])],
            False,
        ),
        (
            "id is a list",
            lambda: [*q, "-v", _jsonl(work / "idl.jsonl", [{"id": [1], "prompt": "a", "response": " b"}])],
            False,
        ),
        (
            "id is a dict",
            lambda: [
                "estimate",
                _jsonl(work / "idd.jsonl", [{"id": {"a": 1}, "text": "a"}]),
                "--value-model",
                VM,
                "-o",
                work / "o.parquet",
            ],
            False,
        ),
        ("label 1e400", lambda: [*q, "-v", file("inf.jsonl", '{"prompt":"a","response":" b","label":1e400}\n')], False),
        ("id NaN", lambda: [*q, "-v", file("nan.jsonl", '{"id":NaN,"prompt":"a","response":" b"}\n')], False),
        (
            "label huge int",
            lambda: [*q, "-v", file("hi.jsonl", '{"prompt":"a","response":" b","label":' + "9" * 5000 + "}\n")],
            False,
        ),
        (
            "duplicate keys",
            lambda: [*q, "-v", file("dk.jsonl", '{"prompt":"a","prompt":"c","response":" b"}\n')],
            False,
        ),
        ("CSV with NUL", lambda: [*q, "-v", file("nul.csv", b"prompt,response\na\x00b, c\n", True)], False),
        ("CSV unbalanced quote", lambda: [*q, "-v", file("q.csv", 'prompt,response\n"a, b\n')], False),
        ("parquet that is JSON", lambda: [*q, "-v", file("j.parquet", '{"prompt":"a"}')], False),
        ("parquet truncated", lambda: [*q, "-v", file("t.parquet", VAL.read_bytes()[:200], True)], False),
        ("gz that is not gzip", lambda: [*q, "-v", file("g.jsonl.gz", "not gzip")], False),
        ("zst truncated", lambda: [*q, "-v", file("z.jsonl.zst", b"\x28\xb5\x2f\xfd\x00", True)], False),
        ("datasets state.json deep", lambda: [*q, "-v", _ds("deep", "[" * 50000 + "]" * 50000)], False),
        (
            "datasets state.json escapes",
            lambda: [*q, "-v", _ds("esc", json.dumps({"_data_files": [{"filename": "../../../../etc/passwd"}]}))],
            False,
        ),
        ("folder with a symlink loop", lambda: [*q, "-v", _loop()], False),
        ("glob matching folders only", lambda: [*q, "-v", f"{work}/*/"], False),
        ("input name with newline", lambda: [*q, "-v", _jsonl(work / "n\nl.jsonl", _rows(1))], False),
        ("empty text", lambda: [*q, "-v", _jsonl(work / "et.jsonl", [{"text": ""}])], False),
        (
            "message without role",
            lambda: [*q, "-v", _jsonl(work / "mr.jsonl", [{"messages": [{"content": "hi"}]}])],
            False,
        ),
        (
            "message content a dict",
            lambda: [*q, "-v", _jsonl(work / "md.jsonl", [{"messages": [{"role": "user", "content": {"a": 1}}]}])],
            False,
        ),
        (
            "100k messages",
            lambda: [*q, "-v", _jsonl(work / "mm.jsonl", [{"messages": [{"role": "user", "content": "x"}] * 100000}])],
            False,
        ),
        (
            "1 MB id",
            lambda: [
                "estimate",
                _jsonl(work / "bigid.jsonl", [{"id": "i" * (1 << 20), "text": "a"}]),
                "--value-model",
                VM,
                "-o",
                work / "o2.parquet",
            ],
            False,
        ),
        (
            "id column of booleans",
            lambda: [
                *q,
                "-v",
                _jsonl(work / "bool.jsonl", [{"flag": True, "prompt": "a", "response": " b"}]),
                "--id-column",
                "flag",
            ],
            False,
        ),
        ("store manifest as data", lambda: ["index", "add", S / "manifest.json", "--store", S, "--quiet"], True),
        ("store folder as data", lambda: ["index", "add", S, "--store", S, "--quiet"], True),
        ("/dev/zero as .jsonl", lambda: [*q, "-v", link("zero.jsonl", "/dev/zero")], False),
        (
            "FIFO as values",
            lambda: ["select", "--values", fifo("v.parquet"), "--data", T, "--top", "2", "-o", work / "s.jsonl"],
            False,
        ),
        (
            "FIFO as group data",
            lambda: ["audit", "show", "--store", S, "a", "--data", fifo("g.jsonl"), "--group-column", "label"],
            False,
        ),
        (
            "values ids are ints",
            lambda: [
                "select",
                "--values",
                _pq("vi.parquet", {"id": [1, 2], "value": [0.1, 0.2]}),
                "--data",
                T,
                "--top",
                "1",
                "-o",
                work / "s2.jsonl",
            ],
            False,
        ),
        (
            "values are strings",
            lambda: [
                "select",
                "--values",
                _pq("vs.parquet", {"id": ["s1"], "value": ["high"]}),
                "--data",
                T,
                "--top",
                "1",
                "-o",
                work / "s3.jsonl",
            ],
            False,
        ),
        (
            "values hold NaN",
            lambda: [
                "select",
                "--values",
                _pq("vn.parquet", {"id": ["s1", "s2"], "value": [float("nan"), 1.0]}),
                "--data",
                T,
                "--top",
                "1",
                "-o",
                work / "s4.jsonl",
            ],
            False,
        ),
        (
            "values deep JSONL",
            lambda: [
                "select",
                "--values",
                file("vd.jsonl", '{"id":"s1","value":' + "[" * 50000 + "]" * 50000 + "}\n"),
                "--data",
                T,
                "--top",
                "1",
                "-o",
                work / "s5.jsonl",
            ],
            False,
        ),
        (
            "values lone surrogate",
            lambda: [
                "select",
                "--values",
                file("vsur.jsonl", '{"id":"s\\udc80","value":1}\n'),
                "--data",
                T,
                "--top",
                "1",
                "-o",
                work / "s6.jsonl",
            ],
            False,
        ),
        ("same validation file thrice", lambda: [*q, "-v", V, "-v", f"{data}/../in/val.jsonl", "-v", data], False),
        # option values
        ("top-k int64 max", lambda: [*q, "-v", V, "--top-k", str((1 << 63) - 1)], False),
        ("candidates at bound", lambda: [*q, "-v", V, "--candidates", str(1 << 20)], False),
        (
            "val-index huge",
            lambda: ["explain", "--store", S, "-v", V, "--train-id", "s1", "--val-index", str(10**18)],
            False,
        ),
        (
            "top-pairs at bound",
            lambda: ["explain", "--store", S, "-v", V, "--train-id", "s1", "--top-pairs", str(1 << 20)],
            False,
        ),
        ("unknown train id", lambda: ["explain", "--store", S, "-v", V, "--train-id", "nope\udcff"], False),
        (
            "flag-threshold 1e308",
            lambda: [
                "audit",
                "run",
                "--store",
                S,
                "-v",
                V,
                "--name",
                "c",
                "--flag-threshold",
                "1e308",
                "--device",
                "cpu",
                "--quiet",
            ],
            True,
        ),
        ("shard 0/0", lambda: ["index", "add", T, "--store", S, "--shard", "0/0"], True),
        ("shard huge", lambda: ["index", "add", T, "--store", S, "--shard", "99999999999999999999/1"], True),
        ("device banana", lambda: [*q, "-v", V, "--device", "banana"], False),
        ("device cuda:99", lambda: [*q, "-v", V, "--device", "cuda:99"], False),
        ("model /etc", lambda: ["index", "build", T, "--store", work / "n1", "--model", "/etc"], False),
        (
            "model config.json garbage",
            lambda: ["index", "build", T, "--store", work / "n2", "--model", _model_with("garbage", "{nope")],
            False,
        ),
        (
            "model config.json deep",
            lambda: [
                "index",
                "build",
                T,
                "--store",
                work / "n3",
                "--model",
                _model_with("deep", "[" * 100000 + "]" * 100000),
            ],
            False,
        ),
        ("adapter is a file", lambda: ["index", "add", T, "--store", S, "--adapter", T], True),
        (
            "image column on a text model",
            lambda: ["index", "build", T, "--store", work / "n4", "--model", model, "--image-column", "img"],
            False,
        ),
        ("conversational format on prompt rows", lambda: [*q, "-v", V, "--format", "conversational"], False),
        ("text column missing", lambda: [*q, "-v", V, "--text-column", "body"], False),
        ("audit name 65 chars", lambda: ["audit", "run", "--store", S, "-v", V, "--name", "a" * 65], False),
        ("audit name ..", lambda: ["audit", "run", "--store", S, "-v", V, "--name", ".."], False),
        ("audit name with slash", lambda: ["audit", "show", "--store", S, "a/b"], False),
        ("audit name undecodable", lambda: ["audit", "show", "--store", S, "a\udcff"], False),
        ("compare an audit with itself", lambda: ["audit", "compare", "--store", S, "a", "a"], False),
        (
            "select --top and --drop-bottom",
            lambda: [
                "select",
                "--store",
                S,
                "--audit",
                "a",
                "--top",
                "5",
                "--drop-bottom",
                "1",
                "-o",
                work / "s7.jsonl",
            ],
            False,
        ),
        (
            "select --top 00005",
            lambda: ["select", "--store", S, "--audit", "a", "--top", "00005", "-o", work / "s8.jsonl"],
            False,
        ),
        (
            "select --top 5.0",
            lambda: ["select", "--store", S, "--audit", "a", "--top", "5.0", "-o", work / "s9.jsonl"],
            False,
        ),
        (
            "select --top 1e-300%",
            lambda: ["select", "--store", S, "--audit", "a", "--top", "1e-300%", "-o", work / "s10.jsonl"],
            False,
        ),
        ("sketch faiss banana", lambda: ["index", "sketch", "--store", S, "--faiss-index", "banana"], True),
        ("sketch dim not a multiple", lambda: ["index", "sketch", "--store", S, "--sketch-dim", "3"], True),
        ("sketch dim 0", lambda: ["index", "sketch", "--store", S, "--sketch-dim", "0"], True),
        # index convert (the output is never an input, the store or inside it; bad settings before any write)
        ("convert onto the store", lambda: [*cv, "--out", S], False),
        ("convert into the store's table", lambda: [*cv, "--out", S / "samples.lance" / "new"], False),
        ("convert into the input folder", lambda: [*cv, "--out", data], False),
        ("convert onto an input file", lambda: [*cv, "--out", T], False),
        ("convert into a folder holding the store", lambda: [*cv, "--out", work], False),
        ("convert through a link to the store", lambda: [*cv, "--out", link("store-link", S)], False),
        ("convert rank above d", lambda: [*cv, "--out", work / "c1", "--hidden-rank", "100000"], False),
        ("convert rank negative", lambda: [*cv, "--out", work / "c2", "--hidden-rank", "-3"], False),
        ("convert top-m above the store's", lambda: [*cv, "--out", work / "c3", "--top-m", "999"], False),
        ("convert dtype garbage", lambda: [*cv, "--out", work / "c4", "--hidden-dtype", "bf16"], False),
        (
            "convert int8 block without int8",
            lambda: [*cv, "--out", work / "c5", "--hidden-dtype", "float16", "--int8-block", "8"],
            False,
        ),
        ("convert name with a line break", lambda: [*cv, "--out", work / "c\nd"], False),
        ("convert name with a tab", lambda: [*cv, "--out", work / "c\td"], False),
        ("convert name with spaces", lambda: [*cv, "--out", work / "conv with spaces"], False),
        (
            "convert an empty store",
            lambda: ["index", "convert", "--store", _empty_store(), "--out", work / "c6"],
            False,
        ),
        (
            "convert again, other settings",
            lambda: [*cv, "--out", _converted("cr8", "--hidden-rank", "8"), "--hidden-rank", "4"],
            False,
        ),
        (
            "convert again, same settings",
            lambda: [*cv, "--out", _converted("cr8", "--hidden-rank", "8"), "--hidden-rank", "8"],
            False,
        ),
        (
            "convert a low-rank store to another rank",
            lambda: [
                "index",
                "convert",
                "--store",
                _converted("cr8", "--hidden-rank", "8"),
                "--out",
                work / "c7",
                "--hidden-rank",
                "16",
            ],
            False,
        ),
        (
            "convert a converted store",
            lambda: [
                "index",
                "convert",
                "--store",
                _converted("ci8", "--hidden-dtype", "int8", "--top-m", "4"),
                "--out",
                work / "c8",
                "--top-m",
                "2",
                "--quiet",
            ],
            False,
        ),
        (
            "query a low-rank conversion",
            lambda: [
                "query",
                "--store",
                _converted("cr8", "--hidden-rank", "8"),
                "-v",
                V,
                "--device",
                "cpu",
                "--quiet",
                "--candidates",
                "5",
            ],
            False,
        ),
        (
            "audit a converted store",
            lambda: [
                "audit",
                "run",
                "--store",
                _converted("ci8", "--hidden-dtype", "int8", "--top-m", "4"),
                "-v",
                V,
                "--name",
                "x",
                "--device",
                "cpu",
                "--quiet",
            ],
            False,
        ),
        (
            "explain on a low-rank conversion",
            lambda: [
                "explain",
                "--store",
                _converted("cr8", "--hidden-rank", "8"),
                "-v",
                V,
                "--train-id",
                "s1",
                "--device",
                "cpu",
            ],
            False,
        ),
        (
            "index add to a converted store",
            lambda: [
                "index",
                "add",
                T,
                "--store",
                _converted("ci8", "--hidden-dtype", "int8", "--top-m", "4"),
                "--quiet",
                "--device",
                "cpu",
            ],
            False,
        ),
        (
            "sketch a low-rank conversion wider than its rank",
            lambda: [
                "index",
                "sketch",
                "--store",
                _converted("cr8", "--hidden-rank", "8"),
                "--sketch-hidden-cols",
                "16",
            ],
            False,
        ),
        (
            "check a low-rank conversion",
            lambda: ["index", "check", "--store", _converted("cr8", "--hidden-rank", "8")],
            False,
        ),
        (
            "info on a low-rank conversion",
            lambda: ["index", "info", "--store", _converted("cr8", "--hidden-rank", "8")],
            False,
        ),
        ("check on the table folder", lambda: ["index", "check", "--store", S / "samples.lance"], False),
        ("info on a file", lambda: ["index", "info", "--store", T], False),
        ("query a value model folder", lambda: [*q[:2], VM, "-v", V], False),
        (
            "estimate with a store as value model",
            lambda: ["estimate", T, "--value-model", S, "-o", work / "o3.parquet"],
            False,
        ),
        (
            "distill fraction too small",
            lambda: ["distill", "--store", S, "--audit", "a", "--out", work / "vm2", "--fraction", "1e-9"],
            False,
        ),
        (
            "estimate NUL and emoji texts",
            lambda: [
                "estimate",
                _jsonl(work / "emo.jsonl", [{"text": "\x00\U0001f600" * 50}]),
                "--value-model",
                VM,
                "-o",
                work / "o4.csv",
            ],
            False,
        ),
        (
            "estimate group column with commas",
            lambda: [
                "estimate",
                _jsonl(work / "gc.jsonl", [{"text": "a", "src": 'x,"y"\nz'}]),
                "--value-model",
                VM,
                "-o",
                work / "o5.csv",
                "--group-column",
                "src",
            ],
            False,
        ),
        (
            "estimate group column absent",
            lambda: ["estimate", T, "--value-model", VM, "-o", work / "o6.parquet", "--group-column", "nope"],
            False,
        ),
        (
            "bootstrap at bound",
            lambda: ["audit", "show", "--store", S, "a", "--data", T, "--group-column", "label", "--bootstrap", "1000"],
            False,
        ),
        (
            "max-samples 3",
            lambda: [
                "distill",
                "--store",
                S,
                "--audit",
                "a",
                "--out",
                work / "vm3",
                "--max-samples",
                "3",
                "--ngram-dim",
                "64",
            ],
            False,
        ),
    ]

    def alarm(*_):
        raise Timeout()

    signal.signal(signal.SIGALRM, alarm)
    failures, tried = [], 0
    protected = [data, T.parent, VM]
    for name, build, writes_store in cases:
        tried += 1
        try:
            args = build()
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{name}: set-up failed: {exc!r}")
            continue
        before = {str(p): _snapshot(p) for p in protected}
        before_store = _snapshot(S)
        signal.alarm(a.timeout)
        try:
            r = run(*args)
        except Timeout:
            failures.append(f"{name}: no answer in {a.timeout}s (hang)")
            continue
        finally:
            signal.alarm(0)
        err = (r.stderr if r.stderr_bytes is not None else "").strip()
        problem = None
        if r.exit_code not in (0, 2):
            problem = f"exit {r.exit_code}: {r.exception!r} {err[-300:]}"
        elif r.exit_code == 2 and (not err.startswith("error:") or "\n" in err):
            problem = f"not one error line: {err[:300]!r}"
        elif "Traceback" in r.output:
            problem = "traceback in output"
        for p in protected:
            if _snapshot(p) != before[str(p)]:
                problem = (problem or "") + f" changed {p}"
        if writes_store:
            from forvalue.maintenance import check_store

            rep = check_store(S)
            if not rep.clean:
                problem = (problem or "") + f" store not clean: {rep.problems[:1]}"
        elif _snapshot(S) != before_store:
            problem = (problem or "") + " the store changed"
        leftovers = [str(f) for f in work.rglob("*.tmp")]
        if leftovers:
            problem = (problem or "") + f" left {leftovers[:2]}"
            for f in leftovers:
                Path(f).unlink()
        status = "ok" if problem is None else "FAIL"
        print(f"[{status}] {name}: exit {r.exit_code} {err[:160]!r}" + (f" -- {problem}" if problem else ""))
        if problem:
            failures.append(f"{name}: {problem}")
    os.chmod(work / "ro", 0o755)
    if a.kills:
        k_tried, k_failures = _kills(work, model, S, V, T, VM, a.kills)
        tried += k_tried
        failures += k_failures
        k_tried, k_failures = _convert_kills(work, S, a.kills)
        tried += k_tried
        failures += k_failures
    print(
        f"\nhostile pass ({'SmolLM2-135M' if a.real else 'tiny model'}): {tried} cases tried, {len(failures)} failures"
    )
    for f in failures:
        print("  " + f)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


def _complete(path: Path) -> bool:
    """Whether ``path`` is a whole output file of its format."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.read_table(path)
        elif path.suffix == ".jsonl":
            text = path.read_text()
            assert text == "" or text.endswith("\n")
            [json.loads(line) for line in text.splitlines()]
        elif path.suffix == ".csv":
            import pyarrow.csv as pcsv

            pcsv.read_csv(path)
        elif path.suffix == ".html":
            assert path.read_text().rstrip().endswith("</html>")
        return True
    except Exception:  # noqa: BLE001
        return False


def _killed_run(argv: list[str], env: dict, after: float, ctrl_c: bool, label: str, failures: list[str]):
    """Run ``argv``, send SIGKILL (SIGINT when ``ctrl_c``) after ``after`` seconds; the problems every kill must not
    leave (a Ctrl-C exit other than 0 / 130, a traceback) and "SIGNAL, exit N"; None (a failure recorded) when it
    did not exit."""
    import subprocess
    import time

    sig = signal.SIGINT if ctrl_c else signal.SIGKILL
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(after)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        failures.append(f"kill {label}: no exit 120 s after {sig.name}")
        return None
    problem = []
    if sig == signal.SIGINT and proc.returncode not in (0, 130):
        problem.append(f"Ctrl-C gave exit {proc.returncode}: {err.strip()[-200:]!r}")
    if "Traceback" in err:
        problem.append("traceback")
    return problem, f"{sig.name}, exit {proc.returncode}"


def _report_round(line: str, problem: list[str], failures: list[str]) -> None:
    """Print one killed round's line (ok or FAIL with its problems); a failed round joins ``failures``."""
    print(f"[{'FAIL' if problem else 'ok'}] {line}" + (f" -- {'; '.join(problem)}" if problem else ""))
    if problem:
        failures.append(f"{line}: {'; '.join(problem)}")


def _kills(work: Path, model: str, S: Path, V: Path, T: Path, VM: Path, rounds: int) -> tuple[int, list[str]]:
    """Real ``forvalue`` processes killed (SIGKILL, or SIGINT as Ctrl-C) at random moments while they write:
    every output must be its old bytes or a whole new file, the store sound (an uncommitted audit table
    reported and repaired), the value model loadable as a whole model, the inputs untouched."""
    import random
    import subprocess
    import time

    from forvalue.maintenance import check_store
    from forvalue.value_model import ValueModel

    out = work / "killed"
    out.mkdir(exist_ok=True)

    def _more(k):  # fresh rows each round, so every killed add has work to do
        return _jsonl(work / f"more{k + 1}.jsonl", _rows(40, start=500 + 40 * (k + 1)))

    more = _more(-1)
    dev = ["--device", "cpu"]
    commands = {
        "estimate -o": (["estimate", T, "--value-model", VM, "-o", out / "values.parquet"], [out / "values.parquet"]),
        "select -o": (
            ["select", "--store", S, "--audit", "a", "--top", "50%", "-o", out / "sel.jsonl"],
            [out / "sel.jsonl"],
        ),
        "query -o --all-scores": (
            [
                "query",
                "--store",
                S,
                "-v",
                V,
                *dev,
                "--quiet",
                "--exact",
                "-o",
                out / "top.csv",
                "--all-scores",
                out / "all.parquet",
            ],
            [out / "top.csv", out / "all.parquet"],
        ),
        "audit run --report": (
            ["audit", "run", "--store", S, "-v", V, "--name", "a", *dev, "--quiet", "--report", out / "a.html"],
            [out / "a.html"],
        ),
        "audit show --report": (["audit", "show", "--store", S, "b", "--report", out / "b.html"], [out / "b.html"]),
        "explain -o": (
            ["explain", "--store", S, "-v", V, "--train-id", "s3", *dev, "-o", out / "why.html"],
            [out / "why.html"],
        ),
        "distill --out (rewrite)": (["distill", "--store", S, "--audit", "b", "--out", VM, "--ngram-dim", "1024"], []),
        "index add": (lambda k: ["index", "add", _more(k), "--store", S, "--quiet", "--write-every", "4"], []),
        # a new sketch shape each round: basis, column and manifest are rewritten one after the other
        "index sketch --rebuild": (
            lambda k: [
                "index",
                "sketch",
                "--store",
                S,
                "--rebuild",
                "--sketch-hidden-cols",
                "8" if k % 2 else "4",
                "--sketch-vocab-buckets",
                "256" if k % 2 else "512",
            ],
            [],
        ),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    rng = random.Random(28)
    tried, failures = 0, []
    protected = {p: p.read_bytes() for p in (T, V, more)}
    for name, (args, outputs) in commands.items():
        make = args if callable(args) else (lambda k, fixed=args: fixed)
        argv = [sys.executable, "-m", "forvalue", *map(str, make(-1))]
        started = time.perf_counter()
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        span = time.perf_counter() - started
        if done.returncode != 0:
            failures.append(f"kill {name}: the unkilled run failed: {done.stderr[-300:]}")
            continue
        for k in range(rounds):
            tried += 1
            old = {p: p.read_bytes() for p in outputs if p.exists()}
            argv = [sys.executable, "-m", "forvalue", *map(str, make(k))]
            killed = _killed_run(argv, env, rng.uniform(0.4, 1.0) * span, k == rounds - 1, f"{name} #{k}", failures)
            if killed is None:
                continue
            problem, how = killed
            for p in outputs:
                if p.exists() and p.read_bytes() != old.get(p) and not _complete(p):
                    problem.append(f"{p.name} half written")
            for p, data in protected.items():
                if p.read_bytes() != data:
                    problem.append(f"input {p.name} changed")
            report = check_store(S)
            if not report.clean:
                if all("without a committed version" in x for x in report.problems):
                    report = check_store(S, repair=True)
                elif any("index sketch" in x and "--rebuild" in x for x in report.problems):
                    import forvalue  # a sketch rebuild killed midway: the re-run the line names repairs it

                    forvalue.open(S).sketch(rebuild=True)
                    report = check_store(S)
                    print(f"  (kill {name} #{k} left the sketch half rebuilt; check named it, the re-run repaired it)")
                if not report.clean:
                    problem.append(f"store not sound: {report.problems[:1]}")
            try:
                ValueModel.load(VM)
            except Exception as exc:  # noqa: BLE001
                problem.append(f"value model unreadable: {exc}")
            _report_round(f"kill {name} #{k} ({how})", problem, failures)
    return tried, failures


def _convert_kills(work: Path, S: Path, rounds: int) -> tuple[int, list[str]]:
    """``index convert`` killed (SIGKILL, the last round SIGINT) at random moments, each round into a new output:
    the source byte for byte as before, and the same command re-run completes the output with every sample of
    the source once (``index check`` clean)."""
    import random
    import subprocess
    import time

    from forvalue.maintenance import check_store
    from forvalue.storage.store import Store

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    rng = random.Random(35)
    source = _snapshot(S)
    want = sorted(r["id"] for b in Store.open(S).scan(["id"]) for r in b.to_pylist())

    def argv(out):
        flags = ["--hidden-rank", "8", "--hidden-dtype", "int8", "--write-every", "2", "--quiet"]
        return [sys.executable, "-m", "forvalue", "index", "convert", "--store", str(S), "--out", str(out), *flags]

    started = time.perf_counter()
    done = subprocess.run(argv(work / "killed-conv-full"), env=env, capture_output=True, text=True, timeout=600)
    span = time.perf_counter() - started
    if done.returncode != 0:
        return 1, [f"kill index convert: the unkilled run failed: {done.stderr[-300:]}"]
    tried, failures = 0, []
    for k in range(rounds):
        tried += 1
        out = work / f"killed-conv{k}"
        label = f"index convert #{k}"
        killed = _killed_run(argv(out), env, rng.uniform(0.3, 1.0) * span, k == rounds - 1, label, failures)
        if killed is None:
            continue
        problem, how = killed
        if _snapshot(S) != source:
            problem.append("the source store changed")
        try:
            before = Store.open(out).count()
        except Exception:  # noqa: BLE001 - killed before its table existed
            before = "no table"
        again = subprocess.run(argv(out), env=env, capture_output=True, text=True, timeout=600)
        if again.returncode != 0:
            problem.append(f"the re-run failed: {again.stderr.strip()[-200:]!r}")
        else:
            report = check_store(out)
            got = sorted(r["id"] for b in Store.open(out).scan(["id"]) for r in b.to_pylist())
            if not report.clean:
                problem.append(f"output not sound: {report.problems[:1]}")
            if got != want:
                problem.append(f"output holds {len(got)} ids, the source {len(want)}")
        _report_round(f"kill index convert #{k} ({how}, {before} of {len(want)} rows kept)", problem, failures)
    return tried, failures


if __name__ == "__main__":
    sys.exit(main())
