"""The one scan loop over a store, shared by queries and audits, and the audit's scan built on it.

:func:`scan_blocks` reads the store in row batches and decodes them in a thread while the current
batch is scored (:func:`read_ahead`); :func:`score_all` (a query) and :func:`audit_scan` (an audit:
aggregates in the G-form, or every per-validation-sample score in the token form in memory-bounded
passes) both score what it yields, and :func:`cosine` normalises per-sample scores for both.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from forvalue.engine.gform import BlockedGForm, aggregate_weights
from forvalue.engine.plan import (
    bounded_val_blocks,
    choose_form,
    cpu_workers,
    memory_budget,
    one_torch_thread,
    plan_passes,
    wait_through_ctrl_c,
)
from forvalue.engine.scorer import BlockedScorer, ExactScorer
from forvalue.engine.validation import ValidationSet
from forvalue.engine.variant import as_block, for_scoring
from forvalue.schemas.tables import SCORING_COLUMNS
from forvalue.storage.rows import decode_block

SCAN_COLUMNS = SCORING_COLUMNS + ["id", "label"]


# Stored blocks scored at once by the G-form's pair way on a CPU (threads, each with torch on one thread)
GFORM_BLOCK_WORKERS = cpu_workers()


def read_ahead(batches, hidden_size: int, depth: int = 2, val: ValidationSet | None = None):
    """``(batch, decode_block(batch))`` for each batch of ``batches``, read and decoded by a thread up to ``depth``
    batches ahead, so the store's read and the decode overlap the scoring (both release the GIL for most of
    their work). With ``val``, blocks are read as its scorers need them (:func:`~forvalue.engine.variant.for_scoring`).
    An error of the read is raised here, in order; leaving the loop early stops the thread."""
    slots: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for batch in batches:
                block = decode_block(batch, hidden_size)
                if not put(("batch", (batch, block if val is None else for_scoring(block, val)))):
                    return
            put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put(("error", exc))

    jobs = _Jobs()
    thread = threading.Thread(target=jobs.wrap(run), name="forvalue-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = slots.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        # not thread.join: a second Ctrl-C in it escaped this generator's cleanup ("Exception ignored in: <generator
        # object read_ahead ...>" and a traceback), and a join cut by Ctrl-C can mark a running thread stopped
        jobs.stop(timeout=5.0)


def scan_blocks(store, read_rows: int = 1024, val: ValidationSet | None = None):
    """``(first_row, batch, block)`` for every row batch of ``store`` in storage order (ids and labels in
    ``batch``, the decoded :class:`~forvalue.storage.rows.TrainBlock` in ``block``, read as ``val``'s scorers
    need it), read ahead by a thread."""
    first = 0
    batches = store.scan(SCAN_COLUMNS, batch_size=read_rows)
    for batch, block in read_ahead(batches, store.manifest.stored_width, val=val):
        yield first, batch, block
        first += batch.num_rows


def _build_while_reading(blocks, val: ValidationSet, weights: np.ndarray, device, budget: int):
    """``(scorer, head)``: the G-form of ``weights`` built while a thread takes the first block of ``blocks`` (a
    :func:`scan_blocks` generator; ``head`` a list of it, empty for an empty store), so the store's read and decode
    overlap the build (~1 s for 1,000 validation samples) instead of following it. The build stays on the calling
    thread (Ctrl-C stops it); when it fails, ``blocks`` is closed (its reader stopped) once the thread's read is
    done, or without it when that read had not begun."""
    jobs = _Jobs()
    with ThreadPoolExecutor(1) as first:
        try:
            head = first.submit(jobs.wrap(lambda: list(itertools.islice(blocks, 1))))
            scorer = BlockedGForm(val, weights, device, budget=budget)
        except BaseException:
            jobs.stop()  # a generator cannot be closed while another thread runs it
            blocks.close()
            raise
        return scorer, head.result()


class _Jobs:
    """The jobs of a pool's threads, counted: :meth:`stop` waits for the running ones to end, and a job not begun by
    then does nothing. A Ctrl-C anywhere meanwhile (a second one: the caller is leaving on the first, maybe from
    inside ``pool.submit``, whose future it never got) does not cut the wait: a thread left in torch or in the
    store's read at the interpreter's exit aborts the process ("terminate called without an active exception"). The
    pool's own shutdown cannot do it: a ``Thread.join`` cut by Ctrl-C marks the thread as ended (Python 3.11)."""

    def __init__(self):
        self._done = threading.Condition()
        self._running = 0
        self._stopped = False

    def wrap(self, fn):
        def job(*args):
            with self._done:
                if self._stopped:
                    return None
                self._running += 1
            try:
                return fn(*args)
            finally:
                with self._done:
                    self._running -= 1
                    self._done.notify_all()

        return job

    def stop(self, timeout: float | None = None) -> None:
        """Wait for the running jobs (at most ``timeout`` seconds when given); a job not begun will do nothing."""
        with self._done:
            self._stopped = True
        wait_through_ctrl_c(self._done, lambda: not self._running, timeout)


def cosine(scores: np.ndarray, train_sq_norms: np.ndarray, val_norms: np.ndarray) -> np.ndarray:
    """Per-sample scores ``(rows, cols)`` divided by ``||G_i|| ||G_v||`` (``val_norms`` per column)."""
    return scores / np.maximum(np.sqrt(train_sq_norms)[:, None] * np.asarray(val_norms)[None, :], 1e-30)


def score_all(store, val: ValidationSet, config, device):
    """Stream the whole store through the exact scorer; yields ``(first_row, ids, labels, scores)``.

    ``scores`` is float64 of shape ``(rows, n_val)`` (or ``(rows, 1)`` with ``config.aggregate='mean'``),
    already normalized per ``config.normalize`` (a :class:`~forvalue.schemas.config.QueryConfig`). The
    mean is scored in the G-form (one matrix ``mean_v G_v``) when :func:`~forvalue.engine.plan.choose_form`
    finds it cheaper.
    """
    mean = config.aggregate == "mean"
    gform = mean and choose_form(val, 1) == "gform"
    if gform:  # one matrix mean_v G_v scored against every stored row (forvalue.engine.gform, docs/gform.md)
        scorer = BlockedGForm(val, np.full((len(val), 1), 1.0 / len(val)), device)
        hidden_cols = None if val.center is None else val.hidden.shape[1] - 1  # a centred set: not its offsets
        val_norms = np.sqrt(np.maximum(scorer.sq_frobenius(hidden_cols), 0.0))
    else:
        scorer = BlockedScorer(val, device, config.val_block_tokens)
        val_norms = np.sqrt(val.sq_norms)
    if mean and not gform:
        gram = scorer.score(as_block(val))
        val_norms = np.sqrt(np.array([max(gram.mean(), 0.0)]))
    for first, batch, block in scan_blocks(store, config.read_rows, val):
        scores = scorer.score(block)
        if mean and not gform:
            scores = scores.mean(axis=1, keepdims=True)
        if config.normalize == "cosine":
            scores = cosine(scores, block.sq_norms, val_norms)
        yield first, batch.column("id").to_pylist(), batch.column("label").to_pylist(), scores


@dataclass
class AuditScan:
    """Per stored row (storage order): mean, per-label means, max (None when not computed).

    Attributes
    ----------
    ids, labels : lists of str, length n_train
    mean : float64 array, shape (n_train,)
    by_label : dict label -> float64 array, shape (n_train,)
    maximum : float64 array of shape (n_train,), or None
    form : {"gform", "token"}
    passes : int
        Passes over the store.
    seconds : float
    """

    ids: list
    labels: list
    mean: np.ndarray
    by_label: dict
    maximum: np.ndarray | None
    form: str
    passes: int = 1
    seconds: float = 0.0
    details: dict = field(default_factory=dict)


def audit_scan(
    store,
    val: ValidationSet,
    val_labels: list,
    groups: list,
    device,
    normalize: str = "none",
    read_rows: int = 1024,
    need_max: bool = False,
    form: str = "auto",
    budget: int | None = None,
    progress: bool = False,
    desc: str = "audit",
) -> AuditScan:
    """Score every stored row against the validation set's mean, per-label means and (optionally) max.

    Parameters
    ----------
    store : forvalue.storage.store.Store
    val : ValidationSet
    val_labels : list of str or None, length n_val
    groups : list of str
        Validation labels with an aggregate of their own, in output order.
    device : torch.device
    normalize : {"none", "cosine"}
        Cosine divides each per-sample score by ``||G_v|| ||G_i||`` before averaging.
    need_max : bool
        Per-validation-sample scores are needed (the max): the token form, in memory-bounded passes.
    form : {"auto", "gform", "token"}
        ``auto`` = :func:`choose_form`; the token form is used whenever ``need_max``.
    budget : int, optional
        Bytes for the scorers' validation-side data (default :func:`memory_budget`).

    Returns
    -------
    AuditScan
        With the token form, ``maximum`` is always filled (the per-sample scores are there anyway).
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    device = torch.device(device)
    budget = memory_budget(device) if budget is None else budget
    normalized = normalize == "cosine"
    weights = aggregate_weights(val_labels, groups, val.sq_norms if normalized else None)
    if form == "auto":
        form = choose_form(val, weights.shape[1])
    if need_max:
        form = "token"
    total = store.count()
    ids, labels = [], []

    if form == "gform":
        if device.type == "cpu":  # a store smaller than GFORM_BLOCK_WORKERS blocks: as many blocks as workers
            read_rows = max(1, min(read_rows, -(-total // GFORM_BLOCK_WORKERS)))
        blocks = scan_blocks(store, read_rows, val)
        scorer, head = _build_while_reading(blocks, val, weights, device, budget)
        parts = []
        bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress)

        def finish(batch, block, scores) -> None:
            if normalized:  # the weights already hold 1 / ||G_v||
                scores = scores / np.maximum(np.sqrt(block.sq_norms), 1e-30)[:, None]
            parts.append(scores)
            ids.extend(batch.column("id").to_pylist())
            labels.extend(batch.column("label").to_pylist())
            bar.update(batch.num_rows)

        # the pair way runs on one torch thread (plan.one_torch_thread): on a CPU, GFORM_BLOCK_WORKERS stored blocks at
        # once, results kept in storage order (the gather way runs its large operations on torch's threads)
        workers = GFORM_BLOCK_WORKERS if device.type == "cpu" and scorer.pairs else 1
        if workers > 1:
            with one_torch_thread(), ThreadPoolExecutor(workers) as pool:
                pending: deque = deque()
                jobs = _Jobs()
                try:
                    for _, batch, block in itertools.chain(head, blocks):
                        pending.append((batch, block, pool.submit(jobs.wrap(scorer.score), block)))
                        if len(pending) > workers:  # at most `workers` blocks in flight beyond the read-ahead
                            batch, block, job = pending.popleft()
                            finish(batch, block, job.result())
                    while pending:
                        batch, block, job = pending.popleft()
                        finish(batch, block, job.result())
                except BaseException:
                    jobs.stop()  # the blocks being scored are done before the error goes on
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
        else:
            for _, batch, block in itertools.chain(head, blocks):
                finish(batch, block, scorer.score(block))
        bar.close()
        agg = np.concatenate(parts) if parts else np.zeros((0, weights.shape[1]))
        return AuditScan(
            ids,
            labels,
            agg[:, 0],
            {g: agg[:, a] for a, g in enumerate(groups, start=1)},
            None,
            "gform",
            1,
            time.perf_counter() - started,
            {"vocab_blocks": scorer.blocks},
        )

    blocks = bounded_val_blocks(val, budget)
    passes = plan_passes(val, blocks, budget)
    val_norms = np.sqrt(val.sq_norms)
    label_cols = {g: [j for j, label in enumerate(val_labels) if label == g] for g in groups}
    sums = np.zeros((total, weights.shape[1]))
    maximum = np.full(total, -np.inf)
    one_pass = len(passes) == 1
    plain = aggregate_weights(val_labels, groups)
    bar = tqdm(total=total * len(passes), desc=desc, unit="sample", disable=not progress)
    for p, pass_blocks in enumerate(passes):
        members = np.concatenate([blocks[b] for b in pass_blocks])
        scorers = [(blocks[b], ExactScorer(val.subset(blocks[b]), device)) for b in pass_blocks]
        for first, batch, block in scan_blocks(store, read_rows, val):
            scores = np.empty((batch.num_rows, members.size), np.float64)
            col = {j: c for c, j in enumerate(members)}
            for group, scorer in scorers:
                scores[:, [col[j] for j in group]] = scorer.score(block)
            if normalized:  # as score_all: per-sample scores over ||G_i|| ||G_v||
                scores = cosine(scores, block.sq_norms, val_norms[members])
            rows = slice(first, first + batch.num_rows)
            if one_pass:  # exactly the audit's former arithmetic
                sums[rows, 0] = scores.mean(axis=1)
                for a, g in enumerate(groups, start=1):
                    sums[rows, a] = scores[:, label_cols[g]].mean(axis=1)
            else:
                sums[rows] += scores @ plain[members]
            maximum[rows] = np.maximum(maximum[rows], scores.max(axis=1))
            if p == 0:
                ids.extend(batch.column("id").to_pylist())
                labels.extend(batch.column("label").to_pylist())
            bar.update(batch.num_rows)
        del scorers
    bar.close()
    return AuditScan(
        ids,
        labels,
        sums[:, 0],
        {g: sums[:, a] for a, g in enumerate(groups, start=1)},
        maximum,
        "token",
        len(passes),
        time.perf_counter() - started,
        {"val_blocks": len(blocks)},
    )
