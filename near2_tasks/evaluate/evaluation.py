"""Offline evaluation per nested dimension: exact retrieval over the whole catalog, then ranking metrics.

For each dimension d, every judged query is scored against **every** catalog product by cosine similarity
of the truncated, re-normalised vectors (one batched matrix product per block of queries; Elasticsearch
is not involved, so the numbers measure the model, not the index). The top 100 products per query feed
:mod:`near2_tasks.evaluate.metrics`; results are reported overall and per query slice (:mod:`near2_tasks.evaluate.slices`).

Embeddings are computed once per model at the full dimension and cached on disk per (model version,
catalog texts) by :func:`near2_tasks.models.embeddings.encode_cached`, so re-evaluating the champion next to each
challenger costs only the matrix products.

Outputs: :class:`EvaluationReport` (``report.json``), a Markdown table and a PNG of NDCG@10 against
dimension (this model next to its references: champion, base), and MLflow metrics named
``eval_ndcg_at_10_dim_64`` (``eval_<slice>_ndcg_at_10_dim_64`` per slice). Which model a reference names,
and the key of its cached embeddings, is :func:`near2_tasks.models.refs.resolve_model`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from near2_tasks.models.backends import load_inference_encoder
from near2_tasks.conventions import metric_key
from near2_tasks.data.text import product_texts
from near2_tasks.models.embeddings import check_dims, encode_cached, model_dimension, texts_fingerprint
from near2_tasks.errors import Near2Error
from near2_tasks.evaluate.metrics import Qrels
from near2_tasks.evaluate.retrieval import ExactRetriever, evaluate_retriever, scale_of
from near2_tasks.evaluate.slices import BUILTIN_SLICES
from near2_tasks.models.refs import embedding_cache_dir, resolve_model

if TYPE_CHECKING:
    from near2_tasks.config import Settings

log = logging.getLogger(__name__)

#: The metric plotted against dimension and compared in the Markdown summary.
HEADLINE_METRIC = "ndcg@10"

MetricValues = dict[str, float | None]


# ----- the report ---------------------------------------------------------------------------------------
@dataclass
class EvaluationReport:
    """Metrics of one model per dimension, overall and per query slice, on one set of judgments.

    A metric is ``None`` when no query counts for it (e.g. a slice where no query has a relevant
    product); an empty slice has no dimensions at all (``slices["long"] == {}``) and ``slice_sizes``
    says 0. Nothing is ever NaN, so the JSON stays valid.
    """

    model: str
    dims: dict[int, MetricValues]
    slices: dict[str, dict[int, MetricValues]]
    slice_sizes: dict[str, int]
    n_queries: int
    k: int
    metrics: list[str]
    model_key: str = ""
    registered_model: str | None = None
    model_version: str | None = None
    run_id: str | None = None
    label: str | None = None
    dataset: dict[str, Any] = field(default_factory=dict)
    references: dict[str, EvaluationReport] = field(default_factory=dict)
    wall_time_s: float | None = None

    @property
    def display_name(self) -> str:
        if self.label:
            return self.label
        if self.registered_model and self.model_version:
            return f"{self.registered_model} v{self.model_version}"
        return self.model

    def value(self, metric: str, dim: int, slice_name: str | None = None) -> float | None:
        """One number; Near2Error when the report does not hold that metric, dimension or slice."""
        if slice_name is None:
            table = self.dims
        elif slice_name in self.slices:
            table = self.slices[slice_name]
            if not table:
                return None  # empty slice
        else:
            raise Near2Error(f"the report of {self.display_name} has no slice {slice_name!r}",
                             hint=f"slices in it: {sorted(self.slices)}")
        if dim not in table:
            raise Near2Error(f"the report of {self.display_name} has no dimension {dim}",
                             hint=f"dimensions in it: {sorted(table, reverse=True)}")
        if metric not in table[dim]:
            raise Near2Error(f"the report of {self.display_name} has no metric {metric!r}",
                             hint=f"metrics in it: {self.metrics} (evaluate with the cut-off the gate uses)")
        return table[dim][metric]

    # ----- JSON --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def by_dim(table: dict[int, MetricValues]) -> dict[str, MetricValues]:
            return {str(dim): dict(values) for dim, values in table.items()}

        return {
            "model": self.model,
            "label": self.label,
            "model_key": self.model_key,
            "registered_model": self.registered_model,
            "model_version": self.model_version,
            "run_id": self.run_id,
            "k": self.k,
            "metrics": list(self.metrics),
            "n_queries": self.n_queries,
            "dims": by_dim(self.dims),
            "slices": {name: by_dim(table) for name, table in self.slices.items()},
            "slice_sizes": dict(self.slice_sizes),
            "dataset": dict(self.dataset),
            "references": {label: ref.to_dict() for label, ref in self.references.items()},
            "wall_time_s": self.wall_time_s,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationReport:
        def by_dim(table: Mapping[str, Any]) -> dict[int, MetricValues]:
            return {int(dim): dict(values) for dim, values in table.items()}

        try:
            return cls(
                model=data["model"], dims=by_dim(data["dims"]),
                slices={name: by_dim(table) for name, table in data.get("slices", {}).items()},
                slice_sizes=dict(data.get("slice_sizes", {})), n_queries=int(data["n_queries"]),
                k=int(data.get("k", 10)), metrics=list(data.get("metrics", [])),
                model_key=data.get("model_key", ""), registered_model=data.get("registered_model"),
                model_version=data.get("model_version"), run_id=data.get("run_id"), label=data.get("label"),
                dataset=dict(data.get("dataset", {})),
                references={label: cls.from_dict(ref) for label, ref in data.get("references", {}).items()},
                wall_time_s=data.get("wall_time_s"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise Near2Error(f"not an evaluation report: {exc!r} is missing or malformed",
                             hint="pass a report.json written by `near2 evaluate`") from exc

    def write_json(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def read_json(cls, path: Path) -> EvaluationReport:
        path = Path(path)
        if not path.is_file():
            raise Near2Error(f"evaluation report {path} does not exist", hint="run `near2 evaluate` first")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise Near2Error(f"evaluation report {path} is not valid JSON: {exc}") from exc


# ----- Markdown and plot ------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _metric_table(table: dict[int, MetricValues], metrics: Sequence[str]) -> list[str]:
    lines = ["| dim | " + " | ".join(metrics) + " |", "|---:|" + "---:|" * len(metrics)]
    for dim in sorted(table, reverse=True):
        lines.append(f"| {dim} | " + " | ".join(_fmt(table[dim].get(m)) for m in metrics) + " |")
    return lines


def render_markdown(report: EvaluationReport) -> str:
    """The report as Markdown: overall table, the headline metric next to references, one table per slice."""
    data = report.dataset
    lines = [
        f"# Evaluation of {report.display_name}",
        "",
        f"Model `{report.model}`; {report.n_queries} judged queries, exact cosine over "
        f"{data.get('n_products', '?')} products; relevance floor {data.get('relevance_floor', '?')}, "
        f"relevant at >= {data.get('relevant_threshold', '?')}.",
        "",
        "## All queries",
        "",
        *_metric_table(report.dims, report.metrics),
    ]
    if report.references and HEADLINE_METRIC in report.metrics:
        labels = list(report.references)
        names = [report.references[label].display_name for label in labels]
        lines += ["", f"## {HEADLINE_METRIC} against the references", "",
                  "| dim | " + " | ".join([report.display_name, *names]) + " |",
                  "|---:|" + "---:|" * (len(labels) + 1)]
        for dim in sorted(report.dims, reverse=True):
            ours = report.dims[dim].get(HEADLINE_METRIC)
            cells = [_fmt(ours)]
            for label in labels:
                theirs = report.references[label].dims.get(dim, {}).get(HEADLINE_METRIC)
                delta = "" if ours is None or theirs is None else f" ({ours - theirs:+.4f})"
                cells.append(_fmt(theirs) + delta)
            lines.append(f"| {dim} | " + " | ".join(cells) + " |")
        lines += ["", "In brackets: this model minus the reference."]
    for name, table in report.slices.items():
        legend = BUILTIN_SLICES.get(name, "config slice")
        size = report.slice_sizes.get(name, 0)
        lines += ["", f"## Slice `{name}` ({legend}): {size} queries", ""]
        lines += _metric_table(table, report.metrics) if table else ["Empty: no query falls in this slice."]
    return "\n".join(lines) + "\n"


def slice_table(report: EvaluationReport, reference: str | None = None, metric: str = HEADLINE_METRIC) -> list[str]:
    """Markdown lines: ``metric`` per query slice (rows: all queries, then each slice) and dimension
    (columns, largest first), with the change against ``reference`` (a label in ``report.references``)."""
    dims = sorted(report.dims, reverse=True)
    theirs = report.references.get(reference) if reference else None
    rows: list[tuple[str, int, dict[int, MetricValues], dict[int, MetricValues]]] = [
        ("all queries", report.n_queries, report.dims, theirs.dims if theirs else {})]
    rows += [(f"`{name}`", report.slice_sizes.get(name, 0), table, theirs.slices.get(name, {}) if theirs else {})
             for name, table in report.slices.items()]
    lines = ["| slice | queries | " + " | ".join(f"{d}-d" for d in dims) + " |", "|---|---:|" + "---:|" * len(dims)]
    for name, size, table, reference_table in rows:
        cells = []
        for dim in dims:
            ours = table.get(dim, {}).get(metric)
            other = reference_table.get(dim, {}).get(metric)
            delta = "" if ours is None or other is None else f" ({ours - other:+.4f})"
            cells.append(_fmt(ours) + delta)
        lines.append(f"| {name} | {size} | " + " | ".join(cells) + " |")
    if theirs is not None:
        lines += ["", f"In brackets: this model minus the {theirs.display_name}."]
    return lines


def plot_by_dimension(reports: Mapping[str, EvaluationReport], path: Path, metric: str = HEADLINE_METRIC) -> Path:
    """One chart, one line per model: ``metric`` against dimension (log2 axis, largest dimension left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    all_dims: set[int] = set()
    for label, report in reports.items():
        points = [(dim, values.get(metric)) for dim, values in sorted(report.dims.items())]
        points = [(dim, value) for dim, value in points if value is not None]
        if points:
            all_dims.update(dim for dim, _ in points)
            axes.plot(*zip(*points), marker="o", label=label)
    axes.set_xscale("log", base=2)
    axes.set_xticks(sorted(all_dims), [str(d) for d in sorted(all_dims)])
    axes.invert_xaxis()
    axes.set_xlabel("embedding dimension")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} by nested dimension")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


@dataclass(frozen=True)
class ReportFiles:
    json: Path
    markdown: Path
    plot: Path

    def all(self) -> list[Path]:
        return [self.json, self.markdown, self.plot]


def write_report(report: EvaluationReport, output: Path) -> ReportFiles:
    """``output`` (report.json), plus ``<stem>.md`` and ``<stem>_ndcg_by_dim.png`` beside it."""
    output = Path(output)
    markdown = output.with_suffix(".md")
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(render_markdown(report))
    curves = {report.display_name: report, **{ref.display_name: ref for ref in report.references.values()}}
    plot = plot_by_dimension(curves, output.with_name(f"{output.stem}_ndcg_by_dim.png"))
    return ReportFiles(json=report.write_json(output), markdown=markdown, plot=plot)


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
                   reference_reports: Mapping[str, EvaluationReport] | None = None) -> EvaluationReport:
    """Evaluate one model at every dimension in ``dims`` (default: ``settings.model.dims``).

    ``model_ref``: a local directory, ``models:/...`` / ``runs:/...`` URI, the packaged base model or a
    hub id. ``reference_reports`` (e.g. ``{"champion": ..., "base": ...}``) are carried into the
    report for the Markdown comparison and the plot; they are not recomputed.
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
        log.info("dim %d: %s", dim, ", ".join(f"{n}={_fmt(v)}" for n, v in scores.dims[dim].items()))
    names, overall, per_slice = scores.metrics, scores.dims, scores.slices

    n_ideal = int((data.qrels.ideal_dcg(floor, k) > 0).sum())
    n_relevant = int((data.qrels.count_relevant(threshold) > 0).sum())
    return EvaluationReport(
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


# ----- MLflow --------------------------------------------------------------------------------------------
def mlflow_metrics(report: EvaluationReport) -> dict[str, float]:
    """``eval_ndcg_at_10_dim_64`` for all queries, ``eval_<slice>_ndcg_at_10_dim_64`` per slice."""
    values: dict[str, float] = {}
    for dim, metrics in report.dims.items():
        values.update({metric_key("eval", m, dim): v for m, v in metrics.items() if v is not None})
    for slice_name, table in report.slices.items():
        for dim, metrics in table.items():
            values.update({metric_key(f"eval_{slice_name}", m, dim): v for m, v in metrics.items() if v is not None})
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
