"""The public handle (forvalue.store): open/build, Store and Audit methods, typed results (forvalue.results)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from conftest import cli, write_jsonl

import forvalue
import forvalue.session
from forvalue.results import AuditComparison, AuditInfo, AuditSummary, CheckReport, Selection, StoreInfo
from forvalue.schemas.errors import ForValueError, StoreError


@pytest.fixture
def st(tmp_path, tiny_model_dir, toy_rows):
    write_jsonl(tmp_path / "train.jsonl", toy_rows)
    write_jsonl(tmp_path / "val.jsonl", [dict(toy_rows[0], id="v0"), dict(toy_rows[1], id="v1")])
    cfg = forvalue.BuildConfig(model=forvalue.ModelConfig(path=str(tiny_model_dir), device="cpu"), progress=False)
    return forvalue.build(tmp_path / "train.jsonl", tmp_path / "store", cfg)


def test_build_and_open_give_the_same_store(st, toy_rows):
    assert st.last_build.written == len(toy_rows) and len(st) == len(toy_rows)
    again = forvalue.open(st.path)
    assert again.manifest == st.manifest and len(again) == len(st)
    assert repr(again).startswith(f"Store('{st.path}'")


def test_open_refuses_what_is_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="no such store"):
        forvalue.open(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not a forvalue store"):
        forvalue.open(tmp_path / "plain")


def test_info_and_check_are_typed_and_match_the_cli(st, toy_rows):
    info = st.info()
    assert isinstance(info, StoreInfo) and info.samples == len(toy_rows) and info.labels == {"math": 6, "reverse": 6}
    assert "12 samples" in repr(info)
    printed = json.loads(cli("index", "info", "--store", str(st.path), "--json").output)
    assert printed == json.loads(json.dumps(info.as_dict(), default=str))
    report = st.check()
    assert isinstance(report, CheckReport) and report.clean and report.rows == len(toy_rows)
    assert "_duplicate_addresses" not in report.as_dict()
    assert json.loads(cli("index", "check", "--store", str(st.path), "--json").output) == report.as_dict()


def test_query_takes_one_path_or_many_and_loads_the_model_once(st, monkeypatch):
    val = st.path.parent / "val.jsonl"
    loads = []
    real = forvalue.session.load_store_runner
    monkeypatch.setattr(forvalue.session, "load_store_runner", lambda *a, **k: loads.append(1) or real(*a, **k))
    cfg = forvalue.QueryConfig(top_k=3, progress=False, device="cpu")
    one = st.query(str(val), cfg, keep_scores=True)
    many = st.query([val], cfg, keep_scores=True)
    assert one.top.equals(many.top) and one.scores.shape == (2, len(st))
    e = st.explain(val, "rev-1", forvalue.ExplainConfig(device="cpu"))
    assert e.score == pytest.approx(float(one.scores[0][one.train_ids.index("rev-1")]), rel=1e-6)
    assert len(loads) == 1  # query, query and explain share the handle's model
    assert e.to_arrow().num_rows == len(e.rows()) and "Explanation(S = " in repr(e)


def test_query_equals_the_cli(st, tmp_path):
    val = st.path.parent / "val.jsonl"
    res = cli("query", "--store", str(st.path), "-v", str(val), "--top-k", "4", "-o", str(tmp_path / "t.parquet"))
    assert res.exit_code == 0, res.output
    import pyarrow.parquet as pq

    api = st.query(val, forvalue.QueryConfig(top_k=4, progress=False)).top
    assert pq.read_table(tmp_path / "t.parquet").equals(api)


def test_audits_mapping_summary_compare_select(st, toy_rows, tmp_path):
    val = st.path.parent / "val.jsonl"
    assert len(st.audits) == 0 and list(st.audits) == []
    a = st.audit(str(val), "a", forvalue.AuditConfig(progress=False, device="cpu"))
    assert a.run.version == 1 and a.run.n_train == len(toy_rows) and "AuditRun('a' v1" in repr(a.run)
    write_jsonl(tmp_path / "math.jsonl", [r for r in toy_rows if r["label"] == "math"][:2])
    st.audit(tmp_path / "math.jsonl", "m", forvalue.AuditConfig(progress=False, device="cpu"))
    assert sorted(st.audits) == ["a", "m"] and "a" in st.audits
    assert "zz" not in st.audits and "a/b" not in st.audits and st.audits.get("zz") is None  # Mapping's contract
    assert st.audits.get("a").info.name == "a"
    assert all(isinstance(i, AuditInfo) for i in st.audits.list())
    with pytest.raises(ForValueError, match="no audit named 'zz' .known: a, m"):
        st.audits["zz"]
    s = st.audits["a"].summary(3)
    assert isinstance(s, AuditSummary) and len(s.top) == len(s.bottom) == 3 and s.info.name == "a"
    assert s.to_arrow().column("part").to_pylist() == ["top"] * 3 + ["bottom"] * 3
    c = st.audits["a"].compare(st.audits["m"])
    assert isinstance(c, AuditComparison) and c.common == len(toy_rows) and -1 <= c.spearman <= 1
    assert st.audits["a"].compare("a").spearman == pytest.approx(1.0)
    assert c.to_arrow().column_names == ["id", "rank_a", "rank_b"]
    chosen = st.audits["a"].select(top="25%", output=tmp_path / "s.jsonl")
    table = st.audits["a"].table()
    best = sorted(table.to_pylist(), key=lambda r: r["rank"])[:3]
    assert isinstance(chosen, Selection) and [r["id"] for r in chosen.rows()] == [r["id"] for r in best]
    assert len(chosen) == 3 and repr(chosen).startswith("Selection(3 of 12 samples")
    assert (tmp_path / "s.jsonl").read_text().count("\n") == 3
    assert st.audits["a"].select(top=3).rows() == chosen.rows()  # an int is a count, as "3"
    assert isinstance(st.audits["a"].to_arrow(), pa.Table)
    page = st.audits["a"].report(tmp_path / "r.html")
    assert page.read_text().count("data:image/png;base64,") == 2


def test_result_dicts_are_json_ready(st):
    val = st.path.parent / "val.jsonl"
    a = st.audit(val, "a", forvalue.AuditConfig(progress=False, device="cpu"))
    for result in (st.info(), st.check(), a.run, a.summary(), a.compare("a"), a.select(top=2)):
        json.dumps(result.as_dict())


def test_api_outputs_never_go_into_the_store(st, tmp_path):
    """The output policy holds for the Python API too, not only for the CLI's paths."""
    val = st.path.parent / "val.jsonl"
    manifest = (st.path / "manifest.json").read_bytes()
    result = st.query(val, forvalue.QueryConfig(top_k=2, progress=False, device="cpu"))
    with pytest.raises(ForValueError, match="is inside the store"):
        st.explain_results(result, val, 1, st.path / "pages")
    with pytest.raises(ForValueError, match="is inside the store"):
        st.query(val, forvalue.QueryConfig(progress=False), all_scores_path=st.path / "manifest.json")
    a = st.audit(val, "a", forvalue.AuditConfig(progress=False, device="cpu"))
    with pytest.raises(ForValueError, match="is inside the store"):
        a.report(st.path / "manifest.json")
    with pytest.raises(ForValueError, match="is inside the store"):
        a.select(top=2, output=st.path / "subset.jsonl")
    assert (st.path / "manifest.json").read_bytes() == manifest
    assert not (st.path / "pages").exists() and not (st.path / "subset.jsonl").exists()
    assert st.check().clean
    pages = st.explain_results(result, val, 1, tmp_path / "pages")
    assert (tmp_path / "pages" / "index.html").exists() and pages.column("explanation").null_count == 2


def test_audit_report_refuses_its_path_before_explaining(st, tmp_path):
    # Audit.report(out, explain_validation=...) loaded the model, wrote the explanation pages into OUT.explain/ and
    # only then refused a bad report path: the policy refuses outputs before any work
    val = st.path.parent / "val.jsonl"
    a = st.audit(val, "a", forvalue.AuditConfig(progress=False, device="cpu"))
    (tmp_path / "folder.html").mkdir()
    for bad, why in ((tmp_path / "report.txt", "unknown output format"), (tmp_path / "folder.html", "is a folder")):
        with pytest.raises(ForValueError, match=why):
            a.report(bad, explain_validation=val, device="cpu")
        assert not bad.with_suffix(".explain").exists()
    page = a.report(tmp_path / "report.html", explain_validation=val, device="cpu")
    assert page.is_file() and any((tmp_path / "report.explain").iterdir())


def test_bad_input_is_refused_before_the_model_loads(st, monkeypatch):
    """The handle gives the workflows a loader, so their checks still come first."""

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the bad input was refused")

    monkeypatch.setattr(forvalue.session, "load_store_runner", no_model)
    val = st.path.parent / "val.jsonl"
    with pytest.raises(ForValueError, match="no training sample with id 'nope'"):
        st.explain(val, "nope")
    with pytest.raises(ForValueError, match="audit name"):
        st.audit(val, "../x")
    with pytest.raises(ForValueError, match="no such file"):
        st.query(st.path.parent / "missing.jsonl")
    assert len(st.audits) == 0 and list(st.audits) == []


def test_validation_rows_in_memory_work_where_paths_do(st, toy_rows, tmp_path):
    """Rows (dicts) instead of files: the output policy skips them as inputs (a long text is no file name)."""
    rows = [dict(toy_rows[0], id="v0", prompt=toy_rows[0]["prompt"] + " " + "x" * 300)]
    cfg = forvalue.QueryConfig(top_k=2, progress=False, device="cpu")
    result = st.query(rows, cfg)
    pages = st.explain_results(result, rows, 1, tmp_path / "pages")
    assert pages.column("explanation").null_count == 1 and (tmp_path / "pages" / "index.html").exists()


def test_create_beside_a_twin_waits_for_its_first_version_then_gives_up(st, monkeypatch):
    """Two builds into a new store started together: the one that finds the table's folder the other is creating can
    be there before its first version, and opening it failed the build ("samples.lance was not found"; the two-builds
    fault test in CI). Store.create waits for the version (here: the first two opens fail), up to TWIN_WAIT seconds."""
    import forvalue.storage.store as store_module
    from forvalue.storage.store import Store

    manifest = Store.open(st.path).manifest
    real_init, tries = Store.__init__, []

    def not_yet(self, path, m, fail=2):
        tries.append(1)
        if len(tries) <= fail:
            raise StoreError(f"{path}: cannot open the store (Dataset at path samples.lance was not found)")
        real_init(self, path, m)

    monkeypatch.setattr(Store, "__init__", not_yet)
    assert Store.create(st.path, manifest).count() == len(st) and len(tries) > 2
    monkeypatch.setattr(store_module, "TWIN_WAIT", 0.2)
    monkeypatch.setattr(Store, "__init__", lambda self, path, m: not_yet(self, path, m, fail=10**6))
    with pytest.raises(StoreError, match="was not found"):  # a table that never gets a version: the error
        Store.create(st.path, manifest)


@pytest.mark.parametrize(
    "config,kw,needle",
    [
        ("QueryConfig", dict(top_k=2.5), "top_k: must be a whole number, got 2.5"),
        ("QueryConfig", dict(top_k=True), "top_k: must be a whole number, got True"),
        ("QueryConfig", dict(top_k="5"), "top_k: must be a whole number, got '5'"),
        ("QueryConfig", dict(candidates=5.0), "candidates: must be a whole number"),
        ("ExplainConfig", dict(top_pairs=2.5), "top_pairs: must be a whole number"),
        ("ExplainConfig", dict(val_index=1.0), "val_index: must be a whole number"),
        ("AuditConfig", dict(flag_fraction="0.1"), "flag_fraction: must be a number"),
        ("AuditConfig", dict(progress=1), "progress: must be True or False"),
    ],
)
def test_settings_of_the_wrong_kind_are_refused_when_made(config, kw, needle):
    """An API caller's setting of the wrong kind is one ConfigError naming the field when the config is made; it
    was a TypeError after the model load and the scan, or (True) taken as 1 (hostile pass). Whole numbers stay
    numbers and None stays 'not set'."""
    from forvalue.schemas.errors import ConfigError

    cls = getattr(forvalue, config)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        cls(**kw)
    assert forvalue.QueryConfig(top_k=5, candidates=None, whiten=1).whiten == 1
    assert forvalue.AuditConfig(flag_fraction=0, flag_threshold=-3).flag_threshold == -3
    from forvalue.indexer.readers import as_paths

    with pytest.raises(ForValueError, match="expected a path, or a list of paths or rows"):
        as_paths(None)  # st.query(None) / st.add(None): a TypeError from the reader before
