"""A fixed-size random sketch of ``G = sum_k e_k h_k^T`` whose inner products estimate For-Value scores.

The score is ``S(v, i) = <G_v, G_i>_F`` with ``G`` a |V| x d matrix. The sketch maps ``G`` to
``z(G)`` in R^D (``D = T * r * c``) so that ``E[<z(G_v), z(G_i)>] = <G_v, G_i>`` exactly:

* ``T`` independent blocks; block ``t`` has
* a count-sketch of the vocabulary side: id ``j`` goes to bucket ``b_t(j)`` of ``r`` buckets
  with sign ``s_t(j)`` (``C_t``, an r x |V| matrix with one ``+-1`` per column), and
* a Gaussian projection of the hidden side: ``P_t`` (d x c, entries N(0, 1/c));
* ``z_t(G) = C_t G P_t`` (r x c), and ``z = concat_t z_t / sqrt(T)``.

Each block is an unbiased estimator (``E[C^T C] = I``, ``E[P P^T] = I``, independent), and the
``T`` blocks average, so the variance falls as ``1/T``. Small ``r`` and ``c`` with many blocks
give the lowest variance for a given ``D`` (``r = c = 1`` is the Rademacher x Gaussian random
feature map of ``e (x) h``); ``r, c > 1`` are cheaper per token. Because ``G`` is a sum of
outer products and the sketch is linear, ``z(G) = sum_k (C e_k) (x) (P^T h_k)`` is computed
from the stored sparse errors and hidden states alone, token by token, with no |V| x d matrix.
Everything is fixed by ``(seed, vocab_size, hidden_size, dim, r, c)``, recorded in the manifest,
so the query side builds the very same sketch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from schemas.errors import ForValueError

# Floats allowed in one (tokens x D) intermediate.
_CHUNK_FLOATS = 1 << 24


@dataclass(frozen=True)
class SketchSpec:
    """Parameters that fix a sketch (all recorded in the store manifest)."""

    dim: int
    vocab_buckets: int
    hidden_cols: int
    seed: int
    vocab_size: int
    hidden_size: int

    def __post_init__(self) -> None:
        per_block = self.vocab_buckets * self.hidden_cols
        if self.dim < 1 or per_block < 1 or self.dim % per_block:
            raise ForValueError(
                f"--sketch-dim ({self.dim}) must be a positive multiple of vocab buckets x hidden cols "
                f"({self.vocab_buckets} x {self.hidden_cols})"
            )

    @property
    def blocks(self) -> int:
        return self.dim // (self.vocab_buckets * self.hidden_cols)

    @classmethod
    def from_manifest(cls, manifest) -> "SketchSpec | None":
        if not getattr(manifest, "sketch_dim", None):
            return None
        return cls(manifest.sketch_dim, manifest.sketch_vocab_buckets, manifest.sketch_hidden_cols,
                   manifest.sketch_seed, manifest.vocab_size, manifest.hidden_size)


class Sketcher:
    """Computes sketches for one :class:`SketchSpec` (random tables built once, deterministically)."""

    def __init__(self, spec: SketchSpec, device: torch.device | str = "cpu", flip_signs: bool = False):
        self.spec = spec
        self.device = torch.device(device)
        T, r, c = spec.blocks, spec.vocab_buckets, spec.hidden_cols
        rng_vocab = np.random.default_rng([spec.seed, 1])
        buckets = rng_vocab.integers(0, r, size=(spec.vocab_size, T), dtype=np.int64)
        signs = rng_vocab.integers(0, 2, size=(spec.vocab_size, T), dtype=np.int8).astype(np.float32) * 2 - 1
        if flip_signs:  # a deliberately wrong sketch (tests): query-side signs that disagree with the store's
            signs = -signs * (rng_vocab.integers(0, 2, size=signs.shape) * 2 - 1)
        # Dense (|V|, T * r) count-sketch table, used through embedding_bag.
        table = np.zeros((spec.vocab_size, T * r), np.float32)
        np.put_along_axis(table, buckets + np.arange(T) * r, signs, axis=1)
        rng_hidden = np.random.default_rng([spec.seed, 2])
        proj = rng_hidden.standard_normal((spec.hidden_size, T * c)).astype(np.float32) / math.sqrt(c)
        self.table = torch.from_numpy(table).to(self.device)
        self.proj = torch.from_numpy(proj).to(self.device)

    @torch.no_grad()
    def sketch(self, hidden: np.ndarray, ids: np.ndarray, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Sketches of ``len(lengths)`` samples.

        Parameters
        ----------
        hidden : array, shape (N, d)
            Hidden states of all scored tokens, samples concatenated.
        ids, values : arrays, shape (N, m + 1)
            Error support (``indexer.sparse_errors.error_entries``).
        lengths : int array, shape (rows,)
            Tokens per sample.

        Returns
        -------
        float32 array, shape (rows, D)
        """
        spec = self.spec
        T, r, c = spec.blocks, spec.vocab_buckets, spec.hidden_cols
        lengths = np.asarray(lengths, np.int64)
        rows, n = lengths.size, int(lengths.sum())
        out = torch.zeros((rows, spec.dim), dtype=torch.float32, device=self.device)
        if n == 0:
            return out.cpu().numpy()
        segment = torch.from_numpy(np.repeat(np.arange(rows), lengths)).to(self.device)
        chunk = max(1, _CHUNK_FLOATS // spec.dim)
        for start in range(0, n, chunk):
            part = slice(start, min(n, start + chunk))
            h = torch.from_numpy(np.ascontiguousarray(hidden[part], dtype=np.float32)).to(self.device)
            idx = torch.from_numpy(np.ascontiguousarray(ids[part], dtype=np.int64)).to(self.device)
            val = torch.from_numpy(np.ascontiguousarray(values[part], dtype=np.float32)).to(self.device)
            u = torch.nn.functional.embedding_bag(idx, self.table, per_sample_weights=val, mode="sum")  # (k, T*r)
            w = h @ self.proj  # (k, T*c)
            outer = (u.view(-1, T, r, 1) * w.view(-1, T, 1, c)).reshape(-1, spec.dim)
            out.index_add_(0, segment[part], outer)
        out.mul_(1.0 / math.sqrt(T))
        return out.cpu().numpy()


@lru_cache(maxsize=4)
def get_sketcher(spec: SketchSpec, device: str = "cpu") -> Sketcher:
    """Cached :class:`Sketcher` (its random tables take a moment to build for large vocabularies)."""
    return Sketcher(spec, device)
