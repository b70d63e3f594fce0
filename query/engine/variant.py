"""Score variants that leave the store as it is: centred hidden states (``center="mean"``) and whitened ones
(``whiten=lambda``).

Centring replaces ``<h_v, h_i>`` by ``<h_v - mu, h_i - mu>`` in Eq. 1, for a mean hidden state ``mu``
(:func:`store_mean`). The store is not rewritten: the validation side holds ``d + 1`` columns
``[h_v - mu, -<h_v - mu, mu>]`` and every stored token is read as ``[h_i, 1]``, so the plain inner product over
``d + 1`` columns is the centred one,

    <h_v - mu, h_i> - <h_v - mu, mu> = <h_v - mu, h_i - mu>,

and every scorer (token form, G-form, prefilter rerank, explanations, Ray actors) computes the centred score
without knowing it: :func:`centre_validation` transforms the validation set once and records ``mu`` in it,
:func:`for_scoring` reads each stored block for it. The stored rows' ``||G_i||^2`` (the cosine denominator)
become the centred ones without a pass over token pairs:

    ||G^c||^2 = ||G||^2 - 2 sum_k <E, e_k> <h_k, mu> + |mu|^2 ||E||^2,    E = sum_k e_k,

from the stored ``||G||^2`` (:func:`centred_sq_norms`). The float64 reference is
``tools.reference.centred_score``; docs/variants.md has the measurements.

Whitening (``whiten=lambda``, implies centring) replaces ``<h_v - mu, h_i - mu>`` by ``(h_v - mu)^T C^-1 (h_i - mu)``
with ``C = Sigma + lambda tr(Sigma) / d I`` the covariance of the same stored tokens shrunk towards the identity
(:func:`store_moments`). Only the validation side changes: it holds ``[w_v, -<w_v, mu>]`` with
``w_v = C^-1 (h_v - mu)`` against the stored ``[h_i, 1]``, so every scorer computes it as it computes the centred
score, at no cost per stored token. The stored ``||G_i||`` in that metric would need ``d^2`` work per stored token,
so cosine is not offered with whitening (the configs refuse it); the validation side's norms
(:func:`whitened_sq_norms`) are exact, and an explanation computes its one stored sample's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from forvalue.schemas.tables import SCORING_COLUMNS
from forvalue.storage.rows import TrainBlock, decode_block

if TYPE_CHECKING:  # the validation module pulls the encoder in; this one stays light
    from forvalue.engine.validation import ValidationSet

# Stored samples whose scored tokens give the mean hidden state (evenly spaced over the store).
MEAN_ROWS = 4096
# Stored samples whose scored tokens give the whitening's mean and covariance (d^2 work per token: ~1.5 s of CPU
# per 50k tokens on the 2-core benchmark machine, so fewer than the mean's).
MOMENT_ROWS = 1024
# The score-variant settings (VariantConfig's fields) with the paper's values: what an older audit's settings mean.
PAPER_VARIANT = {"center": "none", "validation_tokens": "store", "whiten": None}


def variant_options(source) -> dict:
    """The score-variant settings of a :class:`~forvalue.schemas.config.VariantConfig` or of an audit's recorded
    settings (a dict; a missing key: the paper's value), as keyword arguments of :class:`Explainer`."""
    if isinstance(source, dict):
        return {k: source.get(k, v) for k, v in PAPER_VARIANT.items()}
    return {k: getattr(source, k) for k in PAPER_VARIANT}


def variant_flags(settings: dict) -> str:
    """The score settings of a recorded audit or query (``normalize`` and the :data:`PAPER_VARIANT` keys; a missing
    key: the paper's value) as the flags that give them, e.g. ``--normalize none --center mean --validation-tokens
    response --whiten 0.1``."""
    opts = {"normalize": settings.get("normalize", "none"), **variant_options(settings)}
    return " ".join(
        f"--{k.replace('_', '-')} {number_flag(v) if isinstance(v, float) else v}"
        for k, v in opts.items()
        if v is not None
    )


def number_flag(value: float) -> str:
    """``value`` as a flag's argument that gives back exactly ``value``: short (``0.1``, ``3``) where that loses
    nothing, else every digit it needs (``0.123456789``, not ``0.123457``)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def store_mean(store, rows: int = MEAN_ROWS) -> np.ndarray:
    """The mean hidden state ``mu``, float64 of shape ``(d,)``: over the scored tokens of ``min(rows, n)``
    stored samples at evenly spaced positions (all of them in a store of at most ``rows`` samples).

    Deterministic for a store version; hidden states as the scorers read them (int8 dequantized).
    """
    return _moments(store, rows, second=False)[0]


def store_moments(store, rows: int = MOMENT_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, Sigma)``: the mean and the covariance ``(d, d)`` (float64, normalised by the token count) of the
    scored tokens of ``min(rows, n)`` evenly spaced stored samples, as :func:`store_mean` reads them."""
    return _moments(store, rows, second=True)


def _moments(store, rows: int, second: bool) -> tuple[np.ndarray, np.ndarray | None]:
    total = store.count()
    positions = np.unique(np.linspace(0, max(total - 1, 0), num=min(rows, total)).round().astype(np.int64))
    width = store.manifest.stored_width  # a low-rank store's coordinates (its validation sets are projected)
    acc, count = np.zeros(width), 0
    outer = np.zeros((width, width)) if second else None
    shift = None  # the second moment is taken about the first block's mean (float32 products, little cancellation)
    for start in range(0, positions.size, 1024):
        part = positions[start : start + 1024].tolist()
        block = decode_block(store.take(part, SCORING_COLUMNS), width)
        acc += block.hidden.sum(axis=0, dtype=np.float64)
        count += block.hidden.shape[0]
        if second and block.hidden.shape[0]:
            if shift is None:
                shift = block.hidden.mean(axis=0, dtype=np.float64)
            h = (block.hidden.astype(np.float64) - shift).astype(np.float32)
            outer += (h.T @ h).astype(np.float64)
    mu = acc / max(count, 1)
    if not second:
        return mu, None
    if shift is None:
        return mu, np.zeros((width, width))
    off = mu - shift
    return mu, outer / max(count, 1) - np.outer(off, off)


def shrunk_covariance(cov: np.ndarray, lam: float) -> np.ndarray:
    """``C = Sigma + lambda tr(Sigma) / d I``: the whitening metric's inverse (positive definite for ``lambda > 0``
    and a non-zero ``Sigma``)."""
    d = cov.shape[0]
    scale = max(float(np.trace(cov)) / d, 1e-12)
    return cov + lam * scale * np.eye(d)


def whitened_sq_norms(
    centred: np.ndarray, whitened: np.ndarray, ids: np.ndarray, values: np.ndarray, lengths: np.ndarray
) -> np.ndarray:
    """``||G_r||_M^2 = sum_{k,k'} <e_k, e_k'> <w_k, u_k'>`` per row, float64: ``centred`` the rows' ``u = h - mu``,
    ``whitened`` their ``w = M u``. One sparse product per chunk of rows, no pass over token pairs."""
    import torch

    lengths = np.asarray(lengths, np.int64)
    out = np.zeros(lengths.size)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    chunk = 256
    for first in range(0, lengths.size, chunk):
        last = min(first + chunk, lengths.size)
        lo, hi = int(offsets[first]), int(offsets[last])
        if hi == lo:
            continue
        row_of = np.repeat(np.arange(last - first), lengths[first:last])
        part_ids = np.asarray(ids[lo:hi], np.int64)
        width = int(part_ids.max(initial=0)) + 1
        keys = (row_of[:, None] * width + part_ids).ravel()
        unique, inverse = np.unique(keys, return_inverse=True)
        tokens = np.repeat(np.arange(hi - lo), part_ids.shape[1])
        index = torch.from_numpy(np.vstack([inverse.ravel(), tokens]))
        s = torch.sparse_coo_tensor(
            index,
            torch.from_numpy(np.asarray(values[lo:hi], np.float64).ravel()),
            (unique.size, hi - lo),
            check_invariants=False,  # in-range indices by construction
        )
        gu = torch.sparse.mm(s, torch.from_numpy(np.ascontiguousarray(centred[lo:hi], np.float64)))
        gw = torch.sparse.mm(s, torch.from_numpy(np.ascontiguousarray(whitened[lo:hi], np.float64)))
        per_key = (gu * gw).sum(dim=1).numpy()
        out[first:last] = np.bincount(unique // width, weights=per_key, minlength=last - first)
    return out


def centred_sq_norms(
    hidden: np.ndarray, ids: np.ndarray, values: np.ndarray, lengths: np.ndarray, sq_norms: np.ndarray, mu
) -> np.ndarray:
    """``||G_r^c||_F^2`` per row from its stored ``||G_r||_F^2`` (formula in the module docstring), float64.

    ``hidden`` ``(N, d)``, ``ids`` / ``values`` ``(N, m + 1)`` error entries, ``lengths`` tokens per row.
    """
    lengths = np.asarray(lengths, np.int64)
    n_rows = lengths.size
    if n_rows == 0:
        return np.zeros(0)
    row_of = np.repeat(np.arange(n_rows), lengths)
    width = int(ids.max(initial=0)) + 1
    keys = (row_of[:, None] * width + ids).ravel()
    unique, inverse = np.unique(keys, return_inverse=True)
    e_sum = np.bincount(inverse, weights=values.ravel().astype(np.float64), minlength=unique.size)  # E per (row, id)
    e_dot = (values.astype(np.float64) * e_sum[inverse].reshape(ids.shape)).sum(axis=1)  # <E_r, e_k> per token
    h_mu = hidden.astype(np.float64) @ np.asarray(mu, np.float64)
    cross = np.bincount(row_of, weights=e_dot * h_mu, minlength=n_rows)
    e_sq = np.bincount(unique // width, weights=e_sum * e_sum, minlength=n_rows)
    mu = np.asarray(mu, np.float64)
    return np.asarray(sq_norms, np.float64) - 2.0 * cross + float(mu @ mu) * e_sq


def centre_validation(val: "ValidationSet", mu: np.ndarray) -> "ValidationSet":
    """``val`` with hidden states ``[h - mu, -<h - mu, mu>]`` ``(M, d + 1)``, centred ``sq_norms``, ``center=mu``."""
    mu = np.asarray(mu, np.float64)
    shifted = val.hidden.astype(np.float64) - mu
    hidden = np.hstack([shifted, -(shifted @ mu)[:, None]]).astype(np.float32)
    sq = centred_sq_norms(val.hidden, val.ids, val.values, val.lengths, val.sq_norms, mu)
    return replace(val, hidden=hidden, sq_norms=sq, center=mu)


def centre_block(block: TrainBlock, mu: np.ndarray) -> TrainBlock:
    """A stored block read for a centred validation set: hidden ``[h, 1]`` ``(N, d + 1)``, centred ``sq_norms``."""
    sq = centred_sq_norms(block.hidden, block.ids, block.values, block.lengths, block.sq_norms, mu)
    ones = np.ones((block.hidden.shape[0], 1), np.float32)
    hidden = np.hstack([block.hidden.astype(np.float32, copy=False), ones])
    return TrainBlock(hidden, block.ids, block.values, block.lengths, sq)


def whiten_validation(val: "ValidationSet", mu: np.ndarray, cov: np.ndarray, lam: float) -> "ValidationSet":
    """``val`` with hidden states ``[w, -<w, mu>]``, ``w = C^-1 (h - mu)`` (:func:`shrunk_covariance`), the whitened
    ``sq_norms``, ``center=mu`` and ``whiten=C``: every scorer then computes ``(h_v - mu)^T C^-1 (h_i - mu)``."""
    mu = np.asarray(mu, np.float64)
    c = shrunk_covariance(np.asarray(cov, np.float64), lam)
    centred = val.hidden.astype(np.float64) - mu
    w = np.linalg.solve(c, centred.T).T
    hidden = np.hstack([w, -(w @ mu)[:, None]]).astype(np.float32)
    sq = whitened_sq_norms(centred, w, val.ids, val.values, val.lengths)
    return replace(val, hidden=hidden, sq_norms=sq, center=mu, whiten=c)


def centred_hidden(val: "ValidationSet") -> np.ndarray:
    """A centred or whitened set's ``h - mu`` ``(M, d)`` (float32), recovered from its scoring columns."""
    if val.whiten is not None:
        return (val.hidden[:, :-1].astype(np.float64) @ val.whiten).astype(np.float32)
    return val.hidden[:, :-1]


def raw_hidden(val: "ValidationSet") -> np.ndarray:
    """The set's hidden states as encoded (``(M, d)``), whatever variant it was prepared for."""
    if val.center is None:
        return val.hidden
    return centred_hidden(val) + val.center.astype(np.float32)


def block_sq_norms(block: TrainBlock, val: "ValidationSet") -> np.ndarray:
    """The ``||G_r||^2`` of a stored block read for ``val`` (:func:`for_scoring`) in ``val``'s metric: the block's
    own when not whitened; else :func:`whitened_sq_norms` (``d^2`` work per token: for a few rows, e.g. an
    explanation's)."""
    if val.whiten is None:
        return block.sq_norms
    centred = block.hidden[:, :-1].astype(np.float64) - val.center
    w = np.linalg.solve(val.whiten, centred.T).T
    return whitened_sq_norms(centred, w, block.ids, block.values, block.lengths)


def for_scoring(block: TrainBlock, val: "ValidationSet") -> TrainBlock:
    """``block`` as the scorers of ``val`` read it (centred when ``val`` is)."""
    return block if val.center is None else centre_block(block, val.center)


def as_block(val: "ValidationSet") -> TrainBlock:
    """The validation samples as a stored block read for ``val``'s scorers (its Gram matrix, ``||mean G_v||``):
    a centred set's own tokens are ``[h - mu, 0]`` against its ``[h - mu, -<h - mu, mu>]``."""
    hidden = val.hidden
    if val.center is not None:  # a whitened set's own tokens: [h - mu, 0] against its [C^-1 (h - mu), ...]
        hidden = np.hstack([centred_hidden(val), np.zeros((hidden.shape[0], 1), hidden.dtype)])
    return TrainBlock(hidden, val.ids, val.values, val.lengths, val.sq_norms)


# --whiten auto's candidates (None: centred only, no whitening), in units of the mean variance
WHITEN_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, None)
# validation samples (evenly spaced) whose own retrieval chooses among them: bounds the Gram matrices' cost
CHOOSE_SAMPLES = 256


def label_auc(scores: np.ndarray, labels: list) -> float:
    """Mean over the labelled samples ``j`` of the AUC with which column ``j`` of the square ``scores`` (stored-side
    rows, validation-side columns, the same samples) ranks the other samples of ``j``'s label above the rest (each
    sample's own row left out; ties count half). NaN when no sample has both kinds of others."""
    labels = np.array([None if l is None else str(l) for l in labels], dtype=object)
    labelled = np.array([l is not None for l in labels])
    aucs = []
    for j, label in enumerate(labels):
        if label is None:
            continue
        keep = labelled.copy()
        keep[j] = False
        same = (labels == label) & keep
        other = ~same & keep
        if not same.any() or not other.any():
            continue
        pos, neg = scores[same, j], scores[other, j]
        aucs.append(float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()))
    return float(np.mean(aucs)) if aucs else float("nan")


def check_auto_labels(labels: list, config=None) -> None:
    """Refuse (ForValueError) ``auto`` settings that ``labels`` cannot choose: fewer than two labels with two samples
    each. With ``config``, only when one of its settings is ``auto``. Cheap: before any model loads."""
    from collections import Counter

    from forvalue.schemas.errors import ForValueError

    if config is not None and "auto" not in (config.validation_tokens, config.whiten):
        return
    counts = Counter(str(l) for l in labels if l is not None)  # as label_auc compares them
    if sum(1 for c in counts.values() if c >= 2) < 2:
        shown = ", ".join(f"{k!r}: {c}" for k, c in counts.most_common(5))
        more = f", ... {len(counts) - 5} more labels" if len(counts) > 5 else ""
        raise ForValueError(
            "auto settings are chosen by how well the validation samples retrieve their own label, which needs at "
            f"least two labels with two samples each (got {'{' + shown + more + '}' if counts else 'no labels'}); "
            "give the settings instead (e.g. --whiten 1, --validation-tokens store)"
        )


def choice_samples(labels: list, limit: int | None = None) -> list[int]:
    """The validation samples (positions, ascending) whose own retrieval chooses the ``auto`` settings: all of them
    when there are at most ``limit`` (:data:`CHOOSE_SAMPLES`); else evenly spaced samples of each label with two or
    more, at least two of each (of evenly spaced labels when there are more than ``limit / 2``). An evenly spaced
    pick over the whole set could keep one sample of each label when it is sorted by label: nothing to choose by."""
    limit = CHOOSE_SAMPLES if limit is None else limit
    if len(labels) <= limit:
        return list(range(len(labels)))
    groups: dict = {}
    for j, label in enumerate(labels):
        if label is not None:
            groups.setdefault(str(label), []).append(j)
    kept = [g for g in groups.values() if len(g) >= 2]
    per = max(2, limit // max(len(kept), 1))
    if per * len(kept) > limit:
        spaced = np.linspace(0, len(kept) - 1, num=max(2, limit // per)).round().astype(np.int64)
        kept = [kept[i] for i in np.unique(spaced)]
    pick = []
    for g in kept:
        pick += [g[i] for i in np.unique(np.linspace(0, len(g) - 1, num=min(len(g), per)).round().astype(np.int64))]
    return sorted(pick)


def choose_variant(
    queries: dict,
    stored_like: "ValidationSet",
    labels: list,
    mu: np.ndarray,
    cov: np.ndarray,
    lams,
    centre_mu: np.ndarray | None = None,
    normalize: str = "none",
) -> tuple[str, object, dict]:
    """The ``auto`` settings: the validation positions (a key of ``queries``: ``"store"`` / ``"response"``, each the
    raw validation set encoded so) and the whitening (one of ``lams``: a number, None for centred only, or
    ``"raw"`` for the paper's hidden states) with which the validation samples best retrieve their own label
    among themselves (``mu`` / ``cov`` the whitening's moments; ``centre_mu``, default ``mu``, the mean of the
    centred-only candidate). Each sample, encoded as the query would be, ranks the others encoded as stored samples are
    (``stored_like``), itself left out (:func:`label_auc`); ties go to the store's positions and the milder value.
    With ``normalize="cosine"`` each score is divided by the stored side's ``||G_i||``, as the scan's cosine does
    (its other factor, ``||G_v||``, is one per column and ranks nothing).
    Returns ``(tokens, lam, {(tokens, lam): AUC})``.

    Raises ForValueError when fewer than two labels have two samples each (nothing to choose by).
    """
    import torch

    from forvalue.engine.scorer import ExactScorer
    from forvalue.schemas.errors import ForValueError

    check_auto_labels(labels)
    pick = choice_samples(labels)
    side = stored_like.subset(pick)
    block = TrainBlock(side.hidden, side.ids, side.values, side.lengths, side.sq_norms)
    labels = [labels[j] for j in pick]
    aucs: dict = {}
    for tokens, val in queries.items():
        val = val.subset(pick)
        for lam in lams:
            if lam == "raw":
                prepared = val
            elif lam is None:
                prepared = centre_validation(val, mu if centre_mu is None else centre_mu)
            else:
                prepared = whiten_validation(val, mu, cov, lam)
            scores = ExactScorer(prepared, torch.device("cpu")).score(for_scoring(block, prepared))
            if normalize == "cosine":
                scores = scores / np.maximum(np.sqrt(side.sq_norms), 1e-30)[:, None]
            aucs[(tokens, lam)] = label_auc(scores, labels)
    best = max(aucs.values())
    if not np.isfinite(best):
        raise ForValueError(
            "auto settings: no validation sample has both others of its label and others of other labels; give "
            "the settings instead (e.g. --whiten 1, --validation-tokens store)"
        )
    mildness = {lam: j for j, lam in enumerate(sorted((l for l in lams if l not in (None, "raw")), reverse=True))}
    order = {"raw": -2, None: -1, **mildness}  # the paper's, then centred only, then the mildest whitening
    tied = [key for key, a in aucs.items() if a >= best - 1e-12]
    tokens, lam = min(tied, key=lambda k: (k[0] != "store", order[k[1]]))
    return tokens, lam, aucs


def resolve_auto(config, store, encode, labels: list) -> tuple:
    """``config`` (a query's or audit's) with ``whiten="auto"`` and ``validation_tokens="auto"`` replaced by
    :func:`choose_variant`'s choice, the validation set to score (encoded with the chosen positions; already whitened
    when whitening was chosen or given, with the moments the choice read, so they are not read twice), and a
    record of the choice (None when nothing is ``auto``). ``encode(tokens)``: the validation samples encoded with
    those positions (``"store"`` or ``"response"``); each is asked for once.

    ``whiten="auto"`` chooses among :data:`WHITEN_GRID` (centred whatever ``center`` says); with a fixed
    ``whiten`` or none, ``validation_tokens="auto"`` chooses the positions under the configured variant.
    """
    tokens_auto, whiten_auto = config.validation_tokens == "auto", config.whiten == "auto"
    if not (tokens_auto or whiten_auto):
        return config, encode(config.validation_tokens), None
    check_auto_labels(labels)  # before anything is encoded
    stored_like = encode("store")
    queries = {"store": stored_like}
    if tokens_auto or config.validation_tokens == "response":
        queries["response"] = encode("response")
    if not tokens_auto:
        queries = {config.validation_tokens: queries[config.validation_tokens]}
    if whiten_auto:
        lams = WHITEN_GRID
    elif config.whiten is not None:
        lams = (config.whiten,)
    else:
        lams = (None,) if config.center == "mean" else ("raw",)
    mu, cov = store_moments(store) if (whiten_auto or config.whiten is not None) else (store_mean(store), None)
    # centred only (None) is scored with --center mean's mean (store_mean), not the moments' (fewer samples), so
    # the AUC printed for it is the one of the scores given
    centre_mu = store_mean(store) if None in lams and cov is not None else mu
    normalize = getattr(config, "normalize", "none")
    tokens, lam, aucs = choose_variant(queries, stored_like, labels, mu, cov, lams, centre_mu, normalize)
    changes = {"validation_tokens": tokens}
    if whiten_auto:
        changes.update(center="mean", whiten=lam)
    config = replace(config, **changes)
    val = queries[tokens]
    if lam is not None and lam != "raw":  # whitened with the moments read above (apply_variant keeps it)
        val = whiten_validation(val, mu, cov, lam)
    elif lam is None:  # centred with the mean the choice used (apply_variant keeps it)
        val = centre_validation(val, centre_mu)
    chosen = {"validation_tokens": tokens, "center": config.center, "whiten": config.whiten}
    if getattr(config, "normalize", "none") == "cosine":  # not chosen, but part of the flags that give these scores
        chosen["normalize"] = "cosine"
    record = {  # the settings that give the same scores when given instead of auto
        "chosen": chosen,
        "label_auc": {_variant_key(t, l, tokens_auto, whiten_auto): round(v, 6) for (t, l), v in aucs.items()},
    }
    return config, val, record


def _variant_key(tokens: str, lam, tokens_auto: bool, whiten_auto: bool) -> str:
    parts = [tokens] if tokens_auto else []
    if whiten_auto:
        parts.append("none" if lam is None else f"{lam:g}")
    return " ".join(parts)


def describe_auto(record: dict) -> str:
    """One line for the user: what the ``auto`` settings chose, and each candidate's own-label AUC."""
    chosen = record["chosen"]
    what = [f"--validation-tokens {chosen['validation_tokens']}"]
    if chosen["whiten"] is not None:  # implies centring
        what.append(f"--whiten {number_flag(chosen['whiten'])}")
    elif chosen.get("center") == "mean":  # whiten="auto" chose none: centred only
        what.append("--center mean")
    if chosen.get("normalize") == "cosine":
        what.append("--normalize cosine")
    grid = ", ".join(f"{k} {v:.3f}" for k, v in record["label_auc"].items())
    return f"auto settings chose {' '.join(what)} (validation samples' own-label AUC: {grid})"


def apply_variant(val: "ValidationSet", store, center: str, whiten: float | None = None) -> "ValidationSet":
    """``val`` prepared for ``center`` and ``whiten`` (``"none"`` and None: unchanged; ``"mean"``:
    :func:`centre_validation` with :func:`store_mean`; ``whiten``: :func:`whiten_validation` with
    :func:`store_moments`, centred whatever ``center`` says)."""
    if val.center is not None:
        return val
    if whiten is not None:
        mu, cov = store_moments(store)
        return whiten_validation(val, mu, cov, whiten)
    if center == "none":
        return val
    return centre_validation(val, store_mean(store))
