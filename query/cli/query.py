"""``forvalue query``: the training samples that matter most for each validation sample."""

from __future__ import annotations

import click

from forvalue.cli.options import config_options, make, quiet_option, store_option, validation_option
from forvalue.schemas.config import DataConfig, ModelConfig, QueryConfig

_COLUMNS = ("format", "prompt_column", "response_column", "text_column", "messages_column", "id_column", "label_column",
            "image_column")


@click.command("query")
@store_option
@validation_option
@click.option("--output", "-o", default=None, help="Output file: .jsonl, .csv or .parquet (default: JSONL on stdout).")
@click.option("--all-scores", type=click.Path(), default=None,
              help="Also write the full score matrix (one row per training sample, one column per validation sample) "
                   "to this .parquet file.")
@config_options(QueryConfig)
@config_options(ModelConfig, only=("path", "dtype"))
@config_options(DataConfig, only=_COLUMNS)
@quiet_option
def query_command(store, validation, output, all_scores, quiet, **kw):
    """Rank the stored training samples by their value for each validation sample (exact scores).

    Validation samples are encoded with the store's model and settings (a different --model is refused).
    """
    from forvalue.api import run_query
    from forvalue.present.output import check_output_path, write_table

    check_output_path(output)
    cfg = make(QueryConfig, kw, progress=not quiet)
    model = make(ModelConfig, kw, device=cfg.device)
    result = run_query(store, validation, cfg, data=make(DataConfig, kw), model=model, all_scores_path=all_scores)
    write_table(result.top, output)
    if output:
        click.echo(f"scored {result.n_train} training samples against {result.n_validation} validation samples "
                   f"in {result.seconds:.1f}s; wrote {result.top.num_rows} rows to {output}", err=True)
