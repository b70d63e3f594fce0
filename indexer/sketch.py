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

Fitted hidden basis (``basis="fitted"``, the default of new stores). The Gaussian ``P`` treats
every hidden direction alike, but LLM hidden states share a large common direction and most
of their variance lies in few others; and the vocabulary side is where samples differ most
(``<e_v, e_i>`` is non-zero only where their supports overlap), so a fine vocabulary
count-sketch matters more than many hidden columns. With ``U`` (d x c, orthonormal: the mean
hidden direction, then the top principal directions of the hidden states orthogonal to it,
:func:`fit_basis`) in place of ``P``, ``z(G) = C G U`` estimates ``<G_v U, G_i U>``: the score
restricted to the subspace of ``U``, with the count-sketch's collisions as the only noise (no
longer unbiased for the full score, but far more accurate for ranking, see docs/prefilter.md).
``U`` is fitted once per store from the first hidden states written and saved beside the table
(``forvalue.storage.sketch_basis``); the query side loads the same ``U``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from forvalue.schemas.errors import ForValueError

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
    basis: str = "gaussian"  # "gaussian" (random P) or "fitted" (a stored basis U, see fit_basis)
    heavy: int = 0  # vocabulary ids with buckets of their own (a stored list, see fit_heavy_ids)

    def __post_init__(self) -> None:
        if self.basis not in ("gaussian", "fitted"):
            raise ForValueError(f"sketch basis must be 'gaussian' or 'fitted', got {self.basis!r}")
        if self.heavy:
            if self.basis != "fitted":
                raise ForValueError("--sketch-heavy-ids needs --sketch-basis fitted (they are fitted with it)")
            if not 0 < self.heavy < min(self.vocab_buckets, self.vocab_size):
                raise ForValueError(
                    f"--sketch-heavy-ids ({self.heavy}) must be below the {self.vocab_buckets} vocabulary buckets "
                    f"and the {self.vocab_size} vocabulary ids (the other ids share the remaining buckets)"
                )
        if self.basis == "fitted" and self.hidden_cols > self.hidden_size:
            raise ForValueError(
                f"--sketch-hidden-cols ({self.hidden_cols}) must be <= the {self.hidden_size} values stored per token "
                "(the hidden size, or the store's --hidden-rank)"
            )
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
        return cls(
            manifest.sketch_dim,
            manifest.sketch_vocab_buckets,
            manifest.sketch_hidden_cols,
            manifest.sketch_seed,
            manifest.vocab_size,
            getattr(manifest, "stored_width", manifest.hidden_size),  # R in a low-rank store
            getattr(manifest, "sketch_basis", "gaussian"),
            getattr(manifest, "sketch_heavy_ids", 0) or 0,
        )


class Sketcher:
    """Computes sketches for one :class:`SketchSpec` (random tables built once, deterministically)."""

    def __init__(
        self,
        spec: SketchSpec,
        device: torch.device | str = "cpu",
        flip_signs: bool = False,
        basis: np.ndarray | None = None,
        heavy_ids: np.ndarray | None = None,
    ):
        self.spec = spec
        self.device = torch.device(device)
        T, r, c, H = spec.blocks, spec.vocab_buckets, spec.hidden_cols, spec.heavy
        rng_vocab = np.random.default_rng([spec.seed, 1])
        buckets = rng_vocab.integers(H, r, size=(spec.vocab_size, T), dtype=np.int64)
        signs = rng_vocab.integers(0, 2, size=(spec.vocab_size, T), dtype=np.int8).astype(np.float32) * 2 - 1
        if H:  # the heavy ids: bucket j of every block is id heavy_ids[j]'s alone, sign +1
            heavy_ids = _checked_heavy_ids(heavy_ids, spec)
            buckets[heavy_ids] = np.arange(H)[:, None]
            signs[heavy_ids] = 1.0
        if flip_signs:  # a deliberately wrong sketch (tests): query-side signs that disagree with the store's
            signs = -signs * (rng_vocab.integers(0, 2, size=signs.shape) * 2 - 1)
        # Dense (|V|, T * r) count-sketch table, used through embedding_bag.
        table = np.zeros((spec.vocab_size, T * r), np.float32)
        np.put_along_axis(table, buckets + np.arange(T) * r, signs, axis=1)
        if spec.basis == "fitted":
            if basis is None or basis.shape != (spec.hidden_size, c):
                got = None if basis is None else basis.shape
                raise ForValueError(
                    f"a fitted sketch needs its ({spec.hidden_size}, {c}) basis, got {got}; "
                    "run 'forvalue index sketch --rebuild' on the store (a lost sketch_basis.npy or an interrupted "
                    "'index sketch' leaves this)"
                )
            proj = np.tile(np.asarray(basis, np.float32), (1, T))
        else:
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
            Error support (``forvalue.indexer.sparse_errors.error_entries``).
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


def _checked_heavy_ids(heavy_ids: np.ndarray | None, spec: SketchSpec) -> np.ndarray:
    from forvalue.storage.sketch_basis import heavy_ids_fit

    ids = None if heavy_ids is None else np.asarray(heavy_ids)
    if not heavy_ids_fit(ids, spec.heavy, spec.vocab_size):
        got = None if ids is None else f"{ids.dtype} {ids.shape}"
        raise ForValueError(
            f"a sketch with {spec.heavy} heavy ids needs its list of {spec.heavy} distinct vocabulary ids, got {got}; "
            "run 'forvalue index sketch --rebuild' on the store (a lost sketch_vocab.npy or an interrupted "
            "'index sketch' leaves this)"
        )
    return ids.astype(np.int64)


_CACHE: dict = {}


def _digest(array: np.ndarray | None, dtype) -> str | None:
    return None if array is None else hashlib.sha256(np.ascontiguousarray(array, dtype).tobytes()).hexdigest()


def get_sketcher(
    spec: SketchSpec, basis: np.ndarray | None = None, device: str = "cpu", heavy_ids: np.ndarray | None = None
) -> Sketcher:
    """Cached :class:`Sketcher` (its random tables take a moment to build for large vocabularies).

    ``basis`` is the store's fitted basis (``forvalue.storage.sketch_basis.load_basis``) when
    ``spec.basis == "fitted"``; it is ignored for the Gaussian sketch. ``heavy_ids``: the store's
    (``load_heavy_ids``) when ``spec.heavy``; else ignored.
    """
    if spec.basis != "fitted":
        basis = None
    if not spec.heavy:
        heavy_ids = None
    key = (spec, device, _digest(basis, np.float32), _digest(heavy_ids, np.int64))
    if key not in _CACHE:
        if len(_CACHE) >= 4:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = Sketcher(spec, device, basis=basis, heavy_ids=heavy_ids)
    return _CACHE[key]


def fit_heavy_ids(
    hidden: np.ndarray, ids: np.ndarray, values: np.ndarray, basis: np.ndarray, count: int, vocab_size: int
) -> np.ndarray:
    """The ``count`` vocabulary ids of most error mass along the basis' first direction (the mean hidden
    direction): ``sum_k |values[k, j] * <h_k, U_0>|`` over the tokens given (the store's first), ties to the
    lower id; int64, heaviest first.

    Count-sketch collisions are the sketch's main loss (docs/prefilter.md "Adaptive candidates at 10^6"):
    a few ids hold much of the error mass, and giving each a bucket of its own keeps them from colliding.
    """
    along = np.abs(values * (np.asarray(hidden, np.float32) @ np.asarray(basis, np.float32)[:, :1]))
    ids = np.asarray(ids, np.int64)
    mass = np.bincount(ids.ravel(), weights=along.ravel(), minlength=vocab_size)[:vocab_size]
    return np.argsort(-mass, kind="stable")[:count].astype(np.int64)
