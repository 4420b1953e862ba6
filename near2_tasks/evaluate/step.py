"""The evaluation stage's step: challenger, champion and base model per dimension on the test split."""

from __future__ import annotations

import logging

from near2_tasks.data.step import accepted
from near2_tasks.models.registry import mlflow_run_url, mlflow_version_url
from near2_tasks.run import Result, StepContext, record
from near2_tasks.train.step import split_frame

log = logging.getLogger(__name__)


def evaluate(ctx: StepContext, validation: Result, examples: Result, trained: Result) -> Result:
    """Evaluate the challenger, the champion (if any) and the base model per dimension on the held-out
    test queries; the challenger's report (with the others as references) goes to its MLflow run."""
    from near2_tasks.evaluate.evaluation import log_evaluation
    from near2_tasks.evaluate.report import write_report
    from near2_tasks.promote.gates import evaluate_with_references, reference_role

    settings = ctx.settings
    products, _ = accepted(validation)
    test = split_frame(examples, "test")
    version = str(trained["model_version"])
    out = ctx.run_dir / "evaluation"
    dims = settings.model.dims
    challenger, champion = evaluate_with_references(settings, trained["model_uri"], version, products, test, dims)
    references = challenger.references
    files = write_report(challenger, out / "report.json")
    log_evaluation(settings, challenger, files)
    return record(ctx, "evaluate", {
        "report": str(files.json), "plot": str(files.plot),
        "reference": reference_role(challenger), "champion_version": champion,
        "ndcg_at_10": {label: {str(d): report.dims[d].get("ndcg@10") for d in dims}
                       for label, report in {"challenger": challenger, **references}.items()},
        "links": {"MLflow run": mlflow_run_url(settings, trained["run_id"]),
                  "MLflow model version": mlflow_version_url(settings, version)},
    })

