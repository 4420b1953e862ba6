"""The evaluation report: :class:`EvaluationReport` (``report.json``), its Markdown and its plot.

:func:`near2_tasks.evaluate.evaluation.evaluate_model` produces the report; this module reads and writes
it (JSON), renders it as Markdown (the overall table, the headline metric next to the references, one
table per query slice; :func:`slice_table` for the gate's summary) and plots NDCG@10 against dimension,
this model next to its references (champion, base). :func:`write_report` writes all three side by side.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from near2_tasks.errors import Near2Error
from near2_tasks.evaluate.retrieval import MetricValues
from near2_tasks.evaluate.slices import BUILTIN_SLICES

#: The metric plotted against dimension and compared in the Markdown summary.
HEADLINE_METRIC = "ndcg@10"


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
    #: hybrid-RRF of this model (gates.hybrid; near2_tasks.evaluate.hybrid), None when not measured
    hybrid: EvaluationReport | None = None

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
            **({"hybrid": self.hybrid.to_dict()} if self.hybrid is not None else {}),
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
                hybrid=cls.from_dict(data["hybrid"]) if data.get("hybrid") else None,
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
def format_value(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _metric_table(table: dict[int, MetricValues], metrics: Sequence[str]) -> list[str]:
    lines = ["| dim | " + " | ".join(metrics) + " |", "|---:|" + "---:|" * len(metrics)]
    for dim in sorted(table, reverse=True):
        lines.append(f"| {dim} | " + " | ".join(format_value(table[dim].get(m)) for m in metrics) + " |")
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
            cells = [format_value(ours)]
            for label in labels:
                theirs = report.references[label].dims.get(dim, {}).get(HEADLINE_METRIC)
                delta = "" if ours is None or theirs is None else f" ({ours - theirs:+.4f})"
                cells.append(format_value(theirs) + delta)
            lines.append(f"| {dim} | " + " | ".join(cells) + " |")
        lines += ["", "In brackets: this model minus the reference."]
    for name, table in report.slices.items():
        legend = BUILTIN_SLICES.get(name, "config slice")
        size = report.slice_sizes.get(name, 0)
        lines += ["", f"## Slice `{name}` ({legend}): {size} queries", ""]
        lines += _metric_table(table, report.metrics) if table else ["Empty: no query falls in this slice."]
    if report.hybrid is not None:  # gates.hybrid (near2_tasks.evaluate.hybrid)
        lines += ["", f"## Hybrid RRF: BM25 on `{report.hybrid.dataset.get('lexical_index')}` + exact search", "",
                  *_metric_table(report.hybrid.dims, report.metrics)]
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
            cells.append(format_value(ours) + delta)
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
