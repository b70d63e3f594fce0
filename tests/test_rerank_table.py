"""The prefilter's second stage (forvalue.storage.rerank_rows, forvalue.storage.rerank_table): its entries and scores
against a dense ``G U`` computed directly, its growth by segments against one build, and its files' crash and
damage rules (prefilter.json is the commit point)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import build_sketched, word_rows, write_jsonl

from forvalue.schemas.config import QueryConfig
from forvalue.schemas.errors import StoreError
from forvalue.schemas.tables import SCORING_COLUMNS
from forvalue.storage import faiss_index, rerank_table
from forvalue.storage.rerank_rows import COLS, bag_scores, entry_dtype, row_entries, validation_table
from forvalue.storage.rows import decode_block
from forvalue.storage.store import Store


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, tiny_model_dir, tiny_runner):
    tmp = tmp_path_factory.mktemp("rerank")
    write_jsonl(tmp / "train.jsonl", word_rows(90))
    return build_sketched(tmp / "train.jsonl", tmp / "store", tiny_model_dir, tiny_runner, write_every=30)


def _dense_gu(hidden, ids, values, lengths, basis, vocab) -> np.ndarray:
    """``G_r U`` of each row, dense ``(rows, vocab, COLS)``, from ``G_r = sum_k e_k h_k^T`` written out."""
    out = np.zeros((lengths.size, vocab, COLS))
    ends = np.cumsum(lengths)
    for r, (a, b) in enumerate(zip(ends - lengths, ends)):
        errors = np.zeros((b - a, vocab))
        np.add.at(errors, (np.repeat(np.arange(b - a), ids.shape[1]), ids[a:b].ravel()), values[a:b].ravel())
        g = errors.T @ hidden[a:b].astype(np.float64)  # (vocab, d)
        out[r] = g @ basis.astype(np.float64)
    return out


def _block(store: Store, rows) -> object:
    return decode_block(store.take(list(rows), SCORING_COLUMNS), store.manifest.stored_width)


def test_entries_and_scores_equal_dense_g_u(store_path):
    store = Store.open(store_path)
    vocab = store.manifest.vocab_size
    block = _block(store, range(12))
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((block.hidden.shape[1], COLS)))[0].astype(np.float32)
    counts, ids, values = row_entries(block.hidden, block.ids, block.values, block.lengths, basis, vocab)
    dense = _dense_gu(block.hidden, block.ids, block.values, block.lengths, basis, vocab)
    got = np.zeros_like(dense)
    got[np.repeat(np.arange(counts.size), counts), ids] = values
    np.testing.assert_allclose(got, dense, rtol=1e-4, atol=1e-4 * np.abs(dense).max())
    for r, (a, b) in enumerate(zip(np.cumsum(counts) - counts, np.cumsum(counts))):  # each row's support, sorted
        support = np.unique(block.ids[np.sum(block.lengths[:r]) : np.sum(block.lengths[: r + 1])])
        assert ids[a:b].tolist() == support.tolist()
    # the validation side and the bag scores: s2 = <G_v U, G_i U>
    val = _block(store, [40])
    table = validation_table(val.hidden, val.ids, val.values, basis, vocab)
    np.testing.assert_allclose(table, _dense_gu(val.hidden, val.ids, val.values, val.lengths, basis, vocab)[0], 1e-4)
    expect = np.einsum("rvc,vc->r", dense, table.astype(np.float64))
    np.testing.assert_allclose(bag_scores(ids.astype(np.int64), values, counts, table), expect, rtol=1e-4)


def test_the_basis_is_the_sketch_s_when_it_has_two_columns_else_fitted(store_path):
    """A fitted sketch basis of c >= 2 columns is the second stage's (the stage is that sketch without its
    collisions); a sketch of one hidden direction (2048 x 1) gets 2 directions fitted from the first block."""
    import dataclasses
    import types

    from forvalue.storage.sketch_basis import fit_basis, load_basis

    store = Store.open(store_path)
    hidden = _block(store, range(16)).hidden
    assert np.array_equal(rerank_table._basis(store, hidden), load_basis(store_path))
    one = types.SimpleNamespace(manifest=dataclasses.replace(store.manifest, sketch_hidden_cols=1), path=store.path)
    np.testing.assert_array_equal(rerank_table._basis(one, hidden), fit_basis(hidden, COLS))
    narrow = types.SimpleNamespace(manifest=dataclasses.replace(store.manifest, hidden_rank=1), path=store.path)
    assert narrow.manifest.stored_width == 1 and rerank_table._basis(narrow, hidden[:, :1]) is None


def test_built_by_segments_equals_one_build_and_merges(store_path, tmp_path, monkeypatch):
    store = Store.open(store_path)
    n = store.count()
    (tmp_path / "whole").mkdir()
    whole = rerank_table.extend(store, tmp_path / "whole", None, n, block_rows=16)
    monkeypatch.setattr(rerank_table, "MAX_SEGMENTS", 3)
    folder = tmp_path / "parts"
    folder.mkdir()
    record, bounds = None, [20, 33, 34, 60, n]  # the first part holds the first block: the same basis
    for rows in bounds:
        record = rerank_table.extend(store, folder, record, rows, block_rows=16)
        assert record["rows"] == rows and rerank_table.sound(record)
    assert len(record["segments"]) <= 3  # merged past MAX_SEGMENTS
    vocab = store.manifest.vocab_size
    a, b = rerank_table.load(tmp_path / "whole", whole, vocab), rerank_table.load(folder, record, vocab)
    assert a.rows == b.rows == n and np.array_equal(a.basis, b.basis)
    rows = np.random.default_rng(1).permutation(n)
    for r in rows[:30]:
        for got, want in zip(_entries(b, r), _entries(a, r)):
            np.testing.assert_array_equal(got, want)  # bit for bit
    table = np.random.default_rng(2).standard_normal((store.manifest.vocab_size, a.basis.shape[1])).astype(np.float32)
    np.testing.assert_array_equal(b.score(rows, table), a.score(rows, table))


def _entries(table, row: int):
    """``(ids, values)`` of one row, from whichever segment holds it."""
    seg = next(s for s in table.segments if s.first <= row < s.first + s.rows)
    ids, values, _ = seg.gather(np.array([row - seg.first]))
    return ids, values


def test_values_past_float16_make_a_float32_segment(store_path, tmp_path, monkeypatch):
    """A value float16 cannot hold (hidden states far larger than usual) makes its segment float32, rows written
    before it included: nothing rounds to infinity."""
    store = Store.open(store_path)
    n = store.count()
    import forvalue.storage.rerank_table as rt

    real = rt.row_entries
    calls = []

    def scaled(*args):
        counts, ids, values = real(*args)
        calls.append(1)
        return counts, ids, values * (1e6 if len(calls) == 2 else 1.0)  # the second block only

    monkeypatch.setattr(rt, "row_entries", scaled)
    (tmp_path / "f").mkdir()
    record = rt.extend(store, tmp_path / "f", None, n, block_rows=16)
    assert [s["dtype"] for s in record["segments"]] == ["float32"]
    table = rt.load(tmp_path / "f", record, store.manifest.vocab_size)
    cols = record["cols"]
    assert table.segments[0].entries.dtype == entry_dtype(cols, wide=True)
    assert np.isfinite(table.segments[0].entries["v"]).all()
    monkeypatch.setattr(rt, "row_entries", real)
    (tmp_path / "g").mkdir()
    plain = rt.load(tmp_path / "g", rt.extend(store, tmp_path / "g", None, n, block_rows=16), store.manifest.vocab_size)
    assert plain.segments[0].entries.dtype == entry_dtype(cols)
    # rows of the first block: the same values, widened
    ids_f, vals_f, _ = table.segments[0].gather(np.arange(16))
    ids_p, vals_p, _ = plain.segments[0].gather(np.arange(16))
    assert np.array_equal(ids_f, ids_p) and np.array_equal(vals_f, vals_p)


def test_index_carries_its_second_stage_and_a_kill_before_the_commit_keeps_the_old_one(store_path, tmp_path):
    import shutil

    path = tmp_path / "store"
    shutil.copytree(store_path, path)
    store = Store.open(path)
    pre = faiss_index.ensure(store)
    assert pre.rerank is not None and pre.rerank.rows == pre.rows == store.count()
    # the store's fitted sketch basis (4 columns here): the second stage is that sketch without its collisions
    from forvalue.storage.sketch_basis import load_basis

    assert store.manifest.sketch_hidden_cols == 4 and np.array_equal(pre.rerank.basis, load_basis(path))
    folder = path / faiss_index.INDEX_DIR
    meta = json.loads((folder / faiss_index.META_FILE).read_text())
    assert rerank_table.files(meta["rerank"]) == {p.name for p in folder.glob("rerank-*")}
    # files written, the commit (prefilter.json) not: the old record still loads, the new files are orphans
    pre.rerank, pre.meta = None, dict(pre.meta, rerank=None)
    faiss_index.extend_rerank(store, pre)
    assert len(list(folder.glob("rerank-*"))) > len(rerank_table.files(meta["rerank"]))
    again = faiss_index.load(store)
    assert again.rerank is not None and again.meta["rerank"] == meta["rerank"]
    faiss_index.save(store, pre, index_changed=False)  # the next commit removes what its record does not name
    meta2 = json.loads((folder / faiss_index.META_FILE).read_text())
    assert rerank_table.files(meta2["rerank"]) == {p.name for p in folder.glob("rerank-*")}
    assert meta2["file"] == meta["file"]  # the FAISS file was kept, not written again


@pytest.mark.parametrize("damage", ["truncate", "remove", "record"])
def test_damaged_second_stage_is_reported_and_rebuilt(store_path, tmp_path, damage):
    import shutil

    from forvalue.maintenance import check_store

    path = tmp_path / "store"
    shutil.copytree(store_path, path)
    store = Store.open(path)
    pre = faiss_index.ensure(store)
    folder = path / faiss_index.INDEX_DIR
    seg = pre.meta["rerank"]["segments"][0]
    if damage == "truncate":
        with open(folder / seg["entries"], "r+b") as f:
            f.truncate(seg["entries_bytes"] - 8)
    elif damage == "remove":
        (folder / seg["offsets"]).unlink()
    else:
        meta = json.loads((folder / faiss_index.META_FILE).read_text())
        meta["rerank"]["segments"][0]["rows"] = -1
        (folder / faiss_index.META_FILE).write_text(json.dumps(meta))
    assert faiss_index.load(store).rerank is None  # never scored from damaged files
    report = check_store(path)
    assert any("second stage" in p for p in report.problems), report.problems
    repaired = check_store(path, repair=True)
    assert repaired.repaired["prefilter_rebuilt"] and not check_store(path).problems
    fresh = faiss_index.load(Store.open(path))
    assert fresh.rerank is not None and fresh.rerank.rows == store.count()


def test_query_through_the_second_stage_returns_exact_scores(store_path, tiny_runner, tmp_path):
    """Scores returned through the second stage are the exact scan's; its candidates are those it ranks best."""
    from conftest import exact_scores, word_val

    from forvalue.api import run_query

    write_jsonl(tmp_path / "val.jsonl", word_val())
    scores, train_ids = exact_scores(store_path, tmp_path / "val.jsonl", tiny_runner)
    column = {t: j for j, t in enumerate(train_ids)}
    cfg = QueryConfig(top_k=5, progress=False, candidates=10, max_candidates=10)
    staged = run_query(store_path, [tmp_path / "val.jsonl"], cfg, runner=tiny_runner)
    assert staged.prefiltered and staged.candidates == [10] * len(word_val())
    for r in staged.top.to_pylist():
        i = int(r["validation_id"][1:])
        assert r["score"] == pytest.approx(scores[i, column[r["train_id"]]], rel=1e-6)


def test_a_writer_killed_while_writing_the_second_stage_leaves_the_index_usable_and_its_files_go(store_path, tmp_path):
    """A process killed (os._exit, no cleanup) while writing the second stage's entries: the committed record is
    untouched (here: none yet), the next ensure writes it whole and removes the dead writer's temporary file."""
    import shutil
    import subprocess
    import sys

    path = tmp_path / "store"
    shutil.copytree(store_path, path)
    folder = path / faiss_index.INDEX_DIR
    before = json.loads((folder / faiss_index.META_FILE).read_text())
    before.pop("rerank", None)
    (folder / faiss_index.META_FILE).write_text(json.dumps(before))  # an index of before: no second stage
    code = (
        "import os, forvalue.storage.rerank_table as rt\n"
        "from forvalue.storage import faiss_index\nfrom forvalue.storage.store import Store\n"
        "real, calls = rt.row_entries, []\n"
        "def dying(*a):\n    calls.append(1)\n    if len(calls) == 2: os._exit(9)\n    return real(*a)\n"
        "rt.row_entries = dying\nrt.BLOCK_ROWS = 16\n"
        f"faiss_index.ensure(Store.open({str(path)!r}))\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert list(folder.glob(".rerank-*.tmp")) and json.loads((folder / faiss_index.META_FILE).read_text()) == before
    assert faiss_index.load(Store.open(path)).rerank is None
    pre = faiss_index.ensure(Store.open(path))
    assert pre.rerank is not None and pre.rerank.rows == Store.open(path).count()
    assert not list(folder.glob(".rerank-*")), list(folder.iterdir())
    assert rerank_table.files(pre.meta["rerank"]) == {p.name for p in folder.glob("rerank-*")}


def test_two_writers_of_the_stage_leave_one_named_and_check_repair_removes_the_other(store_path, tmp_path):
    """Two processes that both write the second stage (two queries on an index without one): the last commit
    names its files; the other's stay while it runs, are a note of 'index check' after it ended, and go with
    '--repair' (or the next commit)."""
    import shutil
    import subprocess
    import sys

    from forvalue.maintenance import check_store

    path = tmp_path / "store"
    shutil.copytree(store_path, path)
    folder = path / faiss_index.INDEX_DIR
    meta = json.loads((folder / faiss_index.META_FILE).read_text())
    meta.pop("rerank", None)
    (folder / faiss_index.META_FILE).write_text(json.dumps(meta))
    for f in folder.glob("rerank-*"):
        f.unlink()
    code = f"from forvalue.storage import faiss_index, store\nfaiss_index.ensure(store.Store.open({str(path)!r}))\n"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    # and one that wrote the stage's files but ended before its commit: unnamed files of a writer gone, for sure
    orphan = (
        "from forvalue.storage import faiss_index, store\n"
        f"pre = faiss_index.load(store.Store.open({str(path)!r}))\npre.rerank = None\n"
        f"assert faiss_index.extend_rerank(store.Store.open({str(path)!r}), pre)\n"
    )
    subprocess.run([sys.executable, "-c", orphan], check=True)
    named = rerank_table.files(json.loads((folder / faiss_index.META_FILE).read_text())["rerank"])
    on_disk = {p.name for p in folder.glob("rerank-*")}
    assert named <= on_disk and faiss_index.load(Store.open(path)).rerank is not None
    report = check_store(path)
    assert len(on_disk - named) >= 3 and report.clean and any("second-stage files" in n for n in report.notes)
    repaired = check_store(path, repair=True)
    assert repaired.repaired["unused_prefilter_files_removed"] == len(on_disk - named)
    assert {p.name for p in folder.glob("rerank-*")} == named and repaired.clean


def _copy(store_path, tmp_path):
    import shutil

    path = tmp_path / "store"
    shutil.copytree(store_path, path)
    pre = faiss_index.ensure(Store.open(path))
    return path, path / faiss_index.INDEX_DIR, pre


@pytest.mark.parametrize("damage", ["random_entries", "nan_values", "reversed_offsets", "vocab_in_record"])
def test_a_stage_damaged_at_its_size_is_never_scored_from_and_check_repairs_it(store_path, tmp_path, damage):
    """Damage that keeps every file's size (hostile pass): random bytes in the entries (ids out of the vocabulary),
    offsets that do not rise, a record naming another vocabulary. A query never scores from them (offsets and
    record: the stage is written again; entries: one line naming the file and the repair), `index check` names it
    (it reads every entry) and `--repair` rebuilds it."""
    from forvalue.maintenance import check_store

    path, folder, pre = _copy(store_path, tmp_path)
    seg = pre.meta["rerank"]["segments"][0]
    if damage == "random_entries":
        data = np.random.default_rng(0).integers(0, 256, seg["entries_bytes"], np.uint8)
        (folder / seg["entries"]).write_bytes(data.tobytes())
    elif damage == "nan_values":  # ids intact, every value NaN (a query used them, exit 0; hostile pass)
        entries = np.fromfile(
            folder / seg["entries"], entry_dtype(pre.rerank.basis.shape[1], seg["dtype"] == "float32")
        )
        entries["v"] = np.nan
        entries.tofile(folder / seg["entries"])
    elif damage == "reversed_offsets":
        offsets = np.load(folder / seg["offsets"])
        np.save(folder / seg["offsets"], offsets[::-1].copy())
        assert (folder / seg["offsets"]).stat().st_size == seg["offsets_bytes"]
    else:
        meta = json.loads((folder / faiss_index.META_FILE).read_text())
        meta["rerank"]["vocab_size"] = 5
        (folder / faiss_index.META_FILE).write_text(json.dumps(meta))
    loaded = faiss_index.load(Store.open(path))
    rows = np.arange(Store.open(path).count())
    if damage in ("random_entries", "nan_values"):
        table = np.zeros((Store.open(path).manifest.vocab_size, loaded.rerank.basis.shape[1]), np.float32)
        found = "outside the vocabulary" if damage == "random_entries" else "not finite"
        with pytest.raises(StoreError, match=f"{found}.*index check --store .* --repair"):
            loaded.rerank.score(rows, table)
    else:
        assert loaded.rerank is None  # not loaded: written again on the index's next use
    report = check_store(path)
    assert not report.clean and any("second stage" in p for p in report.problems), report.problems
    assert check_store(path, repair=True).clean and faiss_index.load(Store.open(path)).rerank is not None


def test_segments_removed_by_another_writer_s_merge_are_written_whole_not_an_error(store_path, tmp_path, monkeypatch):
    """Another writer merged the segments and committed (its commit removed them) while this one extended its
    older record: the merge of this one finds them gone and writes the stage whole (it raised an error naming a
    command that does not exist)."""
    monkeypatch.setattr(rerank_table, "MAX_SEGMENTS", 2)
    store = Store.open(store_path)
    n = store.count()
    folder = tmp_path / "f"
    folder.mkdir()
    record = None
    for rows in (30, 40):
        record = rerank_table.extend(store, folder, record, rows, block_rows=16)
    for seg in record["segments"]:
        (folder / seg["entries"]).unlink()  # the other writer's commit removed them
    again = rerank_table.extend(store, folder, record, n, block_rows=16)
    assert again["rows"] == n and len(again["segments"]) == 1 and again["basis"] != record["basis"]
    assert rerank_table.load(folder, again, store.manifest.vocab_size) is not None


def test_a_prefilter_path_that_is_a_file_is_one_line(store_path, tmp_path):
    """STORE/prefilter as a plain file: the index can never be written there. `index check` said 'no prefilter index
    yet', `--repair` reported a repair, `index add` passed silently."""
    import shutil

    from forvalue.maintenance import check_store
    from forvalue.schemas.errors import StoreError as Refused

    path = tmp_path / "store"
    shutil.copytree(store_path, path)
    shutil.rmtree(path / faiss_index.INDEX_DIR)
    (path / faiss_index.INDEX_DIR).write_text("")
    with pytest.raises(Refused, match="prefilter: is a file, not the prefilter's folder; remove it"):
        faiss_index.ensure(Store.open(path))
    report = check_store(path)
    assert not report.clean and any("is a file" in p for p in report.problems)
