"""Ranking metrics, vectorised over all queries at once.

Conventions (ARCHITECTURE.md, "Relevance"; the same as trec_eval, checked against ``pytrec_eval`` in the tests):

* **NDCG@k**: linear gain ``relevance - floor`` (grades below the floor count as the floor), discount
  ``log2(rank + 1)``, ideal ranking built from the query's judged products; an unjudged product gains 0.
  Queries whose ideal DCG is 0 (every judged product at the floor) are skipped: NaN for them.
* **binary metrics** (MRR@k, Precision@k, Recall@k, MAP@k): relevant means ``relevance >= threshold``.
  Precision@k divides by k, AP@k divides by the query's number of relevant products (trec_eval's
  ``map_cut``). Queries with no relevant judged product are skipped (recall is undefined for them): NaN.

A ranking is an integer matrix ``(n_queries, depth)`` of catalog row numbers, best first; ``-1`` pads a
row when the catalog holds fewer products than the depth. Judgments are :class:`Qrels`, keyed by the same
query and catalog row numbers. Every function returns one value per query; averaging (over all queries,
or over a slice) is :func:`mean_over`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

#: Metric families and what they need; a metric name is ``<family>@<k>``, e.g. ``ndcg@10``.
METRIC_FAMILIES = ("ndcg", "mrr", "precision", "recall", "map")


def metric_names(k: int) -> list[str]:
    """The metrics an evaluation reports at cut-off k: the k-metrics, then Recall@100 and MAP@100."""
    names = [f"ndcg@{k}", f"mrr@{k}", f"precision@{k}", f"recall@{k}", "recall@100", "map@100"]
    return list(dict.fromkeys(names))  # k == 100 would repeat recall@100


def parse_metric(name: str) -> tuple[str, int]:
    """``'ndcg@10'`` -> ``('ndcg', 10)``; ValueError for anything else."""
    match = re.fullmatch(r"([a-z]+)@(\d+)", name)
    if not match or match.group(1) not in METRIC_FAMILIES or int(match.group(2)) <= 0:
        raise ValueError(f"unknown metric {name!r}: expected <family>@<k> with family in {METRIC_FAMILIES}")
    return match.group(1), int(match.group(2))


def required_depth(names: list[str]) -> int:
    """How many ranked products per query the given metrics look at."""
    return max(parse_metric(name)[1] for name in names)


@dataclass(frozen=True)
class Qrels:
    """Judged relevance: one entry per distinct (query, catalog row) pair, sorted by query then row.

    Build it with :meth:`from_pairs`, which averages duplicate judgments of the same pair.
    """

    query: np.ndarray  # int64, query number 0..n_queries-1
    product: np.ndarray  # int64, catalog row number 0..n_products-1
    relevance: np.ndarray  # float64
    n_queries: int
    n_products: int

    @classmethod
    def from_pairs(cls, query: np.ndarray, product: np.ndarray, relevance: np.ndarray,
                   n_queries: int, n_products: int) -> Qrels:
        query = np.asarray(query, dtype=np.int64)
        product = np.asarray(product, dtype=np.int64)
        relevance = np.asarray(relevance, dtype=np.float64)
        if not (len(query) == len(product) == len(relevance)):
            raise ValueError("query, product and relevance must have the same length")
        if len(query) and (query.min() < 0 or query.max() >= n_queries):
            raise ValueError("query numbers must lie in [0, n_queries)")
        if len(product) and (product.min() < 0 or product.max() >= n_products):
            raise ValueError("product numbers must lie in [0, n_products)")
        keys = query * n_products + product
        unique_keys, inverse = np.unique(keys, return_inverse=True)
        sums = np.bincount(inverse, weights=relevance, minlength=len(unique_keys))
        counts = np.bincount(inverse, minlength=len(unique_keys))
        return cls(
            query=unique_keys // n_products, product=unique_keys % n_products,
            relevance=sums / np.maximum(counts, 1), n_queries=n_queries, n_products=n_products,
        )

    @property
    def keys(self) -> np.ndarray:
        """Sorted ``query * n_products + product`` (sorted because ``from_pairs`` used ``np.unique``)."""
        return self.query * self.n_products + self.product

    def ranked_relevance(self, ranking: np.ndarray) -> np.ndarray:
        """Relevance of each ranked product, ``(n_queries, depth)``; NaN where unjudged or padding."""
        ranking = np.asarray(ranking, dtype=np.int64)
        if ranking.ndim != 2 or ranking.shape[0] != self.n_queries:
            raise ValueError(f"ranking must have shape (n_queries={self.n_queries}, depth), got {ranking.shape}")
        out = np.full(ranking.shape, np.nan)
        keys = self.keys
        if len(keys) == 0:
            return out
        wanted = np.arange(self.n_queries, dtype=np.int64)[:, None] * self.n_products + ranking
        position = np.clip(np.searchsorted(keys, wanted), 0, len(keys) - 1)
        judged = (keys[position] == wanted) & (ranking >= 0)
        out[judged] = self.relevance[position[judged]]
        return out

    def count_relevant(self, threshold: float) -> np.ndarray:
        """Number of judged products with relevance >= threshold, per query."""
        return np.bincount(self.query, weights=self.relevance >= threshold, minlength=self.n_queries)

    def ideal_dcg(self, floor: float, k: int) -> np.ndarray:
        """DCG@k of the best possible ordering of each query's judged products."""
        gains = np.maximum(self.relevance - floor, 0.0)
        order = np.lexsort((-gains, self.query))  # by query, then gain descending
        query, gains = self.query[order], gains[order]
        group_start = np.searchsorted(query, np.arange(self.n_queries))
        rank = np.arange(len(query)) - group_start[query]  # 0-based rank inside the query
        top = rank < k
        return np.bincount(query[top], weights=gains[top] / np.log2(rank[top] + 2.0), minlength=self.n_queries)


def _discounts(depth: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(depth) + 2.0)


def ndcg_at(ranked: np.ndarray, qrels: Qrels, floor: float, k: int) -> np.ndarray:
    """NDCG@k per query (NaN where the ideal DCG is 0). ``ranked`` is from :meth:`Qrels.ranked_relevance`."""
    gains = np.maximum(np.nan_to_num(ranked[:, :k] - floor, nan=0.0), 0.0)
    dcg = gains @ _discounts(gains.shape[1])
    ideal = qrels.ideal_dcg(floor, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ideal > 0, dcg / ideal, np.nan)


def _hits(ranked: np.ndarray, threshold: float, k: int) -> np.ndarray:
    return np.nan_to_num(ranked[:, :k], nan=-np.inf) >= threshold


def _where_relevant_exist(values: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    return np.where(n_relevant > 0, values, np.nan)


def mrr_at(ranked: np.ndarray, qrels: Qrels, threshold: float, k: int) -> np.ndarray:
    """Reciprocal rank of the first relevant product within the top k (0 if none)."""
    hits = _hits(ranked, threshold, k)
    first = np.argmax(hits, axis=1)
    rr = np.where(hits.any(axis=1), 1.0 / (first + 1.0), 0.0)
    return _where_relevant_exist(rr, qrels.count_relevant(threshold))


def precision_at(ranked: np.ndarray, qrels: Qrels, threshold: float, k: int) -> np.ndarray:
    """Relevant products in the top k, divided by k."""
    precision = _hits(ranked, threshold, k).sum(axis=1) / k
    return _where_relevant_exist(precision, qrels.count_relevant(threshold))


def recall_at(ranked: np.ndarray, qrels: Qrels, threshold: float, k: int) -> np.ndarray:
    """Relevant products in the top k, divided by the query's number of relevant products."""
    n_relevant = qrels.count_relevant(threshold)
    found = _hits(ranked, threshold, k).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _where_relevant_exist(found / n_relevant, n_relevant)


def map_at(ranked: np.ndarray, qrels: Qrels, threshold: float, k: int) -> np.ndarray:
    """Average precision over the top k: sum of precision at each relevant rank / number relevant."""
    hits = _hits(ranked, threshold, k)
    precision_at_rank = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
    n_relevant = qrels.count_relevant(threshold)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _where_relevant_exist((precision_at_rank * hits).sum(axis=1) / n_relevant, n_relevant)


def per_query_metrics(ranking: np.ndarray, qrels: Qrels, names: list[str], floor: float,
                      threshold: float) -> dict[str, np.ndarray]:
    """Every named metric, one value per query (NaN where the query does not count for that metric)."""
    ranked = qrels.ranked_relevance(ranking)
    depth = ranked.shape[1]
    results: dict[str, np.ndarray] = {}
    for name in names:
        family, k = parse_metric(name)
        if k > depth and depth < qrels.n_products:
            raise ValueError(f"{name} needs {k} ranked products per query, the ranking holds {depth}")
        if family == "ndcg":
            results[name] = ndcg_at(ranked, qrels, floor, k)
        else:
            function = {"mrr": mrr_at, "precision": precision_at, "recall": recall_at, "map": map_at}[family]
            results[name] = function(ranked, qrels, threshold, k)
    return results


def mean_over(values: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    """Mean of the queries that count (not NaN), optionally within a mask; None when none counts."""
    if mask is not None:
        values = values[mask]
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else None
