"""Running Great Expectations suites on DataFrames and collecting row-level results.

A :class:`Check` is one GX expectation with its stage (``rows`` or ``set``) and what a failure means;
:class:`ExpectationRunner` holds the ephemeral GX context (and the HTML data docs site) and runs a list
of checks on a frame; :func:`run_stage` turns the results into the failing rows of each row-level check
and the failures of table-level ones, collected in a :class:`TableOutcome`. The suites themselves are in
:mod:`near2_tasks.data.suites`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from near2_tasks.errors import Near2Error


@dataclass(frozen=True)
class Check:
    """One expectation and what a failure means."""

    name: str
    stage: str  # "rows" or "set"
    expectation: Any  # a great_expectations.expectations.Expectation
    reason: str
    row_level: bool = True


@dataclass
class TableOutcome:
    """One table's validation: its accepted rows, the failing checks of each quarantined row, every check run."""

    name: str
    input_rows: int
    accepted: pd.DataFrame
    reasons: dict[int, list[str]]  # row -> failing check names
    checks: list[dict[str, Any]]
    table_failures: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def quarantined_rows(self) -> int:
        return len(self.reasons)

    @property
    def rejected_fraction(self) -> float:
        return self.quarantined_rows / self.input_rows if self.input_rows else 0.0


class ExpectationRunner:
    """An ephemeral GX context; runs suites on DataFrames and renders the HTML data docs."""

    def __init__(self, docs_dir: Path | None) -> None:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self._gx = gx
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.docs_dir = docs_dir
        if docs_dir is not None:
            self.context.add_data_docs_site(site_name="near2", site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            })
        self.source = self.context.data_sources.add_pandas("near2")

    def run(self, suite_name: str, checks: list[Check], frame: pd.DataFrame) -> dict[str, Any]:
        """Validate ``frame`` against ``checks``; return each check's GX result, by check name."""
        gx = self._gx
        batch_definition = self.source.add_dataframe_asset(suite_name).add_batch_definition_whole_dataframe("all")
        suite = self.context.suites.add(gx.ExpectationSuite(name=suite_name))
        for check in checks:
            check.expectation.meta = {"near2_check": check.name}
            check.expectation.notes = check.reason
            suite.add_expectation(check.expectation)
        definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=suite_name, data=batch_definition, suite=suite))
        outcome = definition.run(batch_parameters={"dataframe": frame}, result_format={"result_format": "COMPLETE"})
        return {r.expectation_config.meta["near2_check"]: r for r in outcome.results}

    def build_docs(self) -> Path | None:
        if self.docs_dir is None:
            return None
        self.context.build_data_docs(site_names=["near2"])  # not the ephemeral context's temporary site
        return self.docs_dir / "index.html"


def _describe(check: Check, result: Any) -> dict[str, Any]:
    config = result.expectation_config
    info = {
        "check": check.name,
        "stage": check.stage,
        "level": "row" if check.row_level else "table",
        "expectation": config.type,
        "column": config.kwargs.get("column"),
        "success": bool(result.success),
        "reason": check.reason,
    }
    if check.row_level:
        info["unexpected_count"] = int(result.result.get("unexpected_count") or 0)
    else:
        info["observed_value"] = result.result.get("observed_value")
        info["expected"] = {k: v for k, v in config.kwargs.items() if k in ("min_value", "max_value")}
    if result.exception_info and result.exception_info.get("raised_exception"):
        info["exception"] = str(result.exception_info.get("exception_message"))[:500]
    return info


def run_stage(runner: ExpectationRunner, suite_name: str, checks: list[Check], frame: pd.DataFrame,
              reasons: dict[int, list[str]], described: list[dict[str, Any]], table_failures: list[str]) -> None:
    """Run one stage; record failing rows in ``reasons`` and failed table checks in ``table_failures``."""
    results = runner.run(suite_name, checks, frame)
    for check in checks:
        result = results[check.name]
        info = _describe(check, result)
        described.append(info)
        if "exception" in info:
            raise Near2Error(f"expectation {check.name} could not run: {info['exception']}")
        if check.row_level:
            rows = result.result.get("unexpected_index_list") or []
            if len(rows) != info["unexpected_count"]:
                raise Near2Error(f"expectation {check.name}: GX returned {len(rows)} row indices for "
                                 f"{info['unexpected_count']} unexpected values")
            for row in rows:
                reasons.setdefault(int(row), []).append(check.name)
        elif not result.success:
            table_failures.append(
                f"{check.name} (observed {info['observed_value']}, expected {info['expected']})")
