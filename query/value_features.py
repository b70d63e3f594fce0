"""What a value model learns from, read from a store: texts, audit targets, the model's embedding table,
the store's identity and build throughput (the store side of :mod:`forvalue.distill`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from forvalue.schemas.errors import ForValueError
from forvalue.schemas.manifest import MUST_MATCH
from forvalue.storage.store import Store


def store_identity(store: Store) -> dict:
    """What a value model must match in a store: the model and encoding settings (manifest MUST_MATCH)."""
    m = store.manifest
    must = {k: getattr(m, k) for k in MUST_MATCH}
    fingerprint = hashlib.sha256(json.dumps(must, sort_keys=True, default=str).encode()).hexdigest()
    return {
        "path": str(store.path if not isinstance(store.path, Path) else store.path.resolve()),
        "model_path": m.model_path,
        "model_weights_sha256": m.model_weights_sha256,
        "tokenizer_sha256": m.tokenizer_sha256,
        "manifest_fingerprint": fingerprint,
        "settings": json.loads(json.dumps(must, default=str)),  # the fingerprinted settings, to name a difference
        "build_samples_per_s": build_throughput(store),
    }


def build_throughput(store: Store) -> float | None:
    """Samples per second of the store's build, from the timestamps of its Lance commits.

    The table is created after the model is loaded and every write batch is one commit, so
    rows added between consecutive commits over the time between them is the encoding
    throughput. Gaps between separate builds (``index add`` later, a model load) are left out: pairs slower
    than 20x the fastest pair's seconds per row (a median let the gap in when a store has two or three
    commits: a build and one ``index add`` an hour later gave 0.04 samples/s).
    """
    try:
        versions = store._dataset().versions()
    except Exception:  # an old pylance without versions(): no throughput, not an error
        return None
    pts = sorted(
        (v["version"], v["timestamp"].timestamp(), int(v.get("metadata", {}).get("total_rows", -1))) for v in versions
    )
    pairs = [(b[2] - a[2], b[1] - a[1]) for a, b in zip(pts, pts[1:]) if a[2] >= 0 and b[2] > a[2] and b[1] > a[1]]
    if not pairs:
        return None
    per_row = np.array([dt / rows for rows, dt in pairs])
    keep = per_row <= 20 * per_row.min()
    rows = sum(r for (r, _), k in zip(pairs, keep) if k)
    secs = sum(t for (_, t), k in zip(pairs, keep) if k)
    return float(rows / secs) if secs > 0 else None


def stored_texts(store: Store, ids: Sequence[str] | None = None) -> dict[str, str]:
    """Text of each stored sample (prompt + response, or text), of ``ids`` only when given; one scan."""
    wanted = None if ids is None else set(ids)
    out = {}
    for batch in store.scan(["id", "prompt", "response", "text"], batch_size=8192):
        for r in batch.to_pylist():
            if wanted is None or r["id"] in wanted:
                out[r["id"]] = r["text"] if r["text"] is not None else f"{r['prompt']}{r['response']}"
    return out


def audit_targets(table: pa.Table) -> list[str]:
    return ["score_mean"] + [c for c in table.column_names if c.startswith("mean_vs_label:")]


def id_hashes(ids: Iterable[str]) -> np.ndarray:
    """Sorted 63-bit hashes of ids (a compact record of the labelled rows inside the model)."""
    h = [int.from_bytes(hashlib.sha1(i.encode()).digest()[:8], "little") >> 1 for i in ids]
    return np.sort(np.array(h, np.int64))


# -- the embed student's inputs ------------------------------------------------------------------------
_EMBED_KEYS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight")


def load_embedding_table(store: Store):
    """The store model's tokenizer (``tokenizers.Tokenizer``) and input-embedding table ((V, d) float32).

    A lookup in the safetensors weights; the model itself is never built or run.
    """
    from forvalue.indexer.fingerprint import weights_sha256

    folder = Path(store.manifest.model_path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        raise ForValueError(
            f"store model '{folder}' is not a folder with safetensors weights; the embed student reads "
            "its input-embedding table from there (use --student ngram)"
        )
    if store.manifest.adapter_sha256 is None and weights_sha256(folder) != store.manifest.model_weights_sha256:
        raise ForValueError(
            f"store model '{folder}' has changed since the build (weights SHA-256 differs); "
            "use --student ngram or restore the model"
        )
    from safetensors import safe_open
    from transformers import AutoTokenizer

    table = None
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            key = next((k for k in f.keys() if k.endswith(_EMBED_KEYS)), None)
            if key is not None:
                table = f.get_tensor(key).float().numpy()
                break
    if table is None:
        raise ForValueError(
            f"store model '{folder}': no input-embedding tensor ({', '.join(_EMBED_KEYS)}) in its "
            "safetensors files; use --student ngram"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ForValueError(
            f"store model '{folder}': the embed student needs a fast (tokenizers) tokenizer; use --student ngram"
        )
    return backend, table


def id_hashes_unsorted(ids: Sequence[str]) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.sha1(i.encode()).digest()[:8], "little") >> 1 for i in ids], np.int64)
