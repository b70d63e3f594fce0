"""Vision-language models end to end on a tiny random Qwen2-VL, offline: inputs, scored positions,
scores against the dense and autograd references, CLI, bad images, image formats."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import assert_one_line_error, cli, write_jsonl

from forvalue.api import build_index, run_query
from forvalue.indexer.data import iter_samples
from forvalue.schemas.config import BuildConfig, DataConfig, EncodeConfig, ModelConfig, QueryConfig
from tools.image_task import generate
from tools.reference import dense_scores
from tools.tiny_models import make_vlm_dir, qwen2vl_processor

IMG = DataConfig(image_column="image")


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return make_vlm_dir(tmp_path_factory.mktemp("tiny-qwen2vl"))


@pytest.fixture(scope="module")
def vlm_runner(vlm_dir):
    from forvalue.indexer.model_runner import load_runner

    return load_runner(ModelConfig(path=str(vlm_dir), device="cpu"))


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """3 classes x (3 train + 1 test) images of 56x56 pixels, with captions."""
    out = tmp_path_factory.mktemp("shapes")
    train, test = generate(out, n_train=3, n_test=1, n_classes=3, size=56)
    return train, test


def _samples(path, data=IMG):
    return list(iter_samples([path], data))


def _build(tmp_path, vlm_dir, train, encode: EncodeConfig, runner=None, **kw):
    cfg = BuildConfig(model=ModelConfig(path=str(vlm_dir), device="cpu"), data=IMG, encode=encode, progress=False, **kw)
    return build_index([train], tmp_path / "store", cfg, runner=runner)


def _scores_in_order(res, samples):
    order = {sid: j for j, sid in enumerate(res.train_ids)}
    return res.scores[:, [order[s.id] for s in samples]]


def test_vlm_folder_is_detected(vlm_runner):
    from forvalue.indexer.vlm_runner import VisionLanguageRunner

    assert isinstance(vlm_runner, VisionLanguageRunner) and vlm_runner.model_kind == "vlm"
    assert vlm_runner.vocab_size == len(vlm_runner.tokenizer) and vlm_runner.hidden_size == 48


def test_fallback_inputs_equal_the_qwen2vl_processor(vlm_runner, vlm_dir, task):
    """Without torchvision the runner expands image tokens itself; the real processor gives the same ids and pixels."""
    from forvalue.indexer.vlm_inputs import VisionTextInputs

    assert vlm_runner.inputs.processor is None  # the fallback is what the runner uses here
    proc = qwen2vl_processor(vlm_dir)
    real = VisionTextInputs(proc.tokenizer, proc.image_processor, proc.chat_template, proc, vlm_runner.image_max_pixels)
    for sample in _samples(task[0])[:4]:
        a = vlm_runner.tokenize(sample, "response", 512, True)
        b = real.tokenize(sample, "response", 512, True)
        assert a.input_ids == b.input_ids and a.first_target == b.first_target
        assert set(a.vision) == set(b.vision) == {"pixel_values", "image_grid_thw"}
        for key in a.vision:
            torch.testing.assert_close(a.vision[key], b.vision[key])


def test_only_response_tokens_are_scored(vlm_runner, task):
    tok_ = vlm_runner.tokenizer
    image_id = tok_.convert_tokens_to_ids("<|image_pad|>")
    for sample in _samples(task[0]):
        t = vlm_runner.tokenize(sample, "all", 512, False)  # "all" is ignored: a VLM scores the response
        ids, first = t.input_ids, t.first_target
        n_image = int(t.vision["image_grid_thw"][0].prod()) // 4
        assert ids.count(image_id) == n_image > 0
        assert image_id not in ids[first:] and max(i for i, x in enumerate(ids) if x == image_id) < first
        assert ids[first:] == tok_(sample.response, add_special_tokens=False)["input_ids"]
        assert tok_.decode(ids[first:]) == sample.response
        assert tok_.decode(ids[:first]).endswith("<|im_start|>assistant\n")
    # the response is cut at max_length; a prompt (with its image tokens) that fills max_length scores nothing
    sample = _samples(task[0])[0]
    full = vlm_runner.tokenize(sample, "response", 512, True)
    cut = vlm_runner.tokenize(sample, "response", full.first_target + 1, True)
    assert cut.truncated and cut.n_scored == 1 and cut.input_ids == full.input_ids[: full.first_target + 1]
    none = vlm_runner.tokenize(sample, "response", full.first_target - 2, True)
    assert none.truncated and none.n_scored == 0 and none.input_ids.count(image_id) == n_image


def test_stored_targets_are_the_responses(vlm_runner, vlm_dir, task, tmp_path):
    from forvalue.storage.store import Store

    report = _build(tmp_path, vlm_dir, task[0], EncodeConfig(top_m=8), runner=vlm_runner)
    samples = {s.id: s for s in _samples(task[0])}
    assert report.written == len(samples) and report.bad_skipped == 0
    manifest = Store.open(tmp_path / "store").manifest
    assert (manifest.model_kind, manifest.score_tokens, manifest.image_column) == ("vlm", "response", "image")
    assert manifest.processor_sha256 and manifest.image_max_pixels == ModelConfig().image_max_pixels
    rows = Store.open(tmp_path / "store").scan(["id", "target_ids", "n_scored"]).__next__().to_pylist()
    for row in rows:
        expected = vlm_runner.tokenizer(samples[row["id"]].response, add_special_tokens=False)["input_ids"]
        assert row["target_ids"] == expected and row["n_scored"] == len(expected)


def test_dense_reference_equals_lm_head_gradient_inner_product(vlm_runner, task):
    """For the VLM too, the reference score is the inner product of LM-head gradients of the response log-likelihood."""
    from tools.reference import _image_inputs

    model = vlm_runner.model
    samples = _samples(task[0])[:2] + _samples(task[1])[:2]

    def grad(sample):
        t = vlm_runner.tokenize(sample, "response", 512, True)
        ids = torch.tensor([t.input_ids])
        model.zero_grad()
        logits = model(input_ids=ids, **_image_inputs(model, ids, t.vision)).logits[0, t.first_target - 1 : -1]
        logp = torch.log_softmax(logits.double(), dim=-1)
        logp.gather(1, ids[0, t.first_target :, None]).sum().backward()
        return model.lm_head.weight.grad.double().clone().ravel()

    grads = [grad(s) for s in samples]
    model.zero_grad()
    expected = np.array([[float(g_v @ g_i) for g_i in grads[:2]] for g_v in grads[2:]])
    got = dense_scores(model, vlm_runner.tokenizer, samples[:2], samples[2:], tokenize=vlm_runner.tokenize)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert np.abs(expected).max() > 1.0


def test_store_equals_dense_reference(vlm_runner, vlm_dir, task, tmp_path):
    """Padded batches of images (batch size 4, different lengths) give the one-at-a-time reference's scores."""
    train, val = _samples(task[0]), _samples(task[1])
    model, tok_ = vlm_runner.model, vlm_runner.tokenizer
    _build(
        tmp_path,
        vlm_dir,
        task[0],
        EncodeConfig(top_m=vlm_runner.vocab_size, hidden_dtype="float32"),
        runner=vlm_runner,
        batch_size=4,
    )
    res = run_query(
        tmp_path / "store", [task[1]], QueryConfig(progress=False, device="cpu"), runner=vlm_runner, keep_scores=True
    )
    ref = dense_scores(model, tok_, train, val, tokenize=vlm_runner.tokenize)
    np.testing.assert_allclose(_scores_in_order(res, train), ref, rtol=2e-4, atol=1e-4 * np.abs(ref).max())
    # top-m: equal to the reference restricted the same way, and not to the full one
    _build(tmp_path / "m4", vlm_dir, task[0], EncodeConfig(top_m=4), runner=vlm_runner, batch_size=4)
    res4 = run_query(
        tmp_path / "m4" / "store",
        [task[1]],
        QueryConfig(progress=False, device="cpu"),
        runner=vlm_runner,
        keep_scores=True,
    )
    # the default store keeps int8 hidden states (one scale per token): the reference rounds them the same way
    ref4 = dense_scores(model, tok_, train, val, top_m=4, hidden_dtype="int8", tokenize=vlm_runner.tokenize)
    np.testing.assert_allclose(_scores_in_order(res4, train), ref4, rtol=2e-4, atol=1e-4 * np.abs(ref4).max())
    assert not np.allclose(ref4, ref, rtol=1e-3)


def test_image_changes_the_score(vlm_runner, task, tmp_path):
    """The image is model input, not decoration: the same text with another image encodes differently."""
    from forvalue.indexer.encoder import encode_batch

    a = _samples(task[0])[0]
    other = _samples(task[0])[-1]  # another class's image
    b = type(a)(**{**a.__dict__, "image": other.image})
    ea, eb = (
        encode_batch(vlm_runner, [vlm_runner.tokenize(s, "response", 512, True)], EncodeConfig(top_m=8))[0]
        for s in (a, b)
    )
    assert ea.errors.target_ids.tolist() == eb.errors.target_ids.tolist()
    assert not np.allclose(ea.hidden.astype(np.float32), eb.hidden.astype(np.float32), atol=1e-3)


def test_cli_build_query_audit_with_image_column(vlm_dir, task, tmp_path):
    store = tmp_path / "store"
    r = cli(
        "index",
        "build",
        task[0],
        "--store",
        store,
        "--model",
        vlm_dir,
        "--image-column",
        "image",
        "--device",
        "cpu",
        "--top-m",
        "8",
        "--quiet",
        "--json",
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["written"] == 9
    info = cli("index", "info", "--store", store)
    assert "model_kind: vlm" in info.stdout and "image_column: image" in info.stdout
    # the query needs no image option: the store's image column is the default
    r = cli(
        "query", "--store", store, "-v", task[1], "--top-k", "9", "-o", tmp_path / "top.jsonl", "--quiet", "--exact"
    )
    assert r.exit_code == 0, r.output
    exact = [json.loads(line) for line in (tmp_path / "top.jsonl").read_text().splitlines()]
    assert len(exact) == 3 * 9 and {row["validation_id"] for row in exact} == {s.id for s in _samples(task[1])}
    # the prefilter path reranks exactly: with every row a candidate it is the exact ranking
    r = cli(
        "query",
        "--store",
        store,
        "-v",
        task[1],
        "--top-k",
        "9",
        "--candidates",
        "9",
        "-o",
        tmp_path / "pf.jsonl",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    pf = [json.loads(line) for line in (tmp_path / "pf.jsonl").read_text().splitlines()]
    assert [x["train_id"] for x in pf] == [x["train_id"] for x in exact]
    np.testing.assert_allclose([x["score"] for x in pf], [x["score"] for x in exact], rtol=1e-6)
    r = cli("audit", "run", "--store", store, "-v", task[1], "--name", "a1", "--device", "cpu", "--quiet")
    assert r.exit_code == 0 and "3 encoded now" in r.stdout, r.output
    r = cli("audit", "run", "--store", store, "-v", task[1], "--name", "a1", "--device", "cpu", "--quiet")
    assert r.exit_code == 0 and "0 encoded now" in r.stdout, r.output


def test_index_add_keeps_the_store_image_settings(vlm_dir, task, tmp_path):
    store = tmp_path / "store"
    assert (
        cli(
            "index",
            "build",
            task[0],
            "--store",
            store,
            "--model",
            vlm_dir,
            "--image-column",
            "image",
            "--image-max-pixels",
            "2500",
            "--device",
            "cpu",
            "--quiet",
        ).exit_code
        == 0
    )
    r = cli("index", "add", task[1], "--store", store, "--device", "cpu", "--quiet", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["total_rows"] == 12
    from forvalue.storage.store import Store

    assert Store.open(store).manifest.image_max_pixels == 2500


def _bad_rows(task, tmp_path):
    rows = [json.loads(line) for line in task[0].read_text().splitlines()]
    folder = task[0].parent
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    for r in rows:
        r["image"] = str(folder / r["image"])
    rows[2]["image"] = "missing/nowhere.png"  # relative to the data file's folder (tmp_path)
    rows[5]["image"] = "broken.png"
    return write_jsonl(tmp_path / "bad.jsonl", rows)


def test_missing_and_corrupt_images(vlm_dir, task, tmp_path):
    bad = _bad_rows(task, tmp_path)
    common = ("--model", vlm_dir, "--image-column", "image", "--device", "cpu", "--quiet")
    r = cli("index", "build", bad, "--store", tmp_path / "s1", *common)
    err = assert_one_line_error(r, f"{bad}:3: field 'image'", "missing/nowhere.png", "does not exist", "--on-bad skip")
    assert "Traceback" not in err
    rows = bad.read_text().splitlines()
    (tmp_path / "corrupt.jsonl").write_text("\n".join(rows[3:]) + "\n")
    r = cli("index", "build", tmp_path / "corrupt.jsonl", "--store", tmp_path / "s2", *common)
    assert_one_line_error(r, "corrupt.jsonl:3: field 'image'", "does not decode")
    r = cli("index", "build", bad, "--store", tmp_path / "s3", *common, "--on-bad", "skip", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["bad_skipped"] == 2 and report["written"] == 7 and report["total_rows"] == 7
    # a validation sample with a missing image is refused, naming its row
    val = write_jsonl(tmp_path / "val.jsonl", [json.loads(rows[2])])
    r = cli("query", "--store", tmp_path / "s3", "-v", val, "--quiet")
    assert_one_line_error(r, f"{val}:1: field 'image'", "does not exist")


def test_image_cell_errors_name_the_row(vlm_dir, tmp_path):
    from forvalue.indexer.data import iter_samples as rows_of
    from forvalue.schemas.errors import InputDataError

    path = write_jsonl(
        tmp_path / "x.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "p", "response": "r", "image": 3}]
    )
    with pytest.raises(InputDataError, match=r"x.jsonl:1: field 'image': missing column .*--image-column"):
        list(rows_of([path], IMG))
    path = write_jsonl(tmp_path / "y.jsonl", [{"prompt": "p", "response": "r", "image": 3}])
    with pytest.raises(InputDataError, match=r"y.jsonl:1: field 'image': expected an image path, bytes"):
        list(rows_of([path], IMG))


def test_text_model_refuses_image_rows(tiny_model_dir, task, tmp_path):
    r = cli(
        "index",
        "build",
        task[0],
        "--store",
        tmp_path / "s",
        "--model",
        tiny_model_dir,
        "--image-column",
        "image",
        "--device",
        "cpu",
        "--quiet",
    )
    assert_one_line_error(r, "train.jsonl:1: field 'image'", "text-only causal LM")


def test_parquet_bytes_and_datasets_dicts_equal_paths(vlm_runner, vlm_dir, task, tmp_path):
    """Image bytes in Parquet and datasets {"bytes", "path"} dicts give the same vectors as the image files."""
    rows = [json.loads(line) for line in task[0].read_text().splitlines()]
    folder = task[0].parent
    raw = [(folder / r["image"]).read_bytes() for r in rows]
    base = {k: [r[k] for r in rows] for k in ("id", "prompt", "response", "label")}
    pq.write_table(pa.table({**base, "image": pa.array(raw, pa.binary())}), tmp_path / "bytes.parquet")
    dicts = [
        {"bytes": b, "path": None} if i % 2 else {"bytes": None, "path": str(folder / r["image"])}
        for i, (b, r) in enumerate(zip(raw, rows))
    ]
    pq.write_table(pa.table({**base, "image": dicts}), tmp_path / "dicts.parquet")
    q = QueryConfig(progress=False, device="cpu")
    scores = []
    for name, path in (
        ("paths", task[0]),
        ("bytes", tmp_path / "bytes.parquet"),
        ("dicts", tmp_path / "dicts.parquet"),
    ):
        cfg = BuildConfig(data=IMG, encode=EncodeConfig(top_m=8), progress=False)
        build_index([path], tmp_path / name, cfg, runner=vlm_runner)
        res = run_query(tmp_path / name, [task[1]], q, runner=vlm_runner, keep_scores=True)
        scores.append(_scores_in_order(res, _samples(task[0])))
    np.testing.assert_array_equal(scores[1], scores[0])
    np.testing.assert_array_equal(scores[2], scores[0])


def test_query_refuses_other_image_settings(vlm_dir, vlm_runner, task, tmp_path):
    from forvalue.indexer.model_runner import load_runner
    from forvalue.schemas.errors import ManifestMismatchError

    _build(tmp_path, vlm_dir, task[0], EncodeConfig(top_m=8), runner=vlm_runner)
    other = load_runner(ModelConfig(path=str(vlm_dir), device="cpu", image_max_pixels=1000))
    with pytest.raises(ManifestMismatchError, match="image_max_pixels"):
        run_query(tmp_path / "store", [task[1]], QueryConfig(progress=False, device="cpu"), runner=other)


def test_open_image_downscales_and_cache_key_follows_image_bytes(vlm_runner, tmp_path):
    from PIL import Image

    from forvalue.engine.validation import cache_key
    from forvalue.indexer.images import open_image, parse_image_cell
    from forvalue.schemas.manifest import Manifest

    Image.new("RGB", (200, 100), (10, 20, 30)).save(tmp_path / "a.png")
    ref = parse_image_cell("a.png", tmp_path, "rows.jsonl:1", "image")
    img = open_image(ref, max_pixels=5000)
    assert img.mode == "RGB" and img.size[0] * img.size[1] <= 5000 and img.size[0] == 2 * img.size[1]
    assert open_image(ref, max_pixels=0).size == (200, 100)
    sample = next(
        iter_samples([write_jsonl(tmp_path / "v.jsonl", [{"prompt": "p", "response": "r", "image": "a.png"}])], IMG)
    )
    manifest = Manifest(**_manifest_fields())
    before = cache_key(sample, manifest)
    Image.new("RGB", (200, 100), (10, 20, 31)).save(tmp_path / "a.png")
    assert cache_key(sample, manifest) != before


def _manifest_fields() -> dict:
    return dict(
        model_path="m",
        model_weights_sha256="w",
        adapter_path=None,
        adapter_sha256=None,
        tokenizer_sha256="t",
        dtype="float32",
        hidden_size=4,
        vocab_size=8,
        top_m=2,
        score_tokens="response",
        chat_template=True,
        max_length=64,
        hidden_dtype="float16",
        lowest_likelihood_ratio=None,
        model_kind="vlm",
    )


def test_demo_images_task(tmp_path):
    from PIL import Image

    train, test = generate(tmp_path / "a", n_train=4, n_test=1, n_classes=4, size=32, noise_rate=0.25, seed=3)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert len(rows) == 16 and sum(r["flipped"] for r in rows) == 4
    for r in rows:
        assert (r["label"] != r["true_label"]) == r["flipped"]
        with Image.open(train.parent / r["image"]) as img:
            assert img.size == (32, 32)
    again, _ = generate(tmp_path / "b", n_train=4, n_test=1, n_classes=4, size=32, noise_rate=0.25, seed=3)
    assert again.read_text() == train.read_text()
    assert (tmp_path / "a" / rows[0]["image"]).read_bytes() == (tmp_path / "b" / rows[0]["image"]).read_bytes()
    assert all(not json.loads(line)["flipped"] for line in test.read_text().splitlines())
