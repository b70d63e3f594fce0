"""Data pricing: the value each provider's data brings, with bootstrap confidence intervals.

Given one value per sample (an audit's ``score_mean`` or a distilled estimate) and a provider
group per sample, :func:`price` reports per group: sample count, total value, mean value, the
group's share of the positive value and a rank. The share is group-level:
``share_g = max(total_g, 0) / sum_h max(total_h, 0)``, so shares sum to 1 over the groups and a
provider whose data is worth less than nothing in total gets 0 (rather than per-sample clipping,
which would pay for harmful samples mixed among good ones). Intervals are percentile bootstrap
intervals: samples are resampled with replacement within each group (the group sizes are fixed,
as a provider's contribution is), seeded.

The provider is not stored in the samples table (its Lance schema is shared with the build and
scoring code); it is read from the original data files at pricing time with the build's id rules
(:func:`forvalue.indexer.data.iter_samples_with`), so pricing works on any existing store and the
grouping can change without re-indexing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from forvalue.results import Pricing
from forvalue.schemas.config import DataConfig, PricingConfig
from forvalue.schemas.errors import ForValueError


def _shares(totals: np.ndarray) -> np.ndarray:
    """Group-level share of the positive value along the last axis (0 everywhere when none is positive)."""
    pos = np.clip(totals, 0.0, None)
    s = pos.sum(axis=-1, keepdims=True)
    return np.divide(pos, s, out=np.zeros_like(pos), where=s > 0)


_BOOT_CHUNK = 1 << 22  # resampled indices drawn at once (32 MB of int64)


def price(values: np.ndarray, groups: Sequence[str], config: PricingConfig = PricingConfig()) -> Pricing:
    """Value per group with bootstrap intervals.

    Parameters
    ----------
    values : (n,) float
        One value per sample.
    groups : sequence of str, length n
        The provider of each sample.
    config : PricingConfig
        ``bootstrap`` resamples, ``confidence``, ``bootstrap_seed``.

    Returns
    -------
    Pricing
        One row per group, best (largest total) first: ``group``, ``n``, ``total``, ``mean``,
        ``share`` and their intervals ``total_low/high``, ``mean_low/high``, ``share_low/high``,
        and ``rank`` (1 = largest total).

    Example
    -------
    >>> from forvalue.pricing import price
    >>> rows = price(np.array([3.0, 1.0, 2.0]), ["a", "b", "a"]).rows()
    >>> rows[0]["group"], rows[0]["total"]
    ('a', 5.0)
    """
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or len(values) != len(groups):
        raise ForValueError(f"pricing needs one group per value, got {len(values)} values and {len(groups)} groups")
    if not len(values):
        raise ForValueError("nothing to price: no samples")
    if not np.isfinite(values).all():
        raise ForValueError("pricing: values contain NaN or inf")
    names, inv = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    G = len(names)
    counts = np.bincount(inv, minlength=G)
    totals = np.bincount(inv, weights=values, minlength=G)
    means = totals / counts
    shares = _shares(totals)
    rng = np.random.default_rng(config.bootstrap_seed)
    boot_totals = np.zeros((config.bootstrap, G))
    for g in range(G):
        v = values[inv == g]
        # resamples drawn in chunks of ~4M indices (the same stream as one draw of all): memory bounded by the
        # chunk, not by bootstrap x group size (a 1M-sample group at 1,000 resamples needed ~17 GB)
        step = max(1, _BOOT_CHUNK // len(v))
        for lo in range(0, config.bootstrap, step):
            hi = min(config.bootstrap, lo + step)
            boot_totals[lo:hi, g] = v[rng.integers(0, len(v), size=(hi - lo, len(v)))].sum(axis=1)
    boot_shares = _shares(boot_totals)
    a = (1.0 - config.confidence) / 2 * 100
    lo_hi = lambda x: np.percentile(x, [a, 100 - a], axis=0)  # noqa: E731
    t_lo, t_hi = lo_hi(boot_totals)
    s_lo, s_hi = lo_hi(boot_shares)
    order = np.argsort(-totals, kind="stable")
    rank = np.empty(G, np.int64)
    rank[order] = np.arange(1, G + 1)
    rows = [
        {
            "group": str(names[g]),
            "n": int(counts[g]),
            "total": float(totals[g]),
            "mean": float(means[g]),
            "share": float(shares[g]),
            "total_low": float(t_lo[g]),
            "total_high": float(t_hi[g]),
            "mean_low": float(t_lo[g] / counts[g]),
            "mean_high": float(t_hi[g] / counts[g]),
            "share_low": float(s_lo[g]),
            "share_high": float(s_hi[g]),
            "rank": int(rank[g]),
        }
        for g in range(G)
    ]
    return Pricing(sorted(rows, key=lambda r: r["rank"]), confidence=config.confidence)


def read_groups(data: Sequence[str | Path], column: str, data_config: DataConfig = DataConfig()) -> dict[str, str]:
    """``{sample id: group}`` from the data files (ids by the build's rules; a missing group is an error)."""
    from forvalue.indexer.data import iter_samples_with
    from forvalue.indexer.readers import check_paths

    data = list(data)
    if not data:
        raise ForValueError(f"--group-column {column} needs the data files that hold it: give --data FILE...")
    check_paths(data)
    out: dict[str, str] = {}
    for sample, extra in iter_samples_with(data, data_config, [column]):
        out.setdefault(sample.id, extra[column])
    return out


def audit_pricing(
    store,
    audit: str,
    data: Sequence[str | Path],
    config: PricingConfig,
    data_config: DataConfig = DataConfig(),
    target: str = "score_mean",
) -> Pricing:
    """:func:`price` of an audit's ``target`` column, groups read from ``config.group_column`` of ``data``.

    Every audited sample must be found in the data files (else the shares would silently leave
    some data out); rows of the data files the audit does not cover are ignored.
    """
    from forvalue.audit import load_audit

    if not config.group_column:
        raise ForValueError("pricing needs --group-column (the data column naming each sample's provider)")
    table, _ = load_audit(store, audit)
    if target not in table.column_names:
        raise ForValueError(f"audit '{audit}' has no column '{target}'")
    by_id = read_groups(data, config.group_column, data_config)
    ids = table.column("id").to_pylist()
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ForValueError(
            f"{len(missing)} of {len(ids)} audited samples are not in the data files (e.g. "
            f"'{missing[0]}'); give every file the store was built from, with the same --id-column"
        )
    return price(table.column(target).to_numpy(), [by_id[i] for i in ids], config)


def values_pricing(values: str | Path, config: PricingConfig, column: str = "value") -> Pricing:
    """:func:`price` of a values file from ``forvalue estimate --group-column C`` (it holds column C)."""
    from forvalue.estimates import read_values

    if not config.group_column:
        raise ForValueError("pricing needs --group-column (the data column naming each sample's provider)")
    table = read_values(values, column)
    if config.group_column not in table.column_names:
        raise ForValueError(
            f"{values}: field '{config.group_column}': missing column; run 'forvalue estimate' "
            f"with --group-column {config.group_column}"
        )
    groups = table.column(config.group_column).to_pylist()
    if any(g is None for g in groups):
        raise ForValueError(f"{values}: field '{config.group_column}': missing values")
    return price(table.column(column).to_numpy(zero_copy_only=False), [str(g) for g in groups], config)


def format_pricing(pricing: Pricing) -> list[str]:
    """The pricing table as text lines (what the CLI prints)."""
    pct = f"{pricing.confidence:.0%}"
    out = [
        f"value per group ({pct} bootstrap intervals; share = group's share of the positive total value):",
        f"  {'rank':>4}  {'group':<20} {'n':>7} {'total':>12} {'mean':>11} {'share':>7}  {pct + ' share':<17} "
        f"{pct + ' total'}",
    ]
    for r in pricing.groups:
        share_ci = f"[{r['share_low']:.1%}, {r['share_high']:.1%}]"
        out.append(
            f"  {r['rank']:>4}  {r['group'][:20]:<20} {r['n']:>7} {r['total']:>12.4g} {r['mean']:>11.4g} "
            f"{r['share']:>7.1%}  {share_ci:<17} [{r['total_low']:.4g}, {r['total_high']:.4g}]"
        )
    return out


def write_pricing_report(pricing: Pricing, out: str | Path, title: str) -> Path:
    """Write a self-contained HTML page of ``pricing`` (:func:`forvalue.present.report.pricing_page`), atomically."""
    from forvalue.present.report import pricing_page
    from forvalue.storage.files import check_outputs, write_text

    check_outputs({"report": (out, (".html",))})
    return write_text(out, pricing_page(pricing, title))
