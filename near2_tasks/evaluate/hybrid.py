"""Hybrid-RRF in the offline evaluation, for the hybrid gate (``gates.hybrid``).

When the gate is on, every model the gate compares is also measured the way the storefront's ``hybrid_rrf``
mode ranks with it, without building a serving index:

* the **BM25 side** comes from a lexical-only Elasticsearch index of the evaluated catalog (the serving
  mapping's product and lexical fields and analyzers, :func:`near2_tasks.serving.mapping.product_properties`;
  no vectors), searched with the storefront's own BM25 body (:func:`near2_tasks.serving.hybrid.lexical_body`
  over ``serving.lexical_fields``);
* the **dense side** is the exact whole-catalog search of the evaluation, with the vectors
  :func:`near2_tasks.evaluate.evaluation.evaluate_model` has just encoded (or read from its cache): nothing is
  encoded twice;
* both are fused by :func:`near2_tasks.serving.hybrid.rrf` (``serving.rrf_k``) over the top
  ``serving.hybrid_candidates`` of each side, as serving fuses, and scored by the one entry point,
  :func:`near2_tasks.evaluate.retrieval.evaluate_retriever`, so the metrics are the ones the model's own gate reads.

The lexical index is named ``<elasticsearch.alias>-lexical-<fingerprint>`` (a hash of the indexed fields of
the catalog and of the mapping): created when missing, reused by later evaluations of the same catalog;
older ones of that prefix are deleted. The BM25 rankings are the same for every model, so one
:class:`LexicalSide` fetches them once per evaluation. An unreachable Elasticsearch fails the evaluation
with the URL in the message: the hybrid gate is never skipped silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from near2_tasks import conventions
from near2_tasks.errors import Near2Error
from near2_tasks.evaluate.report import EvaluationReport
from near2_tasks.evaluate.retrieval import Ranked, evaluate_retriever, rank_whole_catalog, rows_of, scale_of
from near2_tasks.serving.es_client import es_errors, make_client
from near2_tasks.serving.hybrid import lexical_body, lexical_fields, rrf
from near2_tasks.serving.mapping import product_properties

if TYPE_CHECKING:
    import pandas as pd
    from elasticsearch import Elasticsearch

    from near2_tasks.config import Settings
    from near2_tasks.evaluate.evaluation import EvaluationData

log = logging.getLogger(__name__)

#: The name of the evaluation's retriever, in the nested report's ``dataset`` and in reasons.
RETRIEVER = "hybrid_rrf"
#: BM25 searches per ``_msearch`` request.
MSEARCH_BATCH = 100


# ----- the lexical-only index of the evaluated catalog ------------------------------------------------------
def lexical_prefix(settings: Settings) -> str:
    return f"{settings.elasticsearch.alias}-lexical-"


def _documents(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """One document per product: the product fields only, ``_id`` = ``product_id``."""
    def text(value: Any) -> str | None:
        return None if value is None or value != value else str(value)  # NaN != NaN

    return [{"_id": row.product_id, "_source": {
        "product_id": row.product_id, "title": row.title, "category": text(row.category), "brand": text(row.brand),
        "price": None if row.price is None or row.price != row.price else float(row.price)}}
        for row in frame.itertuples(index=False)]


def lexical_index_name(settings: Settings, frame: pd.DataFrame) -> str:
    """``<alias>-lexical-<hash of the indexed fields and the mapping>``."""
    from near2_tasks.data.hashing import combine_hashes, frame_hash

    mapping = hashlib.sha256(json.dumps(product_properties(), sort_keys=True).encode()).hexdigest()
    return lexical_prefix(settings) + combine_hashes(frame_hash(frame, conventions.PRODUCT_FIELDS), mapping)


def ensure_lexical_index(settings: Settings, client: Elasticsearch, products: pd.DataFrame) -> str:
    """The lexical-only index of ``products``: reused when it exists and holds every product, else (re)built;
    older lexical indices of the alias are deleted. Returns its name."""
    from elasticsearch import helpers

    from near2_tasks.serving.index import prepare_products

    frame = prepare_products(products)
    name = lexical_index_name(settings, frame)
    es = settings.elasticsearch
    with es_errors(es.url, f"the lexical index {name} of the hybrid gate"):
        if client.indices.exists(index=name) and client.count(index=name)["count"] == len(frame):
            log.info("hybrid gate: reusing the lexical index %s (%d products)", name, len(frame))
        else:  # missing, or a load that did not finish
            client.indices.delete(index=name, ignore_unavailable=True)
            client.indices.create(index=name, settings={"index": {"number_of_shards": 1, "number_of_replicas": 0}},
                                  mappings={"dynamic": "strict", "properties": product_properties()})
            _, errors = helpers.bulk(client, ({"_index": name, **doc} for doc in _documents(frame)),
                                     chunk_size=es.bulk_chunk_size, max_chunk_bytes=es.bulk_max_chunk_bytes,
                                     raise_on_error=False, max_retries=es.bulk_max_retries)
            if errors:
                raise Near2Error(f"Elasticsearch rejected {len(errors)} product(s) of the lexical index {name}: "
                                 f"{str(errors[0])[:300]}")
            client.indices.refresh(index=name)
            log.info("hybrid gate: built the lexical index %s (%d products)", name, len(frame))
        older = client.indices.get(index=lexical_prefix(settings) + "*", allow_no_indices=True,
                                   ignore_unavailable=True)
        for other in sorted(set(older) - {name}):
            client.indices.delete(index=other, ignore_unavailable=True)
            log.info("hybrid gate: deleted the older lexical index %s", other)
    return name


@dataclass
class LexicalSide:
    """BM25 over one lexical index, with the storefront's query body; rankings cached per (queries, size)."""

    settings: Settings
    client: Elasticsearch
    index: str
    _cache: dict[tuple[tuple[str, ...], int], list[list[tuple[str, float]]]] = field(default_factory=dict,
                                                                                     repr=False)

    @property
    def fields(self) -> list[str]:
        return lexical_fields(self.settings.serving.lexical_fields, conventions.LEXICAL_FIELDS)

    def top(self, queries: Sequence[str], size: int) -> list[list[tuple[str, float]]]:
        """(product_id, BM25 score) of the top ``size`` products per query, best first."""
        key = (tuple(queries), size)
        if key not in self._cache:
            self._cache[key] = self._search(list(queries), size)
        return self._cache[key]

    def _search(self, queries: list[str], size: int) -> list[list[tuple[str, float]]]:
        ranked: list[list[tuple[str, float]]] = []
        match_type = self.settings.serving.lexical_type
        with es_errors(self.settings.elasticsearch.url, f"BM25 search of {self.index} (hybrid gate)"):
            for start in range(0, len(queries), MSEARCH_BATCH):
                searches: list[dict[str, Any]] = []
                for query in queries[start:start + MSEARCH_BATCH]:
                    searches += [{"index": self.index},
                                 lexical_body(query, self.fields, size, [], match_type, source=False)]
                for answer in self.client.msearch(searches=searches)["responses"]:
                    if "error" in answer:
                        raise Near2Error(f"BM25 search of {self.index} failed: {str(answer['error'])[:300]}")
                    ranked.append([(hit["_id"], float(hit["_score"])) for hit in answer["hits"]["hits"]])
        return ranked


# ----- the retriever and the evaluation -------------------------------------------------------------------
@dataclass
class HybridExactRetriever:
    """Hybrid RRF without a serving index: the top ``candidates`` (at least the depth) of BM25 and of exact
    cosine search at the dim, fused by :func:`near2_tasks.serving.hybrid.rrf`."""

    catalog_vectors: np.ndarray
    lexical: LexicalSide
    rrf_k: float = 60.0
    candidates: int = 100
    batch_size: int = 256
    name: str = RETRIEVER

    def rank(self, data: EvaluationData, query_vectors: np.ndarray | None, dim: int, depth: int) -> Ranked:
        if query_vectors is None:
            raise Near2Error("hybrid RRF needs the query vectors (its dense side is exact search)")
        n = max(depth, self.candidates)
        dense_rows = rank_whole_catalog(query_vectors, self.catalog_vectors, dim, n, self.batch_size)
        ids = data.product_ids
        fused = []
        for rows, bm25 in zip(dense_rows, self.lexical.top(data.query_texts, n)):
            dense = [(ids[row], 0.0) for row in rows]  # RRF reads the ranks only
            fused.append([f.product_id for f in rrf(dense, bm25, self.rrf_k)[:depth]])
        return Ranked(rows_of(data, fused, depth))


@dataclass
class HybridEvaluation:
    """The ``hybrid`` argument of :func:`~near2_tasks.evaluate.evaluation.evaluate_model`: measures hybrid RRF
    with the vectors the evaluation encoded, into the report's ``hybrid`` (a nested report: same dims,
    metrics and slices)."""

    settings: Settings
    lexical: LexicalSide

    @classmethod
    def of_catalog(cls, settings: Settings, products: pd.DataFrame) -> HybridEvaluation:
        """Ensure the lexical index of ``products`` (Elasticsearch must answer: a Near2Error naming its URL)."""
        client = make_client(settings)
        return cls(settings, LexicalSide(settings, client, ensure_lexical_index(settings, client, products)))

    @property
    def candidates(self) -> int:
        serving = self.settings.serving
        return min(serving.hybrid_candidates, serving.max_num_candidates)

    def evaluate(self, report: EvaluationReport, data: EvaluationData, catalog: np.ndarray,
                 queries: np.ndarray) -> EvaluationReport:
        settings = self.settings
        retriever = HybridExactRetriever(catalog, self.lexical, settings.serving.rrf_k, self.candidates,
                                         settings.evaluation.query_batch_size)
        scores = evaluate_retriever(retriever, data, sorted(report.dims, reverse=True), query_vectors=queries,
                                    k=report.k, metrics=report.metrics, **scale_of(settings))
        return EvaluationReport(
            model=report.model, dims=scores.dims, slices=scores.slices, slice_sizes=scores.slice_sizes,
            n_queries=scores.n_queries, k=report.k, metrics=scores.metrics, model_key=report.model_key,
            registered_model=report.registered_model, model_version=report.model_version, run_id=report.run_id,
            dataset={**report.dataset, "retriever": RETRIEVER, "lexical_index": self.lexical.index,
                     "lexical_fields": self.lexical.fields, "rrf_k": settings.serving.rrf_k,
                     "candidates": self.candidates})
