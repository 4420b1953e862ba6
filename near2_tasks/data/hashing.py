"""Content hashes of tables: the ``dataset_version`` / ``catalog_version`` carried to models and indices;
and stable hashes of single keys (which shard of a sharded index build a product belongs to).

A table hash depends on the rows' values only (not on row order, file format or pandas version): rows are
serialised as JSON arrays of the named columns, sorted, and fed to SHA-256. A key hash is SHA-256 too:
the same on every machine, process and Python version, unlike ``hash()``, which is salted per process.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Iterable

import pandas as pd

#: Hex digits kept: 64 bits, plenty to tell dataset versions apart, short enough for tags and names.
HASH_LENGTH = 16


def _plain(value: Any) -> Any:
    if value is None or type(value) is str or type(value) is int or type(value) is bool:
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    if hasattr(value, "item"):  # numpy scalar
        return _plain(value.item())
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return value if isinstance(value, (int, str, bool)) else str(value)


def frame_digest(frame: pd.DataFrame, columns: Iterable[str]) -> str:
    """Full SHA-256 hex digest of the given columns' rows, independent of row order."""
    columns = list(columns)
    present = [frame[c].tolist() if c in frame.columns else [None] * len(frame) for c in columns]
    lines = sorted(
        json.dumps([_plain(col[i]) for col in present], ensure_ascii=False, separators=(",", ":"))
        for i in range(len(frame))
    )
    digest = hashlib.sha256()
    digest.update(json.dumps(columns).encode())
    for line in lines:
        digest.update(line.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def frame_hash(frame: pd.DataFrame, columns: Iterable[str]) -> str:
    """Short content hash (:data:`HASH_LENGTH` hex digits) of a table's rows."""
    return frame_digest(frame, columns)[:HASH_LENGTH]


def combine_hashes(*parts: str) -> str:
    """One short hash from several (e.g. products + judgments)."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:HASH_LENGTH]


def stable_hash64(key: str) -> int:
    """A 64-bit hash of ``key`` (the first 8 bytes of the SHA-256 of its UTF-8 text, big-endian)."""
    return int.from_bytes(hashlib.sha256(str(key).encode("utf-8")).digest()[:8], "big")


def stable_bucket(key: str, buckets: int) -> int:
    """``key``'s bucket in ``0 .. buckets - 1``: :func:`stable_hash64` modulo ``buckets``."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    return stable_hash64(key) % buckets
