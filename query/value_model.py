"""A distilled value model: predicts a sample's For-Value value from its text alone (no LLM forward pass).

The file format and the prediction side of :mod:`forvalue.distill` (which fits the models).
A value model folder holds::

    M/
      value_model.json       student, feature settings, targets, fit metrics, store + audit identity
      weights.safetensors    the linear head (float32 arrays; never pickle)
      tokenizer.json         embed student only: the store model's tokenizer (tokenizers format)

Two students, both linear in their features (ridge regression, :func:`forvalue.ridge.fit_ridge`):

``ngram``
    Hashed word 1-2-grams and byte 3-5-grams of the whole text (prompt + response, or text),
    signed hashing into ``dim`` buckets, ``sign(c) log(1 + |c|)`` of the counts, L2-normalised,
    plus one length feature. Needs numpy only.
``embed``
    The sum (or mean) of the store model's input-embedding rows over the sample's tokens (a
    table lookup, no forward pass) plus a length feature. Sum pooling matches the structure of
    the score, a sum over tokens (``G = sum_k e_k h_k^T``). Because the head is linear,
    ``w . sum_t E[t]`` equals ``sum_t (E w)[t]``: the model stores the per-token table ``E w``
    (|V| x targets), not the embedding table, and needs only the tokenizer at estimate time.

Prediction never imports torch: :meth:`ValueModel.predict` is numpy on the features.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from forvalue.storage.value_model_files import (  # noqa: F401  (re-exported: the value model's public names)
    EMBED_POOLINGS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    STUDENTS,
    TOKENIZER,
    WEIGHTS,
    ValueModelError,
    load_tokenizer,
)

_WORD = re.compile(r"\w+|[^\w\s]")
_MIX = np.uint64(0x9E3779B97F4A7C15)
# files a value model folder owns: its data files (current and legacy names) and their temporary twins
_OWN_FILE = re.compile(
    r"^\.?(weights(-[0-9a-f]{16})?\.safetensors|tokenizer(-[0-9a-f]{16})?\.json)(\.[0-9]+\.[0-9a-f]+\.tmp)?$"
)
# what a save writes before its manifest: content-named data files and temporary twins, the lock, the manifest's
# temporary twin. The legacy fixed names (tokenizer.json, weights.safetensors) are not among them: a folder of
# another tool holds those, and only a folder whose value_model.json is a value model's owns them
_SAVE_FILE = re.compile(
    r"^\.?(weights-[0-9a-f]{16}\.safetensors|tokenizer-[0-9a-f]{16}\.json)(\.[0-9]+\.[0-9a-f]+\.tmp)?$"
)


def owned_by_a_value_model(name: str) -> bool:
    """Whether a file name is one a value model save writes before its manifest (content-named data files,
    their temporary twins, the manifest's temporary twin, the lock): a folder holding only these is a killed
    first save."""
    return bool(_SAVE_FILE.match(name)) or name == ".value_model.lock" or name.startswith(f".{MANIFEST}.")


def _json_safe(value):
    """``value`` with every float that is not finite (NaN, inf) as None, in nested dicts, lists and tuples."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def check_save_folder(path: Path, option: str = "--out") -> None:
    """Refuse a ``path`` a value model cannot be saved in without harm: a file, or a folder that holds anything
    but a value model (its ``value_model.json`` made by forvalue) or a killed first save's files. A save
    removes the files of the model it replaces, so any other folder would lose files."""
    from forvalue.storage.files import is_value_model

    if not path.exists():
        return
    if path.is_dir():
        try:
            names = [p.name for p in path.iterdir()]
        except OSError as e:
            raise ValueModelError(f"{path}: cannot be listed ({e.strerror or e}); choose another {option}") from None
        if is_value_model(path) or all(owned_by_a_value_model(n) for n in names):
            return
    raise ValueModelError(
        f"{path}: exists and is not a value model folder (saving would replace or remove its files); choose "
        f"another {option} (a new folder, or a value model's to replace it)"
    )


SUM_SCALE = 64.0  # tokens: sum-pooled features are divided by this to keep them near unit scale


def _length_feature(n: np.ndarray) -> np.ndarray:
    """``log(1 + n) / 8``: one dense column on the scale of an L2-normalised feature vector."""
    return (np.log1p(np.asarray(n, np.float64)) / 8.0).astype(np.float64)


def pool_divisor(pooling: str, lengths: np.ndarray) -> np.ndarray:
    """What the summed token embeddings are divided by: the token count (mean) or a constant (sum)."""
    lengths = np.asarray(lengths, np.float64)
    return np.maximum(lengths, 1.0) if pooling == "mean" else np.full(len(lengths), SUM_SCALE)


def pool_length_feature(pooling: str, lengths: np.ndarray) -> np.ndarray:
    """The length column next to the pooled embedding: log length (mean) or length / SUM_SCALE (sum)."""
    lengths = np.asarray(lengths, np.float64)
    return _length_feature(lengths) if pooling == "mean" else lengths / SUM_SCALE


# -- hashed n-grams ----------------------------------------------------------------------------
def _mix64(h: np.ndarray) -> np.ndarray:
    """A 64-bit finaliser (splitmix64) so that buckets and signs are well spread."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def _byte_ngram_hashes(data: bytes, sizes: Sequence[int]) -> np.ndarray:
    b = np.frombuffer(data, np.uint8).astype(np.uint64)
    out = []
    with np.errstate(over="ignore"):
        for n in sizes:
            if len(b) < n:
                continue
            h = np.full(len(b) - n + 1, np.uint64(n) * _MIX, np.uint64)
            for k in range(n):  # polynomial rolling hash over the window, vectorised over positions
                h = h * np.uint64(1099511628211) + b[k : len(b) - n + 1 + k]
            out.append(h)
    return _mix64(np.concatenate(out)) if out else np.zeros(0, np.uint64)


def _word_ngram_hashes(text: str, sizes: Sequence[int]) -> np.ndarray:
    words = _WORD.findall(text)
    keys = []
    for n in sizes:
        keys.extend(zlib.crc32(f"{n}\x1f{chr(31).join(words[i : i + n])}".encode()) for i in range(len(words) - n + 1))
    h = np.array(keys, np.uint64) | (np.uint64(1) << np.uint64(40))  # keep word and byte hashes apart
    return _mix64(h)


@dataclass(frozen=True)
class NgramFeatures:
    """Hashed word and byte n-gram features (sparse rows, ``dim + 1`` columns; the last is the length)."""

    dim: int = 1 << 18
    word_ngrams: tuple[int, ...] = (1, 2)
    byte_ngrams: tuple[int, ...] = (3, 4, 5)

    @property
    def n_features(self) -> int:
        return self.dim + 1

    def spec(self) -> dict:
        return {"dim": self.dim, "word_ngrams": list(self.word_ngrams), "byte_ngrams": list(self.byte_ngrams)}

    def row(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Column indices (int64, sorted) and values (float64) of one text's feature row."""
        data = text.encode("utf-8")
        h = np.concatenate([_word_ngram_hashes(text, self.word_ngrams), _byte_ngram_hashes(data, self.byte_ngrams)])
        idx = (h % np.uint64(self.dim)).astype(np.int64)
        sign = np.where((h >> np.uint64(63)) == 1, -1.0, 1.0)
        cols, inv = np.unique(idx, return_inverse=True)
        counts = np.bincount(inv, weights=sign, minlength=len(cols))
        vals = np.sign(counts) * np.log1p(np.abs(counts))
        norm = np.sqrt((vals**2).sum())
        if norm > 0:
            vals = vals / norm
        return (np.append(cols, self.dim), np.append(vals, _length_feature(len(data))))

    def rows(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR arrays ``(indptr (n+1,), indices (nnz,) int64, values (nnz,) float64)`` of ``texts``."""
        parts = [self.row(t) for t in texts]
        indptr = np.zeros(len(parts) + 1, np.int64)
        indptr[1:] = np.cumsum([len(c) for c, _ in parts])
        if not parts:
            return indptr, np.zeros(0, np.int64), np.zeros(0)
        return indptr, np.concatenate([c for c, _ in parts]), np.concatenate([v for _, v in parts])


def csr_dot(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``X @ weight`` for CSR rows ``X`` and a dense ``weight`` (n_features, T): (n, T) float64."""
    n = len(indptr) - 1
    out = np.zeros((n, weight.shape[1]))
    if len(indices):
        rows = np.repeat(np.arange(n), np.diff(indptr))
        for t in range(weight.shape[1]):
            out[:, t] = np.bincount(rows, weights=values * weight[indices, t], minlength=n)
    return out


# -- token-embedding lookup ----------------------------------------------------------------------
def token_ids(tokenizer, texts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
    """Token ids of each text (no special tokens added), the first ``max_tokens`` of each when given: the store's
    ``max_length``, as the build truncates (a text beyond it was valued on its first tokens only)."""
    return [e.ids[:max_tokens] for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]


# -- the model -----------------------------------------------------------------------------------
@dataclass
class ValueModel:
    """A fitted student: ``predict(texts)`` -> (n, n_targets) values.

    Attributes
    ----------
    student : {"ngram", "embed"}
    targets : list of str
        Audit columns predicted, in output order; the first is ``score_mean``.
    arrays : dict of str to ndarray
        ``ngram``: ``weight`` (dim + 1, T) float32, ``bias`` (T,).
        ``embed``: ``token_table`` (|V|, T) float32, ``length_weight`` (T,), ``bias`` (T,).
    meta : dict
        The JSON manifest (features, fit metrics, store and audit identity).
    """

    student: str
    targets: list[str]
    arrays: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)
    tokenizer: object = None
    _features: NgramFeatures | None = None

    @property
    def output_columns(self) -> list[str]:
        """``value`` for ``score_mean``, ``value_vs_label:L`` for ``mean_vs_label:L``."""
        return ["value" if t == "score_mean" else "value_vs_label:" + t.split(":", 1)[1] for t in self.targets]

    def features(self) -> NgramFeatures:
        if self._features is None:
            spec = self.meta["features"]
            self._features = NgramFeatures(spec["dim"], tuple(spec["word_ngrams"]), tuple(spec["byte_ngrams"]))
        return self._features

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """Values of ``texts`` (whole text of each sample): (n, n_targets) float64."""
        bias = self.arrays["bias"].astype(np.float64)
        if self.student == "ngram":
            return csr_dot(*self.features().rows(texts), self.arrays["weight"]) + bias
        table, lw = self.arrays["token_table"], self.arrays["length_weight"].astype(np.float64)
        pooling = self.meta["features"].get("pooling", "mean")
        ids = token_ids(self.tokenizer, texts, self.meta["features"].get("max_tokens"))  # (None: a model before it)
        lengths = np.array([len(i) for i in ids], np.float64)
        flat = np.concatenate([np.asarray(i, np.int64) for i in ids]) if ids else np.zeros(0, np.int64)
        rows = np.repeat(np.arange(len(ids)), lengths.astype(np.int64))
        out = np.empty((len(texts), len(self.targets)))
        for t in range(out.shape[1]):
            out[:, t] = np.bincount(rows, weights=table[flat, t], minlength=len(ids))
        out /= pool_divisor(pooling, lengths)[:, None]
        out += pool_length_feature(pooling, lengths)[:, None] * lw + bias
        return out

    # -- disk ------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the folder ``path`` (created) so that a kill at any moment leaves the old model or the new one.

        Each data file is written atomically under a name holding its content hash
        (``weights-<sha>.safetensors``, ``tokenizer-<sha>.json``), so the old model's files stay intact;
        then ``value_model.json``, naming the files with their SHA-256, replaces the old one
        atomically (the commit point); the files no manifest names any more are removed last. Two
        saves into one folder take turns (an ``flock`` on ``.value_model.lock``), so one never
        removes the files the other's manifest names.
        """
        import fcntl
        import os

        path = Path(path)
        check_save_folder(path)
        path.mkdir(parents=True, exist_ok=True)
        arrays = {
            k: np.ascontiguousarray(v, np.float32 if np.issubdtype(v.dtype, np.floating) else v.dtype)
            for k, v in self.arrays.items()
        }
        fd = os.open(path / ".value_model.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return self._save_locked(path, arrays)
        finally:
            os.close(fd)

    def _save_locked(self, path: Path, arrays: dict) -> Path:
        import hashlib

        from safetensors.numpy import save

        from forvalue.storage.files import write_bytes, write_text

        blobs = {"weights": (save(arrays), ".safetensors")}
        if self.student == "embed":
            blobs["tokenizer"] = (self.tokenizer.to_str().encode("utf-8"), ".json")
        files = {}
        for role, (data, suffix) in blobs.items():
            digest = hashlib.sha256(data).hexdigest()
            name = f"{role}-{digest[:16]}{suffix}"
            write_bytes(path / name, data)
            files[role] = {"name": name, "sha256": digest, "bytes": len(data)}
        meta = {
            **self.meta,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "student": self.student,
            "targets": self.targets,
            "output_columns": self.output_columns,
            "files": files,
        }
        # strict JSON: a metric that is not a number (a held-out set of one row has no Spearman) is null, not NaN
        write_text(path / MANIFEST, json.dumps(_json_safe(meta), indent=2, sort_keys=True, allow_nan=False))
        named = {f["name"] for f in files.values()}
        for stale in path.iterdir():  # the previous model's files (and a killed save's leftovers)
            if stale.name not in named and _OWN_FILE.match(stale.name):
                stale.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ValueModel":
        """Read a value model folder, every file validated: anything missing, damaged, half-written or
        inconsistent is a one-line :class:`ValueModelError`, never a model that predicts wrong numbers."""
        from forvalue.storage.value_model_files import load_checked

        return cls(*load_checked(Path(path)))
