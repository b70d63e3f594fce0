"""Every fast path against the slow references: dense Eq. 1 and autograd LM-head gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_jsonl

from forvalue.api import build_index, run_query
from forvalue.indexer.data import iter_samples
from forvalue.schemas.config import BuildConfig, DataConfig, EncodeConfig, ModelConfig, QueryConfig
from tools.reference import dense_matrices, dense_scores, dense_self_scores


def _build_and_score(tmp_path, model_dir, rows, val_rows, encode: EncodeConfig, **query_kwargs):
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", val_rows)
    cfg = BuildConfig(
        model=ModelConfig(path=str(model_dir), device="cpu"), encode=encode, progress=False, write_every=5
    )
    build_index([train], tmp_path / "store", cfg)
    qcfg = QueryConfig(progress=False, device="cpu", **query_kwargs)
    res = run_query(tmp_path / "store", [val], qcfg, keep_scores=True)
    order = {sid: j for j, sid in enumerate(res.train_ids)}
    ids = [r["id"] for r in rows]
    return (
        res,
        res.scores[:, [order[i] for i in ids]],
        list(iter_samples([train], DataConfig())),
        list(iter_samples([val], DataConfig())),
    )


def test_reference_h_is_lm_head_input(tiny_runner, toy_rows, tmp_path):
    """The reference's hidden state is the input of the LM head (after the final norm)."""
    sample = next(iter_samples([write_jsonl(tmp_path / "a.jsonl", toy_rows[:1])], DataConfig()))
    h, e = dense_matrices(tiny_runner.model, tiny_runner.tokenizer, sample)
    logits = tiny_runner.logits(torch.from_numpy(h).float()).double()
    probs = torch.softmax(logits, dim=1).numpy()
    assert np.allclose(-probs[e < 0], e[e < 0], atol=1e-5)


def test_dense_reference_equals_lm_head_gradient_inner_product(tiny_runner, toy_rows, tmp_path):
    model, tok = tiny_runner.model, tiny_runner.tokenizer
    assert not model.config.tie_word_embeddings
    samples = list(iter_samples([write_jsonl(tmp_path / "a.jsonl", toy_rows[:5])], DataConfig()))

    def grad(sample):
        from forvalue.indexer.tokenize import tokenize_sample

        t = tokenize_sample(tok, sample, "all", 512, False)
        ids = torch.tensor([t.input_ids])
        model.zero_grad()
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
        logp.gather(1, ids[0, 1:, None]).sum().backward()
        return model.lm_head.weight.grad.double().clone().ravel()

    grads = [grad(s) for s in samples]
    model.zero_grad()
    expected = np.array([[float(g_v @ g_i) for g_i in grads[2:]] for g_v in grads[:2]])
    got = dense_scores(model, tok, samples[2:], samples[:2])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert np.abs(expected).max() > 1.0  # a non-trivial oracle


def test_store_with_full_vocab_equals_dense(tiny_runner, tiny_model_dir, toy_rows, tmp_path):
    vocab = tiny_runner.vocab_size
    res, scores, train, val = _build_and_score(
        tmp_path, tiny_model_dir, toy_rows, toy_rows[:3], EncodeConfig(top_m=vocab, hidden_dtype="float32")
    )
    ref = dense_scores(tiny_runner.model, tiny_runner.tokenizer, train, val)
    np.testing.assert_allclose(scores, ref, rtol=2e-4, atol=1e-3 * np.abs(ref).max())


@pytest.mark.parametrize("score_tokens", ["all", "response"])
def test_store_top_m_equals_restricted_reference(tiny_runner, tiny_model_dir, toy_rows, tmp_path, score_tokens):
    enc = EncodeConfig(top_m=4, score_tokens=score_tokens, hidden_dtype="float16")
    res, scores, train, val = _build_and_score(tmp_path, tiny_model_dir, toy_rows, toy_rows[3:6], enc)
    model, tok = tiny_runner.model, tiny_runner.tokenizer
    ref = dense_scores(model, tok, train, val, top_m=4, hidden_dtype="float16", score_tokens=score_tokens)
    np.testing.assert_allclose(scores, ref, rtol=2e-4, atol=1e-4 * np.abs(ref).max())
    full = dense_scores(model, tok, train, val, score_tokens=score_tokens)
    assert not np.allclose(scores, full, rtol=1e-3), "top-4 should differ from the full-vocabulary score"


def test_cosine_mean_and_blocking(tiny_runner, tiny_model_dir, toy_rows, tmp_path):
    enc = EncodeConfig(top_m=8)  # the default store: int8 hidden states, one scale per token
    assert (enc.hidden_dtype, enc.int8_block) == ("int8", 0)
    _, raw, train, val = _build_and_score(tmp_path, tiny_model_dir, toy_rows, toy_rows[:4], enc, read_rows=1000)
    store = tmp_path / "store"
    q = dict(progress=False, device="cpu")
    # small blocks on both sides give the same scores
    blocked = run_query(
        store, [tmp_path / "val.jsonl"], QueryConfig(read_rows=3, val_block_tokens=10, **q), keep_scores=True
    )
    one = run_query(store, [tmp_path / "val.jsonl"], QueryConfig(**q), keep_scores=True)
    np.testing.assert_allclose(blocked.scores, one.scores, rtol=1e-5)
    # cosine: sq_norm equals the self score of the restricted reference
    # the stored side as stored (int8 values on both sides of its self score), the validation side as encoded
    train_sq = dense_self_scores(tiny_runner.model, tiny_runner.tokenizer, train, top_m=8, hidden_dtype="int8")
    ref_val = dense_scores(tiny_runner.model, tiny_runner.tokenizer, val, val, top_m=8, hidden_dtype="float16")
    cos = run_query(store, [tmp_path / "val.jsonl"], QueryConfig(normalize="cosine", **q), keep_scores=True)
    expected = one.scores / np.sqrt(np.outer(np.diag(ref_val), _in_store_order(train_sq, train, one.train_ids)))
    np.testing.assert_allclose(cos.scores, expected, rtol=1e-4)
    assert np.abs(cos.scores).max() <= 1.0 + 1e-6
    # aggregate mean = mean over validation samples; cosine mean divides by ||mean G_v||
    mean = run_query(store, [tmp_path / "val.jsonl"], QueryConfig(aggregate="mean", **q), keep_scores=True)
    np.testing.assert_allclose(mean.scores[0], one.scores.mean(axis=0), rtol=1e-6)
    assert mean.top.column("validation_id").to_pylist()[0] == "mean"
    mcos = run_query(
        store, [tmp_path / "val.jsonl"], QueryConfig(aggregate="mean", normalize="cosine", **q), keep_scores=True
    )
    norm_mean = np.sqrt(ref_val.mean())
    train_norms = np.sqrt(_in_store_order(train_sq, train, one.train_ids))
    np.testing.assert_allclose(mcos.scores[0], one.scores.mean(axis=0) / (norm_mean * train_norms), rtol=1e-4)


def _in_store_order(values, samples, store_ids):
    by_id = {s.id: v for s, v in zip(samples, values)}
    return np.array([by_id[i] for i in store_ids])


def test_top_k_is_the_top_of_all_scores(tiny_model_dir, toy_rows, tmp_path):
    res, scores, _, _ = _build_and_score(
        tmp_path, tiny_model_dir, toy_rows, toy_rows[:2], EncodeConfig(top_m=8), top_k=4
    )
    ids = [r["id"] for r in toy_rows]
    for j in range(2):
        rows = [r for r in res.top.to_pylist() if r["validation_id"] == toy_rows[j]["id"]]
        assert [r["rank"] for r in rows] == [1, 2, 3, 4]
        expected = [ids[i] for i in np.argsort(-scores[j], kind="stable")[:4]]
        assert [r["train_id"] for r in rows] == expected
        np.testing.assert_allclose([r["score"] for r in rows], np.sort(scores[j])[::-1][:4], rtol=1e-9)


def test_lowest_likelihood_ratio_keeps_hardest_positions(tiny_runner, toy_rows, tmp_path):
    from forvalue.indexer.encoder import encode_batch
    from forvalue.indexer.tokenize import tokenize_sample

    sample = next(iter_samples([write_jsonl(tmp_path / "a.jsonl", toy_rows[:1])], DataConfig()))
    tok = tokenize_sample(tiny_runner.tokenizer, sample, "all", 512, False)
    full = encode_batch(tiny_runner, [tok], EncodeConfig(top_m=4))[0]
    cut = encode_batch(tiny_runner, [tok], EncodeConfig(top_m=4, lowest_likelihood_ratio=0.3))[0]
    n = len(full.hidden)
    assert len(cut.hidden) == int(np.ceil(0.3 * n))
    expected = np.sort(np.argsort(full.errors.target_probs, kind="stable")[: len(cut.hidden)])
    np.testing.assert_array_equal(cut.errors.target_ids, full.errors.target_ids[expected])
    np.testing.assert_array_equal(cut.hidden, full.hidden[expected])


def test_read_only_blocks_are_scored_without_torch_s_not_writable_warning():
    """A float32 store's hidden states are Arrow's memory (read-only, zero-copy): torch warned "The given NumPy
    array is not writable" on every such query (hostile pass). The tensor is made without the warning and the
    array stays untouched."""
    import warnings

    import numpy as np

    from forvalue.engine.scorer import read_only_tensor

    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    array.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        tensor = read_only_tensor(array)
    assert tensor.tolist() == array.tolist() and not array.flags.writeable


def test_exact_scorer_maps_every_kind_of_stored_id_like_the_definition():
    """The exact scorer's id -> validation-row look-up (a table over 0 .. max + 1, made per call) gives Eq. 1 in
    float64 for stored ids in the validation vocabulary, between its ids, above its largest, negative (an int32
    store), for a validation set whose largest id is 0, and for one holding an id far beyond any vocabulary (then
    a binary search, no table of that size); the G-form's mean, through its own look-up, agrees; negative
    validation ids are refused. Every row's score is the sum over token pairs of <h_k, h_l> <e_k, e_l>."""
    from forvalue.engine.scorer import ExactScorer
    from forvalue.engine.validation import ValidationSet
    from forvalue.indexer.data import Sample
    from forvalue.storage.rows import TrainBlock

    rng = np.random.default_rng(3)
    d, m1 = 8, 4

    def reference(v_ids, v_vals, v_hidden, v_len, block):
        out = np.zeros((block.lengths.size, v_len.size))
        tok = np.repeat(np.arange(block.lengths.size), block.lengths)
        vtok = np.repeat(np.arange(v_len.size), v_len)
        for k in range(block.ids.shape[0]):
            for v in range(v_ids.shape[0]):
                e = sum(
                    float(a) * float(b)
                    for i, a in zip(block.ids[k], block.values[k])
                    for j, b in zip(v_ids[v], v_vals[v])
                    if i == j
                )
                out[tok[k], vtok[v]] += e * float(block.hidden[k].astype(np.float64) @ v_hidden[v])
        return out

    far = rng.choice([3, 7, 20, 10**12], size=(5, m1))  # an id far beyond any vocabulary: a search, not a table
    for v_ids in (rng.choice([3, 7, 20, 21], size=(5, m1)), np.zeros((5, m1), np.int64), far):
        v_vals = rng.normal(size=v_ids.shape).astype(np.float32)
        v_hidden = rng.normal(size=(5, d)).astype(np.float32)
        v_len = np.array([2, 3])
        samples = [Sample(id=f"v{j}", prompt=None, response=None, text="x", label=None, source="t") for j in range(2)]
        val = ValidationSet(samples, v_hidden, v_ids.astype(np.int64), v_vals, v_len, np.ones(2))
        ids = rng.choice([-1, 0, 3, 5, 7, 20, 21, 22, 1000, 10**12], size=(9, m1)).astype(np.int64)
        block = TrainBlock(
            rng.normal(size=(9, d)).astype(np.float32),
            ids,
            rng.normal(size=ids.shape).astype(np.float32),
            np.array([4, 0, 5]),
            np.ones(3),
        )
        got = ExactScorer(val, "cpu").score(block)
        np.testing.assert_allclose(got, reference(v_ids, v_vals, v_hidden, v_len, block), rtol=1e-5, atol=1e-5)
        # the G-form's mean, through its own id look-up, is the mean of those scores (a stored id of -1 meets
        # nothing there either)
        from forvalue.engine.gform import GFormScorer

        mean = GFormScorer(val, np.full((2, 1), 0.5), "cpu", torch.float64).score(block)[:, 0]
        np.testing.assert_allclose(mean, got.mean(axis=1), rtol=1e-5, atol=1e-5)  # (the exact scorer: float32)
    # negative validation ids (index -1 of a look-up table is where ids above its largest land) are refused
    from forvalue.schemas.errors import ForValueError

    with pytest.raises(ForValueError, match="must be vocabulary ids"):
        ValidationSet(samples, v_hidden, -np.ones((5, m1), np.int64), v_vals, v_len, np.ones(2))
