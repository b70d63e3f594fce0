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

import threading
import warnings

import numpy as np
import torch

from forvalue.engine.plan import Stopped, cpu_workers, map_on_threads, memory_budget, one_torch_thread, pair_form
from forvalue.engine.scorer import id_positions, id_table, read_only_tensor
from forvalue.engine.validation import ValidationSet
from forvalue.storage.rows import TrainBlock

# Parts of a vocabulary block built at once on a CPU (BlockedGForm; threads, torch on one thread each): the
# 1,000-sample mixed set of docs/gform.md builds in ~1.1 s on one.
GFORM_BUILD_WORKERS = cpu_workers()
# Sparse entries per chunk of validation tokens in the build of Gbar.
_BUILD_ENTRIES = 1 << 24
# Floats in one chunk of the G-form's intermediates: (stored tokens x A d) of the gather, (pairs x d) of ``Z``.
_CHUNK_FLOATS = 1 << 22
# Products per float32 partial sum in the build of the table (the partial sums add up in float64).
_BAG_ENTRIES = 32
# The pair way scores a table row's pairs in one dense product (``Z_r @ P_r^T``) when the row has at least this many
# (pair, piece) products in a chunk; the other rows' products go through one sampled dense product per chunk.
_DENSE_ROW_PRODUCTS = 1024
# The pair way sorts a block's entries by one int64 each, ``(row * rows + sample) << b | entry`` (b bits hold an
# entry's index), and the build an audit's validation entries by ``(piece, row) << b | entry``, when that fits in
# this many bits; else by the key and a permutation (gathers of every entry by it).
_PACKED_KEY_BITS = 62


def vocab_union(val: ValidationSet) -> np.ndarray:
    """Sorted unique error-support ids of the validation tokens, int64 array of shape ``(|V_u|,)``."""
    return np.unique(val.ids)


class GFormScorer:
    """Scores stored blocks against ``A`` aggregates ``Gbar_a = sum_v weights[v, a] G_v``.

    The weights factor as ``weights = member @ combine`` (:func:`factor_weights`): each validation sample in one
    *piece* ``P_c = sum_v member[v, c] G_v`` (an audit's pieces are its labels), ``Gbar_a = sum_c combine[c, a] P_c``.
    The scorer holds the pieces and scores them; ``<Gbar_a, G_i> = sum_c combine[c, a] <P_c, G_i>`` (weights that
    do not factor are their own pieces, ``combine`` the identity).

    Parameters
    ----------
    val : ValidationSet
        ``M`` tokens with hidden states ``(M, d)`` and error entries ``(M, m + 1)``.
    weights : float array, shape (n_val, A)
        Weight of each validation sample in each aggregate (e.g. ``1 / n`` for the mean).
    device : torch.device
    dtype : torch.float32 or torch.float64
        Precision of the table and of the per-token dot products (the table is accumulated in float64; in float32
        from partial sums of at most ``_BAG_ENTRIES`` products each).
    vocab : int array, optional
        The ``V_u`` rows to hold (a slice of :func:`vocab_union` when ``Gbar`` is blocked over ``V_u``);
        default the whole union. Scores of several vocabulary blocks add up to the full score.

    Attributes
    ----------
    keys, table : Tensors, shapes (n,) and (n, d)
        The pieces' non-zero rows: ``table[k] = P_c[vocab[r]]`` for ``keys[k] = r * pieces + c``, keys sorted.
    gbar : Tensor, shape (|vocab| + 1, A * d)
        Row ``r`` holds ``Gbar_a[vocab[r]]`` for every ``a`` side by side; the last row is zero (made on demand).
    """

    def __init__(
        self,
        val: ValidationSet,
        weights: np.ndarray,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        vocab: np.ndarray | None = None,
        build: bool = True,
        stop: threading.Event | None = None,
    ):
        self.device = torch.device(device)
        self._stop = stop  # set: the build raises plan.Stopped at its next step (map_on_threads' caller left)
        self.dtype = dtype
        weights = np.asarray(weights, np.float64).reshape(len(val), -1)
        self.n_agg = weights.shape[1]
        self.member, combine = factor_weights(weights)
        self.n_pieces = self.member.shape[1]
        self.combine = None if combine is None else torch.from_numpy(combine).to(self.device)
        self.d = val.hidden.shape[1]
        vocab = vocab_union(val) if vocab is None else np.asarray(vocab, np.int64)
        self.vocab = torch.from_numpy(vocab).to(self.device)
        self.lookup = id_table(self.vocab)  # id -> row of gbar; ids it does not hold: the last (zero) row
        self.keys, self.table = None, None  # BlockedGForm sets them block by block
        if build:
            with one_torch_thread():  # index_add_ and sorts of millions of entries: 3x the time on two threads
                self.keys, self.table = self._build(val)  # under load 4 (docs/gform.md)
        self._dense = None
        self._first = None

    def _pieces_dense(self) -> torch.Tensor:
        """The pieces side by side, ``(|vocab| + 1, pieces * d)`` (made once, for the gather)."""
        if self._dense is None:
            n_vocab = self.vocab.numel()
            dense = torch.zeros(((n_vocab + 1) * self.n_pieces, self.d), dtype=self.dtype, device=self.device)
            dense[self.keys] = self.table  # the zero row (n_vocab) is never reached
            self._dense = dense.view(n_vocab + 1, self.n_pieces * self.d)
        return self._dense

    @property
    def gbar(self) -> torch.Tensor:
        """``Gbar`` as one dense table ``(|vocab| + 1, A * d)``: each row's aggregates side by side."""
        pieces = self._pieces_dense()
        if self.combine is None:
            return pieces
        g = torch.einsum("rcd,ca->rad", pieces.view(-1, self.n_pieces, self.d).double(), self.combine)
        return g.to(self.dtype).reshape(pieces.shape[0], self.n_agg * self.d)

    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size() + (
            0 if self._dense is None else self._dense.numel() * self._dense.element_size()
        )

    @staticmethod
    def estimate_bytes(n_vocab: int, n_aggregates: int, hidden_size: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of ``gbar`` for ``n_vocab`` rows (the float64 build adds as much again for float32)."""
        item = torch.empty(0, dtype=dtype).element_size()
        return (n_vocab + 1) * n_aggregates * hidden_size * (item + 8)

    def _check_stop(self) -> None:
        if self._stop is not None and self._stop.is_set():
            raise Stopped

    def _positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Row of each id in ``gbar``; ids outside ``vocab`` (negative ones of a damaged int32 store too) map to the
        last (zero) row."""
        return id_positions(self.vocab, self.lookup, ids)

    @torch.no_grad()
    def _build(self, val: ValidationSet) -> tuple[torch.Tensor, torch.Tensor]:
        """The pieces' non-zero rows: sorted keys ``row * pieces + c`` and their ``(n, d)`` values.

        Per chunk of validation tokens, the entries ``(k, j)`` that reach a row ``pos`` of this scorer's vocabulary,
        each once per piece its sample is in (one, when the weights factor; before, once per aggregate: the mean
        and the label, twice the work), sorted by key ``pos * pieces + c``; a key's row is ``sum member[v, c]
        values[k, j] h_k`` over its entries: one ``embedding_bag`` over the hidden states (float64, or in float32
        bags of at most ``_BAG_ENTRIES`` entries, cut at the key's boundaries, whose sums add up in float64). Only
        the rows some entry reaches are accumulated: a per-label table is mostly zeros (a row is in 5 of 31
        aggregates on the mixed sets of docs/gform.md).
        """
        member, n_pieces = self.member, self.n_pieces
        n_vocab = self.vocab.numel()
        token_sample = torch.from_numpy(np.repeat(np.arange(len(val)), val.lengths)).to(self.device)
        # memberships (sample, piece, weight), by sample: one per sample when the weights factor
        m_sample, m_piece = np.nonzero(member)
        m_weight = torch.from_numpy(member[m_sample, m_piece]).to(self.device)
        m_piece = torch.from_numpy(m_piece).to(self.device)
        m_count = torch.from_numpy(np.bincount(m_sample, minlength=len(val))).to(self.device)
        m_first = torch.cumsum(m_count, 0) - m_count
        one_each = len(val) > 0 and int(m_count.max()) <= 1
        entries = val.ids.shape[1]
        # tokens per chunk: at most chunk * (m+1) * (pieces a sample is in) entries
        step = max(1, _BUILD_ENTRIES // (entries * max(1, int(m_count.max()) if len(val) else 1)))
        bag = _BAG_ENTRIES if self.dtype == torch.float32 else None

        def chunks():  # per chunk of validation tokens: (key of each entry, its token, its coefficient), the chunk
            for start in range(0, val.ids.shape[0], step):
                part = slice(start, start + step)
                pos = self._positions(torch.from_numpy(val.ids[part]).to(self.device)).view(-1)  # (t (m+1),)
                held = torch.nonzero(pos != n_vocab).squeeze(1)  # entries on a row of this scorer
                sample = token_sample[part][torch.div(held, entries, rounding_mode="floor")]
                count = m_count[sample]  # each entry once per piece its sample is in
                if one_each:  # (an audit: one piece per sample) no repeats; entries of samples in no piece dropped
                    rep = torch.nonzero(count).squeeze(1)
                    m = m_first[sample[rep]]
                else:
                    rep = torch.repeat_interleave(torch.arange(held.numel(), device=self.device), count)
                    m = (
                        m_first[sample][rep]
                        + torch.arange(rep.numel(), device=self.device)
                        - (torch.cumsum(count, 0) - count)[rep]
                    )
                self._check_stop()
                if not rep.numel():
                    continue
                shift = max(1, pos.numel().bit_length())
                if one_each and n_pieces * (n_vocab + 1) < 1 << max(0, _PACKED_KEY_BITS - shift):
                    # the entry under its sort key in one int64 (held is unique and increasing: the stable order),
                    # one sort, the rest looked up in tables of samples and pieces: no gathers by a permutation of
                    # millions of entries (0.30 of 1.19 s on the 1,000-sample mixed set)
                    held = held[rep]
                    by = torch.sort(((m_piece[m] * (n_vocab + 1) + pos[held]) << shift) | held, stable=True).values
                    held = by & ((1 << shift) - 1)
                    m = m_first[token_sample[part][held // entries]]
                    piece = m_piece[m]
                    row = (by >> shift) - piece * (n_vocab + 1)
                else:
                    held, piece = held[rep], m_piece[m]
                    # by piece, then row: a piece's rows gather its own samples' tokens (measured 0.48 -> 0.28 s
                    # for the 1,000-sample mixed set's entries, against row-major order)
                    order = torch.argsort(piece * (n_vocab + 1) + pos[held], stable=True)
                    held, piece, m = held[order], piece[order], m[order]
                    row = pos[held]
                self._check_stop()
                values = torch.from_numpy(val.values[part]).to(self.device).view(-1)[held].double()
                yield row * n_pieces + piece, held // entries, values * m_weight[m], part

        one = list(chunks()) if val.ids.shape[0] <= step else None  # one chunk: computed once, kept for both passes
        # (a chunk's keys come sorted by piece, then row: each key is one run, and the runs are few)
        used = [torch.unique(torch.unique_consecutive(key)) for key, _, _, _ in (one if one is not None else chunks())]
        used = torch.unique(torch.cat(used)) if used else torch.zeros(0, dtype=torch.int64, device=self.device)
        acc = torch.zeros((used.numel(), self.d), dtype=torch.float64, device=self.device)
        for key, token, coef, part in one if one is not None else chunks():
            self._check_stop()
            new = torch.ones_like(key, dtype=torch.bool)
            new[1:] = key[1:] != key[:-1]  # a key's first entry
            if bag is not None:  # ... or every bag-th entry of a key's run
                first = torch.cummax(torch.where(new, torch.arange(key.numel(), device=self.device), 0), 0).values
                new |= (torch.arange(key.numel(), device=self.device) - first) % bag == 0
            offsets = torch.nonzero(new).squeeze(1)
            hidden = torch.from_numpy(val.hidden[part]).to(self.device, bag and torch.float32 or torch.float64)
            sums = torch.nn.functional.embedding_bag(
                token, hidden, offsets, mode="sum", per_sample_weights=coef.to(hidden.dtype)
            )
            target = torch.searchsorted(used, key[offsets])
            for b0 in range(0, offsets.numel(), _CHUNK_FLOATS // self.d):
                self._check_stop()
                b1 = b0 + _CHUNK_FLOATS // self.d
                acc.index_add_(0, target[b0:b1], sums[b0:b1].double())
        return used, acc.to(self.dtype)

    def sq_frobenius(self, hidden_cols: int | None = None) -> np.ndarray:
        """``||Gbar_a||_F^2`` restricted to this scorer's vocabulary, float64 array of shape ``(A,)``; over the
        first ``hidden_cols`` hidden columns only when given (a centred set's last column is its offset)."""
        if self.combine is None:  # the pieces are the aggregates
            g = self.table.double()[:, :hidden_cols]
            out = torch.zeros(self.n_agg, dtype=torch.float64, device=self.device)
            return out.index_add_(0, self.keys % self.n_agg, (g * g).sum(dim=1)).cpu().numpy()
        g = self.gbar.double().reshape(-1, self.n_agg, self.d)[:, :, :hidden_cols]
        return (g * g).sum(dim=(0, 2)).cpu().numpy()

    @torch.no_grad()
    def score(self, block: TrainBlock) -> np.ndarray:
        """``<Gbar_a, G_i>`` for every stored row ``i`` of ``block``, float64 array of shape ``(rows, A)``.

        The pieces' scores ``<P_c, G_i>`` combined (``@ combine``). Two ways to the same sum
        ``sum_k sum_j values[k, j] <P_c[ids[k, j]], h_k>``:

        * few pieces (``pieces * d`` below ``PAIR_FORM_MIN_FLOATS``, :func:`forvalue.engine.plan.pair_form`): per
          stored token, the table rows of its error entries gathered and summed (``embedding_bag``), then one
          dot product with ``h_k``; each entry reads ``pieces * d`` floats;
        * many: ``G_i`` on the held rows, ``Z[r, i] = sum_{k in i, j: ids[k, j] = r} values[k, j] h_k``, one
          ``d``-vector per (row, sample) pair (an ``embedding_bag`` of the hidden states; a sample meets a row ~3
          times on the stores measured), then each pair's dot products with its row's non-zero pieces only
          (``c_r`` of them) in one sampled dense product (``torch.sparse.sampled_addmm``) per chunk of pairs: a pair
          costs ``c_r d`` multiply-adds, where the gather read ``pieces * d`` floats per entry from a table too large
          for the caches (docs/gform.md).
        """
        rows = block.lengths.size
        out = torch.zeros((rows, self.n_pieces), dtype=torch.float64, device=self.device)
        segment = torch.from_numpy(np.repeat(np.arange(rows), block.lengths)).to(self.device)
        hidden = read_only_tensor(block.hidden).to(self.device, self.dtype)
        pos = self._positions(torch.from_numpy(block.ids).to(self.device))
        values = torch.from_numpy(block.values).to(self.device, self.dtype)
        if self.pairs:
            with one_torch_thread():
                self._score_pairs(out, segment, hidden, pos, values, rows)
        else:
            table = self._pieces_dense()
            chunk = max(1, _CHUNK_FLOATS // (self.n_pieces * self.d))
            for start in range(0, hidden.shape[0], chunk):
                part = slice(start, start + chunk)
                bag = torch.nn.functional.embedding_bag(pos[part], table, per_sample_weights=values[part], mode="sum")
                per_token = torch.einsum("nad,nd->na", bag.view(-1, self.n_pieces, self.d), hidden[part])
                out.index_add_(0, segment[part], per_token.double())
        return (out if self.combine is None else out @ self.combine).cpu().numpy()

    @property
    def pairs(self) -> bool:
        """Whether blocks are scored the pair way (:func:`forvalue.engine.plan.pair_form`), not by the gather."""
        return pair_form(self.n_pieces, self.d)

    def _score_pairs(self, out, segment, hidden, pos, values, rows: int) -> None:
        """Adds the block's piece scores to ``out`` by (row, sample) pairs and their rows' non-zero pieces."""
        n_vocab, n_pieces = self.vocab.numel(), self.n_pieces
        entries = pos.shape[1]
        flat = pos.reshape(-1)
        held = torch.nonzero(flat != n_vocab).squeeze(1)  # entries on a row of the table (the others meet zero)
        if held.numel() == 0:
            return
        # the entries by pair (row, then sample; one sort, a pair's entries in their order) and each pair's first
        key = flat[held] * rows + segment[held // entries]
        shift = max(1, flat.numel().bit_length())
        if (n_vocab + 1) * rows < 1 << max(0, _PACKED_KEY_BITS - shift):
            # the entry's index packed under its key: one sort of one array, no gathers by a permutation (~20% of
            # the time outside the products on the 100k synthetic store with 30 labels)
            key = torch.sort((key << shift) | held, stable=True).values  # (unique keys: stable is torch's radix sort)
            held = key & ((1 << shift) - 1)
            key >>= shift
        else:
            key, order = torch.sort(key, stable=True)
            held = held[order]
        keys, count = torch.unique_consecutive(key, return_counts=True)
        starts = torch.zeros(keys.numel() + 1, dtype=torch.int64, device=self.device)
        torch.cumsum(count, 0, out=starts[1:])
        token, weight = held // entries, values.reshape(-1)[held]
        first, piece_of = self._row_pieces()
        step = max(1, _CHUNK_FLOATS // self.d)  # pairs per chunk of Z
        for p0 in range(0, keys.numel(), step):
            p1 = min(p0 + step, keys.numel())
            e0, e1 = int(starts[p0]), int(starts[p1])
            z = torch.nn.functional.embedding_bag(
                token[e0:e1], hidden, starts[p0:p1] - e0, mode="sum", per_sample_weights=weight[e0:e1]
            )  # (pairs, d)
            row = keys[p0:p1] // rows
            width = first[row + 1] - first[row]  # non-zero pieces of each pair's row
            if int(width.max()) * (p1 - p0) >= _DENSE_ROW_PRODUCTS:  # rows met by many pairs: a dense product each
                width = self._dense_rows(out, z, row, width, first, piece_of, keys[p0:p1] % rows)
            # the other rows' (pair, piece) products <Z[pair], table[slot]> in one sampled dense product (SDDMM), in
            # CSR order (pair-major, as target); a loop of one dense product per table row took about twice as long
            # on the 100k synthetic store with 30 labels (docs/gform.md)
            crow = torch.zeros(p1 - p0 + 1, dtype=torch.int64, device=self.device)
            torch.cumsum(width, 0, out=crow[1:])
            nnz = int(crow[-1])
            if nnz == 0:
                continue
            # the (pair, piece) products pair-major: the j-th of pair p is table row first[row_p] + j, landing on
            # out[sample_p, piece]; one expansion per pair quantity, no per-product gathers of pair data
            offset = crow[:-1]
            slot = torch.arange(nnz, device=self.device) + torch.repeat_interleave(
                first[row] - offset, width, output_size=nnz
            )
            target = torch.repeat_interleave((keys[p0:p1] % rows) * n_pieces, width, output_size=nnz) + piece_of[slot]
            zeros = torch.zeros(nnz, dtype=self.dtype, device=self.device)
            shape = (p1 - p0, self.table.shape[0])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR tensor support is in beta state"
                pattern = torch.sparse_csr_tensor(crow, slot, zeros, shape, check_invariants=False)
                part = torch.sparse.sampled_addmm(pattern, z, self.table.T, beta=0.0).values()
            out.view(-1).index_add_(0, target, part.double())

    def _row_pieces(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's non-zero pieces: ``table[first[r] : first[r + 1]]``, of pieces ``piece_of[...]`` (4 of 30 per
        row on the mixed sets of docs/gform.md: the dense products skip the zero ones). Made once per scorer."""
        if self._first is None:
            n_vocab, n_pieces = self.vocab.numel(), self.n_pieces
            first = torch.searchsorted(self.keys, torch.arange(n_vocab + 2, device=self.device) * n_pieces)
            self._first = (first, self.keys % n_pieces)
        return self._first

    def _dense_rows(self, out, z, row, width, first, piece_of, sample) -> torch.Tensor:
        """Adds the products of the chunk's rows met by many pairs (``_DENSE_ROW_PRODUCTS``) to ``out``, one dense
        product ``Z_r @ P_r^T`` per row (the pairs are sorted by row: a row's pairs are one slice of ``z``); returns
        ``width`` with those pairs' set to 0 (nothing left for the sampled product). Common tokens are in almost
        every stored sample's error support and in every label's pieces: 98% of the products on the 100k synthetic
        store with 30 labels sit on 256 such rows, where a dense product runs several times faster (docs/gform.md)."""
        rows_here, counts = torch.unique_consecutive(row, return_counts=True)
        ends = torch.cumsum(counts, 0)
        # a row's pairs share its width: the last pair's is the row's
        dense = torch.nonzero(counts * width[ends - 1] >= _DENSE_ROW_PRODUCTS).squeeze(1)
        if dense.numel() == 0:
            return width
        width = width.clone()
        lows, highs = first[rows_here[dense]].tolist(), first[rows_here[dense] + 1].tolist()
        for lo, hi, end, count in zip(lows, highs, ends[dense].tolist(), counts[dense].tolist()):
            res = (self.table[lo:hi] @ z[end - count : end].T).T.double()  # (pairs of row r, its non-zero pieces)
            if hi - lo == self.n_pieces:  # every piece (the common rows): whole rows of out
                out.index_add_(0, sample[end - count : end], res)
            else:
                out.index_put_((sample[end - count : end, None], piece_of[lo:hi][None, :]), res, accumulate=True)
            width[end - count : end] = 0
        return width


class BlockedGForm:
    """``A`` aggregates over the whole union vocabulary, built in vocabulary blocks, scored in one gather.

    ``Gbar`` is built one block of ``V_u`` at a time (each block's float64 accumulation within
    ``budget``) into one float32 table, so scoring is a single :class:`GFormScorer` pass: one
    gather per stored token whatever the number of blocks (a validation set that mixes tasks has a
    large ``V_u``; scoring every block separately re-gathered every stored token once per block).
    On a CPU each block is built in ``GFORM_BUILD_WORKERS`` parts of about as many validation entries
    at once (threads, torch on one thread each): a key's row depends only on its own entries, so the
    table is the one built whole, bit for bit.

    Attributes
    ----------
    blocks : int
        Vocabulary blocks the build took (the memory budget's; not counting the parts built at once).
    """

    def __init__(self, val: ValidationSet, weights: np.ndarray, device, dtype=torch.float32, budget: int | None = None):
        vocab, entries = np.unique(val.ids, return_counts=True)  # vocab_union, and each row's validation entries
        n_agg = np.asarray(weights).reshape(len(val), -1).shape[1]
        budget = memory_budget(device) if budget is None else budget
        per_row = GFormScorer.estimate_bytes(1, n_agg, val.hidden.shape[1], dtype) // 2
        rows = max(1, int(budget // max(1, per_row)) - 1)
        starts = range(0, max(1, vocab.size), rows)
        self.blocks = len(starts)
        workers = GFORM_BUILD_WORKERS if torch.device(device).type == "cpu" else 1
        parts = [part for lo in starts for part in _split_by_entries(entries, lo, min(lo + rows, vocab.size), workers)]
        self.n_agg = n_agg
        if len(parts) <= 1:
            self.scorer = GFormScorer(val, weights, device, dtype, vocab)
            return
        self.scorer = GFormScorer(val, weights, device, dtype, vocab, build=False)

        def build(bounds, stop):  # a part's row r is the whole table's row lo + r
            part = GFormScorer(val, weights, device, dtype, vocab[bounds[0] : bounds[1]], stop=stop)
            return part.keys + bounds[0] * part.n_pieces, part.table

        # parts of about half a block each at once: within the budget of one block at a time
        with one_torch_thread():
            built = map_on_threads(build, parts, workers)
        self.scorer.keys, self.scorer.table = torch.cat([k for k, _ in built]), torch.cat([t for _, t in built])

    @property
    def pairs(self) -> bool:
        return self.scorer.pairs

    def score(self, block: TrainBlock) -> np.ndarray:
        return self.scorer.score(block)

    def sq_frobenius(self, hidden_cols: int | None = None) -> np.ndarray:
        return self.scorer.sq_frobenius(hidden_cols)


def _split_by_entries(entries: np.ndarray, lo: int, hi: int, parts: int) -> list[tuple[int, int]]:
    """Vocabulary rows ``[lo, hi)`` cut into at most ``parts`` ranges of about as many validation entries each
    (``entries`` per row): the work of a part's build is its entries (a common token's row holds thousands)."""
    if parts <= 1 or hi - lo < 2:
        return [(lo, hi)]
    total = np.cumsum(entries[lo:hi])
    cuts = np.searchsorted(total, total[-1] * np.arange(1, parts) / parts, side="right") + lo
    bounds = np.unique(np.clip(np.concatenate([[lo], cuts, [hi]]), lo, hi))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def factor_weights(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``weights (n, A)`` as ``member (n, P) @ combine (P, A)`` with one non-zero per row of ``member``, or
    ``(weights, None)`` when that does not hold (or gains nothing: no sample is in two aggregates).

    Samples with the same non-zero pattern form one piece when their rows are proportional (to 1e-12 relative):
    an audit's mean and per-label weights (``1/n`` and ``1/n_g``, both divided by ``||G_v||`` for cosine) give one
    piece per label with ``combine[g] = (n_g / n) at the mean, 1 at the label``.
    """
    weights = np.asarray(weights, np.float64)
    nonzero = weights != 0
    if nonzero.sum(axis=1).max(initial=0) <= 1:
        return weights, None
    patterns, piece = np.unique(nonzero, axis=0, return_inverse=True)
    piece = piece.reshape(-1)
    first = np.full(len(patterns), -1)
    first[piece[::-1]] = np.arange(len(piece))[::-1]  # first sample of each pattern
    ref = np.where(patterns.any(axis=1), patterns.shape[1] - 1 - np.argmax(patterns[:, ::-1], axis=1), -1)
    live = ref >= 0  # the all-zero pattern (a sample in no aggregate) is no piece
    combine = np.zeros((len(patterns), weights.shape[1]))
    combine[live] = weights[first[live]] / weights[first[live], ref[live]][:, None]
    scale = np.where(ref[piece] >= 0, weights[np.arange(len(piece)), np.maximum(ref[piece], 0)], 0.0)
    if np.abs(weights - scale[:, None] * combine[piece]).max(initial=0.0) > 1e-12 * np.abs(weights).max(initial=0.0):
        return weights, None
    member = np.zeros((len(piece), len(patterns)))
    member[np.arange(len(piece)), piece] = scale
    return member[:, live], combine[live]


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
