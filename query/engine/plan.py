"""Planning a scan: which form scores it (the cost model of docs/gform.md) and how validation blocks fit memory.

:func:`choose_form` picks the G-form (one matrix per aggregate, :mod:`forvalue.engine.gform`) or the
token form (:mod:`forvalue.engine.scorer`) by their cost per stored token; :func:`bounded_val_blocks`
and :func:`plan_passes` split per-validation-sample scoring into blocks and passes over the store
whose scorers fit a memory budget (:func:`memory_budget`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager

import numpy as np
import torch

from forvalue.engine.validation import ValidationSet

# Cost model (docs/gform.md "Which form"). Per stored token the token form costs ~ T_v (d + TOKEN_ENTRY_COST
# (m + 1)) operations: a product of d per validation token at BLAS speed, and per stored error entry a gather of
# one float per validation token, worth TOKEN_ENTRY_COST operations (measured: its time per (stored, validation)
# token pair barely moves with d, 0.031 us at d = 576 and 0.034 us at d = 256). The G-form costs ~ A (m + 2) d,
# each worth GATHER_COST operations when it gathers A d floats per error entry (memory-bound) and PAIR_COST when
# it scores (row, sample) pairs by dense products (A d >= PAIR_FORM_MIN_FLOATS). Fitted on both stores of
# docs/gform.md (the 900-row SmolLM2 store, d = 576, and the 100k synthetic one, d = 256, 20k-row head): the
# earlier model (T_v (d + m + 3), GATHER_COST 3) was fitted on the small store alone and picked the token form
# on the large one where the G-form was 1.3-3x cheaper (20-60 labelled validation samples).
TOKEN_ENTRY_COST = 16.0
GATHER_COST = 5.0
PAIR_COST = 2.0
# A d (aggregates x hidden size) from which the G-form scores by pairs (forvalue.engine.gform): the gather was
# as fast or faster at A d = 256 and 2,816 (synthetic store), and slower at 5,760 (1.15x), 16,704 (3.8x) and
# 17,856 (3.4x) (SmolLM2 store of the paper's tasks, 10 / 29 / 31 aggregates; docs/gform.md).
PAIR_FORM_MIN_FLOATS = 4096
# Validation tokens per token-form block (as QueryConfig.val_block_tokens).
VAL_BLOCK_TOKENS = 4096


def cpu_workers(limit: int = 2) -> int:
    """Threads for work split across a CPU's cores (each thread's torch on one thread): the cores this process may
    use, at most ``limit`` (measured on 2 cores; docs/gform.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(limit, cores))


class Stopped(Exception):
    """Raised inside work that :func:`map_on_threads` was told to stop (its caller is leaving on an error)."""


def wait_through_ctrl_c(done: threading.Condition, ended, timeout: float | None = None) -> bool:
    """Wait on ``done`` until ``ended()`` (called under it), in short waits (a wait without a timeout is not woken by
    Ctrl-C here), at most ``timeout`` seconds when given; a Ctrl-C meanwhile does not cut the wait: the caller is
    already leaving on an error and must not leave threads behind in torch or in a store's read ("terminate called
    without an active exception"). Returns whether ``ended()`` became true."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            with done:
                while not ended():
                    if deadline is not None and time.monotonic() >= deadline:
                        return False
                    done.wait(0.1)
            return True
        except KeyboardInterrupt:
            continue


def map_on_threads(fn, items: list, workers: int) -> list:
    """``[fn(item, stop) for item in items]`` on ``workers`` threads, in order; the first error is raised.

    ``stop`` is a :class:`threading.Event` set when the caller leaves early (Ctrl-C while it waits) or an item
    fails: ``fn`` checks it between its steps (raising :class:`Stopped`), so the caller waits for at most one step
    of each running item before the error goes on, where an executor would wait for whole items (seconds, for a
    large G-form build). Every item has returned or stopped before this returns or raises, whatever the moment of
    the Ctrl-C (while the threads start, too) and however many come: a thread left in torch at the interpreter's
    exit aborts the process ("terminate called without an active exception").
    """
    results: list = [None] * len(items)
    errors: list = []
    stop, done = threading.Event(), threading.Condition()
    # items taken by a thread, items running: under ``done``; an item is taken only while ``stop`` is clear, and
    # ``stop`` is set under ``done``, so once it is set no item starts and the running ones can only finish
    state = {"taken": 0, "running": 0, "finished": 0}

    def take() -> int | None:
        with done:
            if stop.is_set() or errors or state["taken"] == len(items):
                return None
            state["taken"] += 1
            state["running"] += 1
            return state["taken"] - 1

    def run() -> None:
        while (i := take()) is not None:
            try:
                results[i] = fn(items[i], stop)
            except BaseException as exc:  # noqa: BLE001 - raised by the caller
                with done:
                    errors.append(exc)
                    stop.set()  # the other running items stop at their next step: the error is raised sooner
            finally:
                with done:
                    state["running"] -= 1
                    state["finished"] += 1
                    done.notify_all()

    def wait_for(ended) -> None:  # short waits: a wait without a timeout is not woken by Ctrl-C here
        with done:
            while not ended():
                done.wait(0.1)

    try:
        # Ctrl-C is held while the threads start (they inherit the mask: the signal goes elsewhere); one taken by
        # another thread meanwhile still raises here, anywhere in this block, which the bookkeeping above allows
        masked = hasattr(signal, "pthread_sigmask")
        before = signal.pthread_sigmask(signal.SIG_BLOCK, set()) if masked else None  # the mask, unchanged
        try:
            if masked:
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            for _ in range(min(workers, len(items))):
                threading.Thread(target=run, name="forvalue-part", daemon=True).start()
        finally:
            if masked:
                signal.pthread_sigmask(signal.SIG_SETMASK, before)
        wait_for(lambda: state["finished"] == len(items) or (errors and not state["running"]))
    except BaseException:
        with done:
            stop.set()
        wait_through_ctrl_c(done, lambda: not state["running"])  # each running item stops at its next step
        raise
    if errors:
        raise errors[0]
    return results


def memory_budget(device: torch.device | str, fraction: float = 0.25) -> int:
    """Bytes the scorer may hold: ``fraction`` of the free accelerator memory or of the available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * fraction)
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: line.split()[1] for line in f}
        available = int(info["MemAvailable"]) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(available * fraction)


@contextmanager
def one_torch_thread():
    """Torch on one thread inside, for many small operations (a rerank's small blocks, the G-form's per-row
    products), where a second thread brings little and on a busy machine every parallel region of every small
    operation can wait for a descheduled worker thread (measured under load 14 on 2 cores: 80 ms against 4 ms per
    group of three small operations; under load 5, a (30, 576) x (576, 5) product 143 us against 11 us)."""
    before = torch.get_num_threads()
    if before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before > 1:
            torch.set_num_threads(before)


def token_cost(val_tokens: int, hidden_size: int, entries: int) -> float:
    """Token-form operations per stored token against ``val_tokens`` validation tokens (``entries`` = m + 1)."""
    return float(val_tokens) * (hidden_size + TOKEN_ENTRY_COST * entries)


def pair_form(n_aggregates: int, hidden_size: int) -> bool:
    """Whether the G-form scores (row, sample) pairs by dense products rather than gathering ``A d`` floats per
    error entry (:meth:`forvalue.engine.gform.GFormScorer.score`)."""
    return n_aggregates * hidden_size >= PAIR_FORM_MIN_FLOATS


def gform_cost(n_aggregates: int, hidden_size: int, entries: int) -> float:
    """G-form operations per stored token for ``n_aggregates`` matrices, in token-form units."""
    cost = PAIR_COST if pair_form(n_aggregates, hidden_size) else GATHER_COST
    return cost * n_aggregates * (entries + 1) * hidden_size


def choose_form(val: ValidationSet, n_aggregates: int) -> str:
    """``"gform"`` or ``"token"``: the form with the lower cost per stored token (build costs amortised)."""
    hidden_size, entries = val.hidden.shape[1], val.ids.shape[1]
    cheaper = gform_cost(n_aggregates, hidden_size, entries) < token_cost(val.ids.shape[0], hidden_size, entries)
    return "gform" if cheaper else "token"


def token_block_bytes(n_tokens: int, n_vocab: int, hidden_size: int) -> int:
    """Bytes an :class:`~forvalue.engine.scorer.ExactScorer` holds for a block (dense errors + hidden)."""
    return 4 * (n_vocab + 1) * n_tokens + 4 * n_tokens * hidden_size + 16 * n_tokens


def bounded_val_blocks(val: ValidationSet, budget: int, max_tokens: int = VAL_BLOCK_TOKENS) -> list[np.ndarray]:
    """Validation sample indices in blocks of at most ``max_tokens`` tokens whose scorer fits ``budget / 4`` bytes.

    A single sample larger than that is a block of its own.
    """
    offsets = np.concatenate([[0], np.cumsum(val.lengths)])
    d = val.hidden.shape[1]
    cap = max(1, budget // 4)
    groups, current, tokens, seen = [], [], 0, set()
    for j, n in enumerate(val.lengths):
        ids = np.unique(val.ids[offsets[j] : offsets[j + 1]])
        grown = seen.union(ids.tolist())
        if current and (tokens + n > max_tokens or token_block_bytes(tokens + int(n), len(grown), d) > cap):
            groups.append(np.array(current))
            current, tokens, grown = [], 0, set(ids.tolist())
        current.append(j)
        tokens += int(n)
        seen = grown
    if current:
        groups.append(np.array(current))
    return groups


def plan_passes(val: ValidationSet, blocks: list[np.ndarray], budget: int) -> list[list[int]]:
    """Group validation blocks into passes over the store, each pass's scorers within ``budget`` bytes."""
    offsets = np.concatenate([[0], np.cumsum(val.lengths)])
    d = val.hidden.shape[1]
    passes, current, used = [], [], 0
    for b, group in enumerate(blocks):
        rows = np.concatenate([np.arange(offsets[j], offsets[j + 1]) for j in group])
        size = token_block_bytes(rows.size, np.unique(val.ids[rows]).size, d)
        if current and used + size > budget:
            passes.append(current)
            current, used = [], 0
        current.append(b)
        used += size
    if current:
        passes.append(current)
    return passes
