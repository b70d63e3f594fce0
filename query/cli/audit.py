"""``forvalue audit run|list|show|compare`` and ``forvalue select``: value the whole training set, act on it."""

from __future__ import annotations

import click

from forvalue.cli.options import COLUMN_FIELDS, config_options, make, quiet_option, store_option, validation_option
from forvalue.schemas.config import AuditConfig, DataConfig, EngineConfig, PricingConfig

_report_option = click.option(
    "--report", type=click.Path(), default=None, help="Also write a self-contained HTML report here."
)


@click.group()
def audit() -> None:
    """Value every training sample against a validation set; list, show and compare audits."""


@audit.command("run")
@store_option
@validation_option
@click.option("--name", required=True, help="Audit name (re-using a name writes a new version).")
@config_options(AuditConfig)
@config_options(DataConfig, only=COLUMN_FIELDS)
@config_options(EngineConfig)
@_report_option
@click.option(
    "--explain-examples",
    is_flag=True,
    help="With --report: explain the report's top and bottom examples token by token (pages against the "
    "mean of the validation set, in REPORT's name + .explain/, linked from the report).",
)
@quiet_option
def audit_run(store, validation, name, report, explain_examples, quiet, **kw):
    """Score every training sample against the validation set and save the audit in the store.

    Validation encodings are cached by content: an unchanged validation set runs no forward
    pass, and edited samples are the only ones re-encoded.
    """
    from forvalue.audit import run_audit
    from forvalue.schemas.errors import ForValueError

    if explain_examples and not report:
        raise ForValueError("--explain-examples needs --report (the pages are linked from the report)")
    s = run_audit(
        store,
        validation,
        name,
        make(AuditConfig, kw, progress=not quiet),
        data=make(DataConfig, kw),
        engine=make(EngineConfig, kw),
    )
    click.echo(
        f"audit '{s.name}' v{s.version}: {s.n_train} training samples against {s.n_validation} validation "
        f"samples ({s.encoded_now} encoded now, the rest cached) in {s.seconds:.1f}s (encode "
        f"{s.encode_seconds:.1f}s, scan {s.scan_seconds:.1f}s [{s.form} form], write {s.write_seconds:.1f}s); "
        f"{s.flagged} flagged"
    )
    if report:
        from forvalue.present.report import audit_report

        links = None
        if explain_examples:
            from pathlib import Path

            from forvalue.present.explain_html import explain_audit_examples

            folder = Path(report).with_suffix(".explain")
            pages = explain_audit_examples(
                store, validation, name, folder, data=make(DataConfig, kw), device=kw.get("device") or "auto"
            )
            links = {sid: f"{folder.name}/{page}" for sid, page in pages.items()}
        click.echo(f"report: {audit_report(store, name, report, explanations=links)}")


@audit.command("list")
@store_option
def audit_list(store):
    """List the audits of a store."""
    from forvalue.audit import audits

    for m in audits(store):
        click.echo(
            f"{m['name']:<24} v{m['version']:<3} {m['created']}  train {m['n_train']}  validation "
            f"{m['n_validation']}  flagged {m['flagged']}  validation sha256 {m['validation_sha256'][:12]}"
        )


@audit.command("show")
@store_option
@click.argument("name")
@click.option(
    "-n", "n_examples", default=5, show_default=True, type=click.IntRange(min=0), help="Top and bottom examples shown."
)
@_report_option
@config_options(PricingConfig)
@click.option("--data", multiple=True, type=click.Path(), help="With --group-column: the data file(s) holding it.")
@config_options(
    DataConfig, only=("id_column", "format", "prompt_column", "response_column", "text_column", "messages_column")
)
def audit_show(store, name, n_examples, report, data, **kw):
    """Summary of one audit: counts, score distribution, top and bottom examples; value per group (--group-column)."""
    from forvalue.audit import audit_summary

    pricing, prices = make(PricingConfig, kw), None
    if pricing.group_column:
        from forvalue.pricing import audit_pricing

        prices = audit_pricing(store, name, data, pricing, make(DataConfig, kw))

    s = audit_summary(store, name, n_examples)
    click.echo(
        f"audit '{name}' v{s['version']} ({s['created']}): {s['n_train']} training vs {s['n_validation']} "
        f"validation samples, {s['flagged']} flagged"
    )
    click.echo(
        "mean score  min {min:.4g}  p10 {p10:.4g}  median {median:.4g}  p90 {p90:.4g}  max {max:.4g}".format(
            **s["percentiles"]
        )
    )
    for title in ("top", "bottom"):
        click.echo(f"{title}:")
        for r in s[title]:
            flag = "  FLAGGED" if r["flagged"] else ""
            click.echo(f"  #{r['rank']:<6} {r['score_mean']:>12.4g}  {r['id']}  [{r['label']}]{flag}")
    if prices:
        from forvalue.pricing import format_pricing

        for line in format_pricing(prices, pricing.confidence):
            click.echo(line)
    if report:
        from forvalue.present.report import audit_report

        click.echo(f"report: {audit_report(store, name, report, pricing=prices, confidence=pricing.confidence)}")


@audit.command("compare")
@store_option
@click.argument("a")
@click.argument("b")
@click.option("--report", type=click.Path(), default=None, help="Write an HTML page with the scatter of both audits.")
def audit_compare(store, a, b, report):
    """Rank correlation of two audits, the samples that moved most, newly flagged ones."""
    from forvalue.audit import compare_audits

    c = compare_audits(store, a, b)
    click.echo(f"{c['common']} common samples; Spearman rank correlation {c['spearman']:.4f}")
    click.echo(f"newly flagged in {b}: {len(c['newly_flagged'])}  {', '.join(c['newly_flagged'][:10])}")
    click.echo(f"no longer flagged: {len(c['no_longer_flagged'])}")
    click.echo("moved most (rank a -> rank b):")
    for m in c["moved"]:
        click.echo(f"  {m['id']}: {m['rank_a']} -> {m['rank_b']}")
    if report:
        from forvalue.present.report import compare_report

        click.echo(f"report: {compare_report(c, report)}")


@click.command("select")
@click.option("--store", type=click.Path(), default=None, help="Store folder (with --audit).")
@click.option("--audit", "audit_name", default=None, help="Audit whose ranking selects.")
@click.option(
    "--values",
    "values",
    type=click.Path(),
    default=None,
    help="Instead of --store/--audit: a values file from 'forvalue estimate' (with --data).",
)
@click.option("--data", multiple=True, type=click.Path(), help="With --values: the data file(s) the values came from.")
@click.option("--top", default=None, help="Keep the best N or N%.")
@click.option("--drop-bottom", default=None, help="Drop the worst N or N%.")
@click.option("--output", "-o", required=True, type=click.Path(), help="JSONL file for fine-tuning.")
@config_options(
    DataConfig,
    only=("id_column", "format", "prompt_column", "response_column", "text_column", "messages_column", "label_column"),
)
def select(store, audit_name, values, data, top, drop_bottom, output, **kw):
    """Write the training subset chosen by an audit (or by estimated values) as JSONL.

    Each line holds id, prompt, response or text, and label.
    """
    from forvalue.schemas.errors import ForValueError

    if values is not None:
        if store is not None or audit_name is not None or not data:
            raise ForValueError("--values goes with --data DATA... (not with --store/--audit)")
        from forvalue.distill import select_by_values

        rows = select_by_values(
            values, data, top=top, drop_bottom=drop_bottom, output=output, data_config=make(DataConfig, kw)
        )
        click.echo(f"wrote {len(rows)} training samples to {output}")
        return
    if store is None or audit_name is None:
        raise ForValueError("give --store and --audit (or --values with --data)")
    from forvalue.audit import select_subset

    rows = select_subset(store, audit_name, top=top, drop_bottom=drop_bottom, output=output)
    click.echo(f"wrote {len(rows)} training samples to {output}")
