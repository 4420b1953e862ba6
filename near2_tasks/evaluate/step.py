"""The evaluation stage's step: challenger, champion and base model per dimension on the test split."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from near2_tasks.data.step import accepted
from near2_tasks.models.registry import mlflow_run_url, mlflow_version_url
from near2_tasks.run import Result, StepContext, record
from near2_tasks.train.step import split_frame

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


def evaluate(ctx: StepContext, validation: Result, examples: Result, trained: Result) -> Result:
    """Evaluate the challenger, the champion (if any) and the base model per dimension on the held-out
    test queries; the challenger's report (with the others as references) goes to its MLflow run."""
    products, _ = accepted(validation)
    return evaluate_version(ctx, products, split_frame(examples, "test"), trained)


def evaluate_version(ctx: StepContext, products: pd.DataFrame, judgments: pd.DataFrame, trained: Result,
                     output_dir: Path | None = None) -> Result:
    """:func:`evaluate` on given frames: the registered version ``trained`` (``model_version``,
    ``model_uri``, ``run_id``) and its references at the dimensions it was trained for (its ``dims`` tag),
    the report to ``output_dir`` (default ``<run dir>/evaluation``). ``near2 gate`` calls this on the test
    split of the judgments it validated, the DAG through :func:`evaluate`."""
    from near2_tasks.evaluate.evaluation import log_evaluation
    from near2_tasks.evaluate.report import write_report
    from near2_tasks.models.registry import get_version
    from near2_tasks.promote.gates import evaluate_with_references, reference_role, version_dims

    settings = ctx.settings
    version = str(trained["model_version"])
    dims = version_dims(settings, get_version(settings, version).tags)
    out = Path(output_dir) if output_dir is not None else ctx.run_dir / "evaluation"
    challenger, champion = evaluate_with_references(settings, trained["model_uri"], version, products, judgments,
                                                    dims)
    files = write_report(challenger, out / "report.json")
    log_evaluation(settings, challenger, files)
    return record(ctx, "evaluate", {
        "report": str(files.json), "plot": str(files.plot),
        "reference": reference_role(challenger), "champion_version": champion,
        "ndcg_at_10": {label: {str(d): report.dims[d].get("ndcg@10") for d in dims}
                       for label, report in {"challenger": challenger, **challenger.references}.items()},
        "links": {"MLflow run": mlflow_run_url(settings, trained["run_id"]),
                  "MLflow model version": mlflow_version_url(settings, version)},
    })
