"""The index mapping: one ``dense_vector`` per served dimension (``embedding_<d>``, index options per
dim), bit-code fields for the funnel, the product and lexical fields, and the settings of a new index."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from near2_tasks import conventions
from near2_tasks.errors import Near2Error
from near2_tasks.serving import compact
from near2_tasks.serving.settings import VectorFieldOptions, default_oversample, is_quantised

if TYPE_CHECKING:
    from near2_tasks.config import Settings

log = logging.getLogger(__name__)


def vector_mapping(settings: Settings, dim: int) -> dict[str, Any]:
    options = settings.elasticsearch.field_options(dim)
    kind = options.index_type
    if kind.startswith("bbq") and dim < 64:
        raise Near2Error(
            f"index type {kind} needs at least 64 dimensions, embedding_{dim} has {dim}",
            hint=f"set elasticsearch.index_options.{dim}.index_type to hnsw or int8_hnsw",
        )
    if kind.startswith("int4") and dim % 2:
        raise Near2Error(f"index type {kind} needs an even dimension, got {dim}")
    if options.oversample and not is_quantised(kind):
        raise Near2Error(f"oversample {options.oversample} of embedding_{dim} needs a quantised index type, "
                         f"not {kind} (its vectors are floats already)",
                         hint=f"set elasticsearch.index_options.{dim}.oversample to 0, or index_type to int8_hnsw "
                              "or bbq_hnsw")
    return {"type": "dense_vector", "dims": dim, "index": True,
            "similarity": options.similarity, "index_options": index_options_mapping(options)}


def index_options_mapping(options: VectorFieldOptions) -> dict[str, Any]:
    """A field's ``index_options`` with every parameter whose default may change set explicitly, so the
    mapping means the same on any server version (bbq rescores 3x by default from 8.19 and 9.1, not before)."""
    kind = options.index_type or "hnsw"
    index_options: dict[str, Any] = {"type": kind}
    if "hnsw" in kind:
        index_options.update(m=options.m, ef_construction=options.ef_construction)
    if kind.startswith(("int8_", "int4_")):
        confidence = 0.0 if options.confidence_interval is None and kind.startswith("int4_") \
            else options.confidence_interval
        if confidence is not None:
            index_options["confidence_interval"] = confidence
    if is_quantised(kind):
        oversample = default_oversample(kind) if options.oversample is None else options.oversample
        index_options["rescore_vector"] = {"oversample": oversample}
    return index_options


def product_properties() -> dict[str, Any]:
    """The mapping of the product fields, lexical ones included: a serving index's, and the whole mapping of
    the lexical-only index the hybrid gate searches (:mod:`near2_tasks.evaluate.hybrid`)."""
    return {
        "product_id": {"type": "keyword"},
        # lexical fields of hybrid search (conventions.LEXICAL_FIELDS): text with the core analyzer;
        # category and brand stay keywords (exact filters) with a .text subfield for BM25
        "title": {"type": "text", "analyzer": conventions.LEXICAL_ANALYZER,
                  "fields": {"keyword": {"type": "keyword", "ignore_above": 512}}},
        "category": {"type": "keyword",
                     "fields": {"text": {"type": "text", "analyzer": conventions.LEXICAL_ANALYZER}}},
        "brand": {"type": "keyword",
                  "fields": {"text": {"type": "text", "analyzer": conventions.LEXICAL_ANALYZER}}},
        "price": {"type": "float"},
    }


def index_body(settings: Settings, dims: list[int], meta: dict[str, Any]) -> dict[str, Any]:
    """Settings (loading mode: no refresh, no replicas) and mappings of a new serving index."""
    properties = product_properties()
    for dim in dims:
        properties[conventions.vector_field(dim)] = vector_mapping(settings, dim)
    coded = compact.coded_dims(settings.elasticsearch.binary_dims, dims)
    for dim in coded:  # 1-bit codes for the funnel's shortlist (near2_tasks.serving.compact)
        properties[conventions.binary_vector_field(dim)] = compact.bit_field_mapping(dim)
    mappings: dict[str, Any] = {"dynamic": "strict", "_meta": meta, "properties": properties}
    if not settings.elasticsearch.vectors_in_source:
        # kNN reads the vector index, never _source: JSON floats there would double the disk
        mappings["_source"] = {"excludes": [conventions.vector_field(d) for d in dims]
                               + [conventions.binary_vector_field(d) for d in coded]}
    return {
        "settings": {"index": {"number_of_shards": settings.elasticsearch.number_of_shards,
                               "number_of_replicas": 0, "refresh_interval": "-1"}},
        "mappings": mappings,
    }

