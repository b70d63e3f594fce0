"""``forvalue distill`` and ``forvalue estimate``: a cheap value model fitted on an audit, and valuing data with it."""

from __future__ import annotations

import click

from forvalue.cli.options import TEXT_COLUMN_FIELDS, config_options, make, quiet_option, store_option
from forvalue.schemas.config import DataConfig, DistillConfig, PricingConfig


def _fmt(m: dict | None) -> str:
    if not m:
        return "n/a"
    return f"Spearman {m['spearman']:.3f}, top-10% precision {m['top10_precision']:.2f}, R^2 {m['r2']:.3f} (n={m['n']})"


@click.command("distill")
@store_option
@click.option("--audit", "audit_name", required=True, help="Audit whose values the model learns.")
@click.option("--out", required=True, type=click.Path(), help="Folder of the value model (JSON + safetensors).")
@config_options(DistillConfig)
def distill_command(store, audit_name, out, **kw):
    """Fit a value model that predicts a sample's value under an audit from its text alone.

    The student never runs the store's model: hashed n-grams, or a lookup in the model's
    input-embedding table. With --fraction/--max-samples it is fitted on a random part of the
    audited rows and the rest is held out and reported.
    """
    import forvalue

    r = forvalue.open(store).audits[audit_name].distill(out, make(DistillConfig, kw))
    click.echo(
        f"value model '{r.path}': student {r.student}, {len(r.targets)} target(s), fitted on {r.n_labelled} of "
        f"{r.n_audited} audited samples in {r.seconds:.1f}s"
    )
    for name, c in r.candidates.items():
        if "skipped" in c:
            click.echo(f"  {name}: skipped ({c['skipped']})")
        else:
            click.echo(f"  {name}: leave-one-out {_fmt(c['loo'])}; held-out {_fmt(c.get('heldout'))}")


def _rate(x: float) -> str:
    """A rate or ratio for a person: whole numbers from 10 up, two significant digits below (never a bare 0)."""
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"


@click.command("estimate")
@click.argument("data", nargs=-1, type=click.Path())
@click.option(
    "--value-model", "value_model", required=True, type=click.Path(), help="Folder made by 'forvalue distill'."
)
@click.option(
    "--output",
    "-o",
    type=click.Path(),
    default=None,
    help="Values file (.parquet, .csv or .jsonl): id, value, value_vs_label:L, the group column.",
)
@store_option(
    required=False, help="Instead of DATA: value this store's samples and compare with --audit (the model's own)."
)
@click.option("--audit", "audit_name", default=None, help="With --store: the audit to compare with.")
@config_options(PricingConfig)
@config_options(DataConfig, only=TEXT_COLUMN_FIELDS)
@click.option("--report", type=click.Path(), default=None, help="With --group-column: an HTML page of value per group.")
@quiet_option
def estimate_command(data, value_model, output, store, audit_name, report, quiet, **kw):
    """Value samples with a value model only (no LLM), streaming; report the throughput.

    \b
    forvalue estimate new.jsonl --value-model runs/vm -o values.parquet
    forvalue estimate new.jsonl --value-model runs/vm -o values.parquet --group-column source
    forvalue estimate --value-model runs/vm --store runs/store --audit v1     (agreement with the exact values)
    """
    from forvalue.schemas.errors import ForValueError

    pricing = make(PricingConfig, kw)
    if store is not None or audit_name is not None:
        if data or store is None or audit_name is None:
            raise ForValueError("give DATA files, or --store with --audit (not both)")
        if report or pricing.group_column:
            raise ForValueError(
                "--report and --group-column price the groups of DATA files; with --store/--audit (a comparison) "
                "give neither, or price the audit with 'forvalue audit show --group-column C --data DATA'"
            )
        import forvalue
        from forvalue.present.output import write_table

        ev = forvalue.open(store).audits[audit_name].evaluate(value_model)
        click.echo(f"held-out samples: {_fmt(ev.heldout)}")
        click.echo(f"all samples:      {_fmt(ev.all)}")
        if output:
            write_table(ev.table, output)
            click.echo(f"wrote {ev.table.num_rows} values to {output}")
        return
    if not data:
        raise ForValueError("give the data files to value (or --store with --audit)")
    if output is None:
        raise ForValueError("give --output FILE (.parquet, .csv or .jsonl) for the values")
    if report and not pricing.group_column:
        raise ForValueError("--report is a page of value per group: give --group-column C with it (or drop --report)")
    from forvalue.estimates import estimate

    r = estimate(data, value_model, output, make(DataConfig, kw), group_column=pricing.group_column, progress=not quiet)
    speed = f"{_rate(r.samples_per_s)} samples/s"
    if r.build_samples_per_s:
        speed += f"; the store's build ran at {_rate(r.build_samples_per_s)} samples/s: {_rate(r.speedup)}x faster"
    click.echo(f"wrote {r.n} values to {output} in {r.seconds:.2f}s ({speed})")
    if r.duplicate_ids:
        click.echo(f"note: {r.duplicate_ids} rows repeat an earlier row's id and were skipped (the first is valued)")
    if pricing.group_column:
        from forvalue.pricing import format_pricing, values_pricing, write_pricing_report

        prices = values_pricing(output, pricing)
        for line in format_pricing(prices):
            click.echo(line)
        if report:
            page = write_pricing_report(prices, report, f"Estimated value per {pricing.group_column}")
            click.echo(f"report: {page}")
