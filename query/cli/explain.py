"""``forvalue explain``: why a training sample scores what it does for a validation sample, token by token."""

from __future__ import annotations

import click

from forvalue.cli.options import TEXT_COLUMN_FIELDS, config_options, make, store_option, validation_option
from forvalue.schemas.config import DataConfig, ExplainConfig, ModelConfig


@click.command("explain")
@store_option
@validation_option
@click.option("--train-id", required=True, help="Id of the stored training sample to explain.")
@click.option(
    "--output",
    "-o",
    default=None,
    type=click.Path(),
    help="Write the explanation: .html (a self-contained page shading every token), .jsonl or .parquet "
    "(one row per token and per top pair). Default: a summary on stdout only.",
)
@config_options(ExplainConfig)
@config_options(ModelConfig, only=("path", "dtype"))
@config_options(DataConfig, only=TEXT_COLUMN_FIELDS)
def explain_command(store, validation, train_id, output, **kw):
    """Split one score S(v, i) exactly into the contributions of both samples' tokens.

    Every term <h_vk, h_ik'> <e_vk, e_ik'> of Eq. 1 is computed from the stored training sample and
    the validation sample encoded with the store's model; the contributions of the training
    tokens (and of the validation tokens) sum to the score 'forvalue query' reports. Prints the
    score, the largest tokens of each side and the top token pairs.

    \b
    forvalue explain --store runs/store -v val.jsonl --val-index 0 --train-id rev-17 -o why.html
    """
    import forvalue
    from forvalue.present.explain_html import FORMATS
    from forvalue.present.output import check_output_path

    check_output_path(output, FORMATS)
    cfg = make(ExplainConfig, kw)
    result = forvalue.open(store).explain(
        validation, train_id, cfg, data=make(DataConfig, kw), model=make(ModelConfig, kw, device=cfg.device)
    )
    click.echo(result.summary())
    if output:
        result.save(output)
        click.echo(f"wrote {output}", err=True)
