"""Content fingerprints of weights and tokenizers, for the store manifest.

File hashes are cached by (path, size, mtime) under the forvalue cache folder, so a
500 MB checkpoint is hashed once, not on every query.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from forvalue.indexer.default_model import cache_dir

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")




def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache = cache_dir() / "hashes.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    known[key] = digest.hexdigest()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only cache only costs time
    return known[key]


def weights_sha256(path: str | Path) -> str:
    """SHA-256 over the weight files of a model folder (or of one file), in name order."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + _file_sha256(file).encode())
    return digest.hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """SHA-256 of what decides token ids: the vocabulary/merges, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    core = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps(
        [getattr(tokenizer, "chat_template", None), tokenizer.bos_token, tokenizer.eos_token], default=str
    )
    return hashlib.sha256((core + extra).encode("utf-8")).hexdigest()
