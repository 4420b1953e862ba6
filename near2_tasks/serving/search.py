"""Storefront search: encode the query with the serving index's own model, then kNN (or a funnel).

The alias target's ``_meta.model_uri`` names the model that encoded the documents; queries are
encoded by exactly that model (ARCHITECTURE.md invariant 3), loaded once per URI and cached. The target is
re-read every ``serving.alias_check_interval_s`` seconds, so when the alias moves to an index built
by a new model version, the next query uses the new model without a restart. Queries go to the
concrete index that was resolved, never to the alias, so a swap between "which model" and "which
documents" cannot pair a query with the wrong vectors.

Modes:
* ``knn``: one approximate kNN on ``embedding_<dim>``;
* ``funnel``: a kNN shortlist on a small dimension, then exact scores at the larger dimension over the
  shortlist only: here, from the index's float16 rescoring store memory-mapped on this host
  (``serving.funnel_rescore: local``, :mod:`near2_tasks.serving.rescore_store`: one Elasticsearch request;
  without filters the shortlist too comes from the store's bit codes, ``serving.funnel_shortlist: local``,
  and Elasticsearch is not asked at all),
  or in Elasticsearch, an exact kNN restricted to the shortlist (an ``ids`` filter; a second request;
  also what ``local`` falls back to, with a WARNING, when the index has no matching store).
  When the index holds 1-bit codes of a dimension (``elasticsearch.binary_dims``), the shortlist
  compares codes by Hamming distance (``near2_tasks.serving.compact``: d/8 bytes per product).
* ``hybrid``: BM25 top-N over the lexical fields and kNN top-N at the dimension (or the funnel, with
  ``serving.hybrid_funnel``), in one ``_msearch``, fused in Python by reciprocal-rank fusion or a linear
  combination of min-max normalised scores with the weight the index ``_meta`` holds for the dimension
  (``near2_tasks.serving.hybrid``: why one request, the tie-breaking order).

Filters (category, brand, price range) run inside the kNN ``filter``, so k results come back even
when the filter is selective (and as the BM25 side's ``bool.filter`` in hybrid mode).

This module runs a search: the :class:`Searcher` (the cached alias target, the query-vector cache, the
requests it sends) and :func:`search`. What a request and its answer are, and their checks:
:mod:`near2_tasks.serving.request`; the served index and its ``_meta``: :mod:`near2_tasks.serving.served_index`;
the request bodies: :mod:`near2_tasks.serving.query_bodies`; the query encoders (one per model URI, shared by
the process, which encode the queries of concurrent requests in one call): :mod:`near2_tasks.serving.query_encoder`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from near2_tasks import conventions
from near2_tasks.errors import Near2Error
from near2_tasks.serving import compact, hybrid
from near2_tasks.serving.es_client import es_errors, make_client
from near2_tasks.serving.query_encoder import EncodeBatcher, batcher_for, encoder_for, torch_threads
from near2_tasks.serving.rescore_store import RescoreStore, StoreCache, StoreMismatch
from near2_tasks.serving.query_bodies import (IndexVanished, funnel_candidates, hit_of, knn_body, msearch_answers,
                                              rescore_body, shortlist_body, shortlist_ids)
from near2_tasks.serving.request import (Hit, HybridSides, Mode, Retrieved, SearchFilters, SearchRequest,
                                         SearchResponse, pick_dims)
from near2_tasks.serving.served_index import ServingIndex, alias_target, read_serving_index

if TYPE_CHECKING:
    from elasticsearch import Elasticsearch
    from sentence_transformers import SentenceTransformer

    from near2_tasks.config import Settings

log = logging.getLogger(__name__)


def _ms_since(began: float) -> float:
    return round((time.perf_counter() - began) * 1000, 3)


class Searcher:
    """Long-lived search state: one client, the cached alias target, the shared encoder cache."""

    def __init__(self, settings: Settings, client: Elasticsearch | None = None) -> None:
        self.settings = settings
        self.client = client or make_client(settings)
        self._serving: ServingIndex | None = None
        self._checked_at = -math.inf
        self._lock = threading.Lock()
        #: (model URI, query text) -> the full-dimension query vector (``serving.query_cache_size``)
        self._vectors: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._vectors_lock = threading.Lock()
        self.query_cache_hits = 0
        self.query_cache_misses = 0
        #: the funnel's local rescoring stores (``serving.funnel_rescore: local``), by index name
        self.stores = StoreCache(settings)
        self._without_codes: set[tuple[str, int]] = set()  # (index, dim) whose store lacks codes: logged once

    # ----- what is served ------------------------------------------------------------------
    def serving_index(self, refresh: bool = False) -> ServingIndex:
        """The alias target and its model, re-read at most every ``alias_check_interval_s``."""
        interval = self.settings.serving.alias_check_interval_s
        with self._lock:
            if refresh or self._serving is None or time.monotonic() - self._checked_at >= interval:
                self._serving = self._read_serving_index()
                self._checked_at = time.monotonic()
            return self._serving

    def _read_serving_index(self) -> ServingIndex:
        name = alias_target(self.settings, self.client)
        if self._serving is not None and self._serving.name == name:
            return self._serving  # _meta of a built index does not change what search needs
        return self.serving_index_of(name)

    def serving_index_of(self, name: str) -> ServingIndex:
        """What search needs to know about the concrete index ``name`` (served or not: tuning and
        evaluation query an index before the swap)."""
        return read_serving_index(self.settings, self.client, name)

    def encoder(self, serving: ServingIndex) -> SentenceTransformer:
        return encoder_for(self.settings, serving.model_uri)

    def batcher(self, serving: ServingIndex) -> EncodeBatcher:
        """The encode batcher of :meth:`encoder`'s model (shared by the process, like the encoder)."""
        return batcher_for(self.settings, serving.model_uri)

    def query_vector(self, served: ServingIndex, query: str) -> tuple[np.ndarray, bool]:
        """(the full-dimension vector of ``query`` by the model of ``served``, whether it came from the
        cache). The cache is keyed by the model URI too, so an alias move to another model never reuses a
        vector of the old one (invariant 3); its vectors are read-only."""
        from near2_tasks.models.embeddings import encode

        size = self.settings.serving.query_cache_size
        key = (served.model_uri, query)
        if size:
            with self._vectors_lock:
                vector = self._vectors.get(key)
                if vector is not None:
                    self._vectors.move_to_end(key)
                    self.query_cache_hits += 1
                    return vector, True
        with torch_threads(self.settings.serving.encode_threads):
            if self.settings.serving.encode_batch_size > 1:  # with the queries of concurrent requests, if any
                vector = self.batcher(served).encode(query)
            else:
                vector = np.asarray(encode(self.encoder(served), [query], batch_size=1)[0])
        if size:
            vector.flags.writeable = False
            with self._vectors_lock:
                self.query_cache_misses += 1
                self._vectors[key] = vector
                self._vectors.move_to_end(key)
                while len(self._vectors) > size:
                    self._vectors.popitem(last=False)
        return vector, False

    # ----- search ----------------------------------------------------------------------------
    def search(self, query: str, k: int = 10, dim: int | None = None, mode: Mode | None = None,
               filters: SearchFilters | dict[str, Any] | None = None,
               num_candidates: int | None = None, fusion: hybrid.Fusion | None = None) -> SearchResponse:
        """Validate, resolve the served index, encode, search; see the module docstring.

        ``fusion`` (mode=hybrid only): ``rrf`` or ``linear``; default ``serving.hybrid_fusion``."""
        from elasticsearch import NotFoundError

        request = SearchRequest.parse(self.settings, query, k, mode, filters, num_candidates, fusion)
        try:
            return self._search(self.serving_index(), request, dim)
        except (NotFoundError, IndexVanished):  # the index was deleted right after the alias moved: follow it
            pass
        try:
            return self._search(self.serving_index(refresh=True), request, dim)
        except (NotFoundError, IndexVanished) as exc:
            raise Near2Error(f"the index behind alias {self.settings.elasticsearch.alias!r} vanished twice "
                             "during the search", hint="check `near2 index status`") from exc

    def _search(self, served: ServingIndex, request: SearchRequest, dim: int | None) -> SearchResponse:
        dim, shortlist_dim = pick_dims(self.settings, served, dim, request.mode)
        began = time.perf_counter()
        self.encoder(served)
        loaded = time.perf_counter()
        full, cached = self.query_vector(served, request.query)
        encoded = time.perf_counter()
        clauses = request.filters.clauses()
        if request.mode == "hybrid":
            retrieved = self.retrieve_hybrid(served, request.query, full, request.k, dim, shortlist_dim, clauses,
                                             request.num_candidates, request.fusion)
        else:
            retrieved = self.retrieve(served, full, request.k, dim, shortlist_dim, clauses, request.num_candidates)
        timings = {"model_load": round((loaded - began) * 1000, 3), "encode": round((encoded - loaded) * 1000, 3),
                   **retrieved.timings_ms, "total": _ms_since(began)}
        return SearchResponse(
            query=request.query, k=request.k, dim=dim, mode=request.mode, index=served.name,
            model_name=served.model_name, model_version=served.model_version, model_uri=served.model_uri,
            hits=retrieved.hits, timings_ms=timings, filters=request.filters.active(), shortlist_dim=shortlist_dim,
            shortlist_size=retrieved.shortlist_size, hybrid=retrieved.hybrid, rescore=retrieved.rescore,
            shortlist=retrieved.shortlist,
            query_cached=cached if self.settings.serving.query_cache_size else None)

    def retrieve(self, served: ServingIndex, full_vector, k: int, dim: int, shortlist_dim: int | None = None,
                 clauses: list[dict[str, Any]] | None = None, num_candidates: int = 100) -> Retrieved:
        """The retrieval part of a search, for a query vector already encoded at full dimension: kNN at ``dim``,
        or (``shortlist_dim`` given) the funnel, in Elasticsearch or, as far as the settings and the index's store
        allow, here. No input checks: callers validate."""
        clauses = clauses or []
        began = time.perf_counter()
        timings: dict[str, float] = {}
        shortlist_size = rescore = None
        with es_errors(self.settings.elasticsearch.url, "search", keep_not_found=True):
            if shortlist_dim is None:
                response = self.client.search(index=served.name, **knn_body(
                    dim, conventions.truncate(full_vector, dim), k, num_candidates, clauses))
                took, hits = response["took"], [hit_of(h) for h in response["hits"]["hits"]]
            else:
                store = self.local_store(served)
                size = funnel_candidates(self.settings.serving, k)
                local = None if clauses or store is None else self.funnel_locally(
                    served, store, full_vector, k, dim, shortlist_dim, size)
                if local is not None:  # both stages from the store: no request
                    timings.update(search=_ms_since(began), es_took=0.0)
                    return Retrieved(hits=local, timings_ms=timings, shortlist_size=size,
                                     rescore="local", shortlist="local")
                body, shortlist_size = shortlist_body(self.settings.serving, served, full_vector, k, shortlist_dim,
                                                      clauses, num_candidates)
                ids, took = shortlist_ids(self.client, served.name, body)
                timings["shortlist"] = _ms_since(began)
                hits, rescore, rescore_took = self.rescore_shortlist(served, ids, full_vector, dim, k, store)
                took += rescore_took or 0
        timings["search"] = _ms_since(began)
        timings["es_took"] = float(took)
        return Retrieved(hits=hits, timings_ms=timings, shortlist_size=shortlist_size, rescore=rescore,
                         shortlist=None if shortlist_dim is None else "elasticsearch")

    def funnel_locally(self, served: ServingIndex, store: RescoreStore, full_vector, k: int, dim: int,
                       shortlist_dim: int, size: int) -> list[Hit] | None:
        """Both stages of the funnel from the index's ``store``: the ``size`` nearest bit codes of ``shortlist_dim``
        (:meth:`RescoreStore.shortlist`, the Hamming kNN that ``embedding_<d>_bits`` answers), rescored at ``dim``.
        None where ``serving.funnel_shortlist`` is elasticsearch or the index or its store has no codes of that
        dimension: then Elasticsearch shortlists."""
        if self.settings.serving.funnel_shortlist != "local" or shortlist_dim not in served.binary_centres:
            return None
        if shortlist_dim not in store.codes:  # a store of an older build: Elasticsearch shortlists (logged once)
            if (served.name, shortlist_dim) not in self._without_codes:
                self._without_codes.add((served.name, shortlist_dim))
                log.warning("mode=funnel on %s shortlists in Elasticsearch: its rescoring store has no %d-bit codes "
                            "(rebuild the index for the no-request funnel)", served.name, shortlist_dim)
            return None
        code = compact.binary_codes(np.asarray(full_vector, dtype=np.float32)[None, :], shortlist_dim,
                                    served.binary_centres[shortlist_dim])[0]
        rows = store.shortlist(code, shortlist_dim, size)
        rows, scores = store.top_rows(rows, full_vector, dim, k, served.similarities.get(dim, "dot_product"))
        return store.hits(rows, scores)

    def local_store(self, served: ServingIndex) -> RescoreStore | None:
        """The served index's rescoring store where ``serving.funnel_rescore`` is local (its document count asked
        of Elasticsearch when it is opened), or None: rescore in Elasticsearch (no matching store is logged once
        when found so and re-tried every 30 s, and counted, by :class:`StoreCache`)."""
        if self.settings.serving.funnel_rescore != "local":
            return None

        def count() -> int:
            with es_errors(self.settings.elasticsearch.url, "counting documents", keep_not_found=True):
                return int(self.client.count(index=served.name)["count"])

        return self.stores.get(served.name, served.model_uri, served.dims, count, served.binary_centres)

    def rescore_shortlist(self, served: ServingIndex, ids: list[str], full_vector, dim: int, k: int,
                          store: RescoreStore | None) -> tuple[list[Hit], str, float | None]:
        """The funnel's second stage: the best ``k`` of the shortlist ``ids`` with exact scores at ``dim``, from
        the local ``store`` (:meth:`local_store`; :meth:`rescore_locally`), else (None, or a store that lacks an id)
        by a second Elasticsearch request over the shortlist only.
        Returns (hits, "local" | "elasticsearch", that request's ``took``; None when no request was sent)."""
        local = None if store is None else self.rescore_locally(served, store, ids, full_vector, dim, k)
        if local is not None:
            return local, "local", None
        if not ids:
            return [], "elasticsearch", None
        response = self.client.search(index=served.name, **rescore_body(dim, full_vector, k, ids))
        return [hit_of(h) for h in response["hits"]["hits"]], "elasticsearch", float(response["took"])

    def rescore_locally(self, served: ServingIndex, store: RescoreStore, ids: list[str], full_vector, dim: int,
                        k: int) -> list[Hit] | None:
        """The best ``k`` of the shortlist ``ids`` scored at ``dim`` from the index's rescoring ``store``, or None
        when the store lacks one of them (logged; not used again until re-tried): rescore in Elasticsearch."""
        try:
            rows, scores = store.top(ids, full_vector, dim, k, served.similarities.get(dim, "dot_product"))
        except StoreMismatch as exc:
            self.stores.failed(served.name, exc)
            return None
        return store.hits(rows, scores)

    def retrieve_lexical(self, served: ServingIndex, query: str, k: int, clauses: list[dict[str, Any]] | None = None,
                         fields: list[str] | None = None) -> Retrieved:
        """BM25 alone (``multi_match`` over the lexical fields): the lexical side, for evaluation."""
        fields = fields or hybrid.lexical_fields(self.settings.serving.lexical_fields, served.lexical_fields)
        began = time.perf_counter()
        with es_errors(self.settings.elasticsearch.url, "search", keep_not_found=True):
            response = self.client.search(index=served.name, **hybrid.lexical_body(
                query, fields, k, clauses or [], self.settings.serving.lexical_type))
        return Retrieved(hits=[hit_of(h) for h in response["hits"]["hits"]],
                         timings_ms={"search": _ms_since(began), "es_took": float(response["took"])})

    def hybrid_sides(self, served: ServingIndex, query: str, full_vector, n: int, dim: int,
                     shortlist_dim: int | None = None, clauses: list[dict[str, Any]] | None = None,
                     num_candidates: int = 100, fields: list[str] | None = None) -> HybridSides:
        """The BM25 top ``n`` and the dense top ``n`` (kNN at ``dim``, or the funnel when ``shortlist_dim``
        is given), the same filter clauses on both sides. One ``_msearch`` carries both searches (the
        funnel's rescore is a second request, it needs the shortlist). No input checks: callers validate."""
        serving = self.settings.serving
        clauses = clauses or []
        fields = fields or hybrid.lexical_fields(serving.lexical_fields, served.lexical_fields)
        lexical = hybrid.lexical_body(query, fields, n, clauses, serving.lexical_type)
        shortlist_size = rescore = None
        if shortlist_dim is None:
            dense = knn_body(dim, conventions.truncate(full_vector, dim), n, max(n, num_candidates), clauses)
        else:
            dense, shortlist_size = shortlist_body(serving, served, full_vector, n, shortlist_dim, clauses,
                                                   num_candidates)
        began = time.perf_counter()
        timings: dict[str, float] = {}
        requests = 1
        with es_errors(self.settings.elasticsearch.url, "search", keep_not_found=True):
            answers = msearch_answers(self.client.msearch(
                searches=[{"index": served.name}, lexical, {"index": served.name}, dense]), served.name)
            took = max(float(a.get("took", 0)) for a in answers)
            lexical_raw, dense_raw = answers[0]["hits"]["hits"], answers[1]["hits"]["hits"]
            dense_hits = [hit_of(raw) for raw in dense_raw]
            if shortlist_dim is not None:
                timings["shortlist"] = _ms_since(began)
                ids = [hit.product_id for hit in dense_hits]  # exact scores at dim over them, as the funnel does
                dense_hits, rescore, rescore_took = self.rescore_shortlist(served, ids, full_vector, dim, n,
                                                                           self.local_store(served))
                if rescore_took is not None:  # a second request
                    took, requests = took + rescore_took, 2
        timings["search"] = _ms_since(began)
        timings["es_took"] = took
        hits: dict[str, Hit] = {}
        dense_side = [_ranked(hit, hits) for hit in dense_hits]  # dense first: its hit is kept
        lexical_side = [_ranked(hit_of(raw), hits) for raw in lexical_raw]
        return HybridSides(dense=dense_side, lexical=lexical_side, hits=hits, timings_ms=timings, requests=requests,
                           shortlist_size=shortlist_size, rescore=rescore)

    def retrieve_hybrid(self, served: ServingIndex, query: str, full_vector, k: int, dim: int,
                        shortlist_dim: int | None = None, clauses: list[dict[str, Any]] | None = None,
                        num_candidates: int = 100, fusion: str = "rrf") -> Retrieved:
        """:meth:`hybrid_sides` with top-N ``serving.hybrid_candidates`` (at least k), fused
        (:func:`near2_tasks.serving.hybrid.fuse`); a hit's score is its fused score."""
        serving = self.settings.serving
        n = min(max(k, serving.hybrid_candidates), serving.max_num_candidates)
        sides = self.hybrid_sides(served, query, full_vector, n, dim, shortlist_dim, clauses,
                                  max(n, num_candidates))
        began = time.perf_counter()
        weight, source = hybrid.weight_for(served, dim, serving.hybrid_weight)
        fused = hybrid.fuse(sides.dense, sides.lexical, fusion, rrf_k=serving.rrf_k, weight=weight)[:k]
        hits = [replace(sides.hits[f.product_id], score=round(f.score, 8)) for f in fused]
        timings = {**sides.timings_ms, "fusion": _ms_since(began)}
        info: dict[str, Any] = {"fusion": fusion, "candidates": n, "requests": sides.requests,
                                "dense_hits": len(sides.dense), "lexical_hits": len(sides.lexical),
                                "dense_ranks": [f.dense_rank for f in fused],
                                "lexical_ranks": [f.lexical_rank for f in fused]}
        if fusion == "rrf":
            info["rrf_k"] = serving.rrf_k
        else:
            info.update(weight=weight, weight_source=source)
        return Retrieved(hits=hits, timings_ms=timings, shortlist_size=sides.shortlist_size, hybrid=info,
                         rescore=sides.rescore)


def _ranked(hit: Hit, hits: dict[str, Hit]) -> tuple[str, float]:
    """(product id, score) of ``hit`` on its side; the first side to return a product keeps its hit."""
    hits.setdefault(hit.product_id, hit)
    return hit.product_id, hit.score


_CLIENTS: dict[str, Elasticsearch] = {}
_CLIENTS_LOCK = threading.Lock()


def _shared_client(settings: Settings) -> Elasticsearch:
    """One client per Elasticsearch configuration, so repeated calls reuse their connections."""
    key = settings.elasticsearch.model_dump_json()
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            _CLIENTS[key] = make_client(settings)
        return _CLIENTS[key]


def search(settings: Settings, query: str, k: int = 10, dim: int | None = None, mode: Mode | None = None,
           filters: SearchFilters | dict[str, Any] | None = None, num_candidates: int | None = None,
           *, searcher: Searcher | None = None, fusion: hybrid.Fusion | None = None) -> SearchResponse:
    """One storefront query. Without a ``searcher`` the alias is read afresh (the encoder and the
    client are still cached); the HTTP service passes its long-lived one."""
    searcher = searcher or Searcher(settings, client=_shared_client(settings))
    return searcher.search(query, k=k, dim=dim, mode=mode, filters=filters, num_candidates=num_candidates,
                           fusion=fusion)
