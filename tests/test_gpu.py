"""The GPU path (``--device cuda``) against the CPU: the scorers, the build, the API and the CLI end to end.

Skipped where torch sees no CUDA device (CI has none); run on a GPU machine with ``pytest tests/test_gpu.py``.
``FORVALUE_TEST_DEVICE=cpu`` runs the same checks with the CPU standing in for the GPU (the checks' own logic).
Tolerances: float32 on both sides, so a GPU's other summation order moves scores by ~1e-6 relative; bfloat16
models (the GPU default) are compared by their top-k, not value for value.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import test_gform
import torch
from conftest import cli, write_jsonl
from test_gform import _close, _gform_scores, _rows, _token_form_float64, _token_scores

from forvalue.engine.gform import BlockedGForm, GFormScorer, aggregate_weights
from forvalue.engine.scan import audit_scan
from forvalue.engine.scorer import BlockedScorer
from forvalue.schemas.config import AuditConfig, BuildConfig, EncodeConfig, ExplainConfig, ModelConfig, QueryConfig
from forvalue.storage.rows import decode_block

DEVICE = os.environ.get("FORVALUE_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="no CUDA device (set FORVALUE_TEST_DEVICE)"
)
setting = test_gform.setting  # test_gform's module-scoped store fixture, shared
COLUMNS = ["hidden", "topk_ids", "topk_probs", "target_ids", "target_probs", "n_scored", "sq_norm"]


def test_token_scorer_on_the_device_equals_eq1(setting):
    store, val = setting["store"], setting["val"]
    exact = _token_form_float64(store, val)
    for block_tokens in (3, 4096):  # validation blocks of a few tokens, and one block
        scorer = BlockedScorer(val, torch.device(DEVICE), block_tokens)
        got = np.concatenate(
            [scorer.score(decode_block(b, store.manifest.hidden_size)) for b in store.scan(COLUMNS, batch_size=5)]
        )
        _close(got, exact, 1e-5)
    _close(_token_scores(store, val), exact, 1e-5)


@pytest.mark.parametrize("way", ["gather", "pairs", "pairs-unpacked", "blocked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gform_on_the_device_equals_eq1(setting, monkeypatch, way, dtype):
    import forvalue.engine.gform as gform
    import forvalue.engine.plan as plan

    store, val = setting["store"], setting["val"]
    weights = aggregate_weights([s.label for s in setting["val_samples"]], ["math", "reverse"])
    exact = _token_form_float64(store, val) @ weights
    monkeypatch.setattr(plan, "PAIR_FORM_MIN_FLOATS", 1 if way.startswith("pairs") else 10**12)
    if way == "pairs-unpacked":
        monkeypatch.setattr(gform, "_PACKED_KEY_BITS", 0)
    if way == "blocked":  # the union vocabulary in several blocks, each its own table on the device
        scorer = BlockedGForm(val, weights, DEVICE, dtype, budget=1)
        assert scorer.blocks > 1
    else:
        scorer = GFormScorer(val, weights, DEVICE, dtype)
        assert scorer.gbar.device.type == torch.device(DEVICE).type
    for read_rows in (3, 1024):
        _close(_gform_scores(store, scorer, read_rows), exact, 1e-5 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("normalize", ["none", "cosine"])
def test_audit_scan_on_the_device_equals_the_cpu(setting, normalize):
    store, val = setting["store"], setting["val"]
    labels = [s.label for s in setting["val_samples"]]
    groups = sorted({l for l in labels if l is not None})
    for form in ("gform", "token"):
        kw = dict(normalize=normalize, read_rows=4, form=form)
        gpu = audit_scan(store, val, labels, groups, DEVICE, **kw)
        cpu = audit_scan(store, val, labels, groups, "cpu", **kw)
        assert gpu.form == cpu.form == form and gpu.ids == cpu.ids
        _close(gpu.mean, cpu.mean, 1e-5)
        for g in groups:
            _close(gpu.by_label[g], cpu.by_label[g], 1e-5)
        if form == "token":
            _close(gpu.maximum, cpu.maximum, 1e-5)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu")
    train = write_jsonl(tmp / "train.jsonl", _rows(24))
    val = write_jsonl(tmp / "val.jsonl", _rows(6, offset=100))
    return tmp, train, val


def _build(files, tiny_model_dir, name, device, dtype="float32", **encode):
    import forvalue

    tmp, train, _ = files
    cfg = BuildConfig(
        model=ModelConfig(path=str(tiny_model_dir), device=device, dtype=dtype),
        encode=EncodeConfig(sketch_dim=2048, **encode),
        progress=False,
        write_every=7,
    )
    return forvalue.build([train], tmp / name, cfg)


def _by_id(result):
    order = np.argsort(result.train_ids)
    return result.scores[:, order]


def test_build_query_audit_and_explain_on_the_device_equal_the_cpu(files, tiny_model_dir):
    """A store built on the device holds the CPU build's rows; queries (exact and prefiltered), audits (both
    forms, flagged by label) and explanations on the device give the CPU's scores."""
    tmp, _, val = files
    on_cpu = _build(files, tiny_model_dir, "cpu-store", "cpu", hidden_dtype="float32")
    on_dev = _build(files, tiny_model_dir, "dev-store", DEVICE, hidden_dtype="float32")
    assert on_dev.manifest.dtype == "float32"
    q = dict(progress=False, top_k=5, exact=True)
    ref = on_cpu.query(val, QueryConfig(device="cpu", **q), keep_scores=True)
    # the device's forward pass gives the same stored rows (to float32 summation order)
    built = on_dev.query(val, QueryConfig(device="cpu", **q), keep_scores=True)
    _close(_by_id(built), _by_id(ref), 1e-4)
    # exact scores on the device
    dev = on_cpu.query(val, QueryConfig(device=DEVICE, **q), keep_scores=True)
    _close(_by_id(dev), _by_id(ref), 1e-5)
    # prefiltered top-k on the device: exact scores of the candidates, every stored row a candidate here
    pre = on_cpu.query(val, QueryConfig(device=DEVICE, progress=False, top_k=5, candidates=24))
    assert pre.top.column("train_id").to_pylist() == ref.top.column("train_id").to_pylist()
    np.testing.assert_allclose(
        pre.top.column("score").to_numpy(), ref.top.column("score").to_numpy(), rtol=1e-5, atol=1e-7
    )
    # audits on the device: mean and own-label scores as on the CPU, the same flags
    cfg = dict(progress=False, flag_by="label")
    a_cpu = on_cpu.audit(val, "cpu", AuditConfig(device="cpu", **cfg)).to_arrow().sort_by("id")
    a_dev = on_cpu.audit(val, "dev", AuditConfig(device=DEVICE, **cfg)).to_arrow().sort_by("id")
    for col in ("score_mean", "flag_score"):
        _close(a_dev.column(col).to_numpy(), a_cpu.column(col).to_numpy(), 1e-5)
    assert a_dev.column("flagged").to_pylist() == a_cpu.column("flagged").to_pylist()
    # an explanation computed with the device's model: the exact score split into token contributions
    train_id = ref.top.column("train_id")[0].as_py()
    e_cpu = on_cpu.explain(val, train_id, ExplainConfig(device="cpu"))
    e_dev = on_cpu.explain(val, train_id, ExplainConfig(device=DEVICE))
    assert e_dev.score == pytest.approx(e_cpu.score, rel=1e-5)
    assert sum(p["contribution"] for p in e_dev.pairs) == pytest.approx(
        sum(p["contribution"] for p in e_cpu.pairs), rel=1e-4, abs=1e-6 * abs(e_cpu.score)
    )


def test_default_dtype_on_the_device_builds_and_queries(files, tiny_model_dir):
    """``--dtype auto`` on a GPU: bfloat16 where the GPU has it, recorded in the manifest, and queried by the
    same dtype on the device and on the CPU (the store's dtype, not the device's default)."""
    _, _, val = files
    st = _build(files, tiny_model_dir, "auto-store", DEVICE, dtype="auto")
    expected = "bfloat16" if DEVICE.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    assert st.manifest.dtype == expected
    q = dict(progress=False, top_k=3, exact=True)
    dev = st.query(val, QueryConfig(device=DEVICE, **q), keep_scores=True)
    cpu = st.query(val, QueryConfig(device="cpu", **q), keep_scores=True)
    assert np.isfinite(dev.scores).all() and np.abs(dev.scores).max() > 0
    # bfloat16 forward passes on two devices: close, not equal
    _close(_by_id(dev), _by_id(cpu), 5e-2)


def test_cli_build_query_and_audit_with_device(files, tiny_model_dir):
    tmp, train, val = files
    store = tmp / "cli-store"
    d = ["--device", DEVICE]
    r = cli("index", "build", str(train), "--store", str(store), "--model", str(tiny_model_dir), *d)
    assert r.exit_code == 0, r.output
    r = cli("query", "--store", str(store), "--validation", str(val), "--top-k", "3", "-o", str(tmp / "q.csv"), *d)
    assert r.exit_code == 0, r.output
    assert (tmp / "q.csv").read_text().count("\n") == 1 + 3 * 6
    r = cli("audit", "run", "--store", str(store), "--validation", str(val), "--name", "a", *d)
    assert r.exit_code == 0, r.output


def test_vision_language_build_and_query_on_the_device_equal_the_cpu(tmp_path):
    """A tiny random Qwen2-VL: images and text through the device's forward pass give the CPU's stored rows."""
    from forvalue.api import build_index, run_query
    from forvalue.schemas.config import DataConfig
    from tools.image_task import generate
    from tools.tiny_models import make_vlm_dir

    vlm = make_vlm_dir(tmp_path / "vlm")
    train, val = generate(tmp_path / "shapes", n_train=3, n_test=1, n_classes=3, size=56)
    data = DataConfig(image_column="image")
    scores = {}
    for device in ("cpu", DEVICE):
        model = ModelConfig(path=str(vlm), device=device, dtype="float32")
        cfg = BuildConfig(model=model, data=data, encode=EncodeConfig(hidden_dtype="float32"), progress=False)
        build_index([train], tmp_path / device / "store", cfg)
        res = run_query(
            tmp_path / device / "store", [val], QueryConfig(progress=False, device=device), data=data, keep_scores=True
        )
        scores[device] = _by_id(res)
    assert np.abs(scores["cpu"]).max() > 0
    _close(scores[DEVICE], scores["cpu"], 1e-4)
