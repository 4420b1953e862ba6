"""Binary codes of nested embeddings: 1 bit per component, for Elasticsearch ``element_type: bit`` fields.

The smallest vector types Elasticsearch quantises itself still cost ``d/2 + 4`` bytes (int4) or
``d/8 + 14`` bytes (bbq, dims > 64) per vector. A nested prefix of a NEAR² model stored as its sign bits
costs ``d/8`` bytes: 8 bytes at 64 dimensions, 192x less than 384 float32 components. Hamming distance
between codes approximates the angle between the vectors well enough for a *shortlist*; the funnel then
rescores that shortlist with float vectors at a larger dimension (see BENCHMARKS.md, "Compact vectors").

Centring first (subtracting the catalog's mean of the re-normalised d-prefixes) spreads the bits: without
it, components with a mean far from zero are nearly constant across the catalog and carry almost no
information. The centre is computed once per dimension from the catalog at index time and must be applied
to the queries too, so it travels with the index (``_meta``).
"""

from __future__ import annotations

import numpy as np

from near2_tasks.conventions import truncate

#: Key of the index ``_meta`` that holds the centre of every coded dimension: ``{"64": [...64 floats]}``.
META_CENTRES = "binary_centres"


def meta_centres(meta: dict) -> dict[int, np.ndarray]:
    """The centres a ``_meta`` (or a rescoring store's ``store.json``) records under :data:`META_CENTRES`, by
    dimension, as float32 arrays (none: ``{}``)."""
    return {int(d): np.asarray(c, dtype=np.float32) for d, c in (meta.get(META_CENTRES) or {}).items()}


def catalog_centre(vectors: np.ndarray, dim: int) -> np.ndarray:
    """Mean of the catalog's re-normalised ``dim``-prefixes (float32, length ``dim``)."""
    return truncate(np.asarray(vectors, dtype=np.float32), dim).mean(axis=0)


def binary_codes(vectors: np.ndarray, dim: int, centre: np.ndarray | None = None) -> np.ndarray:
    """``(n, dim // 8)`` uint8: bit i of a row is set when component i of its ``dim``-prefix (re-normalised,
    minus ``centre``, see :func:`catalog_centre`) is positive. ``dim`` must be a multiple of 8 (as
    Elasticsearch requires of ``bit`` vectors)."""
    if dim % 8:
        raise ValueError(f"bit codes need a dimension divisible by 8, got {dim}")
    prefix = truncate(np.atleast_2d(vectors), dim)
    if centre is not None:
        if len(centre) != dim:
            raise ValueError(f"the centre has {len(centre)} components, the codes {dim}")
        prefix = prefix - np.asarray(centre, dtype=np.float32)
    return np.packbits(prefix > 0, axis=1)


def to_hex(code: np.ndarray) -> str:
    """One code as the hexadecimal string Elasticsearch accepts for ``bit`` vectors and queries."""
    return np.asarray(code, dtype=np.uint8).tobytes().hex()


def coded_dims(binary_dims: list[int], dims: list[int]) -> list[int]:
    """The configured ``elasticsearch.binary_dims`` an index with ``dims`` gets bit codes for: those it
    serves, below its full dimension (a funnel rescores at a larger one), descending."""
    return sorted((d for d in set(binary_dims) if d in dims and d < max(dims)), reverse=True)


def bit_field_mapping(dim: int) -> dict:
    """The ``dense_vector`` mapping of a code field: ``dim`` bits, exhaustive Hamming search (``flat``:
    no graph to keep in memory; scanning ``dim / 8`` bytes per product is fast)."""
    return {"type": "dense_vector", "element_type": "bit", "dims": dim, "index": True, "similarity": "l2_norm",
            "index_options": {"type": "flat"}}


def query_code(vector: np.ndarray, dim: int, centre: np.ndarray) -> str:
    """A full-dimension query vector as the hex code Elasticsearch compares with the documents' codes."""
    return to_hex(binary_codes(np.asarray(vector, dtype=np.float32)[None, :], dim, centre)[0])
