"""The public handle on a store: ``forvalue.open(path)`` and ``forvalue.build(data, path)`` return a :class:`Store`.

Everything a user does with a store is a method of what these return (LanceDB's
``connect()`` pattern): :meth:`Store.query`, :meth:`Store.audit`, :attr:`Store.audits`
(name -> :class:`Audit`), :meth:`Store.explain`, :meth:`Store.check`, :meth:`Store.info`,
:meth:`Store.add`, :meth:`Store.sketch`. Each returns a typed result
(:mod:`forvalue.results`); the CLI calls exactly these and only formats their results. The
store's model is loaded once per handle, on first use, and kept for the next call.

Example
-------
>>> import forvalue
>>> st = forvalue.open(store_path)
>>> st.info().samples
12
>>> r = st.query(validation_path, forvalue.QueryConfig(top_k=3, progress=False))
>>> r.top.num_rows                                  # 3 per validation sample
6
>>> run = st.audit(validation_path, "v1", forvalue.AuditConfig(progress=False))
>>> sorted(st.audits), st.audits["v1"].info.version
(['v1'], 1)
>>> st.audits["v1"].select(top="50%").to_arrow().num_rows
6
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from forvalue.results import (
    AuditComparison,
    AuditInfo,
    AuditRun,
    AuditSummary,
    CheckReport,
    Pricing,
    Selection,
    SketchReport,
    StoreInfo,
    ValueModelEvaluation,
)
from forvalue.schemas.config import (
    AuditConfig,
    BuildConfig,
    DataConfig,
    DistillConfig,
    EngineConfig,
    ExplainConfig,
    ModelConfig,
    PricingConfig,
    QueryConfig,
)
from forvalue.storage.store import Store as _Table

Validation = Iterable[str | Path] | Sequence[dict]


def open(path: str | Path, storage_options: Mapping[str, str] | None = None) -> "Store":
    """Open an existing store (raises :class:`~forvalue.ForValueError` with one line if ``path`` is not one).

    ``path`` is a folder or an object-store URI (``s3://bucket/stores/s1``); ``storage_options``
    (``{"endpoint": ..., "region": ..., "allow_http": "true"}``, keys of
    :data:`forvalue.storage.location.OPTION_ENV`) override the ``AWS_*`` environment variables.

    Example
    -------
    >>> st = forvalue.open(store_path)
    >>> len(st), st.manifest.top_m
    (12, 32)
    >>> forvalue.open("no-such-store")
    Traceback (most recent call last):
    ...
    forvalue.schemas.errors.StoreError: no-such-store: no such store (not a folder); build one with ...
    """
    return Store(path, storage_options)


def build(
    data: Sequence[str | Path] | str | Path,
    path: str | Path,
    config: BuildConfig = BuildConfig(),
    engine: EngineConfig | None = None,
    storage_options: Mapping[str, str] | None = None,
) -> "Store":
    """One forward pass over ``data`` into a new (or resumed) store at ``path``; returns the opened store.

    ``data``: JSONL, Parquet or CSV files, globs or ``datasets`` folders. Re-running skips ids
    already stored, so an interrupted build resumes. The build's counts are in ``store.last_build``.
    ``path`` may be an ``s3://`` URI (``storage_options`` as for :func:`open`).

    Example
    -------
    >>> cfg = forvalue.BuildConfig(model=forvalue.ModelConfig(path=model_path), progress=False)  # default: SmolLM2
    >>> st = forvalue.build(train_path, "my-store", cfg)
    >>> st.last_build.written, st.info().samples
    (12, 12)
    """
    from forvalue.indexer.build import build_index
    from forvalue.storage.location import store_location

    path = store_location(path, storage_options)
    report = build_index(_paths(data), path, config, engine=engine)
    st = Store(path)
    st.last_build = report
    return st


def _paths(data) -> list:
    """:func:`forvalue.indexer.readers.as_paths`, imported on first use (it loads pyarrow)."""
    from forvalue.indexer.readers import as_paths

    return as_paths(data)


class Store:
    """A forvalue store: its samples, its audits, and the model it was built with.

    Attributes
    ----------
    path : Path or forvalue.storage.location.RemotePath
        The store's folder, or its object-store location (``s3://...``).
    manifest : forvalue.schemas.manifest.Manifest
        The model identity and encoding settings every query is checked against.
    last_build : BuildReport or None
        Counts of the last :func:`build` / :meth:`add` through this handle.
    """

    def __init__(self, path: str | Path, storage_options: Mapping[str, str] | None = None):
        from forvalue.storage.location import store_location

        self.path = store_location(path, storage_options)
        self._table = _Table.open(self.path)
        self._runner = None
        self._runner_key = None
        self.last_build = None

    def __repr__(self) -> str:
        m = self.manifest
        return f"Store('{self.path}', model={m.model_path!r}, hidden={m.hidden_dtype}, top_m={m.top_m})"

    @property
    def manifest(self):
        return self._table.manifest

    def _fresh(self) -> _Table:
        """The table at its latest version (another process may have appended)."""
        self._table = _Table.open(self.path)
        return self._table

    def __forvalue_store__(self) -> _Table:
        """The low-level store at its latest version: what the module-level functions (``forvalue.audit``,
        ``forvalue.distill``, ...) use when given this handle (``forvalue.session.storage_of``)."""
        return self._fresh()

    def _lazy_runner(self, model: ModelConfig | None, device: str):
        """A function returning :meth:`_runner_for`: the workflows call it only once the inputs passed their
        checks, so bad input is refused before the model loads, and the handle still loads it once."""
        return lambda: self._runner_for(model, device)

    def _runner_for(self, model: ModelConfig | None, device: str):
        """The store's model, loaded once per handle and device (and overrides), then reused."""
        from forvalue.session import load_store_runner

        model = replace(model or ModelConfig(), device=device)
        if self._runner is None or self._runner_key != model:
            self._runner = load_store_runner(self._table, model)
            self._runner_key = model
        return self._runner

    def __len__(self) -> int:
        return self._fresh().count()

    # -- reading ---------------------------------------------------------------------------------
    def info(self) -> StoreInfo:
        """Samples, scored tokens, labels, bytes per token, sketch and prefilter state, manifest (loads no model)."""
        from forvalue.maintenance import store_info

        return store_info(self.path)

    def check(self, repair: bool = False) -> CheckReport:
        """Verify the store (ids unique, rows decode, manifest agrees, index and audits consistent).

        ``repair=True`` takes the writer lease, removes duplicate rows and rebuilds an unsound
        prefilter index, then checks again. Loads no model.
        """
        from forvalue.maintenance import check_store

        report = check_store(self.path, repair=repair)
        self._fresh()
        return report

    def to_arrow(self, columns: Sequence[str] = ("id", "label", "prompt", "response", "text", "n_scored")):
        """The stored samples' metadata columns as a pyarrow Table (no hidden states)."""
        import pyarrow as pa

        table = self._fresh()
        return pa.Table.from_batches(list(table.scan(list(columns), batch_size=8192)))

    # -- writing ---------------------------------------------------------------------------------
    def add(self, data, config: BuildConfig = BuildConfig(), engine: EngineConfig | None = None):
        """Append ``data`` with the store's own model and encoding settings; returns the :class:`BuildReport`."""
        from forvalue.api import add_to_index

        report = add_to_index(_paths(data), self.path, config, engine=engine)
        self.last_build = report
        self._fresh()
        return report

    def sketch(
        self,
        dim: int | None = None,
        rebuild: bool = False,
        seed: int | None = None,
        faiss_index: str | None = None,
        vocab_buckets: int | None = None,
        hidden_cols: int | None = None,
        basis: str | None = None,
        heavy_ids: int | None = None,
    ) -> SketchReport:
        """Add (or recompute) the prefilter sketches and their FAISS index; unset options keep the store's."""
        from forvalue.maintenance import sketch_store

        report = sketch_store(
            self.path,
            rebuild=rebuild,
            dim=dim,
            seed=seed,
            kind=faiss_index,
            vocab_buckets=vocab_buckets,
            hidden_cols=hidden_cols,
            basis=basis,
            heavy_ids=heavy_ids,
        )
        self._fresh()
        return report

    def convert(
        self,
        out: str | Path,
        hidden_dtype: str | None = None,
        int8_block: int | None = None,
        top_m: int | None = None,
        write_every: int = 512,
        progress: bool = True,
        hidden_rank: int | None = None,
    ) -> "Store":
        """Write this store into a new compact store at ``out`` without a forward pass; returns it, opened.

        ``hidden_dtype="int8"`` halves the hidden states' bytes (``int8_block`` channels per float16 scale);
        ``hidden_rank=R`` stores R coordinates per token in a basis fitted to this store's hidden states (the
        low-rank tier; validation samples are projected onto the same basis); ``top_m`` keeps fewer error
        entries. Scores of the new store are exact on its stored values (the loss against float16 is measured
        in docs/benchmarks.md). Resumes after an interruption; this store is never
        modified. The run's counts are in ``last_build`` of the returned store.
        """
        from forvalue.indexer.convert import convert_store

        report = convert_store(
            self.path,
            out,
            hidden_dtype,
            int8_block,
            top_m,
            block_rows=write_every,
            progress=progress,
            hidden_rank=hidden_rank,
        )
        converted = Store(out)
        converted.last_build = report
        return converted

    # -- scoring ---------------------------------------------------------------------------------
    def query(
        self,
        validation: Validation,
        config: QueryConfig = QueryConfig(),
        data: DataConfig = DataConfig(),
        model: ModelConfig | None = None,
        keep_scores: bool = False,
        all_scores_path: str | Path | None = None,
        engine: EngineConfig | None = None,
    ):
        """The top-k training samples for each validation sample (exact scores, or prefiltered ones).

        Returns a :class:`~forvalue.api.QueryResult`: ``top`` (pyarrow), and the full score matrix with
        ``keep_scores`` (or streamed to ``all_scores_path``, Parquet).
        """
        from forvalue.api import run_query

        on_ray = engine is not None and engine.engine == "ray"
        runner = None if on_ray else self._lazy_runner(model, config.device)
        return run_query(
            self._fresh(),
            _paths(validation),
            config,
            data=data,
            model=model,
            runner=runner,
            keep_scores=keep_scores,
            all_scores_path=all_scores_path,
            engine=engine,
        )

    def explain(
        self,
        validation: Validation,
        train_id: str,
        config: ExplainConfig = ExplainConfig(),
        data: DataConfig = DataConfig(),
        model: ModelConfig | None = None,
    ):
        """Split one score exactly into token contributions; returns an :class:`~forvalue.engine.explain.Explanation`.

        Save it as a page with ``explanation.save("why.html")`` (or ``.jsonl`` / ``.parquet``).
        """
        from forvalue.engine.explain import explain

        runner = self._lazy_runner(model, config.device)  # loaded after explain() checked the id and inputs
        return explain(self._fresh(), _paths(validation), train_id, config, data=data, model=model, runner=runner)

    def explain_results(
        self,
        result,
        validation: Validation,
        n: int,
        folder: str | Path,
        data: DataConfig = DataConfig(),
        model: ModelConfig | None = None,
        device: str = "auto",
    ):
        """One page per top-``n`` result of :meth:`query` (``result``) in ``folder`` and an ``index.html``.

        Returns ``result.top`` with a column ``explanation`` naming each page (None beyond rank ``n``).
        """
        from forvalue.explain_pages import explain_query_results

        runner = self._runner_for(model, device)
        variant = getattr(result, "config", None)  # explained in the query's score variant
        return explain_query_results(
            self._fresh(), runner, _paths(validation), result.top, n, folder, data, variant=variant
        )

    def audit(
        self,
        validation: Validation,
        name: str,
        config: AuditConfig = AuditConfig(),
        data: DataConfig = DataConfig(),
        model: ModelConfig | None = None,
        engine: EngineConfig | None = None,
    ) -> "Audit":
        """Value every training sample against ``validation``; save it as audit ``name`` (a new version if it exists).

        Returns the :class:`Audit`; its ``run`` holds this run's counts and time split. Validation
        encodings are cached in the store by content, so a re-run encodes only changed samples.
        """
        from forvalue.audit import run_audit

        on_ray = engine is not None and engine.engine == "ray"
        runner = None if on_ray else self._lazy_runner(model, config.device)
        run = run_audit(
            self._fresh(), _paths(validation), name, config, data=data, model=model, runner=runner, engine=engine
        )
        return Audit(self, name, run=run)

    @property
    def audits(self) -> "Audits":
        """The store's audits by name (a read-only mapping of :class:`Audit`)."""
        return Audits(self)

    def distill(self, audit: str, out: str | Path, config: DistillConfig = DistillConfig()):
        """Fit a value model on audit ``audit`` and save it to folder ``out``; returns the :class:`DistillReport`."""
        return self.audits[audit].distill(out, config)


class Audits(Mapping):
    """A store's audits, name -> :class:`Audit` (read each time, so a new audit shows at once)."""

    def __init__(self, store: Store):
        self._store = store

    def __getitem__(self, name: str) -> "Audit":
        from forvalue.storage.audits import audit_meta

        audit_meta(self._store._fresh(), name)  # unknown names: one line listing the known ones
        return Audit(self._store, name)

    def __iter__(self) -> Iterator[str]:
        from forvalue.storage.audits import audit_names

        return iter(audit_names(self._store._fresh()))

    def __contains__(self, name: object) -> bool:
        return name in list(self)  # an unknown name is no error here (``in`` and ``get``: the Mapping contract)

    def get(self, name: str, default=None):
        """The audit ``name``, or ``default`` when the store has none of that name."""
        return self[name] if name in self else default

    def __len__(self) -> int:
        from forvalue.storage.audits import audit_names

        return len(audit_names(self._store._fresh()))

    def list(self) -> list[AuditInfo]:
        """Every audit's :class:`~forvalue.results.AuditInfo`, by name."""
        from forvalue.audit import audits

        return audits(self._store._fresh())

    def __repr__(self) -> str:
        return f"Audits({list(self)})"


class Audit:
    """One audit of a store (its latest version): scores, summary, comparisons, selections, pricing.

    Attributes
    ----------
    name : str
    run : AuditRun or None
        This run's counts and time split when the handle comes from :meth:`Store.audit`.
    """

    def __init__(self, store: Store, name: str, run: AuditRun | None = None):
        self.store = store
        self.name = name
        self.run = run

    def __repr__(self) -> str:
        return f"Audit('{self.name}' of {self.store.path})"

    @property
    def info(self) -> AuditInfo:
        """The audit's metadata (version, created, counts, validation hash, settings in ``meta``); reads no rows."""
        from forvalue.storage.audits import audit_meta

        return AuditInfo.from_meta(audit_meta(self.store._fresh(), self.name))

    def table(self):
        """The audit's table (pyarrow): ``id``, ``label``, ``score_mean``, ``score_max``, ``rank``, ``flagged``..."""
        from forvalue.audit import load_audit

        return load_audit(self.store._fresh(), self.name)[0]

    def to_arrow(self):
        """Same as :meth:`table`."""
        return self.table()

    def to_pandas(self):
        """The audit's table as a pandas DataFrame (needs pandas)."""
        return self.table().to_pandas()

    def summary(self, n_examples: int = 5) -> AuditSummary:
        """Mean-score percentiles and the ``n_examples`` top and bottom samples."""
        from forvalue.audit import audit_summary

        return audit_summary(self.store._fresh(), self.name, n_examples)

    def compare(self, other: "Audit | str", n_moved: int = 10) -> AuditComparison:
        """Spearman of the two audits' mean scores, the samples that moved most, flag changes."""
        from forvalue.audit import compare_audits

        other_name = other.name if isinstance(other, Audit) else other
        return compare_audits(self.store._fresh(), self.name, other_name, n_moved)

    def select(
        self,
        top: str | int | None = None,
        drop_bottom: str | int | None = None,
        output: str | Path | None = None,
        drop_flagged: bool = False,
        data: Validation | None = None,
        data_config: DataConfig = DataConfig(),
    ) -> Selection:
        """Keep the best ``top`` (``N`` or ``'N%'``, by the mean score), drop the worst ``drop_bottom``, or drop the
        rows the audit flagged (``drop_flagged``); optionally write JSONL. With ``data`` (the files the store was
        built from) the rows keep the files' shape (a conversation its turns)."""
        from forvalue.audit import select_subset

        top = None if top is None else str(top)
        drop_bottom = None if drop_bottom is None else str(drop_bottom)
        return select_subset(
            self.store._fresh(),
            self.name,
            top=top,
            drop_bottom=drop_bottom,
            output=output,
            drop_flagged=drop_flagged,
            data=data,
            data_config=data_config,
        )

    def pricing(
        self, data: Sequence[str | Path], config: PricingConfig, data_config: DataConfig = DataConfig()
    ) -> Pricing:
        """Value per provider group (``config.group_column`` of ``data``) with bootstrap intervals."""
        from forvalue.pricing import audit_pricing

        return audit_pricing(self.store._fresh(), self.name, _paths(data), config, data_config)

    def report(
        self,
        out: str | Path,
        n_examples: int = 10,
        pricing: Pricing | None = None,
        explain_validation: Validation | None = None,
        data: DataConfig = DataConfig(),
        device: str = "auto",
    ) -> Path:
        """Write a self-contained HTML report; with ``explain_validation``, token pages for its examples."""
        from forvalue.audit import write_audit_report

        links = None
        if explain_validation is not None:
            from forvalue.explain_pages import explain_audit_examples, report_pages_folder

            # checked before the pages are explained (a model load), not after
            folder = report_pages_folder(out, [self.store.path, *_paths(explain_validation)])
            pages = explain_audit_examples(
                self.store._fresh(), _paths(explain_validation), self.name, folder, n_examples, data=data, device=device
            )
            links = {sid: f"{folder.name}/{page}" for sid, page in pages.items()}
        return write_audit_report(self.store._fresh(), self.name, out, n_examples, pricing, links)

    def evaluate(self, value_model) -> "ValueModelEvaluation":
        """A value model (folder or :class:`~forvalue.ValueModel`) fitted on this audit against its exact values."""
        from forvalue.distill import evaluate_value_model

        return evaluate_value_model(value_model, self.store._fresh(), self.name)

    def distill(self, out: str | Path, config: DistillConfig = DistillConfig()):
        """Fit a value model on this audit's values and save it to folder ``out`` (:class:`DistillReport`).

        Check it on the audit's own rows with :meth:`evaluate`."""
        from forvalue.distill import distill_value_model

        return distill_value_model(self.store._fresh(), self.name, out, config)
