"""Offline evaluation per nested dimension: exact retrieval over the whole catalog, then ranking metrics.

For each dimension d, every judged query is scored against **every** catalog product by cosine similarity
of the truncated, re-normalised vectors (one batched matrix product per block of queries; Elasticsearch
is not involved, so the numbers measure the model, not the index). The top 100 products per query feed
:mod:`near2_tasks.evaluate.metrics`; results are reported overall and per query slice (:mod:`near2_tasks.evaluate.slices`).

Embeddings are computed once per model at the full dimension and cached on disk per (model version,
catalog texts) by :func:`near2_tasks.models.embeddings.encode_cached`, so re-evaluating the champion next to each
challenger costs only the matrix products.

Outputs: an :class:`~near2_tasks.evaluate.report.EvaluationReport` (its JSON, Markdown and plot are in
:mod:`near2_tasks.evaluate.report`), and MLflow metrics named ``eval_ndcg_at_10_dim_64``
(``eval_<slice>_ndcg_at_10_dim_64`` per slice). Which model a reference names, and the key of its cached
embeddings, is :func:`near2_tasks.models.refs.resolve_model`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from near2_tasks.conventions import metric_key
from near2_tasks.data.text import product_texts
from near2_tasks.errors import Near2Error
from near2_tasks.evaluate.metrics import Qrels
from near2_tasks.evaluate.report import EvaluationReport, ReportFiles, format_value
from near2_tasks.evaluate.retrieval import ExactRetriever, evaluate_retriever, scale_of
from near2_tasks.models.backends import load_inference_encoder
from near2_tasks.models.embeddings import check_dims, encode_cached, model_dimension, texts_fingerprint
from near2_tasks.models.refs import embedding_cache_dir, resolve_model

if TYPE_CHECKING:
    from near2_tasks.config import Settings
    from near2_tasks.evaluate.hybrid import HybridEvaluation

log = logging.getLogger(__name__)


# ----- data --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvaluationData:
    """Catalog texts, one text per judged query, and the judgments as :class:`Qrels` over catalog rows."""

    product_texts: list[str]
    query_texts: list[str]
    qrels: Qrels
    n_judgments: int
    n_judgments_outside_catalog: int
    #: the catalog's product ids, row by row (Elasticsearch hits map back to rows through them)
    product_ids: list[str] = field(default_factory=list)

    @cached_property
    def row_of(self) -> dict[str, int]:
        """product id -> catalog row."""
        return {pid: row for row, pid in enumerate(self.product_ids)}


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise Near2Error(f"{what} lack the column(s) {missing}; they have {list(frame.columns)}",
                         hint="map the columns in config (dataset.catalog_columns / dataset.judgment_columns)")


def prepare_data(products: pd.DataFrame, judgments: pd.DataFrame, text_template: str) -> EvaluationData:
    """Match judgments to catalog rows. Products are embedded by their ``text`` column (as validation
    builds it), else by ``text_template`` (:mod:`near2_tasks.data.text`, the text training and indexing use).

    Judgments of products outside the catalog are dropped (and counted); none left is an error.
    Queries are identified by ``query_id`` when present, else by their text.
    """
    _require_columns(products, ["product_id", "title"], "the products")
    _require_columns(judgments, ["query", "product_id", "relevance"], "the judgments")
    if products.empty:
        raise Near2Error("the catalog is empty", hint="evaluate against the accepted catalog of `near2 validate`")
    if judgments.empty:
        raise Near2Error("the judgments are empty: there is no query to evaluate",
                         hint="pass graded (query, product, relevance) judgments")
    product_ids = products["product_id"].astype(str)
    duplicated = product_ids[product_ids.duplicated()]
    if len(duplicated):
        raise Near2Error(f"the catalog repeats {len(duplicated)} product_id(s), e.g. {duplicated.iloc[0]!r}",
                         hint="validate the catalog first (`near2 validate`)")
    relevance = pd.to_numeric(judgments["relevance"], errors="coerce")
    if relevance.isna().any():
        raise Near2Error(f"{int(relevance.isna().sum())} judgment(s) have a missing or non-numeric relevance",
                         hint="validate the judgments first (`near2 validate`)")

    row_of = pd.Series(np.arange(len(products)), index=product_ids.to_numpy())
    rows = row_of.reindex(judgments["product_id"].astype(str).to_numpy()).to_numpy()
    in_catalog = ~np.isnan(rows)
    if not in_catalog.any():
        raise Near2Error(
            f"none of the {len(judgments)} judgments refers to a product in the catalog "
            f"({len(products)} products; judged ids look like {judgments['product_id'].astype(str).iloc[0]!r}, "
            f"catalog ids like {product_ids.iloc[0]!r})",
            hint="pass the catalog the judgments were made on, or fix the product_id column mapping")
    kept = judgments.loc[in_catalog]
    query_key = kept["query_id"].astype(str) if "query_id" in kept.columns else kept["query"].astype(str)
    query_codes, query_keys = pd.factorize(query_key, sort=True)
    query_texts = kept["query"].astype(str).groupby(query_codes).first().tolist()
    qrels = Qrels.from_pairs(query_codes, rows[in_catalog].astype(np.int64), relevance[in_catalog].to_numpy(),
                             n_queries=len(query_keys), n_products=len(products))
    if "text" in products.columns:
        texts = products["text"].astype(str).tolist()
    else:
        texts = product_texts(products, text_template)
    return EvaluationData(
        product_texts=texts, query_texts=query_texts, qrels=qrels,
        n_judgments=int(in_catalog.sum()), n_judgments_outside_catalog=int((~in_catalog).sum()),
        product_ids=product_ids.tolist(),
    )


# ----- the entry point -----------------------------------------------------------------------------------
def evaluate_model(settings: Settings, model_ref: str, products: pd.DataFrame, judgments: pd.DataFrame,
                   dims: Sequence[int] | None = None, k: int = 10,
                   reference_reports: Mapping[str, EvaluationReport] | None = None,
                   hybrid: HybridEvaluation | None = None) -> EvaluationReport:
    """Evaluate one model at every dimension in ``dims`` (default: ``settings.model.dims``).

    ``model_ref``: a local directory, ``models:/...`` / ``runs:/...`` URI, the packaged base model or a
    hub id. ``reference_reports`` (e.g. ``{"champion": ..., "base": ...}``) are carried into the
    report for the Markdown comparison and the plot; they are not recomputed. ``hybrid``: also measure
    hybrid-RRF with these vectors into ``report.hybrid`` (gates.hybrid).
    """
    began = time.monotonic()
    if k <= 0:
        raise Near2Error(f"k must be positive, got {k}")
    dims = sorted(set(dims or settings.model.dims), reverse=True)
    if not dims or dims[-1] <= 0:
        raise Near2Error(f"dims must be positive integers, got {dims}")
    data = prepare_data(products, judgments, settings.dataset.text_template)
    resolved = resolve_model(settings, model_ref)
    log.info("loading %s", resolved.load_ref)
    model = load_inference_encoder(settings, resolved.load_ref, missing="export")  # model.backend
    check_dims(dims, model_dimension(model))

    cache_dir = embedding_cache_dir(settings)
    progress = sys.stderr.isatty()
    log.info("encoding %d products and %d queries (cache %s, key %s)", len(data.product_texts),
             len(data.query_texts), cache_dir, resolved.cache_key)
    catalog = encode_cached(model, resolved.cache_key, data.product_texts, cache_dir,
                            batch_size=settings.model.encode_batch_size, show_progress=progress)
    queries = encode_cached(model, resolved.cache_key, data.query_texts, cache_dir,
                            batch_size=settings.model.encode_batch_size, show_progress=progress)

    floor, threshold = settings.dataset.relevance_floor, settings.dataset.relevant_threshold
    scores = evaluate_retriever(ExactRetriever(catalog, settings.evaluation.query_batch_size), data, dims,
                                query_vectors=queries, k=k, **scale_of(settings))
    for dim in dims:
        log.info("dim %d: %s", dim, ", ".join(f"{n}={format_value(v)}" for n, v in scores.dims[dim].items()))
    names, overall, per_slice = scores.metrics, scores.dims, scores.slices

    n_ideal = int((data.qrels.ideal_dcg(floor, k) > 0).sum())
    n_relevant = int((data.qrels.count_relevant(threshold) > 0).sum())
    report = EvaluationReport(
        model=model_ref, dims=overall, slices=per_slice,
        slice_sizes=scores.slice_sizes,
        n_queries=len(data.query_texts), k=k, metrics=names, model_key=resolved.cache_key,
        registered_model=resolved.registered_model, model_version=resolved.version, run_id=resolved.run_id,
        dataset={
            "n_products": len(data.product_texts), "n_judgments": data.n_judgments,
            "judgments_outside_catalog": data.n_judgments_outside_catalog,
            "catalog_fingerprint": texts_fingerprint(data.product_texts),
            "queries_fingerprint": texts_fingerprint(data.query_texts),
            "relevance_floor": floor, "relevant_threshold": threshold,
            "queries_with_ideal_dcg": n_ideal, "queries_with_relevant": n_relevant,
        },
        references=dict(reference_reports or {}),
        wall_time_s=round(time.monotonic() - began, 2),
    )
    if hybrid is not None:
        report.hybrid = hybrid.evaluate(report, data, catalog, queries)
    return report


# ----- MLflow --------------------------------------------------------------------------------------------
def mlflow_metrics(report: EvaluationReport) -> dict[str, float]:
    """``eval_ndcg_at_10_dim_64`` for all queries, ``eval_<slice>_ndcg_at_10_dim_64`` per slice."""
    values: dict[str, float] = {}
    for dim, metrics in report.dims.items():
        values.update({metric_key("eval", m, dim): v for m, v in metrics.items() if v is not None})
    for slice_name, table in report.slices.items():
        for dim, metrics in table.items():
            values.update({metric_key(f"eval_{slice_name}", m, dim): v for m, v in metrics.items() if v is not None})
    if report.hybrid is not None:  # hybrid_ndcg_at_10_dim_64, hybrid_short_ndcg_at_10_dim_64
        values.update({"hybrid" + key[len("eval"):]: v for key, v in mlflow_metrics(report.hybrid).items()})
    return values


def log_evaluation(settings: Settings, report: EvaluationReport, files: ReportFiles | None = None) -> str:
    """Log the metrics (and the report files under ``evaluation/``) to MLflow; returns the run id.

    A registered or run-logged model gets them on its own training run, so the model version page links
    to them; any other model (the base model, a directory) gets a new run ``evaluate <model>``.
    """
    import mlflow

    from near2_tasks.models.registry import configure_mlflow

    configure_mlflow(settings)
    if report.run_id:
        run = mlflow.start_run(run_id=report.run_id)
    else:
        run = mlflow.start_run(run_name=f"evaluate {report.display_name}"[:250],
                               tags={"near2.stage": "evaluate", "near2.evaluated_model": report.model[:5000]})
    with run:
        mlflow.log_metrics(mlflow_metrics(report))
        for path in files.all() if files else []:
            mlflow.log_artifact(str(path), artifact_path="evaluation")
        return run.info.run_id
