"""Sample ids: a content hash for rows without an ``id`` column, and numbering of repeated content.

A row repeating an earlier row's content gets the hash plus ``-K`` (its K-th repeat), so repeats stay
separate samples; the counts live in a numpy open-addressing table (12 bytes per slot) instead of a
Python dict, so a corpus of millions of rows costs megabytes (docs/data-formats.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import numpy as np


def content_id(
    prompt: str | None,
    response: str | None,
    text: str | None,
    image_key: str | None = None,
    messages: tuple[tuple[str, str], ...] | None = None,
    context_turns: int = 0,
) -> str:
    """Stable id of a row without an ``id`` column: 16 hex digits of a SHA-256 of its content.

    ``image_key`` (the image path as written, or the hash of its bytes) is part of the
    content of an image row, so rows that differ only in their image get different ids. A
    conversation's turns (and where its prompt ends) are its content.
    """
    content: list = [prompt, response, text] if image_key is None else [prompt, response, text, image_key]
    if messages is not None:
        content += [[list(turn) for turn in messages], context_turns]
    payload = json.dumps(content, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


class KeyCounts:
    """Occurrence counts of 64-bit keys in a numpy open-addressing table: 12 bytes per slot, 2 to 4 slots per key
    (a Python dict of ints would take ~100 bytes per key).

    Keys are the leading 64 bits of a SHA-256 (uniform), so their low bits index the table directly.
    """

    def __init__(self, capacity: int = 1 << 12):
        self.keys = np.zeros(capacity, dtype=np.uint64)
        self.counts = np.zeros(capacity, dtype=np.uint32)
        self.size = 0

    def bump(self, key: int) -> int:
        """Count one more occurrence of ``key``; returns how many were counted before (0 the first time)."""
        key = key or 1  # 0 marks an empty slot
        slot = self._slot(self.keys, key)
        before = int(self.counts[slot])
        self.counts[slot] = before + 1
        if before == 0:
            self.keys[slot] = key
            self.size += 1
            if 2 * self.size > len(self.keys):
                self._grow()
        return before

    @staticmethod
    def _slot(keys: np.ndarray, key: int) -> int:
        """The slot holding ``key``, or the empty slot where it goes (linear probing)."""
        mask = len(keys) - 1
        slot = key & mask
        while True:
            held = int(keys[slot])
            if held == 0 or held == key:
                return slot
            slot = (slot + 1) & mask

    def _grow(self) -> None:
        old_keys, old_counts = self.keys, self.counts
        self.keys = np.zeros(2 * len(old_keys), dtype=np.uint64)
        self.counts = np.zeros(len(self.keys), dtype=np.uint32)
        for start in range(0, len(old_keys), 8192):  # as Python ints a few thousand at a time
            used = start + np.flatnonzero(old_keys[start : start + 8192])
            for key, count in zip(old_keys[used].tolist(), old_counts[used].tolist()):
                slot = self._slot(self.keys, key)
                self.keys[slot], self.counts[slot] = key, count


class Occurrences:
    """Numbers repeated content ids in reading order: the K-th repeat of id X becomes ``X-K``.

    Holds one 64-bit key and a count per distinct content (:class:`KeyCounts`), not the rows.
    """

    def __init__(self) -> None:
        self.counts = KeyCounts()

    def number(self, sample):
        """``sample`` itself the first time its content id is seen, else a copy with id ``X-K`` (the K-th repeat)."""
        k = self.counts.bump(int(sample.id, 16))
        return sample if k == 0 else replace(sample, id=f"{sample.id}-{k}", occurrence=k)
