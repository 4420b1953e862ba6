"""The promotion stage's steps: the per-dimension gate, the reviewer's approval, the champion move."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from near2_tasks import conventions
from near2_tasks.models.registry import mlflow_run_url, mlflow_version_url
from near2_tasks.run import Result, StepContext, record, skip_rest

if TYPE_CHECKING:
    import pandas as pd

    from near2_tasks.config import Settings
    from near2_tasks.evaluate.report import EvaluationReport
    from near2_tasks.promote.gates import GateDecision

log = logging.getLogger(__name__)


def gate(ctx: StepContext, trained: Result, evaluation: Result) -> Result:
    """Apply ``settings.gates`` per dimension against the champion (or the base model) and record the
    decision on the version (tags ``gate.dim_<d>.<metric>``, ``gate``; the summary on its page).

    A failed gate ends the run as "not promoted": the reasons go to this log and to MLflow, and the
    DAG skips everything after this step, so neither the champion nor the alias moves.
    """
    return _gate(ctx, trained, evaluation)[2]


def _gate(ctx: StepContext, trained: Result, evaluation: Result) -> tuple[GateDecision, EvaluationReport, Result]:
    from near2_tasks.promote import gates
    from near2_tasks.evaluate.report import EvaluationReport

    settings = ctx.settings
    version = str(trained["model_version"])
    challenger = EvaluationReport.read_json(Path(evaluation["report"]))
    role = evaluation["reference"]
    reference = challenger.references[role]
    decision = gates.decide(challenger, reference, settings.gates, reference_role=role)
    gates.record_decision(settings, version, decision, challenger)
    out = Path(evaluation["report"]).parent
    (out / "gate.md").write_text(decision.markdown())
    (out / "gate.json").write_text(json.dumps(decision.to_dict(), indent=2) + "\n")
    if decision.passed:
        log.info("gate passed: challenger v%s against the %s (%s)", version, role, reference.display_name)
    else:
        log.warning("not promoted: challenger v%s failed the gate against the %s:\n  %s", version, role,
                    "\n  ".join(decision.reasons))
    return decision, challenger, record(ctx, "gate", {
        "passed": decision.passed, "status": decision.status, "reference": reference.display_name,
        "reference_role": role, "reasons": decision.reasons, "model_version": version,
        "summary": str(out / "gate.md"), "decision": str(out / "gate.json"),
        "links": {"MLflow model version": mlflow_version_url(settings, version),
                  "MLflow run": mlflow_run_url(settings, trained["run_id"])},
    })


@dataclass
class GateResult:
    """What :func:`gate_version` produced: the decision, the challenger's report and where it was written."""

    version: str
    decision: GateDecision
    report: EvaluationReport
    report_path: Path


def gate_version(settings: Settings, products: pd.DataFrame, judgments: pd.DataFrame,
                 version: str | int = "challenger", output_dir: Path | None = None,
                 run: StepContext | None = None) -> GateResult:
    """The DAG's ``evaluate`` and ``gate`` steps for a registered ``version`` (number or alias) on given
    frames: ``near2 gate`` (on the test split of the judgments it validated) and tests call this.

    The reference is the champion (unless ``version`` is the champion), else the base model. The
    challenger's report (with the references), ``gate.md`` and ``gate.json`` go to ``output_dir`` (default
    ``<home>/reports/v<version>``) and to its MLflow run; the step records to ``run``'s directory (default
    ``<home>/runs/near2_gate/v<version>``).
    """
    from near2_tasks.evaluate.step import evaluate_version
    from near2_tasks.models.registry import configure_mlflow, get_version, model_uri

    configure_mlflow(settings)
    registered = get_version(settings, version)
    number = str(registered.version)
    trained = {"model_version": number, "model_uri": model_uri(settings, number), "run_id": registered.run_id}
    run = run or StepContext(settings, dag_id="near2_gate", run_id=f"v{number}")
    evaluation = evaluate_version(run, products, judgments, trained,
                                  output_dir=Path(output_dir or settings.home / "reports" / f"v{number}"))
    decision, report, _ = _gate(run, trained, evaluation)
    return GateResult(version=number, decision=decision, report=report, report_path=Path(evaluation["report"]))


def approval_status(ctx: StepContext, trained: Result) -> Result:
    """The challenger's approval: ``auto`` (auto-approval on), ``approved``, ``rejected`` or ``pending``
    (the reviewer sets the version tag ``approval`` in the MLflow UI, or runs ``near2 approve``)."""
    from near2_tasks.promote import promotion

    status = promotion.promotion_status(ctx.settings, trained["model_version"])
    state = "auto" if status.auto_approved else status.approval
    if state == conventions.PENDING:
        log.info("waiting: %s", status.reason)
    return record(ctx, "approval", {"state": state, "model_version": status.version, "reason": status.reason})


def promote(ctx: StepContext, trained: Result) -> Result:
    """Make the challenger the champion; :func:`near2_tasks.promote.promotion.promote` refuses unless its gate
    passed and it is approved (ARCHITECTURE.md invariant 2). A rejected challenger ends the run here."""
    from near2_tasks.promote import promotion

    settings, version = ctx.settings, str(trained["model_version"])
    status = promotion.promotion_status(settings, version)
    if status.approval == conventions.REJECTED:
        skip_rest(f"not promoted: {status.reason}")
    move = promotion.promote(settings, version)
    if not move.moved:
        log.info("version %s is already the champion", version)
    return record(ctx, "promote", {
        "model_version": version, "model_uri": trained["model_uri"], "run_id": trained["run_id"],
        "previous_champion": move.previous, "moved": move.moved,
        "links": {"MLflow model version": mlflow_version_url(settings, version),
                  "MLflow run": mlflow_run_url(settings, trained["run_id"])},
    })

