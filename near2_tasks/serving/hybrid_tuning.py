"""Hybrid retrieval, measured: BM25, dense, hybrid-RRF and hybrid-linear evaluated through Elasticsearch
per dimension and query slice (:func:`evaluate_index`), and the linear weight tuned per dimension on the
validation split and stored in the index ``_meta`` (:func:`tune_weights`). The fusion itself, which
serving uses, is :mod:`near2_tasks.serving.hybrid`; this module sits above :mod:`near2_tasks.serving.search`, whose
``Searcher`` it drives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

from near2_tasks import conventions
from near2_tasks.errors import Near2Error
from near2_tasks.serving.hybrid import METHODS, fuse, lexical_fields, linear, weight_for

if TYPE_CHECKING:
    import pandas as pd
    from elasticsearch import Elasticsearch
    from sentence_transformers import SentenceTransformer

    from near2_tasks.config import Settings
    from near2_tasks.serving.index import BuiltIndex
    from near2_tasks.serving.search import Searcher

log = logging.getLogger(__name__)
# ----- evaluation through Elasticsearch ---------------------------------------------------------------------
@dataclass
class HybridEvaluation:
    """NDCG@k of BM25, dense, hybrid-RRF and hybrid-linear per dimension, overall and per query slice,
    with latencies (p50/p99 ms of the Elasticsearch part: requests + fusion; query encoding excluded)."""

    index: str
    n_queries: int
    k: int
    dims: list[int]
    weights: dict[int, float]
    rrf_k: float
    candidates: int
    slice_sizes: dict[str, int]
    #: method -> dim -> slice ("all", "short", ...) -> NDCG@k (None: no query of the slice counts)
    ndcg: dict[str, dict[int, dict[str, float | None]]]
    #: method -> dim -> {"p50": ms, "p99": ms}
    latency_ms: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    #: dim -> weight -> NDCG@k overall (the linear grid, when one was asked for)
    grid: dict[int, dict[float, float | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["grid"] = {str(d): {f"{w:.2f}": v for w, v in g.items()} for d, g in self.grid.items()}
        data["weights"] = {str(d): w for d, w in self.weights.items()}
        for key in ("ndcg", "latency_ms"):
            data[key] = {m: {str(d): v for d, v in table.items()} for m, table in data[key].items()}
        return data

    def markdown(self, slices: Sequence[str] = ("all", "short", "long", "alphanumeric")) -> str:
        sizes = ", ".join(f"{s} {self.slice_sizes.get(s, self.n_queries)}" for s in slices)
        lines = [f"NDCG@{self.k} on {self.n_queries} queries ({sizes}); top-{self.candidates} per side, "
                 f"rrf_k {self.rrf_k:g}",
                 "", "| dim | method | " + " | ".join(slices) + " | p50 ms | p99 ms |",
                 "|---:|---|" + "---:|" * (len(slices) + 2)]
        for dim in self.dims:
            for method in METHODS:
                if method not in self.ndcg:
                    continue
                label = f"{method} (w={self.weights[dim]:.1f})" if method == "hybrid_linear" else method
                values = " | ".join("–" if self.ndcg[method][dim].get(s) is None else f"{self.ndcg[method][dim][s]:.4f}"
                                    for s in slices)
                lat = self.latency_ms.get(method, {}).get(dim, {})
                lines.append(f"| {dim} | {label} | {values} | {lat.get('p50', '–')} | {lat.get('p99', '–')} |")
        return "\n".join(lines)


def evaluate_index(settings: Settings, products: pd.DataFrame, judgments: pd.DataFrame, *,
                   index_name: str | None = None, dims: Sequence[int] | None = None,
                   model: SentenceTransformer | None = None, grid: Sequence[float] | None = None,
                   weights: Mapping[int, float] | None = None, k: int | None = None,
                   searcher: Searcher | None = None, query_vectors: np.ndarray | None = None) -> HybridEvaluation:
    """Evaluate BM25, dense, hybrid-RRF and hybrid-linear through Elasticsearch, per dim and per slice.

    ``index_name``: the index to query (default: the alias target); ``products``: the catalog it holds
    (product ids map ranked hits to judgments); ``judgments``: one split (validation to tune, test to
    report). Requests go through the storefront's code (``Searcher.retrieve`` / ``retrieve_hybrid``), one
    query at a time, so the latencies are the serving path's. Dense: kNN top k; hybrid: top-N
    (``serving.hybrid_candidates``) per side, one ``_msearch``, RRF and linear fused from the same two
    lists. ``grid``: linear weights to score as well (tuning); ``weights``: the linear weight per dim
    (default: the index ``_meta``, else ``serving.hybrid_weight``).
    """
    from near2_tasks.models.embeddings import encode
    from near2_tasks.evaluate.evaluation import prepare_data
    from near2_tasks.serving.index import load_meta_model, prepare_products
    from near2_tasks.evaluate.retrieval import percentiles_ms, rows_of, score_rankings
    from near2_tasks.serving.search import Searcher
    from near2_tasks.evaluate.slices import slice_masks

    k = k or settings.evaluation.k
    searcher = searcher or Searcher(settings)
    served = searcher.serving_index_of(index_name) if index_name else searcher.serving_index(refresh=True)
    dims = sorted(set(dims or served.dims), reverse=True)
    unserved = [d for d in dims if d not in served.dims]
    if unserved:
        raise Near2Error(f"index {served.name} does not serve dims {unserved}", hint=f"it serves {served.dims}")
    products = prepare_products(products, settings.dataset.text_template)
    data = prepare_data(products, judgments, settings.dataset.text_template)
    if query_vectors is None:
        model = model or load_meta_model(settings, served.model_uri)
        query_vectors = encode(model, data.query_texts, batch_size=settings.model.encode_batch_size)
    serving = settings.serving
    candidates = min(max(k, serving.hybrid_candidates), serving.max_num_candidates)
    weights = {d: (weights or {}).get(d, weight_for(served, d, serving.hybrid_weight)[0]) for d in dims}
    fields = lexical_fields(serving.lexical_fields, served.lexical_fields)
    n = len(data.query_texts)
    methods = list(METHODS)
    #: method -> dim -> the product ids each query got (mapped to catalog rows by rows_of when scored)
    answers: dict[str, dict[int, list[list[str]]]] = {m: {d: [] for d in dims} for m in methods}
    grid = [float(w) for w in (grid or [])]
    grid_answers: dict[int, dict[float, list[list[str]]]] = {d: {w: [] for w in grid} for d in dims}
    seconds: dict[str, dict[int, list[float]]] = {m: {d: [] for d in dims} for m in methods}

    for i, (query, vector) in enumerate(zip(data.query_texts, query_vectors)):
        began = time.perf_counter()
        bm25 = searcher.retrieve_lexical(served, query, k, [], fields=fields)
        elapsed = time.perf_counter() - began
        for dim in dims:
            answers["bm25"][dim].append([h.product_id for h in bm25.hits])
            seconds["bm25"][dim].append(elapsed)
            began = time.perf_counter()
            dense = searcher.retrieve(served, vector, k, dim, None, [], max(k, settings.elasticsearch.num_candidates))
            seconds["dense"][dim].append(time.perf_counter() - began)
            answers["dense"][dim].append([h.product_id for h in dense.hits])
            began = time.perf_counter()
            sides = searcher.hybrid_sides(served, query, vector, candidates, dim, None, [],
                                          max(candidates, settings.elasticsearch.num_candidates), fields=fields)
            fetched = time.perf_counter() - began
            for fusion, method in (("rrf", "hybrid_rrf"), ("linear", "hybrid_linear")):
                began = time.perf_counter()
                fused = fuse(sides.dense, sides.lexical, fusion, rrf_k=serving.rrf_k, weight=weights[dim])
                seconds[method][dim].append(fetched + time.perf_counter() - began)
                answers[method][dim].append([f.product_id for f in fused[:k]])
            for w in grid:
                grid_answers[dim][w].append([f.product_id for f in linear(sides.dense, sides.lexical, w)[:k]])
        if (i + 1) % 200 == 0:
            log.info("hybrid evaluation: %d/%d queries", i + 1, n)

    floor, threshold = settings.dataset.relevance_floor, settings.dataset.relevant_threshold
    metric = f"ndcg@{k}"
    masks = slice_masks(data.query_texts, settings.evaluation.slices)

    def score(ids: list[list[str]]) -> dict[str, float | None]:
        overall, by_slice = score_rankings(data, rows_of(data, ids, k), [metric], floor, threshold, masks)
        return {"all": overall[metric], **{s: by_slice[s][metric] if s in by_slice else None for s in masks}}

    ndcg = {m: {d: score(answers[m][d]) for d in dims} for m in methods}
    grid_scores = {d: {w: score(grid_answers[d][w])["all"] for w in grid} for d in dims} if grid else {}
    latency = {m: {d: percentiles_ms(seconds[m][d]) for d in dims} for m in methods} if n else {}
    return HybridEvaluation(
        index=served.name, n_queries=n, k=k, dims=dims, weights=weights, rrf_k=serving.rrf_k,
        candidates=candidates, slice_sizes={"all": n, **{name: int(mask.sum()) for name, mask in masks.items()}},
        ndcg=ndcg, latency_ms=latency, grid=grid_scores)


def best_weight(scores: Mapping[float, float | None], default: float) -> float:
    """The weight with the highest score; ties: the one nearest ``default``, then the smaller."""
    counted = {w: s for w, s in scores.items() if s is not None}
    if not counted:
        return default
    top = max(counted.values())
    tied = [w for w, s in counted.items() if s >= top - 1e-12]
    return min(tied, key=lambda w: (abs(w - default), w))


@dataclass(frozen=True)
class TuningResult:
    index: str
    weights: dict[int, float]
    evaluation: HybridEvaluation | None


def tune_weights(settings: Settings, index_name: str, products: pd.DataFrame, validation: pd.DataFrame, *,
                 model: SentenceTransformer | None = None, client: Elasticsearch | None = None,
                 grid: Sequence[float] | None = None) -> TuningResult:
    """Tune the linear weight per dimension on the validation judgments and store it in the index ``_meta``.

    Call it after the build and before the swap (a served index's ``_meta`` is read once per index name).
    For each dim, every weight of ``grid`` (default ``evaluation.hybrid_weight_grid``) is scored by NDCG@k
    over the validation queries, through Elasticsearch; the best (ties: nearest ``serving.hybrid_weight``)
    goes into ``_meta.hybrid_weights`` and the grid's scores into ``_meta.hybrid_tuning``. No validation
    queries: nothing is written, serving uses ``serving.hybrid_weight``.
    """
    from near2_tasks.serving.es_client import es_errors, make_client
    from near2_tasks.serving.alias import meta_of
    from near2_tasks.serving.search import Searcher

    grid = sorted(set(float(w) for w in (grid or settings.evaluation.hybrid_weight_grid)))
    if not grid or any(not 0 <= w <= 1 for w in grid):
        raise Near2Error(f"hybrid weight grid must hold weights in [0, 1], got {grid}")
    if validation is None or validation.empty:
        log.warning("no validation judgments: %s keeps the default hybrid weight %.2f", index_name,
                    settings.serving.hybrid_weight)
        return TuningResult(index=index_name, weights={}, evaluation=None)
    client = client or make_client(settings)
    searcher = Searcher(settings, client=client)
    evaluation = evaluate_index(settings, products, validation, index_name=index_name, model=model, grid=grid,
                                searcher=searcher)
    default = settings.serving.hybrid_weight
    weights = {d: best_weight(evaluation.grid[d], default) for d in evaluation.dims}
    evaluation.weights = weights
    with es_errors(settings.elasticsearch.url, f"storing the hybrid weights of {index_name}"):
        meta = meta_of(client, index_name)
        meta[conventions.META_HYBRID_WEIGHTS] = {str(d): w for d, w in weights.items()}
        meta[conventions.META_HYBRID_TUNING] = {
            "split": "validation", "queries": evaluation.n_queries, "metric": f"ndcg@{evaluation.k}",
            "candidates": evaluation.candidates,
            "tuned_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "grid": {str(d): {f"{w:.2f}": None if s is None else round(s, 5) for w, s in g.items()}
                     for d, g in evaluation.grid.items()},
            "rrf": {str(d): evaluation.ndcg["hybrid_rrf"][d]["all"] for d in evaluation.dims},
        }
        client.indices.put_mapping(index=index_name, meta=meta)
    log.info("hybrid weights of %s: %s", index_name, weights)
    return TuningResult(index=index_name, weights=weights, evaluation=evaluation)


def weight_tuning(settings: Settings, products: pd.DataFrame,
                  validation: pd.DataFrame) -> Callable[[BuiltIndex, SentenceTransformer | None], BuiltIndex]:
    """A ``before_verify`` step for :func:`near2_tasks.serving.publish.build_verify_swap`: :func:`tune_weights` on the
    loaded index, whose ``_meta`` then carries ``hybrid_weights`` into verification and the swap."""
    from near2_tasks.serving.index import BuiltIndex

    def tune(built: BuiltIndex, model: SentenceTransformer | None) -> BuiltIndex:
        tuned = tune_weights(settings, built.name, products, validation, model=model)
        if not tuned.weights:
            return built
        return BuiltIndex(name=built.name, count=built.count, meta={
            **built.meta, conventions.META_HYBRID_WEIGHTS: {str(d): w for d, w in tuned.weights.items()}})

    return tune
