"""The index behind the serving alias: which concrete index it is, and what its mapping and ``_meta`` say
search needs (the model that encoded the documents, the dims, bit codes, index options, lexical fields,
tuned hybrid weights), read into a :class:`ServingIndex`; the bytes a search reads per product.

:class:`near2_tasks.serving.search.Searcher` caches the result and re-reads it every
``serving.alias_check_interval_s`` seconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from near2_tasks import conventions
from near2_tasks.errors import Near2Error
from near2_tasks.serving import compact
from near2_tasks.serving.es_client import es_errors

if TYPE_CHECKING:
    from elasticsearch import Elasticsearch

    from near2_tasks.config import Settings

log = logging.getLogger(__name__)


def vector_bytes(index_type: str, dim: int) -> float:
    """Bytes per vector of a ``dense_vector`` field searched with ``index_type``, by Elasticsearch's sizing
    formula: float 4·d, int8 d+4, int4 d/2+4, bbq d/8+14 (the quantized copy search reads; the HNSW graph,
    about 4·m bytes more, is not counted). 1-bit codes (``near2_tasks.serving.compact``) cost d/8."""
    kind = index_type.split("_")[0]
    return {"int8": dim + 4, "int4": dim / 2 + 4, "bbq": dim / 8 + 14, "bits": dim / 8}.get(kind, 4 * dim)


@dataclass(frozen=True)
class ServingIndex:
    """The concrete index behind the alias, and what its ``_meta`` says about the model."""

    alias: str
    name: str
    dims: list[int]
    model_uri: str
    model_name: str | None
    model_version: str | None
    #: dims with 1-bit codes (``embedding_<d>_bits``) -> the centre their codes subtract (``near2_tasks.serving.compact``)
    binary_centres: dict[int, np.ndarray] = field(default_factory=dict, compare=False)
    #: dim -> the ``index_options.type`` of ``embedding_<dim>`` in the index's mapping (hnsw, bbq_hnsw, ...)
    index_types: dict[int, str] = field(default_factory=dict, compare=False)
    #: text fields for the BM25 side of hybrid search (``_meta.lexical_fields``; older indices: title)
    lexical_fields: tuple[str, ...] = ("title",)
    #: dim -> linear-fusion weight of the dense side, tuned on the validation split (``_meta.hybrid_weights``)
    hybrid_weights: dict[int, float] = field(default_factory=dict, compare=False)
    #: dim -> the ``similarity`` of ``embedding_<dim>`` (how the funnel's local rescoring scores like the field)
    similarities: dict[int, str] = field(default_factory=dict, compare=False)

    @property
    def full_dim(self) -> int:
        return self.dims[0]

    def bytes_per_product(self, dim: int) -> float:
        """Bytes of ``embedding_<dim>`` that a kNN search reads per product (see :func:`vector_bytes`)."""
        return vector_bytes(self.index_types.get(dim, "hnsw"), dim)

    @classmethod
    def from_mapping(cls, alias: str, name: str, mapping: dict[str, Any]) -> ServingIndex:
        """From the ``mappings`` of index ``name``; an index without ``model_uri``/``dims`` cannot be served."""
        meta = mapping.get("_meta") or {}
        dims = [int(d) for d in meta.get("dims") or []]
        if not dims or not meta.get("model_uri"):
            raise Near2Error(f"index {name} behind alias {alias!r} has no model_uri/dims in its _meta",
                             hint="rebuild it with near2 index (it records the model)")
        log.info("serving index %s (model %s v%s)", name, meta.get("model_name"), meta.get("model_version"))
        centres = compact.meta_centres(meta)
        properties = mapping.get("properties") or {}
        index_types = {d: (properties.get(conventions.vector_field(d), {}).get("index_options") or {}).get(
            "type", "hnsw") for d in dims}
        similarities = {d: properties.get(conventions.vector_field(d), {}).get("similarity", "dot_product")
                        for d in dims}
        lexical = tuple(meta.get(conventions.META_LEXICAL_FIELDS) or ("title",))
        weights = {int(d): float(w) for d, w in (meta.get(conventions.META_HYBRID_WEIGHTS) or {}).items()}
        return cls(alias=alias, name=name, dims=dims, model_uri=meta["model_uri"],
                   model_name=meta.get("model_name"), model_version=meta.get("model_version"),
                   binary_centres=centres, index_types=index_types, lexical_fields=lexical,
                   hybrid_weights=weights, similarities=similarities)


class NoServingIndex(Near2Error):
    """The alias does not exist yet: nothing is served."""

    exit_code = 3


def alias_target(settings: Settings, client: Elasticsearch) -> str:
    """The one concrete index behind ``elasticsearch.alias``; :class:`NoServingIndex` when there is none."""
    from elasticsearch import NotFoundError

    alias = settings.elasticsearch.alias
    with es_errors(settings.elasticsearch.url, "reading the serving alias"):
        try:
            targets = list(client.indices.get_alias(name=alias).keys())
        except NotFoundError:
            targets = []
    if len(targets) != 1:
        raise NoServingIndex(
            f"alias {alias!r} points at {'no index' if not targets else f'{len(targets)} indices'}",
            hint="build and swap an index first: near2 index --model MODEL --catalog PATH",
        )
    return targets[0]


def read_serving_index(settings: Settings, client: Elasticsearch, name: str) -> ServingIndex:
    """What search needs to know about the concrete index ``name`` (served or not: tuning and
    evaluation query an index before the swap)."""
    with es_errors(settings.elasticsearch.url, f"reading the mapping of {name}"):
        mapping = next(iter(client.indices.get_mapping(index=name).values()))["mappings"]
    return ServingIndex.from_mapping(settings.elasticsearch.alias, name, mapping)
