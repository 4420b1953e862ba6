"""Hybrid retrieval: BM25 and nested dense vectors, fused in Python, tuned and evaluated per dimension.

Elasticsearch's RRF and linear *retrievers* need an Enterprise licence (and the local integ-test
distribution lacks them), so near2 fuses the two rankings itself:

* **RRF** (reciprocal-rank fusion): a product scores ``sum over sides of 1 / (rrf_k + rank)``, rank 1-based
  on each side where it appears (``serving.rrf_k``, default 60). Scores of the two sides never meet, so no
  normalisation is needed.
* **linear**: each side's scores are min-max normalised over its own top-N (best -> 1, worst -> 0; a side
  whose hits all score the same gives them all 1), a product missing from a side gets 0 there, and
  ``fused = w * dense + (1 - w) * bm25``. ``w`` is the weight of the dense side *per dimension*: tuned on
  the validation split by :func:`tune_weights` and stored in the index ``_meta.hybrid_weights``
  (``{"384": 0.6, ...}``), else ``serving.hybrid_weight``. ``w = 1`` is dense alone, ``w = 0`` BM25 alone.

**Ties** are broken deterministically, in this order: higher fused score; the better (smaller) rank on
the side that weighs more, then on the other side (absent from a side counts as worse than any rank
there); smaller ``product_id`` (string order). RRF weighs the sides equally and linear with ``w = 0.5``
too: the dense side goes first then (it is the one the gate measured); linear with ``w < 0.5`` puts BM25
first. So ``w = 1`` is exactly the dense order and ``w = 0`` exactly the BM25 order, even where min-max
gives a side's last hit the 0 that products missing from that side get.

**Filters** (category, brand, price) are the same clauses on both sides: inside the kNN ``filter`` (so
kNN still returns N products when the filter is selective) and as the BM25 ``bool.filter``. A side may
return nothing (a query with no word in any lexical field, or a filter nobody passes); fusion is then the
other side's order (RRF and linear both keep it).

**One request** (``_msearch`` carrying the BM25 and the kNN search), not two: the sides are independent,
so one round trip lets Elasticsearch run both concurrently on the same concrete index; two sequential
``_search`` calls would add a round trip per query. A single ``_search`` with both ``query`` and ``knn``
is no alternative: Elasticsearch then *sums* the raw scores over the union (BM25 is unbounded, kNN in
[0, 1]) and returns one ranking, so neither RRF nor a normalised combination can be computed from it.
With ``serving.hybrid_funnel`` the dense side is the funnel, whose rescore needs the shortlist first:
the ``_msearch`` carries BM25 + the shortlist, then one more request rescores (two round trips, as the
funnel alone).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from near2_tasks import conventions

if TYPE_CHECKING:
    from near2_tasks.serving.served_index import ServingIndex

log = logging.getLogger(__name__)

Fusion = Literal["rrf", "linear"]
FUSIONS = ("rrf", "linear")
#: Methods an evaluation reports: each side alone, then the two fusions.
METHODS = ("bm25", "dense", "hybrid_rrf", "hybrid_linear")


# ----- fusion (pure functions) ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fused:
    """One product of a fused ranking: its fused score and its 1-based rank on each side (None: absent)."""

    product_id: str
    score: float
    dense_rank: int | None
    lexical_rank: int | None


Ranked = Sequence[tuple[str, float]]  # (product_id, score), best first


def _ranks(side: Ranked) -> dict[str, int]:
    ranks: dict[str, int] = {}
    for rank, (product_id, _) in enumerate(side, 1):
        ranks.setdefault(product_id, rank)  # a repeated id keeps its best rank
    return ranks


def _ordered(scores: dict[str, float], dense: dict[str, int], lexical: dict[str, int],
             dense_first: bool = True) -> list[Fused]:
    """Fused score descending; ties: the rank on the first side, then on the other (absent = worst), then
    product_id. ``dense_first``: the dense side is the first (it weighs at least as much)."""
    first, second = (dense, lexical) if dense_first else (lexical, dense)

    def key(product_id: str):
        return (-scores[product_id], first.get(product_id, math.inf), second.get(product_id, math.inf), product_id)

    return [Fused(pid, scores[pid], dense.get(pid), lexical.get(pid)) for pid in sorted(scores, key=key)]


def rrf(dense: Ranked, lexical: Ranked, k: float = 60.0) -> list[Fused]:
    """Reciprocal-rank fusion of the two rankings (their scores are ignored)."""
    if not k > 0:
        raise ValueError(f"rrf k must be positive, got {k}")
    dense_ranks, lexical_ranks = _ranks(dense), _ranks(lexical)
    scores: dict[str, float] = {}
    for ranks in (dense_ranks, lexical_ranks):
        for product_id, rank in ranks.items():
            scores[product_id] = scores.get(product_id, 0.0) + 1.0 / (k + rank)
    return _ordered(scores, dense_ranks, lexical_ranks)


def minmax(side: Ranked) -> dict[str, float]:
    """Scores of one side mapped to [0, 1] over its own hits (all equal: all 1)."""
    if not side:
        return {}
    values = [float(score) for _, score in side]
    low, high = min(values), max(values)
    out: dict[str, float] = {}
    for product_id, score in side:
        if product_id not in out:
            out[product_id] = 1.0 if high == low else (float(score) - low) / (high - low)
    return out


def linear(dense: Ranked, lexical: Ranked, weight: float) -> list[Fused]:
    """``weight * minmax(dense) + (1 - weight) * minmax(bm25)``; absent from a side scores 0 there."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"the linear weight must lie in [0, 1], got {weight}")
    dense_norm, lexical_norm = minmax(dense), minmax(lexical)
    scores = {pid: weight * dense_norm.get(pid, 0.0) + (1.0 - weight) * lexical_norm.get(pid, 0.0)
              for pid in dense_norm.keys() | lexical_norm.keys()}
    return _ordered(scores, _ranks(dense), _ranks(lexical), dense_first=weight >= 0.5)


def fuse(dense: Ranked, lexical: Ranked, fusion: Fusion, *, rrf_k: float = 60.0, weight: float = 0.5) -> list[Fused]:
    if fusion == "rrf":
        return rrf(dense, lexical, rrf_k)
    if fusion == "linear":
        return linear(dense, lexical, weight)
    raise ValueError(f"unknown fusion {fusion!r}; fusions are {list(FUSIONS)}")


# ----- the BM25 side ----------------------------------------------------------------------------------------
def lexical_fields(configured: Sequence[str], indexed: Sequence[str]) -> list[str]:
    """The configured multi_match fields (``name^boost``) that the index holds; ``title`` when none is."""
    held = set(indexed)
    fields = [f for f in configured if f.split("^", 1)[0] in held]
    return fields or ["title"]


def lexical_body(query: str, fields: Sequence[str], size: int, filters: list[dict[str, Any]],
                 match_type: str = "best_fields", source: bool = True) -> dict[str, Any]:
    """One BM25 search: ``multi_match`` over ``fields`` as the scoring clause, the filters as ``bool.filter``
    (they do not score). Built as a structure, never from strings."""
    match = {"query": query, "fields": list(fields), "type": match_type}
    if match_type == "best_fields":
        match["tie_breaker"] = 0.3  # the other fields' matches still count a little
    return {"query": {"bool": {"must": [{"multi_match": match}], "filter": list(filters)}}, "size": size,
            "_source": {"includes": list(conventions.PRODUCT_FIELDS)} if source else False}


def weight_for(served: ServingIndex, dim: int, default: float) -> tuple[float, str]:
    """(linear weight at ``dim``, where it came from: ``index`` (_meta.hybrid_weights) or ``settings``)."""
    if dim in served.hybrid_weights:
        return served.hybrid_weights[dim], "index"
    return default, "settings"
