"""Query slices: groups of queries the evaluation reports separately, because models fail differently on them.

Built in (tokens are the whitespace-separated words the shopper typed):

* ``short``: 1–2 tokens (``drill``, ``cordless drill``): little context, the head of the traffic;
* ``long``: 5 or more tokens (``20v brushless cordless drill by dewalt``): descriptive, the tail;
* ``alphanumeric``: some token mixes letters and digits (``DCD771C2``, ``20v``): model numbers and sizes,
  where dense retrieval is weakest.

More slices come from config (``evaluation.slices``: name -> regular expression, matched with
``re.search``; add ``(?i)`` for case-insensitive). A query may belong to several slices, or to none.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

SHORT_MAX_TOKENS = 2
LONG_MIN_TOKENS = 5

#: Built-in slice names and what they hold (also the Markdown report's legend).
BUILTIN_SLICES: dict[str, str] = {
    "short": f"1-{SHORT_MAX_TOKENS} tokens",
    "long": f">= {LONG_MIN_TOKENS} tokens",
    "alphanumeric": "a token mixing letters and digits",
}


def tokens(query: str) -> list[str]:
    return query.split()


def is_short(query: str) -> bool:
    return 1 <= len(tokens(query)) <= SHORT_MAX_TOKENS


def is_long(query: str) -> bool:
    return len(tokens(query)) >= LONG_MIN_TOKENS


def has_alphanumeric_token(query: str) -> bool:
    """True when one token holds both a letter and a digit (``dcd771c2``, ``3/4in``), in any script."""
    return any(
        any(ch.isalpha() for ch in token) and any(ch.isdigit() for ch in token) for token in tokens(query)
    )


_BUILTIN_TESTS = {"short": is_short, "long": is_long, "alphanumeric": has_alphanumeric_token}


def slice_masks(queries: Sequence[str], extra: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """For each slice (built-in first, then ``extra`` name -> regex), a boolean mask over ``queries``."""
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(BUILTIN_SLICES))
    if clash:
        raise ValueError(f"slice names {clash} are built in; choose other names for config slices")
    masks = {name: np.fromiter((test(q) for q in queries), dtype=bool, count=len(queries))
             for name, test in _BUILTIN_TESTS.items()}
    for name, pattern in extra.items():
        regex = re.compile(pattern)
        masks[name] = np.fromiter((regex.search(q) is not None for q in queries), dtype=bool, count=len(queries))
    return masks
