"""Okapi BM25 of pool samples against validation samples (the lexical baseline)."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def bm25(queries: list[str], docs: list[str], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """Okapi BM25 scores (n_queries, n_docs): ``sum_t idf(t) tf (k1 + 1) / (tf + k1 (1 - b + b |d| / avgdl))``.

    ``idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5))`` (never negative); a query term counts once
    per occurrence in the query.
    """
    toks = [Counter(words(d)) for d in docs]
    lens = np.array([sum(c.values()) for c in toks], np.float64)
    avgdl = max(lens.mean(), 1e-9) if len(docs) else 1.0
    df = Counter(t for c in toks for t in c)
    n = len(docs)
    norm = k1 * (1.0 - b + b * lens / avgdl)
    out = np.zeros((len(queries), n))
    for qi, q in enumerate(queries):
        for term, qtf in Counter(words(q)).items():
            if term not in df:
                continue
            idf = math.log(1.0 + (n - df[term] + 0.5) / (df[term] + 0.5))
            tf = np.array([c.get(term, 0) for c in toks], np.float64)
            out[qi] += qtf * idf * tf * (k1 + 1.0) / (tf + norm)
    return out
