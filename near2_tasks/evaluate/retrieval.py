"""The one evaluation entry point: :func:`evaluate_retriever` scores any :class:`Retriever` per dimension
and per query slice (beir's ``EvaluateRetrieval(retriever)`` is the model).

A retriever ranks catalog rows for every query of an :class:`~near2_tasks.evaluate.evaluation.EvaluationData`
at one dimension. :class:`ExactRetriever` (numpy, the whole catalog) is what offline evaluation and the
gates use; the Elasticsearch retrievers (kNN, funnel, BM25, hybrid through the storefront's own
``Searcher``) are in :mod:`near2_tasks.serving.retrievers`. Benchmarks use the same function, so no
qrels, relevance floor or NDCG is ever written by hand: the floor and the "relevant" threshold come from
the dataset's settings (ARCHITECTURE.md, "Relevance"), the metrics from :mod:`near2_tasks.evaluate.metrics`
(cross-checked with pytrec_eval).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from near2_tasks.conventions import truncate
from near2_tasks.errors import Near2Error
from near2_tasks.evaluate.metrics import mean_over, metric_names, per_query_metrics, required_depth
from near2_tasks.evaluate.slices import slice_masks

if TYPE_CHECKING:
    from near2_tasks.config import Settings
    from near2_tasks.evaluate.evaluation import EvaluationData

MetricValues = dict[str, float | None]


@dataclass
class Ranked:
    """One retriever's answer at one dimension: catalog rows per query, best first (``-1``: no hit), and
    the seconds each query took (None: not measured per query, e.g. a batched matrix product)."""

    rows: np.ndarray
    seconds: list[float] | None = None


class Retriever(Protocol):
    """Anything that ranks the catalog: ``rank(data, query_vectors, dim, depth)``.

    ``query_vectors``: the queries encoded at full dimension by the model that encoded the catalog (None
    for a retriever that needs no vectors, e.g. BM25)."""

    name: str

    def rank(self, data: EvaluationData, query_vectors: np.ndarray | None, dim: int, depth: int) -> Ranked: ...


def rows_of(data: EvaluationData, ranked_ids: Sequence[Sequence[str]], depth: int) -> np.ndarray:
    """Product ids per query (e.g. Elasticsearch hits) -> catalog rows, ``(n_queries, depth)``, ``-1``
    padded; ids outside the evaluation's catalog are dropped."""
    row = data.row_of
    out = np.full((len(ranked_ids), depth), -1, dtype=np.int64)
    for i, ids in enumerate(ranked_ids):
        rows = [row[p] for p in ids if p in row][:depth]
        out[i, :len(rows)] = rows
    return out


def rank_whole_catalog(query_vectors: np.ndarray, catalog_vectors: np.ndarray, dim: int, depth: int,
                       batch_size: int = 256) -> np.ndarray:
    """Top ``depth`` catalog rows per query by cosine at dimension ``dim``, best first (exact search).

    Both sides are truncated to ``dim`` and re-normalised, so the dot product is the cosine. Queries go
    in blocks of ``batch_size`` to bound memory at ``batch_size x n_products`` scores.
    """
    catalog = truncate(catalog_vectors, dim)
    queries = truncate(query_vectors, dim)
    depth = min(depth, len(catalog))
    ranking = np.empty((len(queries), depth), dtype=np.int64)
    for start in range(0, len(queries), batch_size):
        scores = queries[start:start + batch_size] @ catalog.T
        if depth < scores.shape[1]:
            top = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
        else:
            top = np.broadcast_to(np.arange(scores.shape[1]), scores.shape).copy()
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        ranking[start:start + batch_size] = np.take_along_axis(top, order, axis=1)
    return ranking


@dataclass
class ExactRetriever:
    """Exact cosine search over the whole catalog (both sides truncated to the dim and re-normalised)."""

    catalog_vectors: np.ndarray
    batch_size: int = 256
    name: str = "exact"

    def rank(self, data: EvaluationData, query_vectors: np.ndarray | None, dim: int, depth: int) -> Ranked:
        if query_vectors is None:
            raise Near2Error("exact search needs the query vectors")
        return Ranked(rank_whole_catalog(query_vectors, self.catalog_vectors, dim, depth, self.batch_size))


@dataclass
class RetrievalScores:
    """Metrics of one retriever per dimension, overall and per query slice, with per-query latency."""

    retriever: str
    k: int
    metrics: list[str]
    n_queries: int
    dims: dict[int, MetricValues]
    slices: dict[str, dict[int, MetricValues]]
    slice_sizes: dict[str, int]
    #: dim -> {"p50": ms, "p99": ms} when the retriever timed each query
    latency_ms: dict[int, dict[str, float]] = field(default_factory=dict)
    #: dim -> the ranked rows (for recall against another retriever, or fusion)
    rankings: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"retriever": self.retriever, "k": self.k, "metrics": self.metrics, "n_queries": self.n_queries,
                "dims": {str(d): v for d, v in self.dims.items()},
                "slices": {s: {str(d): v for d, v in t.items()} for s, t in self.slices.items()},
                "slice_sizes": self.slice_sizes, "latency_ms": {str(d): v for d, v in self.latency_ms.items()}}


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50 and p99 (nearest rank) of per-query seconds, in milliseconds."""
    ordered = sorted(1000 * s for s in seconds)
    return {"p50": round(statistics.median(ordered), 3), "p99": round(ordered[int(0.99 * (len(ordered) - 1))], 3)}


def score_rankings(data: EvaluationData, ranking: np.ndarray, names: Sequence[str], floor: float,
                   threshold: float, masks: Mapping[str, np.ndarray]) -> tuple[MetricValues, dict[str, MetricValues]]:
    """(mean of each metric over all queries, the same per slice): slices without a query are left out."""
    per_query = per_query_metrics(ranking, data.qrels, list(names), floor, threshold)
    overall = {name: mean_over(values) for name, values in per_query.items()}
    per_slice = {s: {name: mean_over(values, mask) for name, values in per_query.items()}
                 for s, mask in masks.items() if mask.any()}
    return overall, per_slice


def overlap_at(ranking: np.ndarray, reference: np.ndarray, k: int) -> float:
    """Mean fraction of the reference's top ``k`` rows that ``ranking``'s top ``k`` holds (recall@k of an
    approximate search against exact search)."""
    hits = [len(set(a[:k][a[:k] >= 0]) & set(b[:k][b[:k] >= 0])) / max(int((b[:k] >= 0).sum()), 1)
            for a, b in zip(ranking, reference)]
    return float(np.mean(hits)) if hits else 0.0


def evaluate_retriever(retriever: Retriever, data: EvaluationData, dims: Sequence[int], *,
                       query_vectors: np.ndarray | None = None, k: int = 10, metrics: Sequence[str] | None = None,
                       floor: float, threshold: float, slices: Mapping[str, str] | None = None,
                       keep_rankings: bool = False) -> RetrievalScores:
    """Score ``retriever`` at every dimension of ``dims`` on ``data``'s judged queries.

    ``metrics`` default to ``ndcg@k``, ``mrr@k``, ``precision@k``, ``recall@k``, ``recall@100``, ``map@100``;
    ``floor`` and ``threshold``: the dataset's relevance floor and "relevant" threshold
    (:func:`scale_of` reads them from settings); ``slices``: extra named slices (regular expressions) on top
    of short / long / alphanumeric.
    """
    if k <= 0:
        raise Near2Error(f"k must be positive, got {k}")
    names = list(metrics or metric_names(k))
    depth = required_depth(names)
    masks = slice_masks(data.query_texts, slices)
    overall: dict[int, MetricValues] = {}
    per_slice: dict[str, dict[int, MetricValues]] = {name: {} for name in masks}
    latency: dict[int, dict[str, float]] = {}
    rankings: dict[int, np.ndarray] = {}
    for dim in dims:
        ranked = retriever.rank(data, query_vectors, dim, depth)
        overall[dim], by_slice = score_rankings(data, ranked.rows, names, floor, threshold, masks)
        for s, values in by_slice.items():
            per_slice[s][dim] = values
        if ranked.seconds:
            latency[dim] = percentiles_ms(ranked.seconds)
        if keep_rankings:
            rankings[dim] = ranked.rows
    return RetrievalScores(retriever=retriever.name, k=k, metrics=names, n_queries=len(data.query_texts),
                           dims=overall, slices=per_slice, slice_sizes={s: int(m.sum()) for s, m in masks.items()},
                           latency_ms=latency, rankings=rankings)


def scale_of(settings: Settings) -> dict[str, Any]:
    """The keyword arguments of :func:`evaluate_retriever` that come from settings: the relevance scale
    and the configured slices."""
    return {"floor": settings.dataset.relevance_floor, "threshold": settings.dataset.relevant_threshold,
            "slices": settings.evaluation.slices}
