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
    import forvalue
    from forvalue.schemas.errors import ForValueError

    if explain_examples and not report:
        raise ForValueError("--explain-examples needs --report (the pages are linked from the report)")
    if report:
        from forvalue.present.output import check_output_path

        check_output_path(report, (".html",))
        if explain_examples:  # its pages' folder too, before the audit runs and is saved (it was checked after)
            from forvalue.explain_pages import report_pages_folder

            report_pages_folder(report, [store, *validation])
    data = make(DataConfig, kw)
    a = forvalue.open(store).audit(
        validation, name, make(AuditConfig, kw, progress=not quiet), data=data, engine=make(EngineConfig, kw)
    )
    s = a.run
    if s.auto_settings is not None:
        from forvalue.engine.variant import describe_auto

        click.echo(describe_auto(s.auto_settings), err=True)
    click.echo(
        f"audit '{s.name}' v{s.version}: {s.n_train} training samples against {s.n_validation} validation "
        f"samples ({s.encoded_now} encoded now, the rest cached) in {s.seconds:.1f}s (encode "
        f"{s.encode_seconds:.1f}s, scan {s.scan_seconds:.1f}s [{s.form} form], write {s.write_seconds:.1f}s); "
        f"{s.flagged} flagged"
    )
    if s.unjudged_labels:
        click.echo(
            f"note: {_unjudged(s.unjudged_labels)}; their flag_score is empty. Add validation samples of those "
            "labels, or flag by 'mean'",
            err=True,
        )
    if report:
        explain = validation if explain_examples else None
        page = a.report(report, explain_validation=explain, data=data, device=kw.get("device") or "auto")
        click.echo(f"report: {page}")


@audit.command("list")
@store_option
def audit_list(store):
    """List the audits of a store."""
    import forvalue

    infos = forvalue.open(store).audits.list()
    if not infos:
        click.echo(f"no audits in {store} yet: run 'forvalue audit run --store {store} -v VAL --name NAME'")
    for m in infos:
        click.echo(
            f"{m.name:<24} v{m.version:<3} {m.created}  train {m.n_train}  validation "
            f"{m.n_validation}  flagged {m.flagged}  validation sha256 {m.validation_sha256[:12]}"
        )


def _unjudged(rows_by_label: dict) -> str:
    """The line naming the training samples ``--flag-by label`` could not judge (``{label: rows}``)."""
    labels = list(rows_by_label)
    shown = ", ".join(labels[:5]) + (", ..." if len(labels) > 5 else "")
    return (
        f"{sum(rows_by_label.values())} training samples are not flagged: no validation sample has their label "
        f"({len(labels)} labels: {shown})"
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
    import forvalue

    pricing = make(PricingConfig, kw)
    if data and not pricing.group_column:
        from forvalue.schemas.errors import ForValueError

        raise ForValueError("--data is read for --group-column C (value per provider); give both, or neither")
    if report:
        from forvalue.present.output import check_output_path

        check_output_path(report, (".html",))
    st = forvalue.open(store)
    audit = st.audits[name]
    prices = audit.pricing(data, pricing, make(DataConfig, kw)) if pricing.group_column else None
    s = audit.summary(n_examples)
    i = s.info
    click.echo(
        f"audit '{name}' v{i.version} ({i.created}): {i.n_train} training vs {i.n_validation} "
        f"validation samples, {i.flagged} flagged"
    )
    if i.meta.get("unjudged_labels"):  # --flag-by label: what the run's note said, kept with the audit
        click.echo(_unjudged(i.meta["unjudged_labels"]))
    stored = len(st)  # (a row count: info() scans every row's labels)
    if stored != i.n_train:  # rows added (or removed) since: select and reports see only the audited ones
        click.echo(
            f"note: the store holds {stored} training samples, this audit scored {i.n_train} (the store changed "
            f"since); run 'forvalue audit run --name {name} ...' again to value them all"
        )
    from forvalue.engine.variant import variant_flags

    chosen = " (chosen by auto)" if i.meta.get("auto_settings") else ""
    click.echo(f"score: {variant_flags(i.meta.get('settings') or {})}{chosen}")
    click.echo(
        "mean score  min {min:.4g}  p10 {p10:.4g}  median {median:.4g}  p90 {p90:.4g}  max {max:.4g}".format(
            **s.percentiles
        )
    )
    for title, rows in (("top", s.top), ("bottom", s.bottom)):
        click.echo(f"{title}:")
        for r in rows:
            flag = "  FLAGGED" if r["flagged"] else ""
            click.echo(f"  #{r['rank']:<6} {r['score_mean']:>12.4g}  {r['id']}  [{r['label']}]{flag}")
    if prices:
        from forvalue.pricing import format_pricing

        for line in format_pricing(prices):
            click.echo(line)
    if report:
        click.echo(f"report: {audit.report(report, pricing=prices)}")


@audit.command("compare")
@store_option
@click.argument("a")
@click.argument("b")
@click.option("--report", type=click.Path(), default=None, help="Write an HTML page with the scatter of both audits.")
def audit_compare(store, a, b, report):
    """Rank correlation of two audits, the samples that moved most, newly flagged ones."""
    import forvalue

    if report:
        from forvalue.present.output import check_output_path

        check_output_path(report, (".html",))
    c = forvalue.open(store).audits[a].compare(b)
    click.echo(f"{c.common} common samples; Spearman rank correlation {c.spearman:.4f}")
    click.echo(f"newly flagged in {b}: {len(c.newly_flagged)}  {', '.join(c.newly_flagged[:10])}")
    click.echo(f"no longer flagged: {len(c.no_longer_flagged)}")
    click.echo("moved most (rank a -> rank b):")
    for m in c.moved:
        click.echo(f"  {m['id']}: {m['rank_a']} -> {m['rank_b']}")
    if report:
        from forvalue.audit import write_compare_report

        click.echo(f"report: {write_compare_report(c, report)}")


@click.command("select")
@store_option(required=False, help="Store folder or s3:// URI (with --audit).")
@click.option("--audit", "audit_name", default=None, help="Audit whose ranking (the mean score) or flags select.")
@click.option(
    "--values",
    "values",
    type=click.Path(),
    default=None,
    help="Instead of --store/--audit: a values file from 'forvalue estimate' (with --data).",
)
@click.option(
    "--data",
    multiple=True,
    type=click.Path(),
    help="With --values: the data file(s) the values came from. With --audit: the file(s) the store was built "
    "from, read for rows in their own shape (a conversation keeps its turns; else the store's text is written).",
)
@click.option("--top", default=None, help="Keep the best N or N%.")
@click.option("--drop-bottom", default=None, help="Drop the worst N or N%.")
@click.option(
    "--drop-flagged",
    is_flag=True,
    help="With --audit: keep every sample the audit did not flag (by its --flag-by score; with 'label', the "
    "samples lowest against their own label). Instead of --top / --drop-bottom.",
)
@click.option("--output", "-o", required=True, type=click.Path(), help="JSONL file for fine-tuning.")
@config_options(
    DataConfig,
    only=("id_column", "format", "prompt_column", "response_column", "text_column", "messages_column", "label_column"),
)
def select(store, audit_name, values, data, top, drop_bottom, drop_flagged, output, **kw):
    """Write the training subset chosen by an audit (or by estimated values) as JSONL.

    Each line holds id, prompt, response or text, and label; with --data, a conversation's turns (messages, or
    prompt / completion turns) as the data files hold them.
    """
    from forvalue.schemas.errors import ForValueError

    if values is not None:
        if store is not None or audit_name is not None or not data:
            raise ForValueError("--values goes with --data DATA... (not with --store/--audit)")
        if drop_flagged:
            raise ForValueError("--drop-flagged goes with --audit (a values file has no flags); use --drop-bottom")
        from forvalue.estimates import select_by_values

        chosen = select_by_values(
            values, data, top=top, drop_bottom=drop_bottom, output=output, data_config=make(DataConfig, kw)
        )
        click.echo(f"wrote {len(chosen)} training samples to {output}")
        return
    if store is None or audit_name is None:
        raise ForValueError("give --store and --audit (or --values with --data)")
    import forvalue

    chosen = (
        forvalue.open(store)
        .audits[audit_name]
        .select(
            top=top,
            drop_bottom=drop_bottom,
            output=output,
            drop_flagged=drop_flagged,
            data=list(data) or None,
            data_config=make(DataConfig, kw),
        )
    )
    click.echo(f"wrote {len(chosen)} training samples to {output}")
