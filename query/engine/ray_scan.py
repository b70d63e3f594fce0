"""Distributed scan on Ray: audits and exact queries scored by actors, one range of fragments each.

``forvalue audit run ... --engine ray`` and ``forvalue query ... --exact --engine ray`` split the
store's Lance fragments (of the version this process opened) into contiguous ranges, about
``4 x workers`` of them. The encoded validation set is put into Ray's object store once; every
task receives the reference, and its arrays are read from the node's shared object store without
a copy (one transfer per node, not per task). Each task scores one
range with the single-process code itself (:func:`forvalue.engine.scan.audit_scan` for an audit,
:func:`forvalue.engine.scan.score_all` for a query) on a :class:`FragmentStore` view, so the per-row
arithmetic is the single-process one; this process merges the ranges in storage order:

- an audit's per-row columns (ids, labels, mean, per-label means, max) are concatenated;
- a query's top-k lists are merged per validation sample, ties broken by storage position as
  :class:`forvalue.engine.ranking.TopK` does; the full score matrix, when asked for, comes back
  range by range in storage order.

Ray is imported only here and in :mod:`forvalue.indexer.ray_build`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from forvalue.schemas.config import EngineConfig
from forvalue.storage.store import Store

# Fragment ranges per worker (smaller ranges balance better, each costs one task and one scorer build).
RANGES_PER_WORKER = 4


class FragmentStore(Store):
    """A read-only :class:`Store` view on some fragments of one version of a store's table.

    Parameters
    ----------
    path : path
        The store folder.
    version : int
        The table version to read (the one the driver opened).
    fragment_ids : sequence of int
        The fragments this view holds, in storage order.
    """

    def __init__(self, path: str | Path, version: int, fragment_ids: Sequence[int]):
        import lance

        from forvalue.schemas.manifest import MANIFEST_FILE, Manifest
        from forvalue.storage.location import store_location

        path = store_location(path)  # a folder, or an s3:// location with its storage options
        super().__init__(path, Manifest.load(path / MANIFEST_FILE))
        with self.io("open"):
            self._snapshot = lance.dataset(self._uri, version=version, storage_options=self._options)
            self._mine = [self._snapshot.get_fragment(int(i)) for i in fragment_ids]

    def refresh(self) -> None:  # a view stays on its version
        pass

    def fragments(self) -> list:
        return list(self._mine)

    def count(self) -> int:
        with self.io("count the rows of"):
            return sum(f.count_rows() for f in self._mine)

    def scan(self, columns, batch_size: int = 1024, with_row_address: bool = False, fragments: list | None = None):
        return super().scan(columns, batch_size, with_row_address, self._mine if fragments is None else fragments)

    def take(self, offsets, columns):
        raise NotImplementedError("a FragmentStore is scanned, not indexed by position")


class Scorer:
    """A scoring actor: scores ranges of fragments against the validation set (a Ray actor).

    Parameters
    ----------
    device : str
        ``auto`` picks the actor's GPU when it has one.
    threads : int
        torch threads of this actor (its ``cpus_per_worker``).
    """

    def __init__(self, device: str, threads: int):
        import torch

        from forvalue.indexer.runner import resolve_device

        torch.set_num_threads(max(1, threads))
        self.device = resolve_device(device)

    def audit(self, val, path: str, version: int, fragment_ids: list, kwargs: dict):
        """:func:`forvalue.engine.scan.audit_scan` of ``val`` (a ValidationSet, resolved by Ray from the
        reference the driver put once) over ``fragment_ids``; returns its ``AuditScan``."""
        from forvalue.engine.scan import audit_scan

        view = FragmentStore(path, version, fragment_ids)
        return audit_scan(view, val, device=self.device, progress=False, **kwargs)

    def query(self, val, path: str, version: int, fragment_ids: list, first_row: int, config, keep: bool):
        """``score_all`` (:func:`forvalue.engine.scan.score_all`) of ``val`` over ``fragment_ids``, reduced to a top-k.

        Returns
        -------
        (scores, rows, blocks)
            ``scores`` float64 and ``rows`` int64 (global storage positions), each ``(n_cols, <=k)``;
            ``blocks``: the ``(ids, labels, scores)`` blocks when ``keep``, else None.
        """
        from forvalue.engine.ranking import TopK
        from forvalue.engine.scan import score_all

        view = FragmentStore(path, version, fragment_ids)
        top, blocks = None, [] if keep else None
        for first, ids, labels, scores in score_all(view, val, config, self.device):
            top = top or TopK(config.top_k, scores.shape[1])
            top.update(scores, first_row + first)
            if keep:
                blocks.append((ids, labels, scores))
        return top.scores, top.rows, blocks


def fragment_ranges(store: Store, parts: int) -> list[tuple[list[int], int]]:
    """Contiguous ranges of the store's fragments with about equal rows: ``[(fragment_ids, first_row)]``."""
    fragments = store.fragments()
    counts = [f.count_rows() for f in fragments]
    total = sum(counts)
    target = max(1, -(-total // max(1, parts)))
    out, current, first, rows = [], [], 0, 0
    for fragment, n in zip(fragments, counts):
        if n == 0:
            continue
        current.append(fragment.fragment_id)
        rows += n
        if rows >= target:
            out.append((current, first))
            current, first, rows = [], first + rows, 0
    if current:
        out.append((current, first))
    return out


def _scorers(ray, engine: EngineConfig, device: str) -> list:
    from forvalue.indexer.ray_build import worker_plan

    workers, gpw, cpw = worker_plan(ray, engine)
    # SPREAD: one actor per node before two on one (each node brings its own cores, GPUs and network)
    cls = ray.remote(Scorer).options(
        num_gpus=gpw, num_cpus=cpw, max_restarts=3, max_task_retries=3, scheduling_strategy="SPREAD"
    )
    return [cls.remote(device, cpw) for _ in range(workers)]


def _gather(ray, refs: list, bar=None, sizes: Sequence[int] = ()) -> list:
    """``ray.get`` of every ref, in order, advancing ``bar`` as each finishes; actor errors unwrapped."""
    from forvalue.indexer.ray_build import unwrap

    pending = {ref: k for k, ref in enumerate(refs)}
    out = [None] * len(refs)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            k = pending.pop(done[0])
            out[k] = ray.get(done[0])
            if bar is not None:
                bar.update(sizes[k])
    except Exception as exc:  # noqa: BLE001 - the actor's error, one line when it is the user's
        raise unwrap(exc) from None
    return out


def ray_audit_scan(
    store: Store,
    val,
    val_labels: list,
    groups: list,
    device: str,
    engine: EngineConfig,
    progress: bool = False,
    desc: str = "audit",
    **kwargs,
):
    """:func:`forvalue.engine.scan.audit_scan` of the whole store on Ray actors; the same ``AuditScan``.

    ``kwargs`` are audit_scan's (``normalize``, ``read_rows``, ``need_max``, ``form``, ``budget``).
    """
    import time

    from tqdm.auto import tqdm

    from forvalue.engine.scan import AuditScan
    from forvalue.indexer.ray_build import ray_session, release

    started = time.perf_counter()
    with ray_session(engine) as ray:
        actors = _scorers(ray, engine, device)
        val_ref = ray.put(val)  # once, read by every task
        ranges = fragment_ranges(store, RANGES_PER_WORKER * len(actors))
        sizes = [sum(store._snapshot.get_fragment(i).count_rows() for i in ids) for ids, _ in ranges]
        args = dict(val_labels=val_labels, groups=groups, **kwargs)
        refs = [
            actors[k % len(actors)].audit.remote(val_ref, store.path, store.version(), ids, args)
            for k, (ids, _) in enumerate(ranges)
        ]
        bar = tqdm(total=store.count(), desc=f"{desc} ({len(actors)} Ray workers)", unit="sample", disable=not progress)
        try:
            parts = _gather(ray, refs, bar, sizes)
        finally:
            bar.close()
            release(ray, actors)
    cat = np.concatenate
    ids = [i for p in parts for i in p.ids]
    labels = [lab for p in parts for lab in p.labels]
    maximum = cat([p.maximum for p in parts]) if parts and all(p.maximum is not None for p in parts) else None
    by_label = {g: cat([p.by_label[g] for p in parts]) for g in groups}
    return AuditScan(
        ids,
        labels,
        cat([p.mean for p in parts]),
        by_label,
        maximum,
        parts[0].form,
        max(p.passes for p in parts),
        time.perf_counter() - started,
        {**parts[0].details, "ray_workers": len(actors), "ranges": len(ranges)},
    )


def ray_score_topk(
    store: Store, val, config, device: str, engine: EngineConfig, keep: bool = False, progress: bool = False
):
    """The exact query's scan (:func:`forvalue.engine.scan.score_all`) on Ray actors: ``(top, blocks)``.

    ``top`` is a :class:`forvalue.engine.ranking.TopK` holding, per column, the ``top_k`` best rows
    of the whole store (storage positions); ``blocks`` the ``(first_row, ids, labels, scores)``
    blocks in storage order when ``keep``, else empty.
    """
    from tqdm.auto import tqdm

    from forvalue.engine.ranking import TopK
    from forvalue.indexer.ray_build import ray_session, release

    with ray_session(engine) as ray:
        actors = _scorers(ray, engine, device)
        val_ref = ray.put(val)  # once, read by every task
        ranges = fragment_ranges(store, RANGES_PER_WORKER * len(actors))
        sizes = [sum(store._snapshot.get_fragment(i).count_rows() for i in ids) for ids, _ in ranges]
        path, version = store.path, store.version()
        refs = [
            actors[k % len(actors)].query.remote(val_ref, path, version, ids, first, config, keep)
            for k, (ids, first) in enumerate(ranges)
        ]
        bar = tqdm(
            total=store.count(), desc=f"scoring ({len(actors)} Ray workers)", unit="sample", disable=not progress
        )
        try:
            parts = _gather(ray, refs, bar, sizes)
        finally:
            bar.close()
            release(ray, actors)
    scores = np.concatenate([p[0] for p in parts], axis=1)
    rows = np.concatenate([p[1] for p in parts], axis=1)
    order = np.lexsort((rows, -scores), axis=1)[:, : config.top_k]  # best first, earlier rows first on ties
    top = TopK(config.top_k, scores.shape[0])
    top.scores, top.rows = np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)
    blocks = []
    if keep:
        for (_, first), part in zip(ranges, parts):
            for ids, labels, block in part[2]:
                blocks.append((first, ids, labels, block))
                first += len(ids)
    return top, blocks
