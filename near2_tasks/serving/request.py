"""A storefront search request and its answer: the modes, the filters, the input checks (query, k, mode,
fusion, num_candidates; which dims a request scores and shortlists at), the hits and the response.

Everything here is plain data and checks; :mod:`near2_tasks.serving.search` runs the request and
:mod:`near2_tasks.serving.query_bodies` turns it into Elasticsearch request bodies. A wrong request raises
:class:`BadSearchRequest` (the HTTP service answers 400 with its message).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from near2_tasks.errors import Near2Error
from near2_tasks.serving import hybrid

if TYPE_CHECKING:
    from near2_tasks.config import Settings
    from near2_tasks.serving.served_index import ServingIndex

Mode = Literal["knn", "funnel", "hybrid"]
MODES = ("knn", "funnel", "hybrid")


class BadSearchRequest(Near2Error):
    """The request itself is wrong (the HTTP service answers 4xx); the message says how."""


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
class SearchRequest:
    """A checked request, defaults filled in from ``serving`` settings (``dim`` is checked against the
    served index, by :func:`pick_dims`)."""

    query: str
    k: int
    mode: str
    filters: SearchFilters
    num_candidates: int
    fusion: str

    @classmethod
    def parse(cls, settings: Settings, query: Any, k: Any, mode: Any, filters: Any, num_candidates: Any,
              fusion: Any) -> SearchRequest:
        serving = settings.serving
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
            num_candidates = max(k, settings.elasticsearch.num_candidates)
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or not (
                k <= num_candidates <= serving.max_num_candidates):
            raise BadSearchRequest(
                f"num_candidates must be an integer from k={k} to {serving.max_num_candidates}, got {num_candidates!r}")
        if fusion is not None and mode != "hybrid":
            raise BadSearchRequest(f"fusion applies to mode=hybrid only, not {mode}", hint="pass mode=hybrid")
        fusion = fusion or serving.hybrid_fusion
        if fusion not in hybrid.FUSIONS:
            raise BadSearchRequest(f"unknown fusion {fusion!r}", hint=f"fusions are {list(hybrid.FUSIONS)}")
        return cls(query=query, k=k, mode=mode, filters=filters, num_candidates=num_candidates, fusion=fusion)


def pick_dims(settings: Settings, served: ServingIndex, dim: int | None, mode: str) -> tuple[int, int | None]:
    """(scoring dim, shortlist dim or None) for this request against this index."""
    serving = settings.serving

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
    #: funnel shortlists (mode=funnel, or a funnel dense side): where they were scored, local or elasticsearch
    rescore: str | None = None
    #: mode=funnel: where the shortlist came from, local (the store's bit codes) or elasticsearch (a kNN)
    shortlist: str | None = None

    def to_dict(self, include_model_uri: bool = True) -> dict[str, Any]:
        data = asdict(self)
        if not include_model_uri:
            data.pop("model_uri")
        return data


@dataclass
class Retrieved:
    """The Elasticsearch part of a search's answer (no encoding)."""

    hits: list[Hit]
    timings_ms: dict[str, float]
    shortlist_size: int | None = None
    hybrid: dict[str, Any] | None = None
    #: where a funnel scored its shortlist: local (the rescoring store) or elasticsearch (a second request)
    rescore: str | None = None
    #: where a funnel found its shortlist: local (the store's bit codes, no request) or elasticsearch
    shortlist: str | None = None


@dataclass
class HybridSides:
    """The two rankings of a hybrid search before fusion, best first, and every hit by product id."""

    dense: list[tuple[str, float]]
    lexical: list[tuple[str, float]]
    hits: dict[str, Hit]
    timings_ms: dict[str, float]
    requests: int
    shortlist_size: int | None = None
    rescore: str | None = None
