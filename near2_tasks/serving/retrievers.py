"""Elasticsearch retrievers for the one evaluation entry point
(:func:`near2_tasks.evaluate.retrieval.evaluate_retriever`).

Each sends, query by query, exactly the requests the storefront sends (``Searcher.retrieve``,
``retrieve_lexical``, ``hybrid_sides`` + :func:`near2_tasks.serving.hybrid.fuse`), so their metrics and
latencies are the serving path's; query encoding is excluded (the vectors are encoded once, up front).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from near2_tasks.errors import Near2Error
from near2_tasks.evaluate.retrieval import Ranked, rows_of
from near2_tasks.serving.hybrid import fuse, lexical_fields, weight_for

if TYPE_CHECKING:
    from near2_tasks.evaluate.evaluation import EvaluationData
    from near2_tasks.serving.search import Searcher
    from near2_tasks.serving.served_index import ServingIndex

Mode = Literal["knn", "funnel", "bm25", "hybrid_rrf", "hybrid_linear"]
MODES: tuple[Mode, ...] = ("knn", "funnel", "bm25", "hybrid_rrf", "hybrid_linear")


@dataclass
class ElasticsearchRetriever:
    """One serving mode of one index: ``knn`` at the dim, ``funnel`` (shortlist at ``shortlist_dim``, exact
    rescoring at the dim), ``bm25`` over the lexical fields, or ``hybrid_rrf`` / ``hybrid_linear`` (top
    ``candidates`` per side in one ``_msearch``, fused; the linear weight from ``weights``, else the index
    ``_meta``, else ``serving.hybrid_weight``)."""

    searcher: Searcher
    served: ServingIndex
    mode: Mode = "knn"
    num_candidates: int = 100
    shortlist_dim: int | None = None
    candidates: int | None = None
    weights: Mapping[int, float] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise Near2Error(f"unknown retrieval mode {self.mode!r}", hint=f"one of {list(MODES)}")
        if self.mode == "funnel" and self.shortlist_dim is None:
            raise Near2Error("the funnel needs shortlist_dim")

    @property
    def name(self) -> str:
        return self.mode if self.mode != "funnel" else f"funnel@{self.shortlist_dim}"

    def weight(self, dim: int) -> float:
        if self.weights and dim in self.weights:
            return float(self.weights[dim])
        return weight_for(self.served, dim, self.searcher.settings.serving.hybrid_weight)[0]

    def rank(self, data: EvaluationData, query_vectors: np.ndarray | None, dim: int, depth: int) -> Ranked:
        if self.mode != "bm25" and query_vectors is None:
            raise Near2Error(f"{self.mode} needs the query vectors (encoded with {self.served.model_uri})")
        serving = self.searcher.settings.serving
        fields = lexical_fields(serving.lexical_fields, self.served.lexical_fields)
        candidates = min(max(depth, self.candidates or serving.hybrid_candidates), serving.max_num_candidates)
        ids: list[list[str]] = []
        seconds: list[float] = []
        for i, query in enumerate(data.query_texts):
            vector = None if query_vectors is None else query_vectors[i]
            began = time.perf_counter()
            if self.mode == "bm25":
                hits = [h.product_id for h in self.searcher.retrieve_lexical(self.served, query, depth, [],
                                                                              fields=fields).hits]
            elif self.mode in ("knn", "funnel"):
                shortlist = self.shortlist_dim if self.mode == "funnel" else None
                hits = [h.product_id for h in self.searcher.retrieve(
                    self.served, vector, depth, dim, shortlist, [], max(depth, self.num_candidates)).hits]
            else:
                sides = self.searcher.hybrid_sides(self.served, query, vector, candidates, dim, None, [],
                                                   max(candidates, self.num_candidates), fields=fields)
                fusion = "rrf" if self.mode == "hybrid_rrf" else "linear"
                fused = fuse(sides.dense, sides.lexical, fusion, rrf_k=serving.rrf_k, weight=self.weight(dim))
                hits = [f.product_id for f in fused[:depth]]
            seconds.append(time.perf_counter() - began)
            ids.append(hits)
        return Ranked(rows_of(data, ids, depth), seconds)
