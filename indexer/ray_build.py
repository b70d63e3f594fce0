"""Distributed build on Ray: model actors encode, write Lance fragments; this process commits them.

``forvalue index build ... --engine ray`` (:func:`forvalue.build_index` with
``engine=EngineConfig(engine="ray")``) runs the build of :mod:`forvalue.indexer.build` with the
expensive part spread over a pool of Ray actors:

- **This process (the driver)** reads the inputs with :func:`forvalue.indexer.data.iter_samples`
  and picks the new samples exactly as a single-process build does
  (:func:`forvalue.indexer.build.fresh_samples`: resume skips stored ids, repeated ids keep their
  first row). Sample ids (content hash and repeat count ``<hash>-K``) depend on the order of every
  row of every input, so this cheap pass (text only, no model) stays in one process; it cuts the
  new samples into chunks of ``write_every``.
- **Actors** (``workers`` of them, ``gpus_per_worker`` / ``cpus_per_worker`` each, one model load
  each) tokenize, encode and sketch a chunk, then write its rows as one Lance fragment into the
  store's ``samples.lance`` (``lance.fragment.write_fragments``: data files only, invisible until
  committed) and return the fragment's metadata.
- **The driver** holds the store's :class:`~forvalue.storage.store.WriterLease` for the whole run
  and commits the fragments in chunk order, each with one ``LanceOperation.Append`` (atomic, like
  :meth:`Store.append`), so the table grows in input order, chunk by chunk (within a chunk rows
  come in the encoder's length-sorted order, as in a single-process build).

A driver killed at any moment leaves the committed chunks (the re-run skips their ids) and, at
worst, uncommitted data files that no version references (``lance`` cleanup removes them): never a
duplicate row. An actor that dies is restarted by Ray and its chunk retried; the fragment of the
lost attempt is never committed. After the last commit the FAISS prefilter index is extended as
after a single-process build; the sketch basis, when the store has none yet, is fitted from the
first chunk (encoded alone before the others start), as a single-process build fits it from its
first write batch.

Ray is imported only here (and in :mod:`forvalue.engine.ray_scan`), never by a plain build.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator

from forvalue.indexer.build_steps import BuildReport, finish_build, refuse_empty_new_store
from forvalue.schemas.config import BuildConfig, EngineConfig
from forvalue.schemas.errors import ConfigError, ForValueError
from forvalue.schemas.manifest import MANIFEST_FILE

# Counters an actor fills for its chunk and the driver adds up.
_ACTOR_COUNTS = ("truncated", "no_scored_tokens", "bad_skipped", "tokens_scored")


# -- the Ray session and the worker pool (shared with forvalue.engine.ray_scan) ----------------------
@contextlib.contextmanager
def ray_session(engine: EngineConfig) -> Iterator:
    """``ray``, connected: to the Ray instance this process already runs, to ``engine.ray_address``,
    or to a new local instance (shut down on exit; one that was running is left running)."""
    try:
        import ray
    except ImportError:
        raise ForValueError("--engine ray needs Ray: pip install 'forvalue[ray]' (or pass --engine local)") from None
    started = False
    if not ray.is_initialized():
        try:
            # no --ray-address: a new local instance, not whatever cluster `ray start` last ran on this machine
            ray.init(
                address=engine.ray_address or "local",
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = engine.ray_address or "a new local Ray instance"
            raise ForValueError(
                f"--ray-address {where}: cannot start or join Ray ({str(exc).splitlines()[0][:200]}); "
                "start the cluster with 'ray start --head' or drop --ray-address"
            ) from None
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def worker_plan(ray, engine: EngineConfig) -> tuple[int, float, int]:
    """``(workers, gpus_per_worker, cpus_per_worker)`` for this cluster (the defaults of :class:`EngineConfig`).

    Raises ConfigError when the cluster cannot hold that many actors at once (they would wait forever).
    """
    resources = ray.cluster_resources()
    gpus, cpus = float(resources.get("GPU", 0.0)), float(resources.get("CPU", 1.0))
    gpw = engine.gpus_per_worker if engine.gpus_per_worker is not None else (1.0 if gpus >= 1 else 0.0)
    cpw = engine.cpus_per_worker
    if engine.workers is not None:
        workers = engine.workers
    elif gpw > 0:
        workers = max(1, int(gpus // gpw))
    else:
        workers = max(1, int(cpus // cpw))
    if gpw > 0 and workers * gpw > gpus + 1e-9:
        raise ConfigError(
            "workers" if engine.workers else "gpus_per_worker",
            f"{workers} actors x {gpw:g} GPUs need {workers * gpw:g} GPUs, the Ray cluster has {gpus:g}; "
            "lower --workers or --gpus-per-worker",
        )
    if workers * cpw > cpus + 1e-9:
        raise ConfigError(
            "workers" if engine.workers else "cpus_per_worker",
            f"{workers} actors x {cpw} CPUs need {workers * cpw} CPUs, the Ray cluster has {cpus:g}; "
            "lower --workers or --cpus-per-worker",
        )
    return workers, gpw, cpw


def release(ray, actors: list) -> None:
    """End ``actors`` now (their resources free for the next job on a shared instance)."""
    for actor in actors:
        ray.kill(actor)


def unwrap(exc: BaseException) -> BaseException:
    """The user-facing error inside a Ray task or actor error (the actor's ForValueError), else ``exc``.

    Ray wraps an actor's exception in a ``RayTaskError`` (``.cause``), and a failed actor constructor
    in an ``ActorDiedError`` built from that task error (its first argument).
    """
    seen = exc
    for _ in range(4):
        if isinstance(seen, ForValueError):
            return seen
        inner = getattr(seen, "cause", None)
        if inner is None and seen.args and isinstance(seen.args[0], BaseException):
            inner = seen.args[0]
        if inner is None:
            break
        seen = inner
    return exc


# -- the encoding actor ----------------------------------------------------------------------------
class Encoder:
    """One model load; encodes chunks of samples into Lance fragments of a store (a Ray actor).

    Parameters
    ----------
    config : BuildConfig
        The build's settings (``score_tokens`` already resolved).
    threads : int
        torch threads of this actor (its ``cpus_per_worker``).
    """

    def __init__(self, config: BuildConfig, threads: int):
        import torch

        from forvalue.indexer.model_runner import load_runner

        torch.set_num_threads(max(1, threads))
        self.config = config
        self.runner = load_runner(config.model)

    def manifest(self):
        """The manifest of the vectors this actor produces (:func:`forvalue.indexer.build.manifest_for`)."""
        from forvalue.indexer.build_steps import manifest_for

        return manifest_for(self.runner, self.config.data, self.config.encode)

    def encode(self, samples: list, store_path) -> tuple[list, dict]:
        """Tokenize, encode and sketch ``samples`` and write them as data files of the store's table.

        Returns
        -------
        (fragments, counts)
            ``fragments``: list of ``lance.fragment.FragmentMetadata`` (empty when no sample was
            kept), not yet committed; ``counts``: ``rows`` written plus :data:`_ACTOR_COUNTS`.
        """
        from lance.fragment import write_fragments

        from forvalue.indexer.build_steps import (
            finite_or_skipped,
            sketch_column,
            store_basis,
            stored_encodings,
            tokenize_counted,
        )
        from forvalue.indexer.encoder import encode_stream
        from forvalue.indexer.sketch import SketchSpec
        from forvalue.schemas.manifest import Manifest
        from forvalue.schemas.tables import SAMPLES_TABLE, schema_of
        from forvalue.storage.location import lance_options, store_location
        from forvalue.storage.rows import encoded_to_arrow
        from forvalue.storage.store import translate_errors

        config, runner = self.config, self.runner
        store_path = store_location(store_path)  # a folder, or an s3:// location with its options
        report = BuildReport(store=str(store_path))
        tokenized = [t for t in (tokenize_counted(s, runner, config, report) for s in samples) if t is not None]
        encoded = [
            e
            for e in encode_stream(runner, tokenized, config.encode, config.batch_size, training=True)
            if finite_or_skipped(e, config, report)
        ]
        counts = {"rows": len(encoded), **{k: getattr(report, k) for k in _ACTOR_COUNTS}}
        counts["tokens_scored"] = sum(len(e.hidden) for e in encoded)
        if not encoded:
            return [], counts
        manifest = Manifest.load(store_path / MANIFEST_FILE)
        spec = SketchSpec.from_manifest(manifest)
        encoded = stored_encodings(store_path, manifest, encoded)  # projected in a low-rank store
        basis, heavy = store_basis(store_path, spec, encoded)
        sketch = sketch_column(encoded, spec, basis, heavy) if spec is not None else None
        schema = schema_of(manifest)
        rows = encoded_to_arrow(encoded, manifest, sketch).cast(schema)
        with translate_errors(store_path, "write a fragment of"):
            fragments = write_fragments(
                rows,
                str(store_path / f"{SAMPLES_TABLE}.lance"),
                schema=schema,
                mode="append",
                max_rows_per_file=1 << 30,
                storage_options=lance_options(store_path),
            )
        return list(fragments), counts


# -- the driver ------------------------------------------------------------------------------------
def _chunks(samples: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def ray_build_index(
    inputs: Iterable[str | Path], store_path: str | Path, config: BuildConfig, engine: EngineConfig
) -> BuildReport:
    """:func:`forvalue.indexer.build.build_index` on a pool of Ray actors (see the module docstring).

    Parameters
    ----------
    inputs : iterable of path
        Data files, folders or globs, read in this process.
    store_path : path
        The store (created if missing); on shared storage when the actors run on other machines.
    config : BuildConfig
        As for a single-process build; ``shard`` must be ``0/1`` (Ray splits the work itself).
    engine : EngineConfig
        ``ray_address``, ``workers``, ``gpus_per_worker``, ``cpus_per_worker``.

    Returns
    -------
    BuildReport
        The same counts as a single-process build of the same inputs.
    """
    from forvalue.indexer.build_steps import resolve_score_tokens
    from forvalue.indexer.data import check_inputs
    from forvalue.storage.location import check_reachable, store_location
    from forvalue.storage.store import Store, WriterLease

    started = time.perf_counter()
    if config.shard != (0, 1):
        raise ConfigError("shard", "--engine ray splits the work over its actors itself; drop --shard")
    inputs = list(inputs)
    check_inputs(inputs, config.data)  # a bad or empty input fails before Ray starts or a model loads
    config = resolve_score_tokens(config, inputs)
    store_path = store_location(store_path)
    check_reachable(store_path)
    existing = (store_path / MANIFEST_FILE).exists()
    lease = WriterLease.acquire(store_path) if existing else None
    try:
        with ray_session(engine) as ray:
            workers, gpw, cpw = worker_plan(ray, engine)
            actor_cls = ray.remote(Encoder).options(
                num_gpus=gpw, num_cpus=cpw, max_restarts=3, max_task_retries=3, scheduling_strategy="SPREAD"
            )
            actor_config = replace(config, progress=False)
            actors = [actor_cls.remote(actor_config, cpw) for _ in range(workers)]
            try:
                try:
                    manifest = ray.get(actors[0].manifest.remote())
                except Exception as exc:  # noqa: BLE001 - a model that fails to load in the actor
                    raise unwrap(exc) from None
                store = Store.create(store_path, manifest)
                lease = lease or WriterLease.acquire(store_path)
                report = _drive(ray, actors, inputs, store, config, started)
                if not existing:
                    refuse_empty_new_store(store_path, report, inputs, config)  # (as the single-process build)
                return report
            finally:
                release(ray, actors)
    finally:
        if lease is not None:
            lease.release()


def _drive(ray, actors: list, inputs: list, store, config: BuildConfig, started: float) -> BuildReport:
    """Feed chunks to the actors (at most two in flight each) and commit their fragments in chunk order."""
    import lance
    from tqdm.auto import tqdm

    from forvalue.indexer.build_steps import fresh_samples
    from forvalue.indexer.data import iter_samples
    from forvalue.indexer.sketch import SketchSpec
    from forvalue.storage.hidden_basis import published_hidden_basis
    from forvalue.storage.sketch_basis import load_basis, load_heavy_ids

    report = BuildReport(store=str(store.path), max_length=config.data.max_length)
    stored = store.ids()
    spec = SketchSpec.from_manifest(store.manifest)
    fit_first = spec is not None and spec.basis == "fitted" and load_basis(store.path) is None
    fit_first |= spec is not None and bool(spec.heavy) and load_heavy_ids(store.path) is None
    fit_first |= bool(store.manifest.hidden_rank) and published_hidden_basis(store.path, store.manifest) is None
    chunks = _chunks(fresh_samples(iter_samples(inputs, config.data), config, stored, report), config.write_every)
    bar = tqdm(desc=f"indexing ({len(actors)} Ray workers)", unit="sample", disable=not config.progress)
    in_flight: deque = deque()  # (object ref, number of samples), in chunk order
    limit = 2 * len(actors)
    path = store.path  # a Path or a RemotePath (with its storage options), pickled to the actors

    def commit_oldest() -> None:
        ref, n = in_flight.popleft()
        try:
            fragments, counts = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - the actor's error, one line when it is the user's
            raise unwrap(exc) from None
        if fragments:
            with store.io("commit fragments to"):
                lance.LanceDataset.commit(
                    store._uri,
                    lance.LanceOperation.Append(fragments),
                    read_version=store.version(),
                    storage_options=store._options,
                )
            store.refresh()
        report.written += counts["rows"]
        for key in ("truncated", "no_scored_tokens", "bad_skipped", "tokens_scored"):
            setattr(report, key, getattr(report, key) + counts[key])
        bar.update(n)

    for k, chunk in enumerate(chunks):
        in_flight.append((actors[k % len(actors)].encode.remote(chunk, path), len(chunk)))
        if fit_first and k == 0:
            commit_oldest()  # the first chunk fits and publishes the bases before the others use them
        while len(in_flight) >= limit:
            commit_oldest()
    while in_flight:
        commit_oldest()
    bar.close()
    return finish_build(store, report, started, config.progress)
