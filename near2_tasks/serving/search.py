"""Storefront search: encode the query with the serving index's own model, then kNN (or a funnel).

The alias target's ``_meta.model_uri`` names the model that encoded the documents; queries are
encoded by exactly that model (ARCHITECTURE.md invariant 3), loaded once per URI and cached. The target is
re-read every ``serving.alias_check_interval_s`` seconds, so when the alias moves to an index built
by a new model version, the next query uses the new model without a restart. Queries go to the
concrete index that was resolved, never to the alias, so a swap between "which model" and "which
documents" cannot pair a query with the wrong vectors.

Modes:
* ``knn``: one approximate kNN on ``embedding_<dim>``;
* ``funnel``: a kNN shortlist on a small dimension, then an exact kNN at the larger dimension
  restricted to the shortlist (an ``ids`` filter; Lucene scores a small filtered set exhaustively).
  When the index holds 1-bit codes of a dimension (``elasticsearch.binary_dims``), the shortlist
  compares codes by Hamming distance (``near2_tasks.serving.compact``: d/8 bytes per product).
* ``hybrid``: BM25 top-N over the lexical fields and kNN top-N at the dimension (or the funnel, with
  ``serving.hybrid_funnel``), in one ``_msearch``, fused in Python by reciprocal-rank fusion or a linear
  combination of min-max normalised scores with the weight the index ``_meta`` holds for the dimension
  (``near2_tasks.serving.hybrid``: why one request, the tie-breaking order).

Filters (category, brand, price range) run inside the kNN ``filter``, so k results come back even
when the filter is selective (and as the BM25 side's ``bool.filter`` in hybrid mode). Request bodies are built as structures, never from strings.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from near2_tasks import conventions

from near2_tasks.serving import compact

from near2_tasks.serving import hybrid
from near2_tasks.errors import Near2Error
from near2_tasks.serving.es_client import es_errors, make_client

if TYPE_CHECKING:
    from elasticsearch import Elasticsearch
    from sentence_transformers import SentenceTransformer

    from near2_tasks.config import Settings

log = logging.getLogger(__name__)

Mode = Literal["knn", "funnel", "hybrid"]
MODES = ("knn", "funnel", "hybrid")


class BadSearchRequest(Near2Error):
    """The request itself is wrong (the HTTP service answers 4xx); the message says how."""


class NoServingIndex(Near2Error):
    """The alias does not exist yet: nothing is served."""

    exit_code = 3


def _finite_number(value: Any) -> bool:
    """An int or float (not a bool) with a finite float value; a huge int overflows, it is not a crash."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@dataclass(frozen=True)
class SearchFilters:
    """Filters applied inside the kNN search."""

    category: str | None = None
    brand: str | None = None
    price_min: float | None = None
    price_max: float | None = None

    @classmethod
    def parse(cls, filters: SearchFilters | dict[str, Any] | None) -> SearchFilters:
        """From a dict (unknown keys are an error) or an instance; checks the price range."""
        if filters is None:
            return cls()
        if isinstance(filters, dict):
            known = set(cls.__dataclass_fields__)
            unknown = sorted(set(filters) - known, key=repr)  # keys of any type (repr: no str/int comparison)
            if unknown:
                raise BadSearchRequest(f"unknown filter(s) {unknown}", hint=f"filters are {sorted(known)}")
            filters = cls(**{key: value for key, value in filters.items() if value is not None})
        if not isinstance(filters, cls):
            raise BadSearchRequest(f"filters must be a mapping, got {type(filters).__name__}",
                                   hint="e.g. {'category': 'Tools', 'price_max': 100}")
        for name in ("price_min", "price_max"):
            value = getattr(filters, name)
            if value is not None and not _finite_number(value):
                raise BadSearchRequest(f"{name} must be a finite number, got {value!r}"[:200])
        for name in ("category", "brand"):
            value = getattr(filters, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise BadSearchRequest(f"{name} must be a non-empty string")
        if filters.price_min is not None and filters.price_max is not None and filters.price_min > filters.price_max:
            raise BadSearchRequest(f"price_min {filters.price_min} is above price_max {filters.price_max}")
        return filters

    def clauses(self) -> list[dict[str, Any]]:
        """Elasticsearch filter clauses (term / range), as structures."""
        clauses: list[dict[str, Any]] = []
        if self.category is not None:
            clauses.append({"term": {"category": self.category}})
        if self.brand is not None:
            clauses.append({"term": {"brand": self.brand}})
        price: dict[str, float] = {}
        if self.price_min is not None:
            price["gte"] = float(self.price_min)
        if self.price_max is not None:
            price["lte"] = float(self.price_max)
        if price:
            clauses.append({"range": {"price": price}})
        return clauses

    def active(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass(frozen=True)
class Hit:
    product_id: str
    title: str
    score: float
    category: str | None = None
    brand: str | None = None
    price: float | None = None


@dataclass
class SearchResponse:
    query: str
    k: int
    dim: int
    mode: str
    index: str
    model_name: str | None
    model_version: str | None
    model_uri: str | None
    hits: list[Hit]
    timings_ms: dict[str, float]
    filters: dict[str, Any] = field(default_factory=dict)
    shortlist_dim: int | None = None
    shortlist_size: int | None = None
    #: mode=hybrid only: fusion, rrf_k or weight (and where the weight came from), per-side hit counts
    hybrid: dict[str, Any] | None = None
    #: whether the query vector came from the searcher's cache (None: ``serving.query_cache_size`` is 0)
    query_cached: bool | None = None

    def to_dict(self, include_model_uri: bool = True) -> dict[str, Any]:
        data = asdict(self)
        if not include_model_uri:
            data.pop("model_uri")
        return data


@dataclass
class Retrieved:
    hits: list[Hit]
    timings_ms: dict[str, float]
    shortlist_size: int | None = None
    hybrid: dict[str, Any] | None = None


@dataclass
class HybridSides:
    """The two rankings of a hybrid search before fusion, best first, and every hit by product id."""

    dense: list[tuple[str, float]]
    lexical: list[tuple[str, float]]
    hits: dict[str, Hit]
    timings_ms: dict[str, float]
    requests: int
    shortlist_size: int | None = None


class IndexVanished(Near2Error):
    """An ``_msearch`` item answered index_not_found: the alias moved and the old index was deleted."""


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

    @property
    def full_dim(self) -> int:
        return self.dims[0]

    def bytes_per_product(self, dim: int) -> float:
        """Bytes of ``embedding_<dim>`` that a kNN search reads per product (see :func:`vector_bytes`)."""
        return vector_bytes(self.index_types.get(dim, "hnsw"), dim)


def vector_bytes(index_type: str, dim: int) -> float:
    """Bytes per vector of a ``dense_vector`` field searched with ``index_type``, by Elasticsearch's sizing
    formula: float 4·d, int8 d+4, int4 d/2+4, bbq d/8+14 (the quantized copy search reads; the HNSW graph,
    about 4·m bytes more, is not counted). 1-bit codes (``near2_tasks.serving.compact``) cost d/8."""
    kind = index_type.split("_")[0]
    return {"int8": dim + 4, "int4": dim / 2 + 4, "bbq": dim / 8 + 14, "bits": dim / 8}.get(kind, 4 * dim)


# One loaded encoder per (model URI, device), shared by every Searcher in the process.
_ENCODERS: OrderedDict[tuple[str, str], SentenceTransformer] = OrderedDict()
_ENCODERS_LOCK = threading.Lock()


def encoder_for(settings: Settings, model_uri: str) -> SentenceTransformer:
    """The query encoder for ``model_uri``, loaded once (LRU of ``serving.encoder_cache_size`` models)."""
    from near2_tasks.models.backends import load_inference_encoder, resolved_backend

    cfg = settings.model
    backend = resolved_backend(cfg)
    key = (model_uri, cfg.device, backend, cfg.quantize, cfg.precision)
    with _ENCODERS_LOCK:
        if key in _ENCODERS:
            _ENCODERS.move_to_end(key)
            return _ENCODERS[key]
        # never export at request time: without the backend's artefact, serve the fp32 model (warned).
        # torch threads are set per request (torch_threads); an exported backend gets its own at load.
        threads = None if backend == "torch" else settings.serving.encode_threads
        model = load_inference_encoder(settings, model_uri, missing="torch", threads=threads)
        _ENCODERS[key] = model
        while len(_ENCODERS) > settings.serving.encoder_cache_size:
            _ENCODERS.popitem(last=False)
        return model


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch threads, then restore. One query is too small to split: with the
    default thread pool it took ~840 ms instead of ~37 ms on a busy 2-core host (BENCHMARKS.md)."""
    if threads is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    if previous == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
        from elasticsearch import NotFoundError

        alias = self.settings.elasticsearch.alias
        with es_errors(self.settings.elasticsearch.url, "reading the serving alias"):
            try:
                targets = list(self.client.indices.get_alias(name=alias).keys())
            except NotFoundError:
                targets = []
            if len(targets) != 1:
                raise NoServingIndex(
                    f"alias {alias!r} points at {'no index' if not targets else f'{len(targets)} indices'}",
                    hint="build and swap an index first: near2 index --model MODEL --catalog PATH",
                )
            name = targets[0]
            if self._serving is not None and self._serving.name == name:
                return self._serving  # _meta of a built index does not change what search needs
        return self.serving_index_of(name)

    def serving_index_of(self, name: str) -> ServingIndex:
        """What search needs to know about the concrete index ``name`` (served or not: tuning and
        evaluation query an index before the swap)."""
        alias = self.settings.elasticsearch.alias
        with es_errors(self.settings.elasticsearch.url, f"reading the mapping of {name}"):
            mapping = next(iter(self.client.indices.get_mapping(index=name).values()))["mappings"]
        meta = mapping.get("_meta") or {}
        dims = [int(d) for d in meta.get("dims") or []]
        if not dims or not meta.get("model_uri"):
            raise Near2Error(f"index {name} behind alias {alias!r} has no model_uri/dims in its _meta",
                             hint="rebuild it with near2 index (it records the model)")
        log.info("serving index %s (model %s v%s)", name, meta.get("model_name"), meta.get("model_version"))
        centres = {int(d): np.asarray(c, dtype=np.float32)
                   for d, c in (meta.get(compact.META_CENTRES) or {}).items()}
        properties = mapping.get("properties") or {}
        index_types = {d: (properties.get(conventions.vector_field(d), {}).get("index_options") or {}).get(
            "type", "hnsw") for d in dims}
        lexical = tuple(meta.get(conventions.META_LEXICAL_FIELDS) or ("title",))
        weights = {int(d): float(w) for d, w in (meta.get(conventions.META_HYBRID_WEIGHTS) or {}).items()}
        return ServingIndex(alias=alias, name=name, dims=dims, model_uri=meta["model_uri"],
                            model_name=meta.get("model_name"), model_version=meta.get("model_version"),
                            binary_centres=centres, index_types=index_types, lexical_fields=lexical,
                            hybrid_weights=weights)

    def encoder(self, serving: ServingIndex) -> SentenceTransformer:
        return encoder_for(self.settings, serving.model_uri)

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
        model = self.encoder(served)
        with torch_threads(self.settings.serving.encode_threads):
            vector = np.asarray(encode(model, [query], batch_size=1)[0])
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

        query, k, mode, filters, num_candidates = self._validate(query, k, mode, filters, num_candidates)
        if fusion is not None and mode != "hybrid":
            raise BadSearchRequest(f"fusion applies to mode=hybrid only, not {mode}", hint="pass mode=hybrid")
        fusion = fusion or self.settings.serving.hybrid_fusion
        if fusion not in hybrid.FUSIONS:
            raise BadSearchRequest(f"unknown fusion {fusion!r}", hint=f"fusions are {list(hybrid.FUSIONS)}")
        try:
            return self._search(self.serving_index(), query, k, dim, mode, filters, num_candidates, fusion)
        except (NotFoundError, IndexVanished):  # the index was deleted right after the alias moved: follow it
            pass
        try:
            return self._search(self.serving_index(refresh=True), query, k, dim, mode, filters, num_candidates,
                                fusion)
        except (NotFoundError, IndexVanished) as exc:
            raise Near2Error(f"the index behind alias {self.settings.elasticsearch.alias!r} vanished twice "
                             "during the search", hint="check `near2 index status`") from exc

    def _validate(self, query, k, mode, filters, num_candidates):
        serving = self.settings.serving
        if not isinstance(query, str) or not query.strip():
            raise BadSearchRequest("the query is empty", hint="pass some words to search for")
        query = query.strip()
        if len(query) > serving.max_query_chars:
            raise BadSearchRequest(f"the query has {len(query)} characters, the limit is {serving.max_query_chars}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= serving.k_max:
            raise BadSearchRequest(f"k must be an integer from 1 to {serving.k_max}, got {k!r}")
        mode = mode or serving.mode
        if mode not in MODES:
            raise BadSearchRequest(f"unknown mode {mode!r}", hint=f"modes are {list(MODES)}")
        filters = SearchFilters.parse(filters)
        if num_candidates is None:
            num_candidates = max(k, self.settings.elasticsearch.num_candidates)
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or not (
                k <= num_candidates <= serving.max_num_candidates):
            raise BadSearchRequest(
                f"num_candidates must be an integer from k={k} to {serving.max_num_candidates}, got {num_candidates!r}")
        return query, k, mode, filters, num_candidates

    def pick_dims(self, served: ServingIndex, dim: int | None, mode: str) -> tuple[int, int | None]:
        """(scoring dim, shortlist dim or None) for this request against this index."""
        serving = self.settings.serving

        def check(d: int, what: str) -> int:
            if isinstance(d, bool) or not isinstance(d, int) or d not in served.dims:
                raise BadSearchRequest(f"{what} {d!r} is not served by index {served.name}",
                                       hint=f"served dims are {served.dims}")
            return d

        if dim is not None:
            dim = check(dim, "dim")
        if mode == "hybrid":  # the dense side is a kNN at dim, or the funnel
            mode = "funnel" if serving.hybrid_funnel else "knn"
        if mode == "knn":
            if dim is None:
                dim = serving.default_dim if serving.default_dim in served.dims else served.full_dim
            return dim, None
        if dim is None:
            dim = serving.funnel_rescore_dim if serving.funnel_rescore_dim in served.dims else served.full_dim
        coded = [d for d in served.binary_centres if d < dim]  # bit codes: the compact shortlist
        shortlist_dim = check(serving.funnel_shortlist_dim, "serving.funnel_shortlist_dim") \
            if serving.funnel_shortlist_dim is not None else max(coded) if coded else min(served.dims)
        if shortlist_dim >= dim:
            raise BadSearchRequest(f"funnel needs a shortlist dimension below the rescore dimension, got "
                                   f"{shortlist_dim} >= {dim}", hint=f"ask for a dim above {shortlist_dim}")
        return dim, shortlist_dim

    def _search(self, served: ServingIndex, query: str, k: int, dim: int | None, mode: str,
                filters: SearchFilters, num_candidates: int, fusion: str = "rrf") -> SearchResponse:
        dim, shortlist_dim = self.pick_dims(served, dim, mode)
        began = time.perf_counter()
        self.encoder(served)
        loaded = time.perf_counter()
        full, cached = self.query_vector(served, query)
        encoded = time.perf_counter()
        if mode == "hybrid":
            retrieved = self.retrieve_hybrid(served, query, full, k, dim, shortlist_dim, filters.clauses(),
                                             num_candidates, fusion)
        else:
            retrieved = self.retrieve(served, full, k, dim, shortlist_dim, filters.clauses(), num_candidates)
        done = time.perf_counter()
        timings = {"model_load": round((loaded - began) * 1000, 3), "encode": round((encoded - loaded) * 1000, 3),
                   **retrieved.timings_ms, "total": round((done - began) * 1000, 3)}
        return SearchResponse(
            query=query, k=k, dim=dim, mode=mode, index=served.name, model_name=served.model_name,
            model_version=served.model_version, model_uri=served.model_uri, hits=retrieved.hits,
            timings_ms=timings, filters=filters.active(), shortlist_dim=shortlist_dim,
            shortlist_size=retrieved.shortlist_size, hybrid=retrieved.hybrid,
            query_cached=cached if self.settings.serving.query_cache_size else None)

    def retrieve(self, served: ServingIndex, full_vector, k: int, dim: int, shortlist_dim: int | None = None,
                 clauses: list[dict[str, Any]] | None = None, num_candidates: int = 100) -> Retrieved:
        """The Elasticsearch part of a search, for a query vector already encoded at full dimension:
        kNN at ``dim``, or (``shortlist_dim`` given) the funnel. No input checks: callers validate."""
        clauses = clauses or []
        began = time.perf_counter()
        timings: dict[str, float] = {}
        shortlist_size = None
        with es_errors(self.settings.elasticsearch.url, "search", keep_not_found=True):
            if shortlist_dim is None:
                response = self.client.search(index=served.name, **knn_body(
                    dim, conventions.truncate(full_vector, dim), k, num_candidates, clauses))
                took = response["took"]
            else:
                body, shortlist_size = self._shortlist_body(served, full_vector, k, shortlist_dim, clauses,
                                                            num_candidates)
                ids, took = shortlist_ids(self.client, served.name, body)
                timings["shortlist"] = round((time.perf_counter() - began) * 1000, 3)
                response = {"hits": {"hits": []}}
                if ids:  # exact scores at the larger dimension, over the shortlist only
                    response = self.client.search(index=served.name, **rescore_body(dim, full_vector, k, ids))
                    took += response["took"]
        timings["search"] = round((time.perf_counter() - began) * 1000, 3)
        timings["es_took"] = float(took)
        return Retrieved(hits=[_hit(h) for h in response["hits"]["hits"]], timings_ms=timings,
                         shortlist_size=shortlist_size)

    def _shortlist_body(self, served: ServingIndex, full_vector, k: int, shortlist_dim: int,
                        clauses: list[dict[str, Any]], num_candidates: int) -> tuple[dict[str, Any], int]:
        """(the funnel's first-stage kNN body, its shortlist size): Hamming distance on the 1-bit codes of
        ``shortlist_dim`` when the index has them, else a float kNN at that dimension."""
        serving = self.settings.serving
        size = min(max(k, serving.funnel_shortlist_size), serving.max_num_candidates)
        candidates = max(size, num_candidates)
        if shortlist_dim in served.binary_centres:
            body = knn_body(shortlist_dim, None, size, candidates, clauses, source=False,
                            code=compact.query_code(full_vector, shortlist_dim, served.binary_centres[shortlist_dim]))
        else:
            body = knn_body(shortlist_dim, conventions.truncate(full_vector, shortlist_dim), size, candidates,
                            clauses, source=False)
        return body, size

    def retrieve_lexical(self, served: ServingIndex, query: str, k: int, clauses: list[dict[str, Any]] | None = None,
                         fields: list[str] | None = None) -> Retrieved:
        """BM25 alone (``multi_match`` over the lexical fields): the lexical side, for evaluation."""
        fields = fields or hybrid.lexical_fields(self.settings.serving.lexical_fields, served.lexical_fields)
        began = time.perf_counter()
        with es_errors(self.settings.elasticsearch.url, "search", keep_not_found=True):
            response = self.client.search(index=served.name, **hybrid.lexical_body(
                query, fields, k, clauses or [], self.settings.serving.lexical_type))
        return Retrieved(hits=[_hit(h) for h in response["hits"]["hits"]],
                         timings_ms={"search": round((time.perf_counter() - began) * 1000, 3),
                                     "es_took": float(response["took"])})

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
        shortlist_size = None
        if shortlist_dim is None:
            dense = knn_body(dim, conventions.truncate(full_vector, dim), n, max(n, num_candidates), clauses)
        else:
            dense, shortlist_size = self._shortlist_body(served, full_vector, n, shortlist_dim, clauses, num_candidates)
        began = time.perf_counter()
        timings: dict[str, float] = {}
        requests = 1
        with es_errors(self.settings.elasticsearch.url, "search", keep_not_found=True):
            response = self.client.msearch(searches=[{"index": served.name}, lexical, {"index": served.name}, dense])
            answers = response["responses"]
            for answer in answers:
                if "error" in answer:
                    error = answer["error"]
                    kind = error.get("type") if isinstance(error, dict) else None
                    if kind == "index_not_found_exception":
                        raise IndexVanished(f"index {served.name} no longer exists")
                    reason = error.get("reason") if isinstance(error, dict) else error
                    raise Near2Error(f"hybrid search on {served.name} failed: {kind}: {reason}"[:500])
            took = max(float(a.get("took", 0)) for a in answers)
            lexical_raw, dense_raw = answers[0]["hits"]["hits"], answers[1]["hits"]["hits"]
            if shortlist_dim is not None:
                timings["shortlist"] = round((time.perf_counter() - began) * 1000, 3)
                ids = [hit["_id"] for hit in dense_raw]
                dense_raw = []
                if ids:  # exact scores at dim over the shortlist, as the funnel does
                    rescored = self.client.search(index=served.name, **rescore_body(dim, full_vector, n, ids))
                    dense_raw = rescored["hits"]["hits"]
                    took += float(rescored["took"])
                    requests = 2
        timings["search"] = round((time.perf_counter() - began) * 1000, 3)
        timings["es_took"] = took
        hits: dict[str, Hit] = {}
        sides = []
        for raw_hits in (dense_raw, lexical_raw):
            side = []
            for raw in raw_hits:
                hit = _hit(raw)
                hits.setdefault(hit.product_id, hit)
                side.append((hit.product_id, hit.score))
            sides.append(side)
        return HybridSides(dense=sides[0], lexical=sides[1], hits=hits, timings_ms=timings, requests=requests,
                           shortlist_size=shortlist_size)

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
        timings = {**sides.timings_ms, "fusion": round((time.perf_counter() - began) * 1000, 3)}
        info: dict[str, Any] = {"fusion": fusion, "candidates": n, "requests": sides.requests,
                                "dense_hits": len(sides.dense), "lexical_hits": len(sides.lexical),
                                "dense_ranks": [f.dense_rank for f in fused],
                                "lexical_ranks": [f.lexical_rank for f in fused]}
        if fusion == "rrf":
            info["rrf_k"] = serving.rrf_k
        else:
            info.update(weight=weight, weight_source=source)
        return Retrieved(hits=hits, timings_ms=timings, shortlist_size=sides.shortlist_size, hybrid=info)


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


def _hit(raw: dict[str, Any]) -> Hit:
    source = raw.get("_source") or {}
    return Hit(product_id=source.get("product_id", raw["_id"]), title=source.get("title", ""),
               score=float(raw["_score"]), category=source.get("category"), brand=source.get("brand"),
               price=source.get("price"))


_CLIENTS: dict[str, Elasticsearch] = {}


def _shared_client(settings: Settings) -> Elasticsearch:
    """One client per Elasticsearch configuration, so repeated calls reuse their connections."""
    key = settings.elasticsearch.model_dump_json()
    with _ENCODERS_LOCK:
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
