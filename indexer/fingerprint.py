"""Content fingerprints of weights and tokenizers, for the store manifest.

File hashes are cached under the forvalue cache folder, so a 500 MB checkpoint is hashed
once, not on every query. The cache key is (path, inode, size, mtime, ctime): a file
rewritten in place with its size and modification time restored still gets a new ctime
(which users cannot set), so it is hashed again and the store sees the new content. A file
changed within :data:`RACY_SECONDS` of being hashed is not cached at all (a second change in
the same timestamp tick would be invisible), so identity always follows content.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from forvalue.indexer.default_model import cache_dir
from forvalue.schemas.errors import ModelLoadError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
RACY_SECONDS = 2.0  # a file whose mtime/ctime is this recent is hashed, but its hash not cached


def _cache_key(path: Path, stat: os.stat_result) -> str:
    return f"{path.resolve()}|{stat.st_dev}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = _cache_key(path, stat)
    cache = cache_dir() / "hashes.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError, RecursionError):
        known = {}
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    prefix = f"{path.resolve()}|"
    known = {k: v for k, v in known.items() if not k.startswith(prefix)}  # this file's older versions
    known[key] = digest.hexdigest()
    after = path.stat()
    recent = time.time() - max(after.st_mtime, after.st_ctime) < RACY_SECONDS
    if recent or _cache_key(path, after) != key:  # changed while hashed, or may change again unseen
        return digest.hexdigest()
    try:
        from forvalue.storage.files import write_text

        write_text(cache, json.dumps(known))
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


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def refuse_pickled_weights(folder: Path, what: str) -> None:
    """Refuse a model or adapter folder whose weights exist only as pickles (``pytorch_model.bin``...).

    Unpickling runs code from the file; forvalue loads safetensors (or GGUF) only.
    """
    files = [p for p in folder.iterdir() if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return
    pickles = sorted(p.name for p in files if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{what} folder '{folder}': its weights are pickle files ({', '.join(pickles[:3])}), which can run code "
            "when loaded; forvalue loads only .safetensors: convert them (model.save_pretrained(folder, "
            "safe_serialization=True)) in a trusted environment"
        )
