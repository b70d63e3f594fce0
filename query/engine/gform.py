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

:func:`forvalue.engine.plan.choose_form` picks the cheaper form by a cost model (docs/gform.md);
:func:`forvalue.engine.scan.audit_scan` is the audit's scan.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from forvalue.engine.plan import memory_budget, pair_form
from forvalue.engine.validation import ValidationSet
from forvalue.storage.rows import TrainBlock

# Sparse entries per chunk of validation tokens in the build of Gbar.
_BUILD_ENTRIES = 1 << 24
# Floats in one chunk of the G-form's intermediates: (stored tokens x A d) of the gather, (pairs x d) of ``Z``.
_CHUNK_FLOATS = 1 << 22


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
        build: bool = True,
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
        self.gbar = self._build(val, weights) if build else None  # BlockedGForm fills it block by block

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
        token_sample = np.repeat(np.arange(len(val)), val.lengths)
        entries = val.ids.shape[1]
        # tokens per chunk: the sparse matrix holds at most chunk * (m+1) * (aggregates a sample belongs to) entries
        # of 3 x 8 bytes (a per-label audit: 2 per sample, the mean and its label's)
        per_token = entries * max(1, int((weights != 0).sum(axis=1).max(initial=0)))
        step = max(1, _BUILD_ENTRIES // per_token)

        def chunks():  # per chunk of validation tokens: (rows of Gbar, token in chunk, coefficient), the chunk
            for start in range(0, val.ids.shape[0], step):
                part = slice(start, start + step)
                pos = self._positions(torch.from_numpy(val.ids[part]).to(self.device))  # (t, m+1)
                w = torch.from_numpy(weights[token_sample[part]]).to(self.device)  # (t, A)
                token, entry, agg = torch.nonzero(
                    (pos != n_vocab)[:, :, None] & (w != 0)[:, None, :], as_tuple=True
                )  # entries that reach a non-zero row of a non-zero aggregate
                if token.numel():
                    values = torch.from_numpy(val.values[part]).to(self.device, torch.float64)
                    yield pos[token, entry] * self.n_agg + agg, token, values[token, entry] * w[token, agg], part

        # the rows some entry reaches, then only those accumulated in float64: a row of a per-label table is
        # non-zero in the few aggregates whose samples use that id (5 of 31 on average, docs/gform.md)
        one = list(chunks()) if val.ids.shape[0] <= step else None  # one chunk: computed once, kept for both passes
        used = [torch.unique(rows) for rows, _, _, _ in (one if one is not None else chunks())]
        used = torch.unique(torch.cat(used)) if used else torch.zeros(0, dtype=torch.int64, device=self.device)
        acc = torch.zeros((used.numel(), self.d), dtype=torch.float64, device=self.device)
        for rows, token, coef, part in one if one is not None else chunks():
            hidden = torch.from_numpy(val.hidden[part]).to(self.device, torch.float64)
            index = torch.stack([torch.searchsorted(used, rows), token])
            sparse = torch.sparse_coo_tensor(index, coef, (used.numel(), hidden.shape[0]), check_invariants=False)
            acc.addmm_(sparse, hidden)
        out = torch.zeros((n_rows, self.d), dtype=self.dtype, device=self.device)
        out[used] = acc.to(self.dtype)  # the zero row (n_vocab) is never reached
        return out.view(n_vocab + 1, self.n_agg * self.d)

    def sq_frobenius(self, hidden_cols: int | None = None) -> np.ndarray:
        """``||Gbar_a||_F^2`` restricted to this scorer's vocabulary, float64 array of shape ``(A,)``; over the
        first ``hidden_cols`` hidden columns only when given (a centred set's last column is its offset)."""
        g = self.gbar.double().reshape(-1, self.n_agg, self.d)[:, :, :hidden_cols]
        return (g * g).sum(dim=(0, 2)).cpu().numpy()

    @torch.no_grad()
    def score(self, block: TrainBlock) -> np.ndarray:
        """``<Gbar_a, G_i>`` for every stored row ``i`` of ``block``, float64 array of shape ``(rows, A)``.

        Two ways to the same sum ``sum_k sum_j values[k, j] <Gbar_a[ids[k, j]], h_k>``:

        * few aggregates (``A d`` below ``PAIR_FORM_MIN_FLOATS``, :func:`forvalue.engine.plan.pair_form`): per
          stored token, the ``Gbar`` rows of its error entries gathered and summed (``embedding_bag``), then one
          dot product with ``h_k``; each entry reads ``A d`` floats;
        * many: ``G_i`` on the held rows, ``Z[r, i] = sum_{k in i, j: ids[k, j] = r} values[k, j] h_k``, one
          ``d``-vector per (row, sample) pair (a sparse-dense product; a sample meets a row ~3 times on the
          stores measured), then per row one dense product of its pairs ``(n, d)`` with its ``(A, d)`` block:
          the block is read once per chunk and a pair costs ``A d`` multiply-adds at BLAS speed, where the
          gather read ``A d`` floats per entry from a table too large for the caches (docs/gform.md).
        """
        rows = block.lengths.size
        out = torch.zeros((rows, self.n_agg), dtype=torch.float64, device=self.device)
        segment = torch.from_numpy(np.repeat(np.arange(rows), block.lengths)).to(self.device)
        hidden = torch.from_numpy(block.hidden).to(self.device, self.dtype)
        pos = self._positions(torch.from_numpy(block.ids).to(self.device))
        values = torch.from_numpy(block.values).to(self.device, self.dtype)
        if pair_form(self.n_agg, self.d):
            self._score_pairs(out, segment, hidden, pos, values, rows)
            return out.cpu().numpy()
        chunk = max(1, _CHUNK_FLOATS // (self.n_agg * self.d))
        for start in range(0, hidden.shape[0], chunk):
            part = slice(start, start + chunk)
            bag = torch.nn.functional.embedding_bag(pos[part], self.gbar, per_sample_weights=values[part], mode="sum")
            per_token = torch.einsum("nad,nd->na", bag.view(-1, self.n_agg, self.d), hidden[part])
            out.index_add_(0, segment[part], per_token.double())
        return out.cpu().numpy()

    def _score_pairs(self, out, segment, hidden, pos, values, rows: int) -> None:
        """Adds the block's scores to ``out`` by (row, sample) pairs and dense products per row (:meth:`score`)."""
        n_vocab = self.vocab.numel()
        entries = pos.shape[1]
        flat = pos.reshape(-1)
        held = torch.nonzero(flat != n_vocab).squeeze(1)  # entries on a row of Gbar (the others meet zero)
        if held.numel() == 0:
            return
        token = held // entries
        keys, pair = torch.unique(flat[held] * rows + segment[token], return_inverse=True)  # by row, then sample
        order = torch.argsort(pair, stable=True)
        token, pair = token[order], pair[order]
        weight = values.reshape(-1)[held[order]]
        starts = torch.searchsorted(pair, torch.arange(keys.numel() + 1, device=self.device))  # entries per pair
        g = self.gbar.view(-1, self.n_agg, self.d)
        step = max(1, _CHUNK_FLOATS // self.d)  # pairs per chunk of Z
        for p0 in range(0, keys.numel(), step):
            p1 = min(p0 + step, keys.numel())
            e0, e1 = int(starts[p0]), int(starts[p1])
            with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state": the product is exact
                warnings.simplefilter("ignore", UserWarning)
                z = torch.sparse_csr_tensor(
                    starts[p0 : p1 + 1] - e0,
                    token[e0:e1],
                    weight[e0:e1],
                    size=(p1 - p0, hidden.shape[0]),
                    check_invariants=False,  # sorted, in-range indices by construction
                ).matmul(hidden)  # (pairs, d)
            ids, counts = torch.unique_consecutive(keys[p0:p1] // rows, return_counts=True)
            part = torch.empty((p1 - p0, self.n_agg), dtype=self.dtype, device=self.device)
            lo = 0
            for r, n in zip(ids.tolist(), counts.tolist()):
                torch.mm(z[lo : lo + n], g[r].T, out=part[lo : lo + n])
                lo += n
            out.index_add_(0, keys[p0:p1] % rows, part.double())


class BlockedGForm:
    """``A`` aggregates over the whole union vocabulary, built in vocabulary blocks, scored in one gather.

    ``Gbar`` is built one block of ``V_u`` at a time (each block's float64 accumulation within
    ``budget``) into one float32 table, so scoring is a single :class:`GFormScorer` pass: one
    gather per stored token whatever the number of blocks (a validation set that mixes tasks has a
    large ``V_u``; scoring every block separately re-gathered every stored token once per block).

    Attributes
    ----------
    blocks : int
        Vocabulary blocks the build took.
    """

    def __init__(self, val: ValidationSet, weights: np.ndarray, device, dtype=torch.float32, budget: int | None = None):
        vocab = vocab_union(val)
        n_agg = np.asarray(weights).reshape(len(val), -1).shape[1]
        budget = memory_budget(device) if budget is None else budget
        per_row = GFormScorer.estimate_bytes(1, n_agg, val.hidden.shape[1], dtype) // 2
        rows = max(1, int(budget // max(1, per_row)) - 1)
        starts = range(0, max(1, vocab.size), rows)
        self.blocks = len(starts)
        if self.blocks == 1:
            self.scorer = GFormScorer(val, weights, device, dtype, vocab)
        else:
            self.scorer = GFormScorer(val, weights, device, dtype, vocab, build=False)
            gbar = torch.zeros((vocab.size + 1, n_agg * val.hidden.shape[1]), dtype=dtype, device=self.scorer.device)
            for lo in starts:
                part = GFormScorer(val, weights, device, dtype, vocab[lo : lo + rows])
                gbar[lo : lo + part.vocab.numel()] = part.gbar[:-1]
                del part
            self.scorer.gbar = gbar
        self.n_agg = n_agg

    def score(self, block: TrainBlock) -> np.ndarray:
        return self.scorer.score(block)

    def sq_frobenius(self, hidden_cols: int | None = None) -> np.ndarray:
        return self.scorer.sq_frobenius(hidden_cols)


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
