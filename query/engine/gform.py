"""Aggregate scores in the G-form (Eq. 2): one matrix per aggregate, flat in the number of validation samples.

Scores are linear in ``G_v = sum_k e_vk h_vk^T``, so a weighted sum of validation samples is one matrix

    Gbar_a = sum_v W[v, a] G_v        (|V_u| x d, dense on V_u = the union of the validation supports)

and its score against a stored sample is, per stored token k' with sparse error support ``ids[k']``
(``m + 1`` entries, ``values[k']``; see :func:`forvalue.indexer.sparse_errors.error_entries`):

    S(Gbar_a, i) = sum_{k' in i} < sum_j values[k', j] * Gbar_a[ids[k', j]] , h_k' >

ids outside ``V_u`` meet a zero row. This is exactly the token form of :mod:`forvalue.engine.scorer`
(``sum_k sum_k' <e_k, e_k'> <h_k, h_k'>`` with the same stored ``m + 1`` entries per token; the
tail mass is stored but enters neither form), summed in another order. The gather-and-sum is one
``embedding_bag`` over the rows of ``Gbar`` (all aggregates side by side, ``(|V_u| + 1, A * d)``),
followed by a batched dot product with ``h_k'``: ~ ``A (m + 1) d`` per stored token, whatever the
number of validation samples.

:func:`choose_form` picks the cheaper form by a cost model (docs/gform.md); :func:`audit_scan` is the
audit's scan: aggregates (mean, per label) in the G-form, or every per-validation-sample score in the
token form when those are needed (``--flag-by max``) or cheaper, in validation blocks whose memory is
bounded (several passes over the store when all blocks do not fit at once).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from forvalue.engine.scorer import ExactScorer
from forvalue.engine.validation import ValidationSet
from forvalue.storage.rows import TrainBlock, decode_block

# Cost model (docs/gform.md). Per stored token the token form costs ~ T_v (d + m + 3) operations at
# BLAS speed; the G-form costs ~ A (m + 1) d gathered (memory-bound) multiply-adds, each worth
# GATHER_COST token-form operations: on the 2-core development CPU (d = 576, m = 32, 41k stored tokens)
# the two forms took the same time at T_v ~ 100 validation tokens (docs/gform.md).
GATHER_COST = 3.0
# Floats in one (stored tokens x A d) intermediate of the G-form: small enough to stay in cache between
# the gather-and-sum and the dot product.
_CHUNK_FLOATS = 1 << 22
# Validation tokens per token-form block (as QueryConfig.val_block_tokens).
VAL_BLOCK_TOKENS = 4096


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


def token_cost(val_tokens: int, hidden_size: int, entries: int) -> float:
    """Token-form operations per stored token against ``val_tokens`` validation tokens (``entries`` = m + 1)."""
    return float(val_tokens) * (hidden_size + entries + 2)


def gform_cost(n_aggregates: int, hidden_size: int, entries: int) -> float:
    """G-form operations per stored token for ``n_aggregates`` matrices, in token-form units."""
    return GATHER_COST * n_aggregates * (entries + 1) * hidden_size


def choose_form(val: ValidationSet, n_aggregates: int) -> str:
    """``"gform"`` or ``"token"``: the form with the lower cost per stored token (build costs amortised)."""
    hidden_size, entries = val.hidden.shape[1], val.ids.shape[1]
    cheaper = gform_cost(n_aggregates, hidden_size, entries) < token_cost(val.ids.shape[0], hidden_size, entries)
    return "gform" if cheaper else "token"


def vocab_union(val: ValidationSet) -> np.ndarray:
    """Sorted unique error-support ids of the validation tokens, int64 array of shape ``(|V_u|,)``."""
    return np.unique(val.ids)


class GFormScorer:
    """Scores stored blocks against ``A`` aggregates ``Gbar_a = sum_v weights[v, a] G_v``.

    Parameters
    ----------
    val : ValidationSet
        ``M`` tokens with hidden states ``(M, d)`` and error entries ``(M, m + 1)``.
    weights : float array, shape (n_val, A)
        Weight of each validation sample in each aggregate (e.g. ``1 / n`` for the mean).
    device : torch.device
    dtype : torch.float32 or torch.float64
        Precision of ``Gbar`` and of the per-token dot products (``Gbar`` is accumulated in float64).
    vocab : int array, optional
        The ``V_u`` rows to hold (a slice of :func:`vocab_union` when ``Gbar`` is blocked over ``V_u``);
        default the whole union. Scores of several vocabulary blocks add up to the full score.

    Attributes
    ----------
    gbar : Tensor, shape (|vocab| + 1, A * d)
        Row ``r`` holds ``Gbar_a[vocab[r]]`` for every ``a`` side by side; the last row is zero.
    """

    def __init__(
        self,
        val: ValidationSet,
        weights: np.ndarray,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        vocab: np.ndarray | None = None,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        weights = np.asarray(weights, np.float64).reshape(len(val), -1)
        self.n_agg = weights.shape[1]
        self.d = val.hidden.shape[1]
        vocab = vocab_union(val) if vocab is None else np.asarray(vocab, np.int64)
        self.vocab = torch.from_numpy(vocab).to(self.device)
        # id -> row of gbar (ids are non-negative vocabulary ids); ids above the largest held one land on the last
        # entry, which points at the zero row
        top = int(vocab.max()) + 2 if vocab.size else 1
        self.lookup = torch.full((top,), vocab.size, dtype=torch.int64, device=self.device)
        self.lookup[self.vocab] = torch.arange(vocab.size, device=self.device)
        self.gbar = self._build(val, weights)
        self.chunk_tokens = max(1, _CHUNK_FLOATS // (self.n_agg * self.d))

    def nbytes(self) -> int:
        return self.gbar.numel() * self.gbar.element_size()

    @staticmethod
    def estimate_bytes(n_vocab: int, n_aggregates: int, hidden_size: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of ``gbar`` for ``n_vocab`` rows (the float64 build adds as much again for float32)."""
        item = torch.empty(0, dtype=dtype).element_size()
        return (n_vocab + 1) * n_aggregates * hidden_size * (item + 8)

    def _positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Row of each id in ``gbar``; ids outside ``vocab`` map to the last (zero) row (one table look-up)."""
        return self.lookup[ids.clamp(0, self.lookup.numel() - 1)]

    @torch.no_grad()
    def _build(self, val: ValidationSet, weights: np.ndarray) -> torch.Tensor:
        """``Gbar`` as one sparse-dense product per chunk of validation tokens, accumulated in float64.

        Row ``pos * A + a`` of the sparse matrix holds ``weights[v, a] * values[k, j]`` in column ``k`` for each
        validation token ``k`` (of sample ``v``) and support entry ``j`` with ``pos = row of ids[k, j]``; times the
        hidden states ``(t, d)`` it gives ``Gbar`` as ``((|vocab| + 1) * A, d)``. Zero weights (samples outside an
        aggregate) and ids outside this scorer's vocabulary (its zero row) are left out of the product, so a
        per-label build costs what its samples cost, not ``A`` times the whole set (an ``index_add_`` per aggregate
        did; docs/gform.md).
        """
        n_vocab = self.vocab.numel()
        n_rows = (n_vocab + 1) * self.n_agg
        out = torch.zeros((n_rows, self.d), dtype=torch.float64, device=self.device)
        token_sample = np.repeat(np.arange(len(val)), val.lengths)
        entries = val.ids.shape[1]
        # tokens per chunk: the sparse matrix holds at most chunk * (m+1) * (aggregates a sample belongs to) entries
        # of 3 x 8 bytes (a per-label audit: 2 per sample, the mean and its label's)
        per_token = entries * max(1, int((weights != 0).sum(axis=1).max(initial=0)))
        step = max(1, (1 << 24) // per_token)
        for start in range(0, val.ids.shape[0], step):
            part = slice(start, start + step)
            pos = self._positions(torch.from_numpy(val.ids[part]).to(self.device))  # (t, m+1)
            values = torch.from_numpy(val.values[part]).to(self.device, torch.float64)
            w = torch.from_numpy(weights[token_sample[part]]).to(self.device)  # (t, A)
            token, entry, agg = torch.nonzero(
                (pos != n_vocab)[:, :, None] & (w != 0)[:, None, :], as_tuple=True
            )  # entries that reach a non-zero row of a non-zero aggregate
            if token.numel() == 0:
                continue
            coef = values[token, entry] * w[token, agg]
            rows = pos[token, entry] * self.n_agg + agg
            sparse = torch.sparse_coo_tensor(
                torch.stack([rows, token]), coef, (n_rows, pos.shape[0]), check_invariants=False
            )
            hidden = torch.from_numpy(val.hidden[part]).to(self.device, torch.float64)
            out.addmm_(sparse, hidden)
        out = out.view(n_vocab + 1, self.n_agg * self.d)
        out[n_vocab] = 0.0
        return out.to(self.dtype)

    def sq_frobenius(self) -> np.ndarray:
        """``||Gbar_a||_F^2`` restricted to this scorer's vocabulary, float64 array of shape ``(A,)``."""
        g = self.gbar.double().reshape(-1, self.n_agg, self.d)
        return (g * g).sum(dim=(0, 2)).cpu().numpy()

    @torch.no_grad()
    def score(self, block: TrainBlock) -> np.ndarray:
        """``<Gbar_a, G_i>`` for every stored row ``i`` of ``block``, float64 array of shape ``(rows, A)``."""
        rows = block.lengths.size
        out = torch.zeros((rows, self.n_agg), dtype=torch.float64, device=self.device)
        segment = torch.from_numpy(np.repeat(np.arange(rows), block.lengths)).to(self.device)
        hidden = torch.from_numpy(block.hidden).to(self.device, self.dtype)
        pos = self._positions(torch.from_numpy(block.ids).to(self.device))
        values = torch.from_numpy(block.values).to(self.device, self.dtype)
        for start in range(0, hidden.shape[0], self.chunk_tokens):
            part = slice(start, start + self.chunk_tokens)
            bag = torch.nn.functional.embedding_bag(pos[part], self.gbar, per_sample_weights=values[part], mode="sum")
            per_token = torch.einsum("nad,nd->na", bag.view(-1, self.n_agg, self.d), hidden[part])
            out.index_add_(0, segment[part], per_token.double())
        return out.cpu().numpy()


class BlockedGForm:
    """``A`` aggregates as a sum of :class:`GFormScorer` over vocabulary blocks of ``V_u`` (same ``score``)."""

    def __init__(self, val: ValidationSet, weights: np.ndarray, device, dtype=torch.float32, budget: int | None = None):
        vocab = vocab_union(val)
        n_agg = np.asarray(weights).reshape(len(val), -1).shape[1]
        budget = memory_budget(device) if budget is None else budget
        per_row = GFormScorer.estimate_bytes(1, n_agg, val.hidden.shape[1], dtype) // 2
        rows = max(1, int(budget // max(1, per_row)) - 1)
        self.parts = [
            GFormScorer(val, weights, device, dtype, vocab[lo : lo + rows]) for lo in range(0, max(1, vocab.size), rows)
        ]
        self.n_agg = n_agg

    def score(self, block: TrainBlock) -> np.ndarray:
        return sum(p.score(block) for p in self.parts)

    def sq_frobenius(self) -> np.ndarray:
        return sum(p.sq_frobenius() for p in self.parts)


# ---------------------------------------------------------------------------------------------
# Per-validation-sample scores in the token form, memory-bounded (flag-by max)


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


# ---------------------------------------------------------------------------------------------
# The audit's scan


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


def aggregate_weights(val_labels: list, groups: list, sq_norms: np.ndarray | None = None) -> np.ndarray:
    """Weights ``(n_val, 1 + len(groups))``: the mean, then the mean over each label's samples.

    With ``sq_norms`` (cosine) each sample's weight is divided by its ``||G_v||``.
    """
    n = len(val_labels)
    w = np.zeros((n, 1 + len(groups)))
    w[:, 0] = 1.0 / n
    for a, g in enumerate(groups, start=1):
        members = [j for j, label in enumerate(val_labels) if label == g]
        w[members, a] = 1.0 / len(members)
    if sq_norms is not None:
        w /= np.maximum(np.sqrt(sq_norms), 1e-30)[:, None]
    return w


def read_ahead(batches, hidden_size: int, depth: int = 2):
    """``(batch, decode_block(batch))`` for each batch of ``batches``, read and decoded by a thread up to ``depth``
    batches ahead, so the store's read and the decode overlap the scoring (both release the GIL for most of
    their work). An error of the read is raised here, in order; leaving the loop early stops the thread."""
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
                if not put(("batch", (batch, decode_block(batch, hidden_size)))):
                    return
            put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put(("error", exc))

    thread = threading.Thread(target=run, name="forvalue-read-ahead", daemon=True)
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
        thread.join(timeout=5)


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
    cosine = normalize == "cosine"
    weights = aggregate_weights(val_labels, groups, val.sq_norms if cosine else None)
    if form == "auto":
        form = choose_form(val, weights.shape[1])
    if need_max:
        form = "token"
    hidden_size = store.manifest.hidden_size
    total = store.count()
    columns = ["hidden", "topk_ids", "topk_probs", "target_ids", "target_probs", "n_scored", "sq_norm", "id", "label"]
    ids, labels = [], []

    if form == "gform":
        scorer = BlockedGForm(val, weights, device, budget=budget)
        parts = []
        bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress)
        for batch, block in read_ahead(store.scan(columns, batch_size=read_rows), hidden_size):
            scores = scorer.score(block)
            if cosine:
                scores = scores / np.maximum(np.sqrt(block.sq_norms), 1e-30)[:, None]
            parts.append(scores)
            ids.extend(batch.column("id").to_pylist())
            labels.extend(batch.column("label").to_pylist())
            bar.update(batch.num_rows)
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
            {"vocab_blocks": len(scorer.parts)},
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
        first = 0
        for batch in store.scan(columns, batch_size=read_rows):
            block = decode_block(batch, hidden_size)
            scores = np.empty((batch.num_rows, members.size), np.float64)
            col = {j: c for c, j in enumerate(members)}
            for group, scorer in scorers:
                scores[:, [col[j] for j in group]] = scorer.score(block)
            if cosine:  # as forvalue.api.score_all: per-sample scores over ||G_i|| ||G_v||
                scores = scores / np.maximum(np.sqrt(block.sq_norms)[:, None] * val_norms[members][None, :], 1e-30)
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
            first += batch.num_rows
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
