"""The G-form (one matrix per aggregate) against the token form and the dense reference, and the audit scan."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import write_jsonl

from forvalue.api import build_index, run_query
from forvalue.audit import load_audit, run_audit
from forvalue.audit import write_audit_report as audit_report
from forvalue.engine.gform import BlockedGForm, GFormScorer, aggregate_weights, factor_weights, vocab_union
from forvalue.engine.plan import bounded_val_blocks, choose_form, plan_passes, token_block_bytes
from forvalue.engine.scan import audit_scan, read_ahead
from forvalue.engine.scorer import BlockedScorer, ExactScorer
from forvalue.engine.validation import encode_validation
from forvalue.indexer.data import iter_samples
from forvalue.schemas.config import AuditConfig, BuildConfig, DataConfig, EncodeConfig, ModelConfig, QueryConfig
from forvalue.storage.rows import decode_block
from forvalue.storage.store import Store
from tools.reference import dense_scores

LABELS = ("reverse", "math", "caps")


def _rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        label = LABELS[i % 3]
        if label == "reverse":
            rows.append(
                {
                    "id": f"r{i}",
                    "prompt": f"reverse the words {i}: the quick brown fox ->",
                    "response": " fox brown quick the",
                    "label": label,
                }
            )
        elif label == "math":
            rows.append(
                {"id": f"m{i}", "prompt": f"solve {i} plus {2 * i} ->", "response": f" answer {3 * i}", "label": label}
            )
        else:
            rows.append(
                {"id": f"c{i}", "prompt": f"shout this {i}: hello there ->", "response": " HELLO THERE", "label": label}
            )
    return rows


@pytest.fixture(scope="module", params=[("float16", 4), ("float32", 12)], ids=["float16-m4", "float32-m12"])
def setting(request, tmp_path_factory, tiny_model_dir, tiny_runner):
    """A tiny store, its validation set (labelled), the samples, and the dense restricted reference."""
    hidden_dtype, top_m = request.param
    tmp = tmp_path_factory.mktemp(f"gform-{hidden_dtype}")
    train_rows, val_rows = _rows(14), _rows(7, offset=100)
    val_rows[-1]["label"] = None  # an unlabelled validation sample counts in the mean only
    train = write_jsonl(tmp / "train.jsonl", train_rows)
    val_path = write_jsonl(tmp / "val.jsonl", val_rows)
    enc = EncodeConfig(top_m=top_m, hidden_dtype=hidden_dtype)
    cfg = BuildConfig(
        model=ModelConfig(path=str(tiny_model_dir), device="cpu"), encode=enc, progress=False, write_every=4
    )
    build_index([train], tmp / "store", cfg)
    store = Store.open(tmp / "store")
    train_samples = list(iter_samples([train], DataConfig()))
    val_samples = list(iter_samples([val_path], DataConfig()))
    val = encode_validation(tiny_runner, val_samples, store.manifest, DataConfig())
    ref = dense_scores(
        tiny_runner.model, tiny_runner.tokenizer, train_samples, val_samples, top_m=top_m, hidden_dtype=hidden_dtype
    )
    store_ids = [r["id"] for b in store.scan(["id"]) for r in b.to_pylist()]
    order = {s.id: j for j, s in enumerate(train_samples)}
    ref = ref[:, [order[i] for i in store_ids]]  # (n_val, n_train) in storage order
    return dict(tmp=tmp, store=store, val=val, val_samples=val_samples, ref=ref, store_ids=store_ids)


def _token_scores(store, val, read_rows=5):
    scorer = BlockedScorer(val, torch.device("cpu"), 16)
    return np.concatenate(
        [
            scorer.score(decode_block(b, store.manifest.hidden_size))
            for b in store.scan(
                ["hidden", "topk_ids", "topk_probs", "target_ids", "target_probs", "n_scored", "sq_norm"],
                batch_size=read_rows,
            )
        ]
    )


def _token_form_float64(store, val):
    """``S[i, v] = sum_k sum_k' <e_k, e_k'> <h_k, h_k'>`` in float64 with dense error rows, per stored row."""
    cols = ["hidden", "topk_ids", "topk_probs", "target_ids", "target_probs", "n_scored", "sq_norm"]
    block = decode_block(pa.Table.from_batches(list(store.scan(cols))), store.manifest.hidden_size)
    size = int(max(block.ids.max(), val.ids.max())) + 1

    def dense(ids, values):
        e = np.zeros((ids.shape[0], size))
        np.add.at(e, (np.repeat(np.arange(ids.shape[0]), ids.shape[1]), ids.ravel()), values.ravel().astype(np.float64))
        return e

    per_token = (block.hidden.astype(np.float64) @ val.hidden.T.astype(np.float64)) * (
        dense(block.ids, block.values) @ dense(val.ids, val.values).T
    )
    rows = np.repeat(np.arange(block.lengths.size), block.lengths)
    cols_ = np.repeat(np.arange(len(val)), val.lengths)
    out = np.zeros((block.lengths.size, len(val)))
    np.add.at(out, (rows[:, None], cols_[None, :]), per_token)
    return out


def _gform_scores(store, scorer, read_rows):
    cols = ["hidden", "topk_ids", "topk_probs", "target_ids", "target_probs", "n_scored", "sq_norm"]
    return np.concatenate(
        [scorer.score(decode_block(b, store.manifest.hidden_size)) for b in store.scan(cols, batch_size=read_rows)]
    )


def _close(got, expected, rtol):
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize("read_rows", [1, 3, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gform_equals_token_form_and_dense_reference(setting, read_rows, dtype):
    store, val, ref = setting["store"], setting["val"], setting["ref"]
    labels = [s.label for s in setting["val_samples"]]
    groups = sorted({l for l in labels if l is not None})
    weights = aggregate_weights(labels, groups)
    # any linear combination is an aggregate too: a random "group" weighting (signs included)
    rng = np.random.default_rng(0)
    weights = np.concatenate([weights, rng.standard_normal((len(val), 2))], axis=1)
    got = _gform_scores(store, GFormScorer(val, weights, "cpu", dtype), read_rows)
    token = _token_scores(store, val) @ weights  # the product's token form (float32), combined afterwards
    exact = _token_form_float64(store, val) @ weights  # Eq. 1 in float64 on the same stored entries
    expected = ref.T @ weights
    assert np.abs(expected).max() > 1e-3 and got.shape == expected.shape == (
        len(setting["store_ids"]),
        weights.shape[1],
    )
    _close(got, exact, 1e-5 if dtype == torch.float32 else 1e-10)
    _close(token, exact, 1e-5)
    _close(got, expected, 2e-4)  # the reference runs its own float64 forward pass
    _close(token, expected, 2e-4)
    # the mean column is the mean of the per-sample reference scores; a label's column its own samples' mean
    _close(got[:, 0], ref.mean(axis=0), 2e-4)
    for a, g in enumerate(groups, start=1):
        _close(got[:, a], ref[[j for j, l in enumerate(labels) if l == g]].mean(axis=0), 2e-4)


@pytest.mark.parametrize(
    "pair_form,chunk_pairs,dense_products",
    [(True, None, None), (True, 1, None), (True, 5, None), (True, None, 1), (True, 5, 1), (True, None, 6)]
    + [(True, None, 10**12), (False, None, None), ("unpacked", 5, 6)],
)
def test_pair_form_gather_form_and_pair_chunks_give_the_same_scores(
    setting, monkeypatch, pair_form, chunk_pairs, dense_products
):
    """Blocks scored by (row, sample) pairs and dense products or by the gather, the pairs cut into chunks anywhere
    (one pair per chunk, five), a table row's products in one dense product per row (every row: 1; the rows met by
    a few pairs: 6) or none of them (10**12), the entries sorted by packed keys or (keys too wide to pack) by a
    permutation: the same scores as Eq. 1 in float64."""
    import forvalue.engine.gform as gform
    import forvalue.engine.plan as plan

    store, val = setting["store"], setting["val"]
    weights = aggregate_weights([s.label for s in setting["val_samples"]], ["math", "reverse"])
    exact = _token_form_float64(store, val) @ weights
    monkeypatch.setattr(plan, "PAIR_FORM_MIN_FLOATS", 1 if pair_form else 10**12)
    if pair_form == "unpacked":
        monkeypatch.setattr(gform, "_PACKED_KEY_BITS", 0)
    if chunk_pairs is not None:
        monkeypatch.setattr(gform, "_CHUNK_FLOATS", chunk_pairs * val.hidden.shape[1])
    if dense_products is not None:
        monkeypatch.setattr(gform, "_DENSE_ROW_PRODUCTS", dense_products)
    dense, dense_rows = [], GFormScorer._dense_rows
    monkeypatch.setattr(GFormScorer, "_dense_rows", lambda self, *a: dense.append(1) or dense_rows(self, *a))
    calls = []
    pairs = GFormScorer._score_pairs
    monkeypatch.setattr(GFormScorer, "_score_pairs", lambda self, *a: calls.append(1) or pairs(self, *a))
    for read_rows in (3, 1024):
        _close(_gform_scores(store, GFormScorer(val, weights, "cpu", torch.float64), read_rows), exact, 1e-10)
        _close(_gform_scores(store, GFormScorer(val, weights, "cpu", torch.float32), read_rows), exact, 1e-5)
    assert bool(calls) == bool(pair_form)
    if dense_products in (1, 10**12):
        assert bool(dense) == (dense_products == 1)


@pytest.mark.parametrize("entries", [1, 40])
def test_build_in_chunks_of_validation_tokens_gives_the_same_table(setting, monkeypatch, entries):
    """Gbar built one validation token at a time, or a few, is the table built in one chunk."""
    import forvalue.engine.gform as gform

    val = setting["val"]
    weights = aggregate_weights([s.label for s in setting["val_samples"]], ["math", "reverse"])
    whole = GFormScorer(val, weights, "cpu", torch.float64).gbar
    monkeypatch.setattr(gform, "_BUILD_ENTRIES", entries)
    torch.testing.assert_close(GFormScorer(val, weights, "cpu", torch.float64).gbar, whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_build_with_packed_sort_keys_is_bit_for_bit_the_permutation_s(setting, monkeypatch, dtype):
    """An audit's table (one piece per sample) built from entries sorted as packed int64 keys is the table built
    from the stable sort and its permutation, bit for bit, in one chunk and in chunks of a few tokens."""
    import forvalue.engine.gform as gform

    val = setting["val"]
    weights = aggregate_weights([s.label for s in setting["val_samples"]], ["math", "reverse"])
    for entries in (None, 40):
        tables = []
        for bits in (62, 0):
            monkeypatch.setattr(gform, "_PACKED_KEY_BITS", bits)
            if entries is not None:
                monkeypatch.setattr(gform, "_BUILD_ENTRIES", entries)
            scorer = GFormScorer(val, weights, "cpu", dtype)
            tables.append((scorer.keys, scorer.table))
        (keys, table), (keys_0, table_0) = tables
        assert torch.equal(keys, keys_0) and torch.equal(table, table_0)


def test_audit_weights_factor_into_one_piece_per_label():
    """An audit's mean and per-label weights (raw or cosine) are one piece per label, combined exactly; weights that
    are not proportional within a pattern, or put no sample in two aggregates, are left as they are."""
    rng = np.random.default_rng(1)
    labels = [str(g) for g in rng.integers(0, 5, 40)]
    groups = sorted(set(labels))
    for sq_norms in (None, rng.uniform(0.5, 3.0, 40)):
        w = aggregate_weights(labels, groups, sq_norms)
        member, combine = factor_weights(w)
        assert combine is not None and member.shape == (40, len(groups)) and combine.shape == (len(groups), 1 + 5)
        assert ((member != 0).sum(axis=1) == 1).all()
        np.testing.assert_allclose(member @ combine, w, rtol=1e-14, atol=0)
    w = np.concatenate([aggregate_weights(labels, groups), rng.standard_normal((40, 1))], axis=1)
    member, combine = factor_weights(w)
    assert combine is None and np.array_equal(member, w)
    assert factor_weights(np.full((40, 1), 1 / 40))[1] is None  # the mean alone: nothing to share
    w = aggregate_weights(labels, groups)
    w[labels.index(groups[0]), 0] = 0.0  # a sample in its label's aggregate but not in the mean: its own piece
    member, combine = factor_weights(w)
    assert member.shape[1] == len(groups) + 1
    np.testing.assert_allclose(member @ combine, w, rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pieces_and_float32_bags_give_the_table_built_per_aggregate_in_float64(setting, monkeypatch, dtype):
    """The table built from one piece per label (float64, or float32 partial sums of one or all entries) is the
    table built per aggregate in float64, and scores the same."""
    import forvalue.engine.gform as gform

    store, val = setting["store"], setting["val"]
    weights = aggregate_weights([s.label for s in setting["val_samples"]], ["math", "reverse"])
    monkeypatch.setattr(gform, "factor_weights", lambda w: (w, None))
    plain = GFormScorer(val, weights, "cpu", torch.float64)
    assert plain.combine is None and plain.n_pieces == weights.shape[1]
    monkeypatch.undo()
    exact = _token_form_float64(store, val) @ weights
    for bag in (1, 10**9):
        monkeypatch.setattr(gform, "_BAG_ENTRIES", bag)
        pieces = GFormScorer(val, weights, "cpu", dtype)
        assert pieces.combine is not None and ((pieces.member != 0).sum(axis=1) == 1).all()  # each entry once
        rtol = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(
            pieces.gbar.double(), plain.gbar, rtol=rtol, atol=rtol * float(plain.gbar.abs().max())
        )
        _close(_gform_scores(store, pieces, 4), exact, 1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("budget_rows", [1, 7, 10_000])
def test_vocabulary_blocks_sum_to_the_whole(setting, budget_rows):
    store, val = setting["store"], setting["val"]
    weights = aggregate_weights([s.label for s in setting["val_samples"]], ["math", "reverse"])
    whole = GFormScorer(val, weights, "cpu")
    per_row = GFormScorer.estimate_bytes(1, weights.shape[1], val.hidden.shape[1]) // 2
    blocked = BlockedGForm(val, weights, "cpu", budget=per_row * (budget_rows + 1))
    n_vocab = vocab_union(val).size
    assert blocked.blocks == -(-n_vocab // budget_rows)
    assert blocked.scorer.vocab.numel() == n_vocab and blocked.scorer.gbar.shape[0] == n_vocab + 1
    # built block by block into one table: the same table as built whole, so the same scores
    torch.testing.assert_close(blocked.scorer.gbar, whole.gbar, rtol=1e-6, atol=1e-6 * float(whole.gbar.abs().max()))
    _close(_gform_scores(store, blocked, 4), _gform_scores(store, whole, 4), 1e-5)
    np.testing.assert_allclose(blocked.sq_frobenius(), whole.sq_frobenius(), rtol=1e-6)


@pytest.mark.parametrize("workers", [2, 3, 50])
@pytest.mark.parametrize("budget_rows", [7, 10_000])
def test_parts_built_at_once_give_the_table_built_whole_bit_for_bit(setting, monkeypatch, workers, budget_rows):
    """On a CPU each vocabulary block is built in parts of about as many validation entries on threads: the same
    keys and the same float32 table, bit for bit, as one build of the whole vocabulary, and the torch thread
    count left as found."""
    import forvalue.engine.gform as gform

    val = setting["val"]
    weights = aggregate_weights([s.label for s in setting["val_samples"]], ["math", "reverse"])
    whole = GFormScorer(val, weights, "cpu")
    per_row = GFormScorer.estimate_bytes(1, weights.shape[1], val.hidden.shape[1]) // 2
    monkeypatch.setattr(gform, "GFORM_BUILD_WORKERS", workers)
    built = []
    monkeypatch.setattr(
        GFormScorer, "_build", lambda self, v, _b=GFormScorer._build: built.append(self.vocab.numel()) or _b(self, v)
    )
    before = torch.get_num_threads()
    parts = BlockedGForm(val, weights, "cpu", budget=per_row * (budget_rows + 1))
    assert torch.get_num_threads() == before
    n_vocab = vocab_union(val).size
    assert parts.blocks == -(-n_vocab // budget_rows) and len(built) > parts.blocks and sum(built) == n_vocab
    assert torch.equal(parts.scorer.keys, whole.keys) and torch.equal(parts.scorer.table, whole.table)


def test_split_by_entries_covers_the_rows_in_balanced_parts():
    from forvalue.engine.gform import _split_by_entries

    rng = np.random.default_rng(0)
    entries = rng.integers(1, 50, 1000)
    entries[500] = 20_000  # one common token: a part of its own
    for lo, hi, parts in [(0, 1000, 2), (100, 900, 3), (0, 1000, 1), (5, 6, 2), (0, 2, 8), (400, 600, 4)]:
        got = _split_by_entries(entries, lo, hi, parts)
        assert got[0][0] == lo and got[-1][1] == hi and 1 <= len(got) <= parts
        assert all(a < b for a, b in got) and all(got[i][1] == got[i + 1][0] for i in range(len(got) - 1))
    halves = _split_by_entries(np.ones(1000, np.int64), 0, 1000, 2)
    assert halves == [(0, 500), (500, 1000)]


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt in this test, as in a terminal, even where the test run itself was started
    with SIGINT ignored (a job started in the background: ``cmd &``, as CI may)."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _ctrl_c_twice_after(event, gap: float) -> None:
    """On a thread: once ``event`` is set, SIGINT to this process, then again ``gap`` seconds later."""
    import os
    import signal
    import threading
    import time

    def ctrl_c_twice():
        event.wait(60)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(gap)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c_twice, daemon=True).start()


def test_map_on_threads_keeps_order_raises_and_lets_ctrl_c_through(ctrl_c_raises):
    """Items on threads, results in order; an item's error is raised; on Ctrl-C the running items are told to stop
    and stop at their next step (an executor would wait for whole items: seconds for a large build), and no thread
    is left running."""
    import os
    import signal
    import threading
    import time

    from forvalue.engine.plan import Stopped, map_on_threads

    assert map_on_threads(lambda x, stop: x * x, list(range(20)), 3) == [x * x for x in range(20)]
    assert map_on_threads(lambda x, stop: x, [], 2) == []

    def bad(x, stop):
        if x == 5:
            raise ValueError("item 5")
        return x

    with pytest.raises(ValueError, match="item 5"):
        map_on_threads(bad, list(range(10)), 2)
    started, steps, stopped = threading.Event(), [], []

    def slow(x, stop):  # many short steps, checking stop between them (as the G-form build does)
        started.set()
        for step in range(6000):
            if stop.is_set():
                stopped.append(x)
                raise Stopped
            steps.append(step)
            time.sleep(0.01)
        return x

    threading.Thread(target=lambda: started.wait(60) and os.kill(os.getpid(), signal.SIGINT), daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        map_on_threads(slow, [1, 2, 3], 2)
    # the running items stopped at their next step (none ran to its end, item 3 never started), none still running
    assert stopped and set(stopped) <= {1, 2} and len(steps) < 6000
    parts = [t for t in threading.enumerate() if t.name == "forvalue-part"]
    for t in parts:  # at most past their last line: a running item would take a minute
        t.join(10)
    assert not any(t.is_alive() for t in parts)


def test_map_on_threads_waits_for_a_started_item_when_ctrl_c_lands_in_thread_start(monkeypatch):
    """A Ctrl-C can land while the threads start: SIGINT masked on the calling thread goes to another thread (the
    store's reader), whose handler raises KeyboardInterrupt on the caller anyway, e.g. inside ``Thread.start`` once
    the thread runs. The item that thread took is still told to stop and waited for: no thread is left in the
    work (in torch at the interpreter's exit: the process aborts), and no hang (a counter taken down twice)."""
    import threading
    import time

    from forvalue.engine.plan import Stopped, map_on_threads

    start = threading.Thread.start

    def start_then_ctrl_c(self):
        start(self)
        if self.name == "forvalue-part":
            raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", start_then_ctrl_c)
    began, stopped = threading.Event(), []

    def item(x, stop, steps):
        began.set()
        for _ in range(steps):
            if stop.is_set():
                stopped.append(x)
                raise Stopped
            time.sleep(0.01)
        return x

    for steps in (2000, 0):  # an item still running when the caller leaves; one done before it waits
        began.clear()
        result = []
        caller = threading.Thread(target=lambda: result.append(_raised(map_on_threads, item, steps)), daemon=True)
        start(caller)
        caller.join(15)
        assert not caller.is_alive(), "map_on_threads still waiting"
        assert result == [KeyboardInterrupt]
        assert not any(t.name == "forvalue-part" and t.is_alive() for t in threading.enumerate())
        assert not began.is_set() or steps == 0 or stopped


def _raised(map_on_threads, item, steps):
    try:
        map_on_threads(lambda x, stop: item(x, stop, steps), [1, 2, 3], 2)
    except BaseException as exc:  # noqa: BLE001
        return type(exc)
    return None


def test_a_second_ctrl_c_while_the_items_stop_still_waits_for_them(ctrl_c_raises):
    """Ctrl-C twice: the second lands while the running items stop (each at its next step); the caller still
    waits for them, so no thread is left in torch when the interpreter exits ("terminate called without an active
    exception", status -6, from ``forvalue audit run`` given two quick Ctrl-Cs while the G-form builds)."""
    import threading
    import time

    from forvalue.engine.plan import Stopped, map_on_threads

    started, began, stopped = threading.Event(), [], []

    def slow_to_stop(x, stop):
        began.append(x)
        started.set()
        while not stop.is_set():
            time.sleep(0.01)
        time.sleep(0.5)  # a long last step: the second Ctrl-C comes in the middle of it
        stopped.append(x)
        raise Stopped

    _ctrl_c_twice_after(started, 0.2)
    with pytest.raises(KeyboardInterrupt):
        map_on_threads(slow_to_stop, [1, 2], 2)
        time.sleep(5)  # (not reached)
    assert began and sorted(stopped) == sorted(began)  # (an item not begun by the first Ctrl-C never begins)
    assert not any(t.name == "forvalue-part" and t.is_alive() for t in threading.enumerate())
    time.sleep(0.3)  # the second signal's handler has run by now (it was raised, or absorbed, above)


def test_map_on_threads_stops_the_other_items_on_an_error():
    """An item's error tells the running items to stop at their next step (a failed G-form part raised its error
    only once the other part had been built whole: 1.2 s instead of 0.3 s for the 1,000-sample mixed set)."""
    import threading
    import time

    from forvalue.engine.plan import Stopped, map_on_threads

    began, stopped = threading.Event(), []

    def item(x, stop):
        if x == 1:
            began.wait(30)
            raise ValueError("item 1")
        began.set()
        for _ in range(3000):
            if stop.is_set():
                stopped.append(x)
                raise Stopped
            time.sleep(0.01)
        return x

    with pytest.raises(ValueError, match="item 1"):
        map_on_threads(item, [1, 2, 3], 2)
    assert stopped == [2]


def test_a_failed_build_stops_the_store_read_and_raises_its_error(setting, monkeypatch):
    """The G-form is built while the store's first block is read: a build that fails raises its own error from the
    audit scan and leaves no reading thread behind; a read that fails raises the read's error."""
    import threading

    import forvalue.engine.scan as scan_mod

    store, val = setting["store"], setting["val"]
    labels = [s.label for s in setting["val_samples"]]
    groups = sorted({l for l in labels if l is not None})

    def broken(*a, **k):
        raise MemoryError("no room for the table")

    monkeypatch.setattr(scan_mod, "BlockedGForm", broken)
    with pytest.raises(MemoryError, match="no room"):
        audit_scan(store, val, labels, groups, "cpu", form="gform", read_rows=1)
    monkeypatch.undo()
    assert not any(t.name == "forvalue-read-ahead" and t.is_alive() for t in threading.enumerate())

    def failing_scan(self, columns, batch_size=1024):
        raise OSError("disk gone")
        yield

    monkeypatch.setattr(Store, "scan", failing_scan)
    with pytest.raises(OSError, match="disk gone"):
        audit_scan(store, val, labels, groups, "cpu", form="gform")


def test_sq_frobenius_is_the_mean_gram(setting):
    """||mean_v G_v||^2 = mean over pairs of validation samples of S(v, v') (cosine of the mean)."""
    val = setting["val"]
    scorer = GFormScorer(val, np.full((len(val), 1), 1.0 / len(val)), "cpu", torch.float64)
    gram = ExactScorer(val, torch.device("cpu")).score(decode_like(val))
    np.testing.assert_allclose(scorer.sq_frobenius()[0], gram.mean(), rtol=1e-5)


def decode_like(val):
    from forvalue.storage.rows import TrainBlock

    return TrainBlock(val.hidden, val.ids, val.values, val.lengths, val.sq_norms)


def test_read_ahead_keeps_order_raises_read_errors_and_stops_early(setting):
    import threading

    store = setting["store"]
    hidden_size = store.manifest.hidden_size
    batches = list(
        store.scan(["hidden", "topk_ids", "topk_probs", "target_ids", "target_probs", "n_scored", "sq_norm"], 2)
    )
    assert len(batches) > 2
    got = list(read_ahead(iter(batches), hidden_size, depth=1))
    assert [b for b, _ in got] == batches
    for (batch, block), want in zip(got, batches):
        np.testing.assert_array_equal(block.hidden, decode_block(want, hidden_size).hidden)

    def failing():
        yield batches[0]
        raise OSError("disk gone")

    seen = []
    with pytest.raises(OSError, match="disk gone"):
        for batch, _ in read_ahead(failing(), hidden_size):
            seen.append(batch)
    assert seen == batches[:1]
    # leaving the loop early stops the reading thread (it would otherwise block on the full queue)
    gen = read_ahead(iter(batches * 50), hidden_size, depth=1)
    next(gen)
    gen.close()
    assert not any(t.name == "forvalue-read-ahead" and t.is_alive() for t in threading.enumerate())


@pytest.mark.parametrize("normalize", ["none", "cosine"])
def test_audit_scan_forms_agree(setting, normalize):
    store, val = setting["store"], setting["val"]
    labels = [s.label for s in setting["val_samples"]]
    groups = sorted({l for l in labels if l is not None})
    kw = dict(normalize=normalize, read_rows=4)
    g = audit_scan(store, val, labels, groups, "cpu", form="gform", **kw)
    t = audit_scan(store, val, labels, groups, "cpu", form="token", **kw)
    assert g.form == "gform" and g.maximum is None and t.form == "token" and t.passes == 1
    assert g.ids == t.ids == setting["store_ids"] and g.labels == t.labels
    # token form with a budget so small that every block is one sample and every pass one block
    tiny = audit_scan(store, val, labels, groups, "cpu", form="token", budget=1, **kw)
    assert tiny.passes == len(val) > 1
    ref = setting["ref"]
    if normalize == "cosine":
        train_sq = np.array([r["sq_norm"] for b in store.scan(["sq_norm"]) for r in b.to_pylist()])
        ref = ref / np.sqrt(np.outer(val.sq_norms, train_sq))
    for scan in (g, t, tiny):
        _close(scan.mean, ref.mean(axis=0), 2e-4)
        for g_ in groups:
            _close(scan.by_label[g_], ref[[j for j, l in enumerate(labels) if l == g_]].mean(axis=0), 2e-4)
        _close(scan.mean, t.mean, 1e-5)
    np.testing.assert_allclose(tiny.maximum, ref.max(axis=0), rtol=2e-4, atol=2e-4 * np.abs(ref).max())
    np.testing.assert_array_equal(tiny.maximum, t.maximum)
    # need_max forces the token form whatever the form asked for
    assert audit_scan(store, val, labels, groups, "cpu", form="gform", need_max=True, **kw).form == "token"


def test_bounded_blocks_and_passes(setting):
    val = setting["val"]
    d = val.hidden.shape[1]
    offsets = np.concatenate([[0], np.cumsum(val.lengths)])

    def block_bytes(group):
        rows = np.concatenate([np.arange(offsets[j], offsets[j + 1]) for j in group])
        return token_block_bytes(rows.size, np.unique(val.ids[rows]).size, d)

    for budget in (1, 4 * block_bytes([0, 1]), 10**12):
        blocks = bounded_val_blocks(val, budget)
        assert np.array_equal(np.concatenate(blocks), np.arange(len(val)))  # every sample once, in order
        assert all(len(b) == 1 or block_bytes(b) <= budget // 4 for b in blocks)
        passes = plan_passes(val, blocks, budget)
        assert sorted(sum(passes, [])) == list(range(len(blocks)))
        assert all(len(p) == 1 or sum(block_bytes(blocks[b]) for b in p) <= budget for p in passes)
    assert len(bounded_val_blocks(val, 10**12)) == 1 and len(bounded_val_blocks(val, 1)) == len(val)


def test_choose_form_follows_the_cost_model(setting):
    val = setting["val"]
    one = val.subset([0])
    # more aggregates make the G-form dearer, more validation tokens make the token form dearer
    forms = [choose_form(one, a) for a in (1, 10, 100, 1000)]
    assert forms == sorted(forms, key=lambda f: f == "token") and forms[-1] == "token"
    many = val.subset(list(range(len(val))) * 40)
    assert choose_form(many, 1) == "gform"


def test_query_aggregate_mean_in_gform_equals_per_sample_mean(setting, tiny_runner):
    tmp = setting["tmp"]
    rows = _rows(7, offset=100) * 6  # 42 validation samples: the G-form is the cheaper one
    for j, r in enumerate(rows):
        r = dict(r, id=f"v{j}")
        rows[j] = r
    path = write_jsonl(tmp / "val_many.jsonl", rows)
    many = encode_validation(
        tiny_runner, list(iter_samples([path], DataConfig())), setting["store"].manifest, DataConfig()
    )
    assert choose_form(many, 1) == "gform"
    q = dict(progress=False, device="cpu", exact=True)
    per_sample = run_query(tmp / "store", [path], QueryConfig(**q), runner=tiny_runner, keep_scores=True)
    for normalize in ("none", "cosine"):
        mean = run_query(
            tmp / "store",
            [path],
            QueryConfig(aggregate="mean", normalize=normalize, **q),
            runner=tiny_runner,
            keep_scores=True,
        )
        expected = per_sample.scores.mean(axis=0)
        if normalize == "cosine":
            gram = ExactScorer(many, torch.device("cpu")).score(decode_like(many)).mean()
            train_sq = np.array([r["sq_norm"] for b in setting["store"].scan(["sq_norm"]) for r in b.to_pylist()])
            expected = expected / np.sqrt(gram * train_sq)
        _close(mean.scores[0], expected, 1e-5)


def test_audit_records_size_and_time_split(setting, tiny_runner):
    tmp = setting["tmp"]
    s = run_audit(
        tmp / "store",
        [tmp / "val.jsonl"],
        "split",
        AuditConfig(progress=False, device="cpu", flag_by="label"),
        runner=tiny_runner,
    )
    assert s.n_validation == len(setting["val"]) and s.form in ("gform", "token")
    assert s.encode_seconds > 0 and s.scan_seconds > 0 and s.write_seconds > 0
    assert abs(s.encode_seconds + s.scan_seconds + s.write_seconds - s.seconds) < 1e-6
    table, meta = load_audit(tmp / "store", "split")
    assert meta["scan_form"] == s.form and set(meta["seconds"]) == {"encode", "scan", "rank_flag"}
    assert meta["score_max_computed"] == (s.form == "token")
    assert (table.column("score_max").null_count == 0) == meta["score_max_computed"]
    page = audit_report(tmp / "store", "split", tmp / "r.html").read_text()
    assert f"Validation set: {len(setting['val'])} samples" in page and f"scan {meta['seconds']['scan']:.2f} s" in page


@pytest.mark.parametrize("normalize", ["none", "cosine"])
def test_pair_way_blocks_in_parallel_equal_one_at_a_time(setting, monkeypatch, normalize):
    """The pair way scores GFORM_BLOCK_WORKERS stored blocks at once on a CPU: the same numbers, in storage order, as
    one block at a time (and as the dense reference), the torch thread count restored."""
    import forvalue.engine.plan as plan
    import forvalue.engine.scan as scan_mod

    store, val = setting["store"], setting["val"]
    labels = [s.label for s in setting["val_samples"]]
    groups = sorted({l for l in labels if l is not None})
    monkeypatch.setattr(plan, "PAIR_FORM_MIN_FLOATS", 1)
    got = {}
    for workers in (1, 3):
        monkeypatch.setattr(scan_mod, "GFORM_BLOCK_WORKERS", workers)
        before = torch.get_num_threads()
        got[workers] = audit_scan(store, val, labels, groups, "cpu", form="gform", normalize=normalize, read_rows=2)
        assert torch.get_num_threads() == before
    one, many = got[1], got[3]
    assert one.ids == many.ids == setting["store_ids"] and one.labels == many.labels
    np.testing.assert_array_equal(one.mean, many.mean)
    for g_ in groups:
        np.testing.assert_array_equal(one.by_label[g_], many.by_label[g_])
    ref = setting["ref"]
    if normalize == "cosine":
        train_sq = np.array([r["sq_norm"] for b in store.scan(["sq_norm"]) for r in b.to_pylist()])
        ref = ref / np.sqrt(np.outer(val.sq_norms, train_sq))
    _close(many.mean, ref.mean(axis=0), 2e-4)


def test_a_second_ctrl_c_while_stored_blocks_are_scored_waits_for_them(setting, monkeypatch, ctrl_c_raises):
    """Ctrl-C twice while the pair way scores stored blocks on threads: the audit scan raises KeyboardInterrupt
    once the blocks being scored are done, none left in torch ("terminate called without an active exception",
    status -6, from ``forvalue audit run`` given two quick Ctrl-Cs while it scored the store)."""
    import threading
    import time

    import forvalue.engine.plan as plan
    import forvalue.engine.scan as scan_mod

    store, val = setting["store"], setting["val"]
    labels = [s.label for s in setting["val_samples"]]
    groups = sorted({l for l in labels if l is not None})
    monkeypatch.setattr(plan, "PAIR_FORM_MIN_FLOATS", 1)
    monkeypatch.setattr(scan_mod, "GFORM_BLOCK_WORKERS", 2)
    scoring, calls = threading.Event(), {"begun": 0, "ended": 0}
    score = GFormScorer.score

    def slow_score(self, block):
        calls["begun"] += 1
        scoring.set()
        time.sleep(0.5)
        out = score(self, block)
        calls["ended"] += 1
        return out

    monkeypatch.setattr(GFormScorer, "score", slow_score)

    _ctrl_c_twice_after(scoring, 0.15)
    with pytest.raises(KeyboardInterrupt):
        audit_scan(store, val, labels, groups, "cpu", form="gform", read_rows=1)
    assert calls["begun"] and calls["ended"] == calls["begun"]
    time.sleep(0.3)  # (the second signal has been raised, or absorbed, above)


def test_gform_runs_on_one_torch_thread_and_restores_the_setting(setting, monkeypatch):
    """The build and the pair way run on one torch thread (thousands of small operations) and leave the
    process's thread count as they found it."""
    import forvalue.engine.plan as plan

    store, val = setting["store"], setting["val"]
    weights = aggregate_weights([s.label for s in setting["val_samples"]], ["math", "reverse"])
    monkeypatch.setattr(plan, "PAIR_FORM_MIN_FLOATS", 1)
    seen = []
    build, pairs = GFormScorer._build, GFormScorer._score_pairs
    monkeypatch.setattr(GFormScorer, "_build", lambda self, *a: seen.append(torch.get_num_threads()) or build(self, *a))
    monkeypatch.setattr(
        GFormScorer, "_score_pairs", lambda self, *a: seen.append(torch.get_num_threads()) or pairs(self, *a)
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        scorer = GFormScorer(val, weights, "cpu")
        _gform_scores(store, scorer, 1024)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert len(seen) >= 2 and set(seen) == {1}


def test_a_ctrl_c_while_the_reader_thread_is_awaited_does_not_cut_the_wait(ctrl_c_raises):
    """read_ahead's ``finally`` joins its reader thread; a second Ctrl-C there (the user pressing again while the
    first one unwinds) raised out of the generator's cleanup: 'Exception ignored in: <generator object read_ahead>'
    and a traceback. The wait now waits them out (at most its timeout) and returns once the thread ended."""
    import threading
    import time

    from forvalue.engine.plan import wait_through_ctrl_c

    started, done, ended = threading.Event(), threading.Condition(), []

    def slow():
        time.sleep(0.2)  # the caller is waiting by now
        started.set()
        time.sleep(0.6)
        with done:
            ended.append(True)
            done.notify_all()

    thread = threading.Thread(target=slow, daemon=True)
    thread.start()
    _ctrl_c_twice_after(started, 0.2)
    t0 = time.monotonic()
    assert wait_through_ctrl_c(done, lambda: bool(ended), timeout=5.0)  # two Ctrl-Cs land meanwhile
    assert time.monotonic() - t0 >= 0.7  # (it did not return at the first Ctrl-C)
    thread.join()
