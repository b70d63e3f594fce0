"""Shared fixtures: a tiny random-initialised causal LM (built by ``tools.tiny_models``), rows and CLI helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.tiny_models import make_model_dir  # noqa: F401  (tests import it from here)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_runner(tiny_model_dir):
    from forvalue.indexer.model_runner import load_runner
    from forvalue.schemas.config import ModelConfig

    return load_runner(ModelConfig(path=str(tiny_model_dir), device="cpu"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def word_rows(n: int) -> list[dict]:
    """``n`` labelled prompt/response rows over eight words, ids ``s000``... (the Ray tests' training set)."""
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    return [
        {
            "id": f"s{i:03d}",
            "prompt": f"{words[i % 8]} question {i} about {words[(i * 3) % 8]} ->",
            "response": f" answer {i * 7} {words[(i * 5) % 8]}",
            "label": "ab"[i % 2],
        }
        for i in range(n)
    ]


def word_val() -> list[dict]:
    """Five validation rows for :func:`word_rows` stores, ids ``v0``..."""
    return [
        {"id": f"v{i}", "prompt": f"beta question {i} ->", "response": f" answer {i}", "label": "ab"[i % 2]}
        for i in range(5)
    ]


def build_sketched(train: Path, store: Path, model_dir, runner, write_every: int = 40) -> Path:
    """A store of ``train`` built with the tiny model and a 2048-value prefilter sketch (commits of ``write_every``
    rows, so the table has several fragments)."""
    from forvalue.indexer.build import build_index
    from forvalue.schemas.config import BuildConfig, EncodeConfig, ModelConfig

    cfg = BuildConfig(
        model=ModelConfig(path=str(model_dir), device="cpu"),
        progress=False,
        write_every=write_every,
        encode=EncodeConfig(sketch_dim=2048),
    )
    build_index([train], store, cfg, runner=runner)
    return store


def exact_scores(store: Path, val: Path, runner, **query):
    """Exact query scores ``(n_val, n_train)`` and the training ids in the store's order (CPU, no progress bar)."""
    from forvalue.api import run_query
    from forvalue.schemas.config import QueryConfig

    res = run_query(store, [val], QueryConfig(progress=False, device="cpu", **query), runner=runner, keep_scores=True)
    return res.scores, res.train_ids


def in_order(scores, store_ids, ids):
    """The columns of ``scores`` (in ``store_ids`` order) rearranged to ``ids``."""
    where = {sid: j for j, sid in enumerate(store_ids)}
    return scores[:, [where[i] for i in ids]]


def assert_close(got, expected, rtol):
    """Equal to ``rtol`` relative to each value, or to ``rtol`` of the largest magnitude near zero."""
    import numpy as np

    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.fixture
def toy_rows() -> list[dict]:
    """A small labelled prompt/response set (2 classes)."""
    rows = []
    for i in range(6):
        rows.append(
            {
                "id": f"rev-{i}",
                "prompt": f"reverse the words {i}: the quick fox ->",
                "response": " fox quick the",
                "label": "reverse",
            }
        )
        rows.append(
            {
                "id": f"math-{i}",
                "prompt": f"solve the math problem {i} ->",
                "response": f" answer {i * 7}",
                "label": "math",
            }
        )
    return rows


def cli(*args: str):
    """Run the forvalue CLI in-process (click's CliRunner)."""
    from click.testing import CliRunner

    from forvalue.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> str:
    """A user error: exit status 2 and one ``error:`` line on stderr containing every needle."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    err = result.stderr.strip()
    assert err.startswith("error:") and "\n" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return err


BUCKET = "fv-test"


@pytest.fixture(scope="session")
def s3():
    """A local S3-compatible server (moto, tests/s3_server.py) for the session, the AWS_* environment pointing at
    it (so Ray nodes started afterwards inherit it), and the bucket ``BUCKET``; yields the endpoint."""
    import os

    pytest.importorskip("moto.server", reason="the object-store tests need moto[server] (the test extra)")
    from tools import moto_server as s3_server

    proc, endpoint = s3_server.start()
    saved = {k: os.environ.get(k) for k in s3_server.s3_env(endpoint)}
    os.environ.update(s3_server.s3_env(endpoint))
    s3_server.make_bucket(endpoint, BUCKET)
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(10)
