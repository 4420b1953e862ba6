"""Elasticsearch request bodies of a search, built as structures (never from strings), and reading their
answers back: the kNN body at a dimension (or on the 1-bit codes of one), the funnel's shortlist and its
exact rescore over the shortlist ids, hits from raw hits, and the checked items of an ``_msearch``.

The BM25 side of hybrid search is :func:`near2_tasks.serving.hybrid.lexical_body`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from near2_tasks import conventions
from near2_tasks.errors import Near2Error
from near2_tasks.serving import compact
from near2_tasks.serving.request import Hit

if TYPE_CHECKING:
    from elasticsearch import Elasticsearch

    from near2_tasks.serving.served_index import ServingIndex
    from near2_tasks.serving.settings import ServingSettings


class IndexVanished(Near2Error):
    """An ``_msearch`` item answered index_not_found: the alias moved and the old index was deleted."""


def knn_body(dim: int, vector, k: int, num_candidates: int, filters: list[dict[str, Any]],
             source: bool = True, code: str | None = None) -> dict[str, Any]:
    """Keyword arguments of ``client.search`` for one kNN query on ``embedding_<dim>``, or, given a
    hex ``code`` instead of a vector, on the bit codes ``embedding_<dim>_bits``."""
    knn: dict[str, Any] = {"k": k, "num_candidates": num_candidates}
    if code is not None:
        knn.update(field=conventions.binary_vector_field(dim), query_vector=code)
    else:
        knn.update(field=conventions.vector_field(dim), query_vector=[float(x) for x in vector])
    if filters:
        knn["filter"] = filters
    return {"knn": knn, "size": k,
            "_source": {"includes": list(conventions.PRODUCT_FIELDS)} if source else False}


def funnel_candidates(serving: ServingSettings, k: int) -> int:
    """How many candidates the funnel's first stage keeps for a top ``k``."""
    return min(max(k, serving.funnel_shortlist_size), serving.max_num_candidates)


def shortlist_body(serving: ServingSettings, served: ServingIndex, full_vector, k: int, shortlist_dim: int,
                   clauses: list[dict[str, Any]], num_candidates: int) -> tuple[dict[str, Any], int]:
    """(the funnel's first-stage kNN body, its shortlist size): Hamming distance on the 1-bit codes of
    ``shortlist_dim`` when the index has them, else a float kNN at that dimension."""
    size = funnel_candidates(serving, k)
    candidates = max(size, num_candidates)
    if shortlist_dim in served.binary_centres:
        body = knn_body(shortlist_dim, None, size, candidates, clauses, source=False,
                        code=compact.query_code(full_vector, shortlist_dim, served.binary_centres[shortlist_dim]))
    else:
        body = knn_body(shortlist_dim, conventions.truncate(full_vector, shortlist_dim), size, candidates,
                        clauses, source=False)
    return body, size


def shortlist_ids(client: Elasticsearch, index: str, body: dict[str, Any]) -> tuple[list[str], int]:
    """(the product ids a funnel's first stage returns, best first; ES's ``took``). Ids come from the
    ``product_id`` doc values, not ``_id``: fetching the stored ``_id`` of 2,000 hits took half of the
    stage (21 ms p50 against 10 ms on Elasticsearch 9.2.4, BENCHMARKS.md), and nothing else is returned."""
    response = client.search(index=index, **{**body, "_source": False}, stored_fields="_none_",
                             docvalue_fields=["product_id"], track_total_hits=False,
                             filter_path=["took", "hits.hits.fields.product_id"])
    return [hit["fields"]["product_id"][0] for hit in response.get("hits", {}).get("hits", [])], response["took"]


def rescore_body(dim: int, full_vector, k: int, ids: list[str]) -> dict[str, Any]:
    """The funnel's second stage: exact kNN at ``dim`` over the shortlist ``ids`` only."""
    return knn_body(dim, conventions.truncate(full_vector, dim), min(k, len(ids)), len(ids),
                    [{"ids": {"values": ids}}])


def hit_of(raw: dict[str, Any]) -> Hit:
    """A :class:`Hit` from one raw Elasticsearch hit (its ``_source``, else its ``_id``)."""
    source = raw.get("_source") or {}
    return Hit(product_id=source.get("product_id", raw["_id"]), title=source.get("title", ""),
               score=float(raw["_score"]), category=source.get("category"), brand=source.get("brand"),
               price=source.get("price"))


def msearch_answers(response: dict[str, Any], index: str) -> list[dict[str, Any]]:
    """The items of an ``_msearch`` response on ``index``; an item's error raises (:class:`IndexVanished`
    when the index was deleted meanwhile, else :class:`Near2Error` with its type and reason)."""
    answers = response["responses"]
    for answer in answers:
        if "error" in answer:
            error = answer["error"]
            kind = error.get("type") if isinstance(error, dict) else None
            if kind == "index_not_found_exception":
                raise IndexVanished(f"index {index} no longer exists")
            reason = error.get("reason") if isinstance(error, dict) else error
            raise Near2Error(f"hybrid search on {index} failed: {kind}: {reason}"[:500])
    return answers
