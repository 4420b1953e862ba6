"""The data stage's step: validate the catalog and judgments; :func:`accepted` reads its output."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from near2_tasks.run import Result, StepContext, record

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


def validate(ctx: StepContext) -> Result:
    """Validate the catalog and judgments (Great Expectations); stop the run on bad data.

    Without ``dataset.catalog_path`` the embedded synthetic catalog is generated and validated.
    """
    from near2_tasks.data.validate import validate_dataset

    settings = ctx.settings
    result = validate_dataset(settings, settings.dataset.catalog_path, settings.dataset.judgments_path,
                              report_dir=ctx.run_dir / "validation")
    log.info("validation passed: %d products, %d judgments accepted (dataset %s)", len(result.products),
             len(result.judgments), result.dataset_version)
    return record(ctx, "validate", {
        "inputs": result.report.get("inputs"), "report_dir": str(ctx.run_dir / "validation"),
        "report_path": str(result.report_path), "dataset_version": result.dataset_version,
        "catalog_version": result.catalog_version, "products": len(result.products),
        "judgments": len(result.judgments),
    })


def accepted(validation: Result) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The accepted products (with the ``text`` every stage embeds) and judgments of the validate step."""
    from near2_tasks.data.outputs import load_accepted

    accepted = load_accepted(Path(validation["report_dir"]))
    return accepted.products, accepted.judgments

