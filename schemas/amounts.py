"""Counts and percentages typed by users (``--top 10%``, ``--drop-bottom 500``), parsed so that nothing
absurd (NaN, infinity, ``1e999``, signs, spaces) reaches arithmetic: each is one line naming the flag."""

from __future__ import annotations

import math
import re
from fractions import Fraction

from forvalue.schemas.errors import ForValueError

_COUNT = re.compile(r"[0-9]{1,4000}")
_SHARE = re.compile(r"-?[0-9]{1,3}(\.[0-9]{1,12})?%")


def parse_share(text: str, total: int, flag: str) -> tuple[float | None, int]:
    """``(share in percent or None, count)`` for ``'10%'`` or ``'100'`` out of ``total`` items.

    A percentage must lie in [0, 100]; a count is a whole number >= 0 (at most ``total`` is used).
    """
    raw = str(text).strip()
    if raw.startswith("-") and (_COUNT.fullmatch(raw[1:]) or _SHARE.fullmatch(raw[1:])):
        raise ForValueError(f"{flag} '{text}' must not be negative")
    if _COUNT.fullmatch(raw):
        return None, int(raw)
    if _SHARE.fullmatch(raw):
        share = float(raw[:-1])
        if not math.isfinite(share):  # pragma: no cover  (the pattern admits finite numbers only)
            raise ForValueError(f"{flag} '{text}' is not a count or a percentage like 10%")
        if share > 100:
            raise ForValueError(f"{flag} '{text}' is more than 100%")
        # exact, halves rounded up: round() sent halves to the even neighbour (3.75% and 6.25% of 40 both 2, 5% of
        # 10 none) and float error could tip a half either way
        return share, math.floor(Fraction(raw[:-1]) * total / 100 + Fraction(1, 2))
    if raw.endswith("%") and re.fullmatch(r"[0-9.eE+]+%", raw):
        try:
            if float(raw[:-1]) > 100:
                raise ForValueError(f"{flag} '{text}' is more than 100%")
        except ValueError:
            pass
    raise ForValueError(f"{flag} '{text}' is not a count or a percentage like 10% (0-100, at most 12 decimals)")
