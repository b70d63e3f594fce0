"""``forvalue query``: the training samples that matter most for each validation sample."""

from __future__ import annotations

import click

from forvalue.cli.options import COLUMN_FIELDS, config_options, make, quiet_option, store_option, validation_option
from forvalue.schemas.config import DataConfig, EngineConfig, ModelConfig, QueryConfig


@click.command("query")
@store_option
@validation_option
@click.option("--output", "-o", default=None, help="Output file: .jsonl, .csv or .parquet (default: JSONL on stdout).")
@click.option(
    "--all-scores",
    type=click.Path(),
    default=None,
    help="Also write the full score matrix (one row per training sample, one column per validation sample) "
    "to this .parquet file.",
)
@click.option(
    "--explain",
    "explain_n",
    type=click.IntRange(min=1),
    default=None,
    help="Also explain the top N results of each validation sample token by token: one HTML page each "
    "(forvalue explain), in --explain-dir, and a column 'explanation' naming the page.",
)
@click.option(
    "--explain-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder of the --explain pages (default: next to -o, named after it: top.jsonl -> top.explain/).",
)
@config_options(QueryConfig)
@config_options(ModelConfig, only=("path", "dtype"))
@config_options(DataConfig, only=COLUMN_FIELDS)
@config_options(EngineConfig)
@quiet_option
def query_command(store, validation, output, all_scores, explain_n, explain_dir, quiet, **kw):
    """Rank the stored training samples by their value for each validation sample (exact scores).

    Validation samples are encoded with the store's model and settings (a different --model is refused).
    """
    import forvalue
    from forvalue.present.output import check_output_path, write_table

    check_output_path(output)
    cfg = make(QueryConfig, kw, progress=not quiet)
    model = make(ModelConfig, kw, device=cfg.device)
    data = make(DataConfig, kw)
    if explain_n is not None:
        from forvalue.explain_pages import pages_folder

        explain_dir = pages_folder(_explain_folder(output, explain_dir))  # (a folder of other files: before the query)
    st = forvalue.open(store)
    result = st.query(
        validation, cfg, data=data, model=model, all_scores_path=all_scores, engine=make(EngineConfig, kw)
    )
    top = result.top
    if result.auto_settings is not None:
        from forvalue.engine.variant import describe_auto

        click.echo(describe_auto(result.auto_settings), err=True)
    if explain_n is not None:
        top = st.explain_results(result, validation, explain_n, explain_dir, data=data, model=model, device=cfg.device)
        click.echo(f"explained the top {explain_n} results: {explain_dir}/index.html", err=True)
    write_table(top, output)
    if result.unsettled:
        click.echo(_unsettled_warning(result), err=True)
    repeated = _repeated_validation_ids(result)
    if repeated:
        click.echo(
            f"warning: validation ids given to more than one sample ({', '.join(repeated[:5])}"
            f"{f' and {len(repeated) - 5} more' if len(repeated) > 5 else ''}): their rankings share the id in the "
            "output; give each validation sample its own id",
            err=True,
        )
    if output:
        staged = (
            f"the best by the second stage of {_candidate_counts(result.pools, 'FAISS candidates')}; "
            if result.pools
            else ""
        )
        scored = (
            f"reranked {result.rows_reranked} candidate rows of {result.n_train} exactly ({staged}{result.rows_read} "
            f"rows read, each round's union read once for all; {_candidate_counts(result.candidates)})"
            if result.prefiltered
            else f"scored {result.n_train} training samples"
        )
        click.echo(
            f"{scored} against {result.n_validation} validation samples "
            f"in {result.seconds:.1f}s; wrote {result.top.num_rows} rows to {output}",
            err=True,
        )


def _repeated_validation_ids(result) -> list[str]:
    """Validation ids that name more than one sample's ranking in ``result.top`` (its rows come per validation
    sample, one ranking after another: an id whose rows restart at rank 1 is repeated)."""
    if result.config is not None and result.config.aggregate == "mean":
        return []
    ids, ranks = result.top.column("validation_id").to_pylist(), result.top.column("rank").to_pylist()
    starts: dict = {}
    for vid, rank in zip(ids, ranks):
        if rank == 1:
            starts[vid] = starts.get(vid, 0) + 1
    return [str(vid) for vid, n in starts.items() if n > 1]


def _candidate_counts(counts: list[int], what: str = "candidates") -> str:
    import numpy as np

    if min(counts) == max(counts):
        return f"{counts[0]} {what} each"
    return f"{what} per validation sample {min(counts)}-{max(counts)}, median {int(np.median(counts))}"


def _unsettled_warning(result) -> str:
    distinct = list(dict.fromkeys(result.unsettled))  # a validation id given twice is named once
    names = ", ".join(distinct[:5]) + (f" and {len(distinct) - 5} more" if len(distinct) > 5 else "")
    most = result.config.max_candidates if result.config and result.config.max_candidates else max(result.candidates)
    who = f"{len(distinct)} validation sample(s) ({names})"
    if result.config.aggregate == "mean":
        who = "the mean of the validation samples"
    return (
        f"warning: {who} still had top-{result.config.top_k} rows in their last candidates at {most} candidates "
        "(or the second stage its best in the last of its FAISS candidates, at the most), or fewer candidates than "
        "that (FAISS found no more, or fewer than the top-k): their top-k may miss rows; "
        "raise --max-candidates (or --pool) or use --exact"
    )


def _explain_folder(output, explain_dir):
    from pathlib import Path

    from forvalue.schemas.errors import ForValueError

    if explain_dir is not None:
        return Path(explain_dir)
    if output is None or str(output) == "-":
        raise ForValueError("--explain: give -o FILE (the pages go next to it) or --explain-dir FOLDER")
    return Path(output).with_suffix(".explain")
