"""TRL data formats (text, prompt-completion, conversational), assistant-token scoring, inputs at scale
(folders, globs, .gz/.zst, datasets folders) and repeated rows."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import assert_one_line_error, cli, make_model_dir, write_jsonl

from forvalue.api import add_to_index, build_index, run_query
from forvalue.indexer.data import Sample, expand_inputs, iter_samples
from forvalue.indexer.tokenize import tokenize_sample
from forvalue.schemas.config import BuildConfig, DataConfig, EncodeConfig, ModelConfig, QueryConfig
from forvalue.schemas.errors import InputDataError
from forvalue.storage.store import Store
from tools.reference import dense_scores

# ChatML-like with the tiny tokenizer's own special tokens; like SmolLM2's, it adds a default system turn.
CHAT = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<s>system\nbe helpful</s>\n{% endif %}"
    "<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
TRIMMING = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] | trim }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)

CONVERSATIONS = [
    # the user's text contains the assistant's answer verbatim: the span must be the assistant's, not the user's
    [{"role": "user", "content": "say: the quick fox"}, {"role": "assistant", "content": "the quick fox"}],
    [
        {"role": "system", "content": "you reverse words"},
        {"role": "user", "content": "reverse: cats and dogs"},
        {"role": "assistant", "content": "dogs and cats"},
        {"role": "user", "content": "again: the lazy dog"},
        {"role": "assistant", "content": "dog lazy the"},
    ],
    [
        {"role": "user", "content": "numbers 1 2 3 ->"},
        {"role": "assistant", "content": " 4 5 6 "},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "7"},
    ],
]


def _render(template: str, messages: list[dict], generation_prompt: bool = False) -> str:
    """The template rendered here with jinja2 directly (not through the product or transformers)."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=generation_prompt)


def _runs(indices) -> list[list[int]]:
    runs: list[list[int]] = []
    for t in indices:
        if runs and runs[-1][-1] == t - 1:
            runs[-1].append(t)
        else:
            runs.append([t])
    return runs


def _sample(messages, context_turns=0) -> Sample:
    return Sample(
        "x",
        None,
        None,
        None,
        None,
        "test:1",
        messages=tuple((m["role"], m["content"]) for m in messages),
        context_turns=context_turns,
    )


@pytest.fixture(scope="module")
def chat_tokenizer():
    from tools.tiny_models import make_lm_tokenizer

    tok = make_lm_tokenizer()
    tok.chat_template = CHAT
    return tok


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama with :data:`CHAT` as its tokenizer's chat template."""
    from transformers import AutoTokenizer

    path = make_model_dir(tmp_path_factory.mktemp("tiny-chat"))
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT
    tok.save_pretrained(path)
    return path


def _check_assistant_positions(tok, template, messages, score_tokens="assistant", context_turns=0):
    """Scored targets are exactly the assistant contents' tokens, at the places the template puts them."""
    s = _sample(messages, context_turns)
    t = tokenize_sample(tok, s, score_tokens, 512, False)
    assert tok.decode(t.input_ids) == _render(template, messages)
    scored = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= context_turns]
    if score_tokens == "response" and context_turns == 0:
        scored = scored[-1:]
    runs = _runs(t.target_indices().tolist())
    assert len(runs) == len(scored) and t.n_scored == sum(map(len, runs))
    for run, i in zip(runs, scored):
        content = messages[i]["content"]
        assert tok.decode([t.input_ids[k] for k in run]) in (content, content.strip())
        # everything before the run is the conversation up to turn i with the generation prompt
        assert tok.decode(t.input_ids[: run[0]]) == _render(template, messages[:i], True)
    return t


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("score_tokens", ["assistant", "response"])
def test_scored_positions_are_the_assistant_tokens(chat_tokenizer, conv, score_tokens):
    _check_assistant_positions(chat_tokenizer, CHAT, CONVERSATIONS[conv], score_tokens)


def test_conversational_prompt_completion_scores_only_the_completion(chat_tokenizer):
    messages = CONVERSATIONS[1]
    t = _check_assistant_positions(chat_tokenizer, CHAT, messages, "assistant", context_turns=3)
    assert len(_runs(t.target_indices().tolist())) == 1
    every = tokenize_sample(chat_tokenizer, _sample(messages, 3), "all", 512, False)
    assert every.input_ids == t.input_ids and every.target_indices().tolist() == list(range(1, len(t.input_ids)))


def test_template_that_trims_content(chat_tokenizer):
    from tools.tiny_models import make_lm_tokenizer

    tok = make_lm_tokenizer()
    tok.chat_template = TRIMMING
    _check_assistant_positions(tok, TRIMMING, CONVERSATIONS[2])


def test_no_chat_template_renders_role_lines(chat_tokenizer):
    from tools.tiny_models import make_lm_tokenizer

    tok = make_lm_tokenizer()
    assert not tok.chat_template
    messages = CONVERSATIONS[1]
    t = tokenize_sample(tok, _sample(messages), "assistant", 512, False)
    plain = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    assert tok.decode(t.input_ids, skip_special_tokens=True) == plain
    runs = _runs(t.target_indices().tolist())
    assert [tok.decode([t.input_ids[k] for k in r]) for r in runs] == ["dogs and cats", "dog lazy the"]


def test_truncation_keeps_only_scored_positions_that_fit(chat_tokenizer):
    full = tokenize_sample(chat_tokenizer, _sample(CONVERSATIONS[1]), "assistant", 512, False)
    cut = tokenize_sample(chat_tokenizer, _sample(CONVERSATIONS[1]), "assistant", full.target_indices()[-1], False)
    assert cut.truncated and cut.target_indices().tolist() == full.target_indices().tolist()[:-1]


@pytest.mark.real_model
def test_smollm2_template_assistant_positions():
    from transformers import AutoTokenizer

    from forvalue.indexer.default_model import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    for messages in CONVERSATIONS:
        _check_assistant_positions(tok, tok.chat_template, messages)


# -- detection --------------------------------------------------------------------------
def test_formats_are_detected_from_columns(tmp_path):
    conv = CONVERSATIONS[0]
    rows = [
        {"text": "plain text"},
        {"prompt": "p ->", "completion": " c"},
        {"prompt": "p ->", "response": " c"},
        {"messages": conv},
        {"prompt": conv[:1], "completion": conv[1:]},
        {"prompt": "say: the quick fox", "completion": conv[1:]},  # a string prompt is one user turn
    ]
    got = list(iter_samples([write_jsonl(tmp_path / "a.jsonl", rows)], DataConfig()))
    assert got[0].text == "plain text" and got[0].messages is None
    assert (got[1].prompt, got[1].response) == ("p ->", " c") and got[1].id == got[2].id.split("-")[0]
    assert got[3].messages == (("user", "say: the quick fox"), ("assistant", "the quick fox"))
    assert got[3].context_turns == 0
    assert got[4].messages == got[3].messages and got[4].context_turns == 1 and got[4].id != got[3].id
    assert got[5].messages == got[4].messages and got[5].id == got[4].id + "-1"
    # --format forces a reading: a row with both text and prompt/completion
    both = write_jsonl(tmp_path / "b.jsonl", [{"text": "t", "prompt": "p", "completion": "c"}])
    assert next(iter_samples([both], DataConfig())).prompt == "p"
    assert next(iter_samples([both], DataConfig(format="text"))).text == "t"


def test_parquet_and_csv_conversations(tmp_path):
    conv = CONVERSATIONS[1]
    # list<struct<role, content>> in Parquet, JSON in a CSV cell
    pq.write_table(pa.table({"messages": [conv, CONVERSATIONS[0]]}), tmp_path / "c.parquet")
    (tmp_path / "c.csv").write_text(
        "messages\n" + "\n".join('"' + json.dumps(c).replace('"', '""') + '"' for c in (conv, CONVERSATIONS[0])) + "\n"
    )
    a = list(iter_samples([tmp_path / "c.parquet"], DataConfig()))
    b = list(iter_samples([tmp_path / "c.csv"], DataConfig()))
    assert [s.messages for s in a] == [s.messages for s in b] and [s.id for s in a] == [s.id for s in b]
    assert a[0].messages[2] == ("assistant", "dogs and cats")


BAD_ROWS = [
    ({"messages": "hello"}, "field 'messages'", "JSON list"),
    ({"messages": []}, "field 'messages'", "empty conversation"),
    (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]},
        "field 'messages[1].content'",
        "missing content",
    ),
    ({"messages": [{"content": "a"}]}, "field 'messages[0].role'", "role"),
    ({"messages": [{"role": "user", "content": 3}]}, "field 'messages[0].content'", "expected text"),
    ({"prompt": [{"role": "user", "content": "a"}], "completion": None}, "field 'completion'", "missing value"),
    ({"body": "x"}, "a.jsonl:2", "'messages'"),
]


@pytest.mark.parametrize("row,where,what", BAD_ROWS)
def test_bad_conversation_rows_name_file_line_field(tmp_path, row, where, what):
    path = write_jsonl(tmp_path / "a.jsonl", [{"messages": CONVERSATIONS[0]}, row])
    with pytest.raises(InputDataError) as err:
        list(iter_samples([path], DataConfig()))
    assert "a.jsonl:2" in str(err.value) and where in str(err.value) and what in str(err.value)


# -- through the model: manifest default, scores against the dense reference -------------
def test_conversational_store_scores_assistant_tokens(tmp_path, chat_model_dir):
    from forvalue.indexer.model_runner import load_runner

    train_rows = [{"messages": c} for c in CONVERSATIONS]
    train_rows.append({"prompt": CONVERSATIONS[1][:3], "completion": CONVERSATIONS[1][3:]})
    val_rows = [{"messages": CONVERSATIONS[1][:3]}, {"prompt": "reverse: the fox ->", "completion": " fox the"}]
    train, val = write_jsonl(tmp_path / "train.jsonl", train_rows), write_jsonl(tmp_path / "val.jsonl", val_rows)
    runner = load_runner(ModelConfig(path=str(chat_model_dir), device="cpu"))
    cfg = BuildConfig(
        model=ModelConfig(path=str(chat_model_dir), device="cpu"),
        encode=EncodeConfig(top_m=runner.vocab_size, hidden_dtype="float32"),
        progress=False,
        write_every=2,
    )
    report = build_index([train], tmp_path / "store", cfg, runner=runner)
    store = Store.open(tmp_path / "store")
    assert store.manifest.score_tokens == "assistant" and report.written == len(train_rows)
    samples = list(iter_samples([train], DataConfig()))
    n_scored = {r["id"]: r["n_scored"] for b in store.scan(["id", "n_scored"], 100) for r in b.to_pylist()}
    for s in samples:
        tok = runner.tokenizer
        expected = sum(
            len(tok(m[1], add_special_tokens=False)["input_ids"])
            for i, m in enumerate(s.messages)
            if m[0] == "assistant" and i >= s.context_turns
        )
        assert n_scored[s.id] == expected
    res = run_query(tmp_path / "store", [val], QueryConfig(progress=False, device="cpu"), keep_scores=True)
    order = [res.train_ids.index(s.id) for s in samples]
    ref = dense_scores(
        runner.model, runner.tokenizer, samples, list(iter_samples([val], DataConfig())), score_tokens="assistant"
    )
    np.testing.assert_allclose(res.scores[:, order], ref, rtol=2e-4, atol=1e-4 * np.abs(ref).max())
    # index add takes the store's scored tokens (assistant) for new conversations
    more = write_jsonl(tmp_path / "more.jsonl", [{"messages": CONVERSATIONS[2][:2]}])
    added = add_to_index([more], tmp_path / "store", BuildConfig(progress=False))
    assert added.written == 1 and Store.open(tmp_path / "store").count() == len(train_rows) + 1
    # the text stored for a conversation is readable, one "role: content" line per turn
    texts = {r["id"]: r["text"] for b in store.scan(["id", "text"], 100) for r in b.to_pylist()}
    assert texts[samples[0].id] == "user: say: the quick fox\nassistant: the quick fox"


def test_text_store_default_stays_all(tmp_path, tiny_model_dir, tiny_runner, toy_rows):
    cfg = BuildConfig(model=ModelConfig(path=str(tiny_model_dir), device="cpu"), progress=False)
    build_index([write_jsonl(tmp_path / "t.jsonl", toy_rows[:3])], tmp_path / "store", cfg, runner=tiny_runner)
    assert Store.open(tmp_path / "store").manifest.score_tokens == "all"


def test_old_manifest_without_new_fields_loads(tmp_path):
    from forvalue.schemas.manifest import Manifest

    raw = dict(
        model_path="m",
        model_weights_sha256="0",
        adapter_path=None,
        adapter_sha256=None,
        tokenizer_sha256="0",
        dtype="float32",
        hidden_size=4,
        vocab_size=10,
        top_m=2,
        score_tokens="response",
        chat_template=False,
        max_length=16,
        hidden_dtype="float16",
        lowest_likelihood_ratio=None,
    )
    assert Manifest.from_json(json.dumps(raw)).score_tokens == "response"


# -- inputs at scale ------------------------------------------------------------------------
def _rows(n, repeat_every=0):
    rows = [{"prompt": f"prompt {i} ->", "completion": f" answer {i}"} for i in range(n)]
    if repeat_every:
        for j in range(repeat_every, n, repeat_every):
            rows[j] = dict(rows[j - repeat_every])
    return rows


def _write_shards(folder: Path, rows, kinds):
    folder.mkdir(parents=True, exist_ok=True)
    chunks = np.array_split(np.arange(len(rows)), len(kinds))
    for k, (kind, idx) in enumerate(zip(kinds, chunks)):
        part = [rows[i] for i in idx]
        data = "".join(json.dumps(r) + "\n" for r in part).encode()
        path = folder / f"part-{k:03d}.{kind}"
        if kind == "parquet":
            pq.write_table(pa.Table.from_pylist(part), path)
        elif kind == "jsonl.gz":
            path.write_bytes(gzip.compress(data))
        elif kind == "jsonl.zst":
            import zstandard

            path.write_bytes(zstandard.ZstdCompressor().compress(data))
        else:
            path.write_bytes(data)
    return folder


def test_folder_glob_and_compressed_shards_read_like_one_file(tmp_path):
    rows = _rows(50, repeat_every=7)
    plain = list(iter_samples([write_jsonl(tmp_path / "all.jsonl", rows)], DataConfig()))
    folder = _write_shards(tmp_path / "data", rows, ["jsonl.gz", "parquet", "jsonl.zst", "jsonl"])
    (folder / "README.md").write_text("not data")
    (folder / ".hidden.jsonl").write_text("junk\n")
    for inputs in ([folder], [str(folder / "part-*")], [str(tmp_path / "**" / "part-*")]):
        got = list(iter_samples(inputs, DataConfig()))
        assert [(s.id, s.prompt, s.response) for s in got] == [(s.id, s.prompt, s.response) for s in plain]
    assert [p.name for p in expand_inputs([folder])] == [
        f"part-{k:03d}.{x}" for k, x in enumerate(["jsonl.gz", "parquet", "jsonl.zst", "jsonl"])
    ]
    assert sum(s.occurrence > 0 for s in plain) == 7


def test_datasets_folder_without_the_datasets_package(tmp_path):
    from test_inputs import write_arrow_folder

    rows = _rows(10)
    folder = write_arrow_folder(tmp_path / "ds", rows)
    got = list(iter_samples([folder], DataConfig()))
    assert [s.response for s in got] == [r["completion"] for r in rows]


@pytest.mark.parametrize(
    "make,needles",
    [
        (lambda d: d / "none-*.jsonl", ("none-*.jsonl", "matches no file")),
        (lambda d: (d / "empty").mkdir() or d / "empty", ("empty", "holds no data file")),
        (
            lambda d: (d / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"text": "ok"}\n')[:-12]) and d / "bad.jsonl.gz",
            ("bad.jsonl.gz", "damaged or cut short"),
        ),
        (
            lambda d: (d / "bad.jsonl.zst").write_bytes(b"not zstd at all") and d / "bad.jsonl.zst",
            ("bad.jsonl.zst", "zst"),
        ),
        (lambda d: (d / "x.parquet.gz").write_bytes(b"x") and d / "x.parquet.gz", ("x.parquet.gz", "unknown format")),
        (
            lambda d: (d / "dd").mkdir() or (d / "dd" / "dataset_dict.json").write_text("{}") and d / "dd",
            ("DatasetDict",),
        ),
    ],
    ids=["glob", "empty_folder", "cut_gzip", "bad_zstd", "parquet_gz", "dataset_dict"],
)
def test_bad_inputs_are_one_line_errors(tmp_path, tiny_model_dir, make, needles):
    path = make(tmp_path)
    result = cli("index", "build", path, "--store", tmp_path / "store", "--model", tiny_model_dir, "--quiet")
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "store").exists()


def test_bad_row_in_a_compressed_shard_names_file_and_line(tmp_path):
    data = b'{"text": "fine"}\n{"text": 5}\n'
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(data))
    with pytest.raises(InputDataError, match=r"a\.jsonl\.gz:2: field 'text'"):
        list(iter_samples([tmp_path / "a.jsonl.gz"], DataConfig()))


def test_hundred_thousand_rows_stream_with_bounded_memory(tmp_path):
    """10^5 rows (~14 MB of JSONL, zstd-compressed) stream with a Python heap far below the data's size."""
    import zstandard

    n = 100_000
    pad = "x" * 100
    lines = (json.dumps({"prompt": f"row {i % 90_000} {pad} ->", "completion": " ok"}) + "\n" for i in range(n))
    path = tmp_path / "big.jsonl.zst"
    with path.open("wb") as fh, zstandard.ZstdCompressor().stream_writer(fh) as out:
        size = sum(out.write(line.encode()) for line in lines)
    assert size > 12_000_000
    tracemalloc.start()
    count = repeats = 0
    ids = set()
    for s in iter_samples([path], DataConfig()):
        count += 1
        repeats += s.occurrence > 0
        if count <= 1000 or count > n - 1000:  # keep a few ids only, so that the peak measures the reader
            ids.add(s.id)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (count, repeats, len(ids)) == (n, 10_000, 2000)
    # the reader keeps a 64-bit key and a count per distinct content (12-byte slots, 2-4 per key, x1.5 while the
    # table grows: <= 72 bytes per key), not the rows (~150 bytes each as JSON, several hundred as Python dicts)
    assert peak < 90_000 * 72 + 1_000_000 and peak < 0.5 * size, (peak, size)


# -- repeated rows: ids, --dedupe, resume, shards -----------------------------------------
def _ids(store) -> list[str]:
    return sorted(Store.open(store).ids())


def test_repeats_are_kept_and_dedupe_drops_them(tmp_path, tiny_model_dir, tiny_runner):
    rows = _rows(12, repeat_every=4)  # rows 4 and 8 repeat 0 and 4 -> 0, 0-1, 0-2
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    samples = list(iter_samples([path], DataConfig()))
    assert [s.id for s in samples] == [s.id for s in iter_samples([path], DataConfig())]
    assert samples[4].id == samples[0].id + "-1" and samples[8].id == samples[0].id + "-2"
    base = dict(model=ModelConfig(path=str(tiny_model_dir), device="cpu"), progress=False, write_every=3)
    kept = build_index([path], tmp_path / "kept", BuildConfig(**base), runner=tiny_runner)
    dropped = build_index([path], tmp_path / "dedupe", BuildConfig(dedupe=True, **base), runner=tiny_runner)
    assert (kept.written, kept.repeats_kept, kept.repeats_dropped) == (12, 2, 0)
    assert (dropped.written, dropped.repeats_kept, dropped.repeats_dropped) == (10, 0, 2)
    assert _ids(tmp_path / "kept") == sorted(s.id for s in samples)
    assert _ids(tmp_path / "dedupe") == sorted(s.id for s in samples if not s.occurrence)
    # the CLI says so
    out = cli("index", "build", path, "--store", tmp_path / "cli", "--model", tiny_model_dir, "--quiet", "--dedupe")
    assert out.exit_code == 0 and "2 repeated rows (--dedupe)" in out.output


def test_resume_with_repeats_writes_exactly_the_rest(tmp_path, tiny_model_dir, tiny_runner):
    rows = _rows(20, repeat_every=3)
    full = write_jsonl(tmp_path / "full.jsonl", rows)
    head = write_jsonl(tmp_path / "head.jsonl", rows[:11])  # as if a build stopped after 11 rows
    cfg = BuildConfig(model=ModelConfig(path=str(tiny_model_dir), device="cpu"), progress=False, write_every=4)
    first = build_index([head], tmp_path / "store", cfg, runner=tiny_runner)
    rest = build_index([full], tmp_path / "store", cfg, runner=tiny_runner)
    assert (first.written, rest.written, rest.already_stored) == (11, 9, 11)
    assert _ids(tmp_path / "store") == sorted(s.id for s in iter_samples([full], DataConfig()))


def test_shards_assign_each_repeat_once(tmp_path, tiny_model_dir, tiny_runner):
    rows = _rows(30, repeat_every=2)
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    base = dict(model=ModelConfig(path=str(tiny_model_dir), device="cpu"), progress=False)
    reports = [
        build_index([path], tmp_path / "store", BuildConfig(shard=(k, 3), **base), runner=tiny_runner) for k in range(3)
    ]
    assert sum(r.written for r in reports) == 30 and sum(r.repeats_kept for r in reports) == 14
    assert all(r.other_shard == 30 - r.written for r in reports)
    assert _ids(tmp_path / "store") == sorted(s.id for s in iter_samples([path], DataConfig()))


def test_bench_inputs_data_reads_the_same_in_every_format(tmp_path):
    """The benchmark's generated inputs (tools.bench_inputs): same rows and ids in every format, 10% repeats."""
    from tools.bench_inputs import FORMATS, write_data

    ids = {}
    for fmt in FORMATS:
        path, size = write_data(fmt, 200, tmp_path)
        samples = list(iter_samples([path], DataConfig()))
        assert len(samples) == 200 and sum(s.occurrence > 0 for s in samples) == 20 and size > 200 * 100
        ids[fmt] = [s.id for s in samples]
    assert all(ids[f] == ids["jsonl"] for f in FORMATS if f != "messages")
    assert len(set(ids["messages"]) & set(ids["jsonl"])) == 0


def test_occurrence_table_counts_like_a_dict():
    """The numpy open-addressing table of the repeat numbering against a plain dict, through growth and probing."""
    import random

    from forvalue.indexer.sample_ids import KeyCounts as _KeyCounts

    rng = random.Random(0)
    keys = [rng.getrandbits(64) for _ in range(2000)]
    keys += [7 + (i << 40) for i in range(300)]  # the same low bits: long probe chains
    keys += [2**64 - 1, 2**63]
    table, ref = _KeyCounts(capacity=8), {}
    for _ in range(20_000):
        key = rng.choice(keys)
        assert table.bump(key) == ref.get(key, 0)
        ref[key] = ref.get(key, 0) + 1
    assert table.size == len(ref) and 2 * table.size <= len(table.keys)
