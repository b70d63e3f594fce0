"""Encode validation samples with the store's model and settings.

The validation side goes through exactly the code the build used (tokenizer, forward
pass, sparsifier), with the tokenization settings read from the store's manifest, and
the model identity compared against it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from forvalue.indexer.build import manifest_for
from forvalue.indexer.data import Sample, iter_samples
from forvalue.indexer.encoder import encode_batch
from forvalue.schemas.config import DataConfig, EncodeConfig
from forvalue.schemas.errors import ForValueError, InputDataError, ManifestMismatchError
from forvalue.schemas.manifest import MUST_MATCH, Manifest


@dataclass
class ValidationSet:
    """Concatenated per-token arrays of ``n`` validation samples (``M`` scored tokens).

    Attributes
    ----------
    samples : list of Sample, length n
    hidden : float32 array, shape (M, d)
    ids : int64 array, shape (M, m + 1)
        Error support ids per token (see ``forvalue.indexer.sparse_errors.error_entries``).
    values : float32 array, shape (M, m + 1)
    lengths : int array, shape (n,)
        Tokens per sample; sample j owns rows ``offsets[j]:offsets[j+1]``.
    sq_norms : float64 array, shape (n,)
    center : float64 array of shape (d,), or None
        The mean hidden state the set is centred on (``forvalue.engine.variant.centre_validation``: then
        ``hidden`` has ``d + 1`` columns and ``sq_norms`` are the centred ones); stored rows are read to match.
    whiten : float64 array of shape (d, d), or None
        The shrunk covariance ``C`` of a whitened set (``forvalue.engine.variant.whiten_validation``: its
        ``hidden`` columns are ``[C^-1 (h - mu), ...]`` and ``sq_norms`` the whitened ones).
    """

    samples: list[Sample]
    hidden: np.ndarray
    ids: np.ndarray
    values: np.ndarray
    lengths: np.ndarray
    sq_norms: np.ndarray
    center: np.ndarray | None = None
    whiten: np.ndarray | None = None

    def __post_init__(self):
        if self.ids.size and int(self.ids.min()) < 0:  # the scorers' id look-ups reserve negative indices
            raise ForValueError(f"validation error ids must be vocabulary ids (>= 0); found {int(self.ids.min())}")

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, index: Sequence[int]) -> "ValidationSet":
        offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        rows = (
            np.concatenate([np.arange(offsets[j], offsets[j + 1]) for j in index]) if len(index) else np.zeros(0, int)
        )
        return ValidationSet(
            [self.samples[j] for j in index],
            self.hidden[rows],
            self.ids[rows],
            self.values[rows],
            self.lengths[list(index)],
            self.sq_norms[list(index)],
            self.center,
            self.whiten,
        )


def validation_paths(source) -> list:
    """The file paths among a validation input (:func:`load_validation_samples` also takes dict rows and Samples):
    what no output may replace."""
    return [v for v in source if isinstance(v, (str, Path))] if isinstance(source, (list, tuple)) else []


def load_validation_samples(
    source: Iterable[str | Path] | Sequence[dict] | Sequence[Sample], data: DataConfig
) -> list[Sample]:
    """Validation samples from paths, dict rows (like JSONL rows) or Sample objects."""
    items = list(source)
    if items and isinstance(items[0], Sample):
        samples = items
    elif items and isinstance(items[0], dict):
        import json
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "validation.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in items))
            samples = [
                replace(s, source=s.source.replace(str(path), "validation row")) for s in iter_samples([path], data)
            ]
    else:
        samples = list(iter_samples(items, data))
    if not samples:
        raise ForValueError("the validation set is empty; give at least one validation sample")
    return samples


def check_runner(runner, manifest: Manifest, data: DataConfig) -> None:
    """Refuse a model/tokenizer/setting that differs from the store's manifest."""
    encode = _encode_config(manifest)
    mine = manifest_for(runner, _data_from_manifest(data, manifest), encode)
    problems = manifest.mismatches(mine)
    if problems:
        raise ManifestMismatchError(
            "the query's model or settings differ from the store's: "
            + "; ".join(problems)
            + " (query with the store's model, or build a new store)"
        )


def _encode_config(manifest: Manifest) -> EncodeConfig:
    """The store's encoding settings (validation samples are encoded with them, never quantized to int8)."""
    return EncodeConfig(
        top_m=manifest.top_m,
        score_tokens=manifest.score_tokens,
        hidden_dtype=manifest.hidden_dtype,
        int8_block=manifest.hidden_block,
    )


def data_for_store(data: DataConfig, manifest: Manifest) -> DataConfig:
    """``data`` with the store's image column when none is given (vision-language stores)."""
    if manifest.model_kind == "vlm" and data.image_column is None and manifest.image_column is not None:
        return replace(data, image_column=manifest.image_column)
    return data


def _data_from_manifest(data: DataConfig, manifest: Manifest) -> DataConfig:
    return replace(data, max_length=manifest.max_length, chat_template=manifest.chat_template)


def validation_mode(sample: Sample, manifest: Manifest, tokens: str = "store") -> str:
    """The ``score_tokens`` a validation sample is tokenized with: the store's, or with ``tokens="response"``
    its response (``assistant`` turns of a conversation) when the store scores every token and the sample
    has a response (a row with only text keeps the store's)."""
    if tokens == "store" or manifest.score_tokens != "all" or sample.text is not None:
        return manifest.score_tokens
    return "assistant" if sample.messages is not None else "response"


def tokenize_validation(runner, sample: Sample, manifest: Manifest, tokens: str = "store"):
    """A validation sample tokenized as :func:`encode_validation` scores it (see :func:`validation_mode`; an
    empty response keeps the store's positions)."""
    mode = validation_mode(sample, manifest, tokens)
    tok = runner.tokenize(sample, mode, manifest.max_length, manifest.chat_template)
    if tok.n_scored == 0 and mode != manifest.score_tokens:
        tok = runner.tokenize(sample, manifest.score_tokens, manifest.max_length, manifest.chat_template)
    return tok


def store_hidden_basis(store) -> np.ndarray | None:
    """The hidden basis validation samples of ``store`` are projected onto (a low-rank store), else None."""
    from forvalue.storage.hidden_basis import load_hidden_basis

    found = load_hidden_basis(store.path, store.manifest)
    return None if found is None else found[0]


def project_validation(val: ValidationSet, manifest: Manifest, basis: np.ndarray | None) -> ValidationSet:
    """``val`` (full-width hidden states) in a low-rank store's coordinates: hidden states ``val.hidden @ basis``
    (float32), ``sq_norms`` recomputed on them; ``val`` itself for a full-width store
    (:mod:`forvalue.indexer.low_rank`)."""
    if not manifest.hidden_rank:
        return val
    if basis is None or basis.shape != (manifest.hidden_size, manifest.hidden_rank):
        raise ForValueError(
            f"the store keeps hidden states in a fitted basis of rank {manifest.hidden_rank}; validation samples "
            "need that basis (forvalue.engine.validation.store_hidden_basis)"
        )
    if val.hidden.shape[1] != manifest.hidden_size:
        raise ForValueError(f"validation hidden states of width {val.hidden.shape[1]} are already projected")
    from forvalue.indexer.convert import self_scores
    from forvalue.indexer.low_rank import project

    hidden = project(val.hidden, basis)
    sq = self_scores(hidden, val.ids, val.values, val.lengths)
    return replace(val, hidden=hidden, sq_norms=sq)


def encode_validation(
    runner,
    samples: list[Sample],
    manifest: Manifest,
    data: DataConfig,
    batch_size: int = 8,
    tokens: str = "store",
    basis: np.ndarray | None = None,
) -> ValidationSet:
    """Forward pass over validation samples with the store's settings; a low-rank store's ``basis``
    (:func:`store_hidden_basis`) projects them into its coordinates.

    ``tokens="response"`` scores only each sample's response (:func:`validation_mode`); the forward pass
    is the same (the whole text), so those positions' hidden states and errors are the store-mode ones.

    Raises
    ------
    InputDataError
        A validation sample is longer than the store's ``max_length`` or has no scored token.
    """
    check_runner(runner, manifest, data)
    encode = _encode_config(manifest)
    tokenized = []
    for s in samples:
        tok = tokenize_validation(runner, s, manifest, tokens)
        if tok.truncated:
            raise InputDataError(
                s.source,
                f"validation sample '{s.id}' is longer than the store's max length ({manifest.max_length} tokens); "
                "shorten it or rebuild the store with a larger --max-length",
            )
        if tok.n_scored == 0:
            raise InputDataError(s.source, f"validation sample '{s.id}' has no token to score")
        tokenized.append(tok)
    encoded = []
    for start in range(0, len(tokenized), batch_size):
        encoded.extend(encode_batch(runner, tokenized[start : start + batch_size], encode, training=False))
    bad = [e.tokenized.sample for e in encoded if not e.finite]
    if bad:
        raise ForValueError(
            f"{bad[0].source}: model output has NaN or inf for validation sample '{bad[0].id}'; check --dtype"
        )
    parts = []
    for e in encoded:
        ids, values = e.entries()
        parts.append((e.hidden.astype(np.float32), ids, values, e.sq_norm))
    return project_validation(assemble(samples, parts), manifest, basis)


def assemble(samples: list[Sample], parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, float]]) -> ValidationSet:
    """A ValidationSet from per-sample ``(hidden, ids, values, sq_norm)`` in sample order."""
    return ValidationSet(
        samples=list(samples),
        hidden=np.concatenate([p[0] for p in parts]).astype(np.float32, copy=False),  # float32 parts: no second copy
        ids=np.concatenate([p[1] for p in parts]),
        values=np.concatenate([p[2] for p in parts]),
        lengths=np.array([len(p[0]) for p in parts]),
        sq_norms=np.array([p[3] for p in parts], dtype=np.float64),
    )


def cache_key(sample: Sample, manifest: Manifest, tokens: str = "store") -> str:
    """Content hash of a validation sample under a store's model and settings (and the validation positions
    scored, when they are not the store's)."""
    import hashlib
    import json

    ident = [getattr(manifest, name) for name in MUST_MATCH] + [manifest.hidden_dtype]
    if validation_mode(sample, manifest, tokens) != manifest.score_tokens:
        ident.append(f"validation_tokens={tokens}")
    content = [ident, sample.prompt, sample.response, sample.text]
    if sample.messages is not None:  # a conversation: its turns and where its prompt ends
        content += [[list(turn) for turn in sample.messages], sample.context_turns]
    if sample.image is not None:  # the image's bytes, not its path: an edited image is re-encoded
        content.append(sample.image.content_sha256())
    payload = json.dumps(content, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def encode_validation_cached(
    samples: list[Sample],
    manifest: Manifest,
    data: DataConfig,
    get_runner,
    cache,
    batch_size: int = 8,
    tokens: str = "store",
    basis: np.ndarray | None = None,
) -> tuple[ValidationSet, int]:
    """Like :func:`encode_validation`, reusing cached encodings; only new samples run the model. The cache
    keeps full-width encodings; a low-rank store's ``basis`` projects the assembled set.

    Parameters
    ----------
    get_runner : callable
        Returns the runner; called only when some sample is not cached.
    cache : forvalue.storage.audits.ValidationCache

    Returns
    -------
    (ValidationSet, number of samples encoded now)
    """
    keys = [cache_key(s, manifest, tokens) for s in samples]
    whole = cache.get_all(keys)
    if whole is not None:  # every sample cached (a repeated audit): one read in sample order, no per-sample parts
        return project_validation(ValidationSet(samples=list(samples), **whole), manifest, basis), 0
    found = cache.get(keys)
    missing = [j for j, k in enumerate(keys) if k not in found]
    if missing:
        fresh = encode_validation(
            get_runner(), [samples[j] for j in missing], replace(manifest, hidden_rank=0), data, batch_size, tokens
        )
        offsets = np.concatenate([[0], np.cumsum(fresh.lengths)])
        new = {}
        for n, j in enumerate(missing):
            rows = slice(offsets[n], offsets[n + 1])
            new[keys[j]] = (fresh.hidden[rows], fresh.ids[rows], fresh.values[rows], float(fresh.sq_norms[n]))
        cache.put(new)
        found.update(new)
    val = assemble(samples, [found[k] for k in keys])
    return project_validation(val, manifest, basis), len(set(keys[j] for j in missing))
