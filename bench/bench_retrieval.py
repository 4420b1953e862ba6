"""What the benchmarks share to score rankings through the one evaluation entry point
(``near2_tasks.evaluate.retrieval.evaluate_retriever``): no qrels, relevance floor or NDCG is written here.

A benchmark that times its requests with its own loop (e.g. rotating the configurations query by query so
background load hits them all alike) hands the answers it got to :class:`Precomputed`, a retriever that
returns them, and scores them with :func:`score`; exact reference rankings come from
``ExactRetriever`` / ``rank_whole_catalog``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from near2_tasks.evaluate.retrieval import Ranked, RetrievalScores, evaluate_retriever, rows_of, scale_of


@dataclass
class Precomputed:
    """A retriever that returns answers a benchmark already has: product ids per query (``ids``, e.g.
    Elasticsearch hits) or catalog rows (``rows``), best first, with the seconds each query took."""

    name: str
    ids: Sequence[Sequence[str]] | None = None
    rows: np.ndarray | None = None
    seconds: Sequence[float] | None = None

    def rank(self, data, query_vectors, dim: int, depth: int) -> Ranked:
        if self.rows is not None:
            rows = np.full((len(self.rows), depth), -1, dtype=np.int64)
            rows[:, :min(depth, self.rows.shape[1])] = self.rows[:, :depth]
        else:
            rows = rows_of(data, self.ids or [], depth)
        return Ranked(rows, list(self.seconds) if self.seconds else None)


def score(data, settings, *, ids: Sequence[Sequence[str]] | None = None, rows: np.ndarray | None = None,
          seconds: Sequence[float] | None = None, metrics: Sequence[str] = ("ndcg@10",), k: int = 10,
          name: str = "precomputed") -> RetrievalScores:
    """``evaluate_retriever`` on precomputed answers, with the dataset's scale and slices from ``settings``;
    the values are under ``scores.dims[0]`` (a precomputed answer has no dimension of its own)."""
    return evaluate_retriever(Precomputed(name, ids, rows, seconds), data, [0], k=k, metrics=list(metrics),
                              keep_rankings=True, **scale_of(settings))


def ndcg(data, settings, *, ids: Sequence[Sequence[str]] | None = None, rows: np.ndarray | None = None,
         k: int = 10) -> float:
    """Mean NDCG@k of precomputed answers (0.0 when no query counts)."""
    value = score(data, settings, ids=ids, rows=rows, metrics=[f"ndcg@{k}"], k=k).dims[0][f"ndcg@{k}"]
    return float(value or 0.0)
