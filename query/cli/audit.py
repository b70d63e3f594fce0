"""``forvalue audit ...`` and ``forvalue select``: parse options, call forvalue.audit, print."""

from __future__ import annotations

import json
from pathlib import Path

import click

from forvalue.cli import _data_config, _data_options, main


@main.group()
def audit() -> None:
    """Value every training sample against a validation set; list, show and compare audits."""


@audit.command("run")
@click.option("--store", required=True, type=click.Path(path_type=Path), help="Store folder.")
@click.option("--validation", "-v", "validation", multiple=True, required=True, type=click.Path(path_type=Path), help="Validation file(s).")
@click.option("--name", required=True, help="Audit name (re-using a name writes a new version).")
@click.option("--normalize", type=click.Choice(["none", "cosine"]), default="none", show_default=True)
@click.option("--flag-fraction", type=float, default=0.1, show_default=True, help="Flag this fraction with the lowest mean score.")
@click.option("--flag-threshold", type=float, default=None, help="Also flag samples whose flag score is below this.")
@click.option("--flag-by", type=click.Choice(["mean", "max", "label"]), default="mean", show_default=True,
              help="Score that flags: mean or max over validation samples, or mean over those with the sample's own label "
                   "(mislabeled data: --flag-by label when validation rows carry labels, else a "
                   "--score-tokens response store with --normalize cosine --flag-by max).")
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Write a self-contained HTML report here.")
@click.option("--device", default="auto", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_data_options
def audit_run(store, validation, name, normalize, flag_fraction, flag_threshold, flag_by, report, device, quiet, **kw):
    """Score every training sample against the validation set and save the audit in the store.

    Validation encodings are cached by content: an unchanged validation set runs no forward
    pass, and edited samples are the only ones re-encoded.
    """
    from forvalue.audit import AuditConfig, load_audit, run_audit

    cfg = AuditConfig(normalize=normalize, flag_fraction=flag_fraction, flag_threshold=flag_threshold, flag_by=flag_by,
                      device=device, progress=not quiet)
    s = run_audit(store, validation, name, cfg, data=_data_config(kw))
    click.echo(f"audit '{s.name}' v{s.version}: {s.n_train} training samples against {s.n_validation} validation samples "
               f"({s.encoded_now} encoded now, the rest cached) in {s.seconds:.1f}s; {s.flagged} flagged")
    if report:
        from forvalue.present.report import audit_report

        table, meta = load_audit(store, name)
        click.echo(f"report: {audit_report(store, table, meta, report)}")


@audit.command("list")
@click.option("--store", required=True, type=click.Path(path_type=Path))
def audit_list(store):
    """List the audits of a store."""
    from forvalue.audit import audits

    for m in audits(store):
        click.echo(f"{m['name']:<24} v{m['version']:<3} {m['created']}  train {m['n_train']}  validation {m['n_validation']}  "
                   f"flagged {m['flagged']}  validation sha256 {m['validation_sha256'][:12]}")


@audit.command("show")
@click.option("--store", required=True, type=click.Path(path_type=Path))
@click.argument("name")
@click.option("-n", "n_examples", default=5, show_default=True, help="Top and bottom examples shown.")
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Also write an HTML report.")
def audit_show(store, name, n_examples, report):
    """Summary of one audit: counts, score distribution, top and bottom examples."""
    import numpy as np

    from forvalue.audit import load_audit

    table, meta = load_audit(store, name)
    s = table.column("score_mean").to_numpy()
    q = np.percentile(s, [0, 10, 50, 90, 100])
    click.echo(f"audit '{name}' v{meta['version']} ({meta['created']}): {meta['n_train']} training vs {meta['n_validation']} "
               f"validation samples, {meta['flagged']} flagged")
    click.echo("mean score  min {:.4g}  p10 {:.4g}  median {:.4g}  p90 {:.4g}  max {:.4g}".format(*q))
    rows = sorted(table.select(["id", "label", "score_mean", "rank", "flagged"]).to_pylist(), key=lambda r: r["rank"])
    for title, part in (("top", rows[:n_examples]), ("bottom", rows[-n_examples:][::-1])):
        click.echo(f"{title}:")
        for r in part:
            click.echo(f"  #{r['rank']:<6} {r['score_mean']:>12.4g}  {r['id']}  [{r['label']}]{'  FLAGGED' if r['flagged'] else ''}")
    if report:
        from forvalue.present.report import audit_report

        click.echo(f"report: {audit_report(store, table, meta, report)}")


@audit.command("compare")
@click.option("--store", required=True, type=click.Path(path_type=Path))
@click.argument("a")
@click.argument("b")
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Write an HTML page with the scatter of both audits.")
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


@main.command("select")
@click.option("--store", required=True, type=click.Path(path_type=Path))
@click.option("--audit", "audit_name", required=True, help="Audit whose ranking selects.")
@click.option("--top", default=None, help="Keep the best N or N%.")
@click.option("--drop-bottom", default=None, help="Drop the worst N or N%.")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="JSONL file for fine-tuning.")
def select(store, audit_name, top, drop_bottom, output):
    """Write the training subset chosen by an audit as JSONL (id, prompt, response | text, label)."""
    from forvalue.audit import select_subset

    rows = select_subset(store, audit_name, top=top, drop_bottom=drop_bottom)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    click.echo(f"wrote {len(rows)} training samples to {output}")
