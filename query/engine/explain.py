"""Exact per-token decomposition of a For-Value score (``forvalue explain``, docs/explain.md).

For a validation sample ``v`` with scored positions ``k`` and a stored training sample ``i``
with scored positions ``k'``, Eq. 1 is a double sum of token-pair terms

    T[k, k'] = <h_vk, h_ik'> * <e_vk, e_ik'>        S(v, i) = sum_k sum_k' T[k, k']

with the sparse errors exactly as the scorer uses them (top-m ids and the target, the tail mass
left out: :func:`forvalue.indexer.sparse_errors.error_entries`) and the training side read from
the store, so the terms add up to the score ``forvalue query`` reports. The contribution of a
training position is its column sum ``sum_k T[k, k']``, that of a validation position its row
sum; each side sums to the score. A position's contribution is shown on the token it predicts
(position ``k`` holds the hidden state at ``t - 1`` and the error of predicting token ``t``).
With ``aggregate='mean'`` the validation side is every validation sample, each term weighted by
``1 / n`` (the score against ``mean_v G_v``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from forvalue.engine.variant import as_block, block_sq_norms, for_scoring, variant_options
from forvalue.indexer.data import Sample
from forvalue.schemas.config import DataConfig, ExplainConfig, ModelConfig
from forvalue.schemas.errors import ConfigError, ForValueError
from forvalue.schemas.tables import SCORING_COLUMNS
from forvalue.storage.rows import decode_block
from forvalue.storage.store import Store

# Floats of one (train tokens x m+1 x val tokens) gather in :func:`pair_terms`.
_CHUNK_FLOATS = 1 << 22


@dataclass
class TokenSide:
    """One sample's tokens and the contribution of each scored position.

    Attributes
    ----------
    sample_id : str
    label : str or None
    pieces : list of str, length T
        Text of every token of the sample (decoded from the tokenizer), in order; joined they
        give the text the model read.
    positions : int64 array, shape (n_scored,)
        Index into ``pieces`` of the token each scored position predicts.
    contributions : float64 array, shape (n_scored,)
        Part of the score carried by each scored position.
    note : str
        Why the text is shown partially (empty when the whole text is shown).
    """

    sample_id: str
    label: str | None
    pieces: list[str]
    positions: np.ndarray
    contributions: np.ndarray
    note: str = ""

    def per_token(self) -> np.ndarray:
        """Contribution of every token, float64 of shape ``(T,)`` (0 for tokens that are not predicted)."""
        out = np.zeros(len(self.pieces))
        np.add.at(out, self.positions, self.contributions)
        return out


@dataclass
class Explanation:
    """The exact decomposition of one score ``S(v, i)`` into token contributions.

    Attributes
    ----------
    score : float
        ``<G_v, G_i>`` (raw, float64); both sides' contributions sum to it.
    cosine : float
        ``score / (||G_v|| ||G_i||)``.
    train : TokenSide
    validation : list of TokenSide
        One sample, or every validation sample with ``aggregate='mean'`` (contributions
        already weighted by ``1 / n``).
    pairs : list of dict
        The ``top_pairs`` largest token-pair terms by absolute value, largest first: keys
        ``validation_id``, ``validation_position``, ``validation_token``, ``train_position``,
        ``train_token``, ``contribution``, ``hidden_dot`` (``<h_vk, h_ik'>``), ``error_dot``
        (``<e_vk, e_ik'>``, weighted by ``1 / n`` for the mean).
    aggregate : {"none", "mean"}
    inputs : tuple of paths
        The store and validation files it was computed from (:meth:`save` never writes over them).
    """

    score: float
    cosine: float
    train: TokenSide
    validation: list[TokenSide]
    pairs: list[dict]
    aggregate: str = "none"
    inputs: tuple = field(default=(), repr=False, compare=False)

    @property
    def validation_id(self) -> str:
        return "mean" if self.aggregate == "mean" else self.validation[0].sample_id

    def rows(self) -> list[dict]:
        """Flat rows for JSONL / Parquet: one per token of each side (kind ``train_token`` or
        ``validation_token``) and one per top pair (kind ``pair``); every row carries the score."""
        out = []
        base = {
            "validation_id": None,
            "train_id": self.train.sample_id,
            "validation_position": None,
            "validation_token": None,
            "train_position": None,
            "train_token": None,
        }
        for side in self.validation:
            for t, (piece, value) in enumerate(zip(side.pieces, side.per_token())):
                out.append(
                    {
                        **base,
                        "kind": "validation_token",
                        "validation_id": side.sample_id,
                        "validation_position": t,
                        "validation_token": piece,
                        "contribution": float(value),
                        "score": self.score,
                    }
                )
        for t, (piece, value) in enumerate(zip(self.train.pieces, self.train.per_token())):
            out.append(
                {
                    **base,
                    "kind": "train_token",
                    "validation_id": self.validation_id,
                    "train_position": t,
                    "train_token": piece,
                    "contribution": float(value),
                    "score": self.score,
                }
            )
        for p in self.pairs:
            out.append(
                {
                    **base,
                    "kind": "pair",
                    "validation_id": p["validation_id"],
                    "validation_position": p["validation_position"],
                    "validation_token": p["validation_token"],
                    "train_position": p["train_position"],
                    "train_token": p["train_token"],
                    "contribution": p["contribution"],
                    "score": self.score,
                }
            )
        return [{k: r[k] for k in _ROW_KEYS} for r in out]

    def summary(self, n: int = 8) -> str:
        """A few lines: the score, each side's largest tokens and the top pairs."""
        val = (
            "the mean of the validation samples"
            if self.aggregate == "mean"
            else f"validation '{self.validation_id}' [{self.validation[0].label}]"
        )
        lines = [
            f"S = {self.score:.6g} (cosine {self.cosine:.4f}): {val} vs training '{self.train.sample_id}' "
            f"[{self.train.label}]"
        ]
        train_tok = self.train.per_token()
        val_tok = [(s, v) for side in self.validation for s, v in zip(side.pieces, side.per_token())]
        val_sum = sum(float(side.contributions.sum()) for side in self.validation)
        lines.append(f"  training tokens sum to {train_tok.sum():.6g}, validation tokens to {val_sum:.6g}")
        order = np.argsort(-np.abs(train_tok), kind="stable")[:n]
        tokens = ", ".join(f"{self.train.pieces[t]!r} {train_tok[t]:+.4g}" for t in order)
        lines.append("  training tokens:   " + tokens)
        order = sorted(range(len(val_tok)), key=lambda j: -abs(val_tok[j][1]))[:n]
        lines.append("  validation tokens: " + ", ".join(f"{val_tok[j][0]!r} {val_tok[j][1]:+.4g}" for j in order))
        lines.append("  top token pairs (validation token x training token):")
        for p in self.pairs[:n]:
            lines.append(
                f"    {p['contribution']:+.4g}  {p['validation_token']!r} (#{p['validation_position']}) x "
                f"{p['train_token']!r} (#{p['train_position']})"
            )
        return "\n".join(lines)

    def to_arrow(self):
        """:meth:`rows` as a pyarrow Table (one row per token of each side, one per top pair)."""
        import pyarrow as pa

        from forvalue.present.explain_html import row_schema

        return pa.Table.from_pylist(self.rows(), schema=row_schema())

    def to_pandas(self):
        """:meth:`to_arrow` as a pandas DataFrame (needs pandas)."""
        return self.to_arrow().to_pandas()

    def save(self, path: str | Path) -> Path:
        """Write the explanation: ``.html`` (a self-contained page), ``.jsonl`` or ``.parquet`` (:meth:`rows`)."""
        from forvalue.present.explain_html import write_explanation

        return write_explanation(self, path)

    def __repr__(self) -> str:
        return f"Explanation(S = {self.score:.6g}, cosine {self.cosine:.4f}, training '{self.train.sample_id}')"


_ROW_KEYS = (
    "kind",
    "validation_id",
    "train_id",
    "validation_position",
    "validation_token",
    "train_position",
    "train_token",
    "contribution",
    "score",
)


def pair_terms(
    h_v: np.ndarray, ids_v: np.ndarray, vals_v: np.ndarray, h_t: np.ndarray, ids_t: np.ndarray, vals_t: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The token-pair terms of Eq. 1, factor by factor, in float64.

    Parameters
    ----------
    h_v : float array, shape (M, d)
        Validation hidden states.
    ids_v, vals_v : arrays, shape (M, m + 1)
        Validation error entries (:func:`forvalue.indexer.sparse_errors.error_entries`).
    h_t : float array, shape (N, d)
    ids_t, vals_t : arrays, shape (N, m + 1)
        The training sample's, as stored.

    Returns
    -------
    hidden_dot : float64 array, shape (M, N)
        ``<h_vk, h_ik'>``.
    error_dot : float64 array, shape (M, N)
        ``<e_vk, e_ik'>`` on the union of the two supports; the terms are ``hidden_dot * error_dot``.
    """
    vocab, inverse = np.unique(ids_v, return_inverse=True)
    m_tokens = ids_v.shape[0]
    dense_v = np.zeros((vocab.size + 1, m_tokens))  # last row: ids absent from the validation side
    np.add.at(dense_v, (inverse.reshape(ids_v.shape), np.arange(m_tokens)[:, None]), vals_v.astype(np.float64))
    pos = np.searchsorted(vocab, ids_t).clip(max=max(vocab.size - 1, 0))
    pos = np.where(vocab[pos] == ids_t, pos, vocab.size) if vocab.size else np.zeros_like(ids_t)
    error_dot = np.empty((ids_t.shape[0], m_tokens))
    chunk = max(1, _CHUNK_FLOATS // max(1, ids_t.shape[1] * m_tokens))
    for start in range(0, ids_t.shape[0], chunk):
        part = slice(start, start + chunk)
        error_dot[part] = np.einsum("nj,njm->nm", vals_t[part].astype(np.float64), dense_v[pos[part]])
    hidden_dot = h_v.astype(np.float64) @ h_t.astype(np.float64).T
    return hidden_dot, error_dot.T


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """Text of each token of ``ids`` such that the pieces join into the decoded text.

    Decodes growing prefixes (byte-level tokenizers split one character over several tokens:
    the piece that completes it carries it; the ones before are empty).
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's text tokenizer
    out, emitted = [], ""
    for t in range(len(ids)):
        full = tok.decode(list(ids[: t + 1]), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        stable = full.rstrip("\ufffd") if t < len(ids) - 1 else full
        if stable.startswith(emitted):
            out.append(stable[len(emitted) :])
        else:
            out.append(tok.decode([int(ids[t])], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        emitted = stable
    return out


class Explainer:
    """Explains scores of stored training samples against encoded validation samples.

    Loads nothing itself: give it the store, a runner of the store's model and the validation
    samples; each :meth:`explain` reads one stored row.

    Parameters
    ----------
    store : Store
    runner : Runner
        Of the store's model (checked against the manifest when the validation side is encoded).
    samples : list of Sample
        The validation samples (encoded once, here, with the store's settings).
    data : DataConfig
    batch_size : int
    val : ValidationSet, optional
        The samples' encodings when already at hand (e.g. from the validation cache of an audit), encoded with
        ``validation_tokens``.
    center, validation_tokens : str
        The score variant explained (:class:`~forvalue.schemas.config.VariantConfig`): a centred score splits
        into centred token-pair terms (``hidden_dot`` is ``<h_v - mu, h_i - mu>``).
    whiten : float, optional
        The whitening shrinkage of the variant (``hidden_dot`` is then ``(h_v - mu)^T C^-1 (h_i - mu)``).
    """

    def __init__(
        self,
        store: Store,
        runner,
        samples: list[Sample],
        data: DataConfig = DataConfig(),
        batch_size: int = 8,
        val=None,
        center: str = "none",
        validation_tokens: str = "store",
        whiten: float | None = None,
    ):
        from forvalue.engine.validation import encode_validation, store_hidden_basis
        from forvalue.engine.variant import apply_variant

        self.store, self.runner, self.samples = store, runner, samples
        self.manifest = store.manifest
        self.validation_tokens = validation_tokens
        if val is None:
            basis = store_hidden_basis(store)
            val = encode_validation(runner, samples, self.manifest, data, batch_size, validation_tokens, basis)
        self.val = apply_variant(val, store, center, whiten)
        self.offsets = np.concatenate([[0], np.cumsum(self.val.lengths)])
        self._val_sides: dict[int, tuple[list[str], np.ndarray]] = {}
        self._gram: np.ndarray | None = None

    def _val_tokens(self, j: int) -> tuple[list[str], np.ndarray]:
        if j not in self._val_sides:
            from forvalue.engine.validation import tokenize_validation

            tok = tokenize_validation(self.runner, self.samples[j], self.manifest, self.validation_tokens)
            self._val_sides[j] = (token_pieces(self.runner.tokenizer, tok.input_ids), tok.target_indices())
        return self._val_sides[j]

    def _rows(self, train_ids: Iterable[str]) -> dict:
        columns = SCORING_COLUMNS + ["id", "label", "prompt", "response", "text"]
        table = self.store.take(sorted(row_positions(self.store, train_ids).values()), columns)
        return {sid: table.slice(n, 1) for n, sid in enumerate(table.column("id").to_pylist())}

    def explain_many(
        self, train_ids: Sequence[str], val_index: int | None = 0, top_pairs: int = 20
    ) -> list[Explanation]:
        """Explanations of ``S(v, i)`` for each training id against validation sample ``val_index``
        (``None``: the mean over all validation samples), in the order of ``train_ids``.

        Raises
        ------
        ForValueError
            A training id is not in the store.
        """
        rows = self._rows(train_ids)
        return [self._explain(rows[sid], val_index, top_pairs) for sid in train_ids]

    def explain(self, train_id: str, val_index: int | None = 0, top_pairs: int = 20) -> Explanation:
        """The explanation of one score (see :meth:`explain_many`)."""
        return self.explain_many([train_id], val_index, top_pairs)[0]

    def _explain(self, row, val_index: int | None, top_pairs: int) -> Explanation:
        block = for_scoring(decode_block(row, self.manifest.stored_width), self.val)
        meta = row.select(["id", "label", "prompt", "response", "text"]).to_pylist()[0]
        chosen = list(range(len(self.samples))) if val_index is None else [val_index]
        weight = 1.0 / len(chosen)
        train_contrib = np.zeros(block.hidden.shape[0])
        sides, candidates = [], []
        for j in chosen:
            rows = slice(self.offsets[j], self.offsets[j + 1])
            hd, ed = pair_terms(
                self.val.hidden[rows], self.val.ids[rows], self.val.values[rows], block.hidden, block.ids, block.values
            )
            terms = hd * ed * weight
            train_contrib += terms.sum(axis=0)
            pieces, positions = self._val_tokens(j)
            sample = self.samples[j]
            sides.append(TokenSide(sample.id, sample.label, pieces, positions, terms.sum(axis=1)))
            flat = np.abs(terms).ravel()
            keep = np.argsort(-flat, kind="stable")[:top_pairs]
            for f in keep:
                k, kk = divmod(int(f), terms.shape[1])
                candidates.append((float(terms[k, kk]), j, k, kk, float(hd[k, kk]), float(ed[k, kk]) * weight))
        train_side = self._train_side(meta, block)
        train_side.contributions = train_contrib
        candidates.sort(key=lambda c: -abs(c[0]))
        pairs = []
        for value, j, k, kk, hdot, edot in candidates[:top_pairs]:
            vside = sides[chosen.index(j)]
            vt, tt = int(vside.positions[k]), int(train_side.positions[kk])
            pairs.append(
                {
                    "validation_id": vside.sample_id,
                    "validation_position": vt,
                    "validation_token": vside.pieces[vt],
                    "train_position": tt,
                    "train_token": train_side.pieces[tt],
                    "contribution": value,
                    "hidden_dot": hdot,
                    "error_dot": edot,
                }
            )
        score = float(train_contrib.sum())
        val_sq = float(self.val.sq_norms[val_index]) if val_index is not None else self._mean_sq_norm()
        train_sq = float(block_sq_norms(block, self.val)[0])  # whitened: this sample's norm in the metric
        cosine = score / max(np.sqrt(max(val_sq, 0.0) * train_sq), 1e-30)
        return Explanation(score, cosine, train_side, sides, pairs, "none" if val_index is not None else "mean")

    def _mean_sq_norm(self) -> float:
        """``||mean_v G_v||^2`` from the validation Gram matrix (the exact scorer on the validation side)."""
        if self._gram is None:
            import torch

            from forvalue.engine.scorer import ExactScorer

            scorer = ExactScorer(self.val, torch.device("cpu"))
            self._gram = scorer.score(as_block(self.val))
        return float(self._gram.mean())

    def _train_side(self, meta: dict, block) -> TokenSide:
        """The stored sample's tokens, re-tokenized with the store's settings and aligned to the stored positions.

        The stored target ids say which token each position predicts; when the re-tokenized text
        does not give them back (a conversation, stored as readable text only; an image sample)
        only the scored tokens are shown, decoded from the stored target ids.
        """
        m = self.manifest
        stored = block.ids[:, -1]  # the target id of each stored position (error_entries puts it last)
        tokenizer = self.runner.tokenizer
        note = "the stored text could not be tokenized back into the stored positions; showing the scored tokens only"
        if m.model_kind == "causal_lm" and (meta["text"] is not None or meta["prompt"] is not None):
            sample = Sample(
                meta["id"],
                meta["prompt"],
                meta["response"],
                None if meta["prompt"] is not None else meta["text"],
                meta["label"],
                f"{self.store.path}",
            )
            try:
                tok = self.runner.tokenize(sample, m.score_tokens, m.max_length, m.chat_template)
            except ForValueError:
                tok = None
            if tok is not None:
                targets = tok.target_indices()
                positions = _align(np.asarray(tok.input_ids)[targets], stored, m.lowest_likelihood_ratio is not None)
                if positions is not None:
                    return TokenSide(
                        meta["id"],
                        meta["label"],
                        token_pieces(tokenizer, tok.input_ids),
                        targets[positions],
                        np.zeros(len(stored)),
                    )
        pieces = token_pieces(tokenizer, stored.tolist())
        return TokenSide(meta["id"], meta["label"], pieces, np.arange(len(stored)), np.zeros(len(stored)), note)


def row_positions(store: Store, train_ids: Iterable[str]) -> dict[str, int]:
    """Storage positions of the given training ids (one scan of the id column).

    Raises
    ------
    ForValueError
        An id is not in the store.
    """
    wanted, where = set(train_ids), {}
    first = 0
    for batch in store.scan(["id"], batch_size=65536):
        for n, sid in enumerate(batch.column(0).to_pylist()):
            if sid in wanted and sid not in where:
                where[sid] = first + n
        first += batch.num_rows
    missing = sorted(wanted - set(where))
    if missing:
        raise ForValueError(
            f"{store.path}: no training sample with id '{missing[0]}' in the store; "
            "check --train-id (ids are those 'forvalue query' returns)"
        )
    return where


def _align(candidates: np.ndarray, stored: np.ndarray, subset: bool) -> np.ndarray | None:
    """Indices into ``candidates`` of the stored positions, or None when they do not match.

    Without a position filter the stored targets are all candidates, in order; with the
    lowest-likelihood filter they are an ordered subset (matched greedily, leftmost).
    """
    if not subset:
        return np.arange(len(stored)) if np.array_equal(candidates, stored) else None
    out, c = [], 0
    for s in stored:
        while c < len(candidates) and candidates[c] != s:
            c += 1
        if c == len(candidates):
            return None
        out.append(c)
        c += 1
    return np.array(out, dtype=np.int64)


def explain(
    store: str | Path | Store,
    validation: Iterable[str | Path] | Sequence[dict] | Sequence[Sample],
    train_id: str,
    config: ExplainConfig = ExplainConfig(),
    data: DataConfig = DataConfig(),
    model: ModelConfig | None = None,
    runner=None,
) -> Explanation:
    """Split one score ``S(v, i)`` exactly into the contributions of both samples' tokens.

    Parameters
    ----------
    store : path or Store
    validation : paths, dict rows or Samples
        Read like :func:`forvalue.run_query`'s; ``config.val_index`` or ``config.val_id``
        picks the sample (``config.aggregate='mean'``: all of them).
    train_id : str
        Id of a stored training sample.
    config : ExplainConfig
    data : DataConfig
        Columns of the validation input.
    model : ModelConfig, optional
        Overrides of the store's model (refused if it is not the same model).
    runner : optional
        An already loaded runner of the store's model.

    Returns
    -------
    Explanation
        ``score`` (equal to ``forvalue query``'s raw score), the per-token contributions of
        both sides (each sums to the score) and the ``config.top_pairs`` largest token pairs.

    Raises
    ------
    ForValueError
        Unknown training id or validation id, validation index out of range.

    Example
    -------
    >>> e = explain(store_path, [validation_path], "rev-1")        # forvalue.open(path).explain(...) calls this
    >>> round(float(e.train.per_token().sum()) / e.score, 6)      # the training tokens' parts sum to the score
    1.0
    >>> e.save("why.html").name
    'why.html'
    """
    from forvalue.engine.validation import data_for_store, load_validation_samples, validation_paths
    from forvalue.session import get_runner, open_nonempty

    store = open_nonempty(store)
    row_positions(store, [train_id])  # an unknown id fails before the model loads
    samples = load_validation_samples(validation, data_for_store(data, store.manifest))
    index = pick_validation(samples, config)
    runner = get_runner(runner, store, model, config.device)
    chosen = samples if index is None else [samples[index]]
    explainer = Explainer(store, runner, chosen, data, config.batch_size, **variant_options(config))
    explanation = explainer.explain(train_id, None if index is None else 0, config.top_pairs)
    explanation.inputs = (store.path, *validation_paths(validation))
    return explanation


def pick_validation(samples: list[Sample], config: ExplainConfig) -> int | None:
    """Index of the validation sample ``config`` names (None for the mean); a one-line error otherwise."""
    if config.aggregate == "mean":
        return None
    if config.val_id is not None:
        found = [j for j, s in enumerate(samples) if s.id == config.val_id]
        if len(found) > 1:  # (the first was taken silently)
            raise ConfigError(
                "val_id",
                f"{len(found)} validation samples have the id '{config.val_id}' (at {', '.join(map(str, found[:5]))}); "
                "give --val-index instead",
            )
        if found:
            return found[0]
        raise ConfigError(
            "val_id",
            f"no validation sample with id '{config.val_id}' (the first ids: {', '.join(s.id for s in samples[:5])})",
        )
    if config.val_index >= len(samples):
        raise ConfigError(
            "val_index",
            f"{config.val_index} is out of range: the validation input holds "
            f"{len(samples)} samples (give 0 to {len(samples) - 1})",
        )
    return config.val_index
