"""The promotion gate: is the challenger at least as good as the reference at every dimension we serve?

The reference is the current champion, or the base model while there is no champion. Both are
evaluated on the same judgments (:mod:`near2_tasks.evaluate.evaluation`); :func:`decide` then applies
``settings.gates`` (:class:`near2_tasks.promote.settings.GateSettings`) at every evaluated dimension, to all queries
and to each configured query slice:

* ``floor``: the challenger's value must reach it;
* ``max_drop``: reference − challenger must not exceed it;
* ``max_relative_drop``: (reference − challenger) / reference must not exceed it.

The outcome, :class:`GateDecision`, holds every check with a one-line reason for each failure. It is
recorded on the model version (:func:`record_decision`): tags ``gate.dim_64.ndcg_at_10`` = pass|fail
(``gate.slice_short.dim_64.ndcg_at_10`` for slices) and ``gate`` = pass|fail, plus a Markdown summary
that reviewers read on the version page (its description) and as the run artifact ``gate/summary.md``.

With ``gates.hybrid`` set, the same rule kinds also apply to hybrid-RRF retrieval (BM25 fused with the
model's exact search, :mod:`near2_tasks.evaluate.hybrid`; the report's ``hybrid``) of the challenger against
the reference's: those checks have ``retriever = "hybrid"``, tags ``gate.hybrid.dim_64.ndcg_at_10``
(``gate.hybrid.slice_short.dim_64.ndcg_at_10``) and reasons starting ``hybrid RRF:``, in the same decision.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from near2_tasks.conventions import TAG_GATE, gate_tag, mlflow_name
from near2_tasks.errors import Near2Error
from near2_tasks.evaluate.report import EvaluationReport

if TYPE_CHECKING:
    import pandas as pd

    from near2_tasks.config import Settings

    from near2_tasks.promote.settings import GateRules, GateSettings, HybridGate, MetricGate

log = logging.getLogger(__name__)

PASS, FAIL = "pass", "fail"
CheckKind = Literal["floor", "max_drop", "max_relative_drop"]
#: Everything after this line of a version's description is rewritten by each gate run.
SUMMARY_MARKER = "<!-- near2 gate summary -->"
#: Where the evaluation's NDCG-by-dimension plot lies among the training run's artifacts.
PLOT_ARTIFACT = "evaluation/report_ndcg_by_dim.png"


def slice_gate_tag(slice_name: str, dim: int, metric: str) -> str:
    """``gate.slice_short.dim_64.ndcg_at_10``: the slice counterpart of :func:`conventions.gate_tag`."""
    return f"gate.slice_{slice_name}.dim_{dim}.{mlflow_name(metric)}"


@dataclass(frozen=True)
class GateCheck:
    """One rule applied to one number. ``passed`` is None when the check could not apply (skipped)."""

    dim: int
    metric: str
    slice: str | None  # None: all queries
    kind: CheckKind
    limit: float
    value: float | None
    reference: float | None
    passed: bool | None
    reason: str
    #: None: the model's exact search (the gate's own rules); "hybrid": hybrid RRF (``gates.hybrid``)
    retriever: str | None = None

    @property
    def scope(self) -> str:
        where = "all queries" if self.slice is None else f"slice {self.slice}"
        return where if self.retriever is None else f"{self.retriever}, {where}"

    @property
    def tag(self) -> str:
        tag = gate_tag(self.dim, self.metric) if self.slice is None else slice_gate_tag(self.slice, self.dim,
                                                                                         self.metric)
        return tag if self.retriever is None else tag.replace("gate.", f"gate.{self.retriever}.", 1)


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict on a challenger, with every check behind it."""

    challenger: str
    reference: str | None
    reference_role: Literal["champion", "base", "none"]
    checks: list[GateCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed is not False for check in self.checks)

    @property
    def status(self) -> str:
        return PASS if self.passed else FAIL

    @property
    def failures(self) -> list[GateCheck]:
        return [check for check in self.checks if check.passed is False]

    @property
    def reasons(self) -> list[str]:
        """One line per failed check."""
        return [check.reason for check in self.failures]

    def tags(self) -> dict[str, str]:
        """Version tags: one per (scope, dimension, metric), fail if any of its checks failed; and ``gate``."""
        tags: dict[str, str] = {}
        for check in self.checks:
            if tags.get(check.tag) != FAIL:
                tags[check.tag] = FAIL if check.passed is False else PASS
        tags[TAG_GATE] = self.status
        return tags

    def to_dict(self) -> dict:
        return {"status": self.status, "challenger": self.challenger, "reference": self.reference,
                "reference_role": self.reference_role, "reasons": self.reasons,
                "checks": [asdict(check) for check in self.checks]}

    def markdown(self) -> str:
        """The summary a reviewer reads before setting ``approval`` on the version page."""
        verdict = "PASSED" if self.passed else "FAILED"
        against = f"the {self.reference_role} ({self.reference})" if self.reference else "absolute floors only"
        lines = [f"## Gate {verdict}: {self.challenger} against {against}", ""]
        if self.failures:
            lines += ["Failed checks:", ""] + [f"- {reason}" for reason in self.reasons] + [""]
        skipped = [check for check in self.checks if check.passed is None]
        lines += ["| scope | dim | metric | check | challenger | reference | limit | result |",
                  "|---|---:|---|---|---:|---:|---:|---|"]
        for check in self.checks:
            result = "skipped" if check.passed is None else PASS if check.passed else f"**{FAIL}**"
            lines.append(f"| {check.scope} | {check.dim} | {check.metric} | {check.kind} | {_fmt(check.value)} | "
                         f"{_fmt(check.reference)} | {check.limit:g} | {result} |")
        if skipped:
            lines += ["", "Skipped: " + "; ".join(sorted({check.reason for check in skipped}))]
        lines += ["", "Approve by setting the tag `approval` = `approved` (or `rejected`) on this version, "
                      "or `near2 approve VERSION [--reject]`."]
        return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


# ----- the decision (pure) -------------------------------------------------------------------------------
def _configured(rule: MetricGate) -> list[tuple[CheckKind, float]]:
    kinds: list[tuple[CheckKind, float | None]] = [
        ("floor", rule.floor), ("max_drop", rule.max_drop), ("max_relative_drop", rule.max_relative_drop)]
    return [(kind, limit) for kind, limit in kinds if limit is not None]


def _checks_for(rule: MetricGate, *, dim: int, metric: str, slice_name: str | None, value: float | None,
                reference: float | None, reference_label: str, tolerance: float) -> list[GateCheck]:
    where = f"dim {dim} {metric}" + ("" if slice_name is None else f" on slice {slice_name}")
    checks: list[GateCheck] = []

    def add(kind: CheckKind, limit: float, passed: bool | None, reason: str) -> None:
        checks.append(GateCheck(dim=dim, metric=metric, slice=slice_name, kind=kind, limit=limit, value=value,
                                reference=reference, passed=passed, reason=reason))

    if rule.floor is not None:
        if value is None:
            add("floor", rule.floor, False, f"{where}: no query counts for this metric, cannot reach the floor "
                                            f"{rule.floor:g}")
        else:
            ok = value >= rule.floor - tolerance
            add("floor", rule.floor, ok, f"{where} = {value:.4f} is below the floor {rule.floor:g}")
    for kind, limit in (("max_drop", rule.max_drop), ("max_relative_drop", rule.max_relative_drop)):
        if limit is None:
            continue
        if value is None or reference is None:
            add(kind, limit, None, f"{where}: no {'challenger' if value is None else 'reference'} value to compare")
            continue
        drop = reference - value
        if kind == "max_drop":
            ok = drop <= limit + tolerance
            reason = (f"{where} = {value:.4f} dropped {drop:.4f} below the {reference_label} ({reference:.4f}); "
                      f"at most {limit:g} allowed")
        else:
            relative = drop / reference if reference > 0 else (0.0 if drop <= 0 else float("inf"))
            ok = relative <= limit + tolerance
            reason = (f"{where} = {value:.4f} dropped {relative:.1%} below the {reference_label} "
                      f"({reference:.4f}); at most {limit:.1%} allowed")
        add(kind, limit, ok, reason)
    return checks


def _check_same_data(challenger: EvaluationReport, reference: EvaluationReport) -> None:
    for key in ("catalog_fingerprint", "queries_fingerprint"):
        ours, theirs = challenger.dataset.get(key), reference.dataset.get(key)
        if ours and theirs and ours != theirs:
            raise Near2Error(
                f"{challenger.display_name} and {reference.display_name} were evaluated on different data "
                f"({key} {ours} != {theirs}); a gate compares like with like",
                hint="evaluate both on the same catalog and judgments (`near2 gate` does)")


def decide(challenger: EvaluationReport, reference: EvaluationReport | None, gates: GateSettings,
           reference_role: Literal["champion", "base"] = "champion") -> GateDecision:
    """Apply ``gates`` at every dimension of ``challenger``'s report, overall and per configured slice."""
    if reference is not None:
        _check_same_data(challenger, reference)
    label = reference_role if reference is not None else "reference"
    scopes: list[tuple[str | None, GateRules]] = [(None, gates.overall), *gates.slices.items()]
    for slice_name, _ in scopes:
        if slice_name is not None and slice_name not in challenger.slices:
            raise Near2Error(f"the gate names slice {slice_name!r}, which the evaluation does not report",
                             hint=f"slices evaluated: {sorted(challenger.slices)}; define extra slices under "
                                  "evaluation.slices")
    checks: list[GateCheck] = []
    for dim in sorted(challenger.dims, reverse=True):
        for slice_name, rules in scopes:
            for metric, rule in rules.rules_at(dim).items():
                if slice_name is not None and not challenger.slices[slice_name]:
                    checks.extend(
                        GateCheck(dim=dim, metric=metric, slice=slice_name, kind=kind, limit=limit, value=None,
                                  reference=None, passed=None, reason=f"slice {slice_name} is empty: no query to judge")
                        for kind, limit in _configured(rule))
                    continue
                value = challenger.value(metric, dim, slice_name)
                theirs = None
                if reference is not None and dim in reference.dims:
                    theirs = reference.value(metric, dim, slice_name)
                checks.extend(_checks_for(rule, dim=dim, metric=metric, slice_name=slice_name, value=value,
                                          reference=theirs, reference_label=label, tolerance=gates.tolerance))
    if gates.hybrid is not None:
        checks.extend(_hybrid_checks(challenger, reference, gates.hybrid, reference_role, gates.tolerance))
    return GateDecision(
        challenger=challenger.display_name, reference=reference.display_name if reference else None,
        reference_role=reference_role if reference is not None else "none", checks=checks)


def _hybrid_checks(challenger: EvaluationReport, reference: EvaluationReport | None, rules: HybridGate,
                   reference_role: Literal["champion", "base"], tolerance: float) -> list[GateCheck]:
    """``gates.hybrid`` applied to the reports' hybrid RRF (:func:`decide` on their ``hybrid``), marked hybrid."""
    from near2_tasks.promote.settings import GateSettings

    for report in (challenger, reference):
        if report is not None and report.hybrid is None:
            raise Near2Error(f"gates.hybrid is set, but the report of {report.display_name} has no hybrid metrics",
                             hint="evaluate with gates.hybrid set (`near2 gate` or the DAG's evaluate step do)")
    inner = decide(challenger.hybrid, None if reference is None else reference.hybrid,
                   GateSettings(overall=rules.overall, slices=rules.slices, tolerance=tolerance), reference_role)
    return [replace(check, retriever="hybrid", reason=f"hybrid RRF: {check.reason}") for check in inner.checks]


# ----- recording the decision on the model version ----------------------------------------------------------
def _description_with_summary(description: str | None, summary: str) -> str:
    """Keep what others wrote in the version description; replace our previous summary."""
    kept = (description or "").split(SUMMARY_MARKER)[0].rstrip()
    return (kept + "\n\n" if kept else "") + SUMMARY_MARKER + "\n" + summary


def reviewer_details(settings: Settings, report: EvaluationReport, reference: str | None,
                     run_id: str | None) -> str:
    """What a reviewer reads under the gate table: NDCG@10 per query slice and dimension, and a link to
    the NDCG-by-dimension plot among the run's artifacts (``evaluation/report_ndcg_by_dim.png``)."""
    from near2_tasks.evaluate.report import HEADLINE_METRIC, slice_table

    lines = [f"## {HEADLINE_METRIC} by query slice and dimension", "", *slice_table(report, reference)]
    if run_id:
        from near2_tasks.models.registry import mlflow_run_url

        plot = f"{mlflow_run_url(settings, run_id)}/artifacts/{PLOT_ARTIFACT}"
        lines += ["", f"Plot: [{HEADLINE_METRIC} by dimension, against the references]({plot}) "
                      f"(the run's artifact `{PLOT_ARTIFACT}`)."]
    return "\n".join(lines) + "\n"


def record_decision(settings: Settings, version: str | int, decision: GateDecision,
                    report: EvaluationReport | None = None) -> None:
    """Tag the version (``gate.dim_<d>.<metric>``, ``gate``), put the summary on its page (description)
    and log it to its run as ``gate/summary.md`` and ``gate/decision.json``. With the challenger's
    ``report``, the description also carries its slice table and a link to its plot (:func:`reviewer_details`).

    Tags of an earlier gate run are removed first, so the version shows this decision only. ``gate`` is
    written last: promotion reads it, and it must never describe checks that are not recorded yet.
    """
    from near2_tasks.models.registry import client

    registry = client(settings)
    name = settings.mlflow.registered_model
    current = registry.get_model_version(name, str(version))
    for tag in current.tags:
        if tag == TAG_GATE or tag.startswith("gate."):
            registry.delete_model_version_tag(name, str(version), tag)
    tags = decision.tags()
    for tag, value in tags.items():
        if tag != TAG_GATE:
            registry.set_model_version_tag(name, str(version), tag, value)
    summary = decision.markdown()
    page = summary
    if report is not None:
        reference = next((key for key, ref in report.references.items() if ref.display_name == decision.reference),
                         None)
        page += "\n" + reviewer_details(settings, report, reference, current.run_id)
    registry.update_model_version(name, str(version), description=_description_with_summary(current.description,
                                                                                           page))
    if current.run_id:
        registry.log_text(current.run_id, summary, "gate/summary.md")
        registry.log_dict(current.run_id, decision.to_dict(), "gate/decision.json")
    registry.set_model_version_tag(name, str(version), TAG_GATE, tags[TAG_GATE])


# ----- what the evaluate and gate steps ask -------------------------------------------------------------
def version_dims(settings: Settings, tags: Mapping[str, str]) -> list[int]:
    """The dimensions a version serves: its ``dims`` tag (``"384,256,..."``), else the configured ones."""
    from near2_tasks.conventions import TAG_DIMS

    raw = tags.get(TAG_DIMS)
    if not raw:
        return list(settings.model.dims)
    try:
        return sorted({int(part) for part in raw.split(",") if part.strip()}, reverse=True)
    except ValueError as exc:
        raise Near2Error(f"the version's {TAG_DIMS} tag {raw!r} is not a comma-separated list of integers") from exc


def current_champion(settings: Settings):
    """The version the ``champion`` alias points at, or None when there is none yet."""
    from mlflow.exceptions import MlflowException

    from near2_tasks.conventions import CHAMPION
    from near2_tasks.models.registry import client

    try:
        return client(settings).get_model_version_by_alias(settings.mlflow.registered_model, CHAMPION)
    except MlflowException as exc:
        # "no such model" / "no such alias" mean no champion yet; anything else (the tracking
        # server down, say) must not silently turn the gate into a comparison with the base model
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def evaluate_with_references(settings: Settings, challenger_ref: str, version: str | int, products: pd.DataFrame,
                             judgments: pd.DataFrame, dims: list[int]) -> tuple[EvaluationReport, str | None]:
    """The challenger ``version`` (loaded from ``challenger_ref``) evaluated on ``judgments`` with its
    references in ``report.references``: the champion, when there is one and it is another version, and
    the base model (``settings.model.base_model``, also for the plot), all at the same dims and k; with
    ``gates.hybrid`` set, each also with its hybrid RRF (``report.hybrid``).
    Returns (report, the champion's version or None). The DAG's evaluate step and ``near2 gate`` both
    call this; :func:`reference_role` says which reference the gate compares with."""
    from near2_tasks.evaluate.evaluation import evaluate_model
    from near2_tasks.models.registry import model_uri

    hybrid = None
    if settings.gates.hybrid is not None:  # the lexical index first: Elasticsearch down fails before any encoding
        from near2_tasks.evaluate.hybrid import HybridEvaluation

        hybrid = HybridEvaluation.of_catalog(settings, products)

    def run(ref: str, label: str, references: Mapping[str, EvaluationReport] | None = None) -> EvaluationReport:
        log.info("evaluating %s (%s)", label, ref)
        report = evaluate_model(settings, ref, products, judgments, dims=dims, k=settings.evaluation.k,
                                reference_reports=references, hybrid=hybrid)
        report.label = label
        return report

    references: dict[str, EvaluationReport] = {}
    champion = current_champion(settings)
    champion_number = None if champion is None else str(champion.version)
    if champion_number is not None and champion_number != str(version):
        references["champion"] = run(model_uri(settings, champion_number), f"champion v{champion_number}")
    references["base"] = run(settings.model.base_model, "base")
    return run(challenger_ref, f"challenger v{version}", references), champion_number


def reference_role(report: EvaluationReport) -> Literal["champion", "base"]:
    """The reference a gate compares with: the champion when the report has one, else the base model."""
    return "champion" if "champion" in report.references else "base"
