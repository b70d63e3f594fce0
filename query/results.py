"""Typed results of the public API: what :class:`forvalue.Store` and :class:`forvalue.Audit` methods return.

Each result is a dataclass with a short ``repr`` a notebook shows, ``as_dict()`` for JSON, and,
where it is tabular, ``to_arrow()`` / ``to_pandas()``. Results that other modules already define
(:class:`~forvalue.indexer.build.BuildReport`, :class:`~forvalue.api.QueryResult`,
:class:`~forvalue.engine.explain.Explanation`, the distillation reports) follow the same rules.

Example
-------
>>> from forvalue.results import Pricing
>>> p = Pricing([{"group": "a", "n": 2, "total": 5.0}], confidence=0.9)
>>> p.to_arrow().column("total").to_pylist()
[5.0]
>>> p
Pricing(1 groups, confidence 0.9)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa


class Result:
    """Mixin: ``as_dict()`` (JSON-ready values) for every result dataclass."""

    def as_dict(self) -> dict:
        """The fields as plain Python values (paths as strings, arrays as lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if not f.name.startswith("_")}


class TableResult(Result):
    """Mixin: a result with rows; ``to_arrow()`` and ``to_pandas()`` read them."""

    def rows(self) -> list[dict]:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def to_arrow(self) -> pa.Table:
        """The rows as a pyarrow Table."""
        return pa.Table.from_pylist(self.rows())

    def to_pandas(self):
        """The rows as a pandas DataFrame (needs pandas)."""
        return self.to_arrow().to_pandas()


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in vars(value).items()}
    return value


# -- stores ----------------------------------------------------------------------------------------
@dataclass(repr=False)
class StoreInfo(Result):
    """What a store holds (``forvalue index info``): counts, size, sketch and prefilter state, its manifest."""

    path: str
    samples: int
    scored_tokens: int
    truncated_samples: int
    labels: dict | str  # label -> count, or "N distinct" beyond 50 labels
    table_version: int
    bytes_on_disk: int
    bytes_per_token: float | None
    sketch: str
    prefilter_index: str
    manifest: dict
    # how hidden states are stored: dtype, int8 block, and for the low-rank tier the rank and the energy it keeps
    hidden_states: str = ""

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"StoreInfo({self.path}: {self.samples} samples, {self.scored_tokens} scored tokens, "
            f"{self.bytes_on_disk / 1e6:.1f} MB ({self.bytes_per_token} B/token), model {m.get('model_path')}, "
            f"hidden {m.get('hidden_dtype')}, top-m {m.get('top_m')})"
        )


@dataclass(repr=False)
class CheckReport(Result):
    """Outcome of :meth:`forvalue.Store.check`: ``clean`` or one line per problem; ``repaired`` with ``repair``."""

    store: str
    rows: int
    problems: list[str]
    notes: list[str]
    clean: bool
    distinct_ids: int = 0
    repaired: dict | None = None
    _duplicate_addresses: list = field(default_factory=list)  # row addresses a repair deletes
    _prefilter_unsound: bool = False

    def __repr__(self) -> str:
        state = "clean" if self.clean else f"{len(self.problems)} problems"
        return f"CheckReport({self.store}: {self.rows} rows, {state})"


@dataclass(repr=False)
class SketchReport(Result):
    """Outcome of :meth:`forvalue.Store.sketch`: the sketch spec, whether rows were sketched, the FAISS index."""

    store: str
    rows: int
    sketch_dim: int
    sketch_basis: str
    vocab_buckets: int
    hidden_cols: int
    sketched: bool
    heavy_ids: int = 0
    sketch_seconds: float = 0.0
    faiss: str | None = None
    faiss_rows: int = 0
    faiss_seconds: float = 0.0
    faiss_bytes: int | None = None

    def __repr__(self) -> str:
        what = "sketched" if self.sketched else "sketch kept"
        return f"SketchReport({self.store}: {self.rows} rows {what} (D={self.sketch_dim}), index {self.faiss})"


# -- audits ----------------------------------------------------------------------------------------
@dataclass(repr=False)
class AuditInfo(Result):
    """An audit's metadata as stored with it (``forvalue audit list``); ``meta`` holds the full record."""

    name: str
    version: int
    created: str
    n_train: int
    n_validation: int
    flagged: int
    validation_sha256: str
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_meta(cls, meta: dict) -> "AuditInfo":
        return cls(
            name=meta["name"],
            version=int(meta["version"]),
            created=meta.get("created", ""),
            n_train=int(meta.get("n_train", 0)),
            n_validation=int(meta.get("n_validation", 0)),
            flagged=int(meta.get("flagged", 0)),
            validation_sha256=meta.get("validation_sha256", ""),
            meta=dict(meta),
        )

    def __repr__(self) -> str:
        return (
            f"AuditInfo('{self.name}' v{self.version}, {self.created}: {self.n_train} training vs "
            f"{self.n_validation} validation samples, {self.flagged} flagged)"
        )


@dataclass(repr=False)
class AuditRun(Result):
    """Outcome of :meth:`forvalue.Store.audit` (one run): counts, time and its split, the scan's form."""

    name: str
    version: int
    n_train: int
    n_validation: int
    encoded_now: int
    flagged: int
    seconds: float
    validation_sha256: str
    encode_seconds: float = 0.0  # validation encoding (cache look-up, model load and forward passes of new samples)
    scan_seconds: float = 0.0  # scoring the store
    write_seconds: float = 0.0  # flags, ranks and the audit table
    form: str = "token"  # "gform" (aggregates as one matrix each) or "token" (per-validation-sample scores)
    auto_settings: dict | None = None  # auto whiten / validation tokens: what was chosen, each candidate's AUC
    # --flag-by label: training rows never flagged, no validation sample having their label, by label
    unjudged_labels: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"AuditRun('{self.name}' v{self.version}: {self.n_train} training vs {self.n_validation} validation "
            f"samples, {self.flagged} flagged, {self.seconds:.1f}s [{self.form} form])"
        )


@dataclass(repr=False)
class AuditSummary(TableResult):
    """What ``forvalue audit show`` prints: the audit's info, mean-score percentiles, top and bottom rows.

    ``rows()`` / ``to_arrow()`` give the top rows then the bottom rows (worst first), with a ``part`` column.
    """

    info: AuditInfo
    percentiles: dict  # min, p10, median, p90, max of score_mean
    top: list[dict]
    bottom: list[dict]

    def rows(self) -> list[dict]:
        return [{"part": "top", **r} for r in self.top] + [{"part": "bottom", **r} for r in self.bottom]

    def __repr__(self) -> str:
        p = self.percentiles
        return f"AuditSummary({self.info!r}, median {p['median']:.4g} [{p['min']:.4g}, {p['max']:.4g}])"


@dataclass(repr=False)
class AuditComparison(TableResult):
    """Two audits side by side: Spearman of their mean scores (average ranks for ties), moves, flag changes.

    ``rows()`` / ``to_arrow()`` list the samples that moved most (``id``, ``rank_a``, ``rank_b``);
    ``scores`` holds both audits' mean scores over the ``common`` samples.
    """

    a: str
    b: str
    common: int
    spearman: float
    moved: list[dict]
    newly_flagged: list[str]
    no_longer_flagged: list[str]
    scores: tuple[np.ndarray, np.ndarray]

    def rows(self) -> list[dict]:
        return list(self.moved)

    def __repr__(self) -> str:
        return (
            f"AuditComparison('{self.a}' vs '{self.b}': {self.common} common samples, Spearman "
            f"{self.spearman:.4f}, {len(self.newly_flagged)} newly flagged)"
        )


@dataclass(repr=False)
class ValueModelEvaluation(TableResult):
    """A value model against the exact values of the audit it was trained for.

    ``heldout`` and ``all``: :func:`forvalue.metrics.agreement` (``n``, ``spearman``, ``top10_precision``,
    ``r2``) on the rows the model was not fitted on (None below 2 rows) and on every row; ``table``: one
    row per audited sample (``id``, ``value``, ``exact``, ``labelled``), what ``to_arrow()`` returns.
    """

    heldout: dict | None
    all: dict
    table: pa.Table

    def rows(self) -> list[dict]:
        return self.table.to_pylist()

    def to_arrow(self) -> pa.Table:
        return self.table

    def as_dict(self) -> dict:
        return {"heldout": self.heldout, "all": self.all}

    def __repr__(self) -> str:
        held = self.heldout["spearman"] if self.heldout else float("nan")
        return f"ValueModelEvaluation(held-out Spearman {held:.3f}, all {self.all['spearman']:.3f}, n={self.all['n']})"


@dataclass(repr=False)
class Selection(TableResult):
    """Training rows chosen by an audit or by estimated values, best first; ``output`` when written."""

    selected: list[dict]
    total: int
    output: Path | None = None

    def rows(self) -> list[dict]:
        return list(self.selected)

    def __len__(self) -> int:
        return len(self.selected)

    def __repr__(self) -> str:
        where = f" -> {self.output}" if self.output else ""
        return f"Selection({len(self.selected)} of {self.total} samples{where})"


@dataclass(repr=False)
class Pricing(TableResult):
    """Value per provider group with bootstrap intervals, best (largest total) first.

    Each row: ``group``, ``n``, ``total``, ``mean``, ``share``, their intervals ``*_low`` / ``*_high``
    and ``rank`` (1 = largest total).
    """

    groups: list[dict]
    confidence: float

    def rows(self) -> list[dict]:
        return list(self.groups)

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __repr__(self) -> str:
        return f"Pricing({len(self.groups)} groups, confidence {self.confidence})"
