"""``forvalue index build|add|info|check|sketch|convert``: make, extend, inspect, verify and compact a store."""

from __future__ import annotations

import json

import click

from forvalue.cli.options import COLUMN_FIELDS, config_options, json_option, make, quiet_option, store_option
from forvalue.schemas.config import BuildConfig, DataConfig, EncodeConfig, EngineConfig, ModelConfig

_SKETCH_FIELDS = ("sketch_dim", "sketch_vocab_buckets", "sketch_hidden_cols", "sketch_basis", "sketch_heavy_ids")


@click.group()
def index() -> None:
    """Build, extend and inspect a store."""


def _print_report(report, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.as_dict()))
        return
    click.echo(
        f"{report.store}: wrote {report.written} samples ({report.tokens_scored} scored tokens) in "
        f"{report.seconds:.1f}s; "
        f"skipped {report.already_stored} already stored, {report.duplicate_ids} repeated ids, "
        f"{report.repeats_dropped} repeated rows (--dedupe), "
        f"{report.no_scored_tokens} without scored tokens, {report.bad_skipped} bad (NaN/inf or unreadable image); "
        f"{report.truncated} truncated to {report.max_length} tokens; kept {report.repeats_kept} repeated rows as "
        f"their own samples; store now holds {report.total_rows} samples"
    )


def _build_config(kw: dict) -> BuildConfig:
    return make(
        BuildConfig,
        kw,
        data=make(DataConfig, kw),
        model=make(ModelConfig, kw),
        encode=make(EncodeConfig, kw),
        progress=not kw["quiet"],
    )


@index.command("build")
@click.argument("data", nargs=-1, required=True, type=click.Path())
@store_option
@config_options(ModelConfig)
@config_options(DataConfig)
@config_options(EncodeConfig, exclude=("sketch_seed",))
@config_options(BuildConfig)
@config_options(EngineConfig)
@quiet_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def build(data, store, as_json, **kw):
    """Encode DATA files (JSONL, Parquet, CSV or datasets folders) into a new or existing store.

    Re-running skips ids already stored, so an interrupted build resumes where it stopped.
    """
    import forvalue

    _print_report(forvalue.build(data, store, _build_config(kw), engine=make(EngineConfig, kw)).last_build, as_json)


@index.command("add")
@click.argument("data", nargs=-1, required=True, type=click.Path())
@store_option
@config_options(
    ModelConfig, only=("path", "adapter", "dtype", "device", "trust_remote_code"), unset=("path", "adapter")
)
@config_options(DataConfig, only=COLUMN_FIELDS)
@config_options(EncodeConfig, only=("on_bad",))
@config_options(BuildConfig)
@config_options(EngineConfig)
@quiet_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def add(data, store, as_json, **kw):
    """Append DATA to an existing store with the store's model and settings (ids already stored are skipped).

    The encoding settings (max length, chat template, top-m, scored tokens, hidden dtype, sketch)
    always come from the store; its model, adapter and dtype too unless --model/--adapter/--dtype are given.
    """
    import forvalue

    _print_report(forvalue.open(store).add(data, _build_config(kw), engine=make(EngineConfig, kw)), as_json)


@index.command("info")
@store_option
@json_option
def info(store, as_json):
    """Print what a store holds: samples, tokens, labels, size, model and settings (loads no model)."""
    import forvalue

    data = forvalue.open(store).info().as_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    m = data.pop("manifest")
    for key, value in data.items():
        click.echo(f"{key:>18}: {value}")
    # every manifest field, in the manifest's own order (the sketch spec is the line above); the image
    # fields only for vision-language stores
    skip = {"adapter_path", "adapter_sha256"} if m.get("adapter_path") is None else set()
    if m.get("model_kind") != "vlm":
        skip |= {"model_kind", "image_column", "image_max_pixels", "processor_sha256"}
    for key, value in m.items():
        if key not in skip and not key.startswith("sketch_"):
            click.echo(f"{key:>18}: {value}")


@index.command("check")
@store_option
@click.option(
    "--repair",
    is_flag=True,
    help="Remove duplicate rows (keeping each id's first) in one atomic commit and rebuild an unsound prefilter index.",
)
@json_option
def check(store, repair, as_json):
    """Verify a store: unique ids, every row decodes, manifest and table agree, prefilter index and audits
    consistent (loads no model). Exit status 0 when clean, 2 with one line per problem otherwise."""
    import sys

    import forvalue

    report = forvalue.open(store).check(repair=repair)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        if repair:
            done = report.repaired
            click.echo(
                f"{store}: repaired: removed {done['duplicate_rows_removed']} duplicate rows"
                + ("; rebuilt the prefilter index" if done["prefilter_rebuilt"] else "")
                + "".join(f"; removed {t} (never committed)" for t in done.get("uncommitted_tables_removed", []))
                + (
                    f"; removed {done['unused_prefilter_files_removed']} unused second-stage files"
                    if done.get("unused_prefilter_files_removed")
                    else ""
                )
            )
        for note in report.notes:
            click.echo(f"{store}: note: {note}")
        for problem in report.problems:
            click.echo(f"error: {problem}", err=True)
        if report.clean:
            click.echo(f"{store}: clean ({report.rows} rows, ids unique, every row decodes)")
    if not report.clean:
        sys.exit(2)


@index.command("sketch")
@store_option
@click.option("--rebuild", is_flag=True, help="Recompute the sketch column even if the store has one.")
@config_options(EncodeConfig, only=_SKETCH_FIELDS + ("sketch_seed",), unset=_SKETCH_FIELDS + ("sketch_seed",))
@click.option(
    "--faiss-index",
    "kind",
    default=None,
    help="auto (exact Flat below 100k rows, pq above), flat, pq (4-bit product codes of every row, re-ranked by "
    "8-bit codes), ivf (inverted lists, IVF-SQ8), hnsw or a FAISS factory string; without it the saved index keeps "
    "its kind, and giving auto again replaces an index auto chose in an older version.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def sketch(store, rebuild, kind, as_json, **kw):
    """Add (or rebuild) the prefilter sketches of a store and its FAISS index (run while no build writes).

    Sketch options not given keep the store's values (else the defaults); giving any of
    --sketch-vocab-buckets/--sketch-hidden-cols/--sketch-basis starts from the defaults.
    """
    import forvalue

    report = (
        forvalue.open(store)
        .sketch(
            dim=kw["sketch_dim"],
            rebuild=rebuild,
            seed=kw["sketch_seed"],
            faiss_index=kind,
            vocab_buckets=kw["sketch_vocab_buckets"],
            hidden_cols=kw["sketch_hidden_cols"],
            basis=kw["sketch_basis"],
            heavy_ids=kw["sketch_heavy_ids"],
        )
        .as_dict()
    )
    click.echo(json.dumps(report) if as_json else ", ".join(f"{k}: {v}" for k, v in report.items()))


@index.command("convert")
@store_option
@click.option(
    "--out", required=True, type=click.Path(), help="New folder for the converted store (resumed if a re-run)."
)
@click.option(
    "--hidden-dtype",
    type=click.Choice(["float16", "float32", "int8"]),
    default=None,
    help="Storage of the hidden states (default: the store's); int8 is half of float16's bytes.",
)
@click.option(
    "--int8-block",
    type=click.IntRange(min=0),
    default=None,
    help="Channels per int8 scale, 0 = one per token (default: the store's, else 0).",
)
@click.option(
    "--top-m", type=click.IntRange(min=1), default=None, help="Keep only this many most likely tokens per position."
)
@click.option(
    "--hidden-rank",
    type=click.IntRange(min=0),
    default=None,
    help="Low-rank tier: store R coordinates per token in a basis fitted to the store's hidden states "
    "(0 = full width; default: the store's).",
)
@click.option(
    "--write-every", type=click.IntRange(min=1), default=512, show_default=True, help="Rows per atomic commit."
)
@quiet_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def convert(store, out, hidden_dtype, int8_block, top_m, hidden_rank, write_every, quiet, as_json):
    """Write the --store store into a new compact store at --out without a forward pass (packed errors,
    float16 sketches, optionally int8 hidden states or fewer top-m tokens). Scores of the new store are
    exact on its stored values; the loss against float16 is measured in docs/benchmarks.md. Re-running
    after an interruption resumes; the source is never modified.
    """
    import forvalue
    from forvalue.cli.options import STORAGE_OPTIONS_KEY
    from forvalue.storage.location import is_uri, store_location

    if is_uri(out):  # a converted store on an object store: the same --storage-option settings
        out = store_location(out, click.get_current_context().meta.get(STORAGE_OPTIONS_KEY))
    converted = forvalue.open(store).convert(
        out, hidden_dtype, int8_block, top_m, write_every, progress=not quiet, hidden_rank=hidden_rank
    )
    report = converted.last_build
    if as_json:
        click.echo(json.dumps(report.as_dict()))
        return
    click.echo(
        f"{report.out}: converted {report.written} samples ({report.tokens} scored tokens) in {report.seconds:.1f}s, "
        f"{report.already_converted} were already there; {report.source_bytes_per_token} -> "
        f"{report.out_bytes_per_token} bytes per scored token"
        + (f"; rank {report.hidden_rank} keeps {report.energy_kept:.2%} of the energy" if report.hidden_rank else "")
    )
