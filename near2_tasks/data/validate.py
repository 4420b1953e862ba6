"""Validate a catalog and its judgments with Great Expectations; accept, quarantine, report.

Nothing is trained on or indexed unless it passed here. A run:

1. loads the tables (:mod:`near2_tasks.data.adapters`; malformed lines are kept as flagged rows);
2. validates each table with GX 1.x suites in an ephemeral context, in two stages:

   * ``rows``: checks of each row on its own (well-formed record, valid encoding, ids present,
     titles non-blank and within length bounds, no control characters, price a number >= 0,
     category/brand in the configured vocabulary, relevance within the declared scale, judged
     product present and accepted in the catalog, not an exact repeat of an earlier row);
   * ``set``: checks of the rows that passed ``rows``, together (product ids unique, repeated
     judgments agree, row count within the drift allowed against the previous accepted catalog,
     table not empty);

3. quarantines every row a row-level expectation flagged, with the names of the failing
   expectations, so that ``accepted + quarantined = input rows`` for each table;
4. merges repeated (query, product) judgments that agree (see below);
5. decides: the run stops (:class:`~near2_tasks.errors.ValidationFailed`) when a table rejects more
   than ``validation.max_rejected_fraction`` of its rows, or a table-level expectation fails and
   ``validation.fail_on_table_expectations`` is set; otherwise the clean rows go on;
6. writes, under ``report_dir``: ``report.json``, ``quarantine/<table>.jsonl``, ``data_docs/``
   (GX HTML) and, when accepted, ``accepted/products.parquet``, ``accepted/judgments.parquet`` and
   ``accepted/manifest.json``.

Duplicate policy. Catalog: an exact repeat of an earlier row is quarantined (the first stays);
different rows sharing a ``product_id`` are *all* quarantined, since nothing says which is right.
Judgments: rows with the same (query key, product) -- the query key being the case-folded,
whitespace-collapsed query -- are merged into one with ``validation.duplicate_judgments`` (mean
by default: Home Depot grades are already means of raters) when their grades differ by at most
``validation.max_duplicate_spread``; otherwise all of them are quarantined as conflicting.

This module runs the steps above and writes the report; the suites and the merge are in
:mod:`near2_tasks.data.suites`, running GX and collecting row-level results in
:mod:`near2_tasks.data.expectations`, the quarantine and accepted files (and
:func:`~near2_tasks.data.outputs.load_accepted`, which reads them back) in :mod:`near2_tasks.data.outputs`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from near2_tasks.config import Settings
from near2_tasks.data.expectations import ExpectationRunner, TableOutcome
from near2_tasks.data.hashing import combine_hashes, frame_hash
from near2_tasks.data.loaders import SchemaError
from near2_tasks.data.outputs import (
    ACCEPTED_JUDGMENT_COLUMNS, CATALOG_HASH_COLUMNS, accepted_products, normalise_dtypes, table_report,
    write_accepted, write_quarantines,
)
from near2_tasks.data.suites import validate_catalog, validate_judgments
from near2_tasks.errors import ValidationFailed


@dataclass
class ValidationResult:
    """What a validation run produced; ``products``/``judgments`` are the accepted, merged rows."""

    passed: bool
    products: pd.DataFrame
    judgments: pd.DataFrame
    dataset_version: str
    catalog_version: str
    report: dict[str, Any]
    report_path: Path
    quarantine_paths: dict[str, Path]
    accepted_paths: dict[str, Path]


def _previous_state_path(settings: Settings, source: str) -> Path:
    key = hashlib.sha256(f"{settings.dataset.name}\0{source}".encode()).hexdigest()[:12]
    return settings.home / "validation" / f"last-accepted-{key}.json"


def _remember_accepted(state_path: Path, catalog_rows: int, versions: dict[str, str], validated_at: str,
                       report_path: Path) -> None:
    """The accepted catalog the next run's row-count drift is checked against."""
    state_path.parent.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps({
        "catalog_rows": catalog_rows, "catalog_version": versions["catalog_version"],
        "dataset_version": versions["dataset_version"], "validated_at": validated_at,
        "report": str(report_path)}, indent=2))


def _fresh_report_dir(report_dir: Path) -> tuple[Path, Path, Path, Path]:
    """``report_dir`` without an earlier run's outputs; its report, accepted, quarantine and data docs paths."""
    report_dir.mkdir(parents=True, exist_ok=True)
    accepted_dir, quarantine_dir, docs_dir = report_dir / "accepted", report_dir / "quarantine", report_dir / "data_docs"
    for stale in (accepted_dir, quarantine_dir, docs_dir):  # a re-run converges to a clean run's output
        shutil.rmtree(stale, ignore_errors=True)
    return report_dir / "report.json", accepted_dir, quarantine_dir, docs_dir


def _resolve_inputs(settings: Settings, catalog_path: Path | None, judgments_path: Path | None
                    ) -> tuple[Path, Path | None]:
    if catalog_path is None and settings.dataset.catalog_path is not None:
        return Path(settings.dataset.catalog_path), (
            judgments_path if judgments_path is not None else settings.dataset.judgments_path)
    if catalog_path is None:
        from near2_tasks.data.synthetic import write_catalog

        ds = settings.dataset
        directory = settings.data_dir / f"synthetic-{ds.synthetic_products}-{ds.synthetic_queries}-{ds.synthetic_seed}"
        catalog, judgments = write_catalog(directory, ds.synthetic_products, ds.synthetic_queries, ds.synthetic_seed)
        return catalog, judgments_path if judgments_path is not None else judgments
    return Path(catalog_path), Path(judgments_path) if judgments_path is not None else None


def _report_base(settings: Settings, catalog_path: Path, judgments_path: Path | None) -> dict[str, Any]:
    """The part of ``report.json`` known before anything is loaded (a failed load's report is this)."""
    return {
        "dataset": settings.dataset.name,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": {"catalog": str(catalog_path), "judgments": str(judgments_path) if judgments_path else None},
        "thresholds": {"max_rejected_fraction": settings.validation.max_rejected_fraction,
                       "fail_on_table_expectations": settings.validation.fail_on_table_expectations},
        "relevance_scale": {"floor": settings.dataset.relevance_floor,
                            "relevant_threshold": settings.dataset.relevant_threshold,
                            "max": settings.dataset.relevance_max},
    }


def _failure_report(report_path: Path, base: dict[str, Any], failures: list[str]) -> dict[str, Any]:
    report = {**base, "passed": False, "status": "failed", "failures": failures}
    report_path.write_text(json.dumps(report, indent=2, default=str))
    return report


def _validate_tables(runner: ExpectationRunner, loaded: Any, settings: Settings, previous: dict[str, Any] | None
                     ) -> tuple[list[TableOutcome], pd.DataFrame, pd.DataFrame]:
    """The outcome of each loaded table, the accepted products and the accepted, merged judgments."""
    catalog = validate_catalog(runner, loaded.catalog, settings, previous["catalog_rows"] if previous else None)
    outcomes = [catalog]
    products = accepted_products(catalog.accepted, settings.dataset.text_template)
    judgments = normalise_dtypes(pd.DataFrame({c: [] for c in ACCEPTED_JUDGMENT_COLUMNS}))
    if loaded.judgments is not None:
        catalog_ids = {pid for pid in loaded.catalog.frame["product_id"].tolist() if pid is not None}
        outcome = validate_judgments(runner, loaded.judgments, settings, catalog_ids, set(products["product_id"]))
        outcomes.append(outcome)
        judgments = outcome.accepted
    return outcomes, products, judgments


def _decide(outcomes: list[TableOutcome], settings: Settings) -> list[str]:
    """The reasons this run must stop (empty: it may continue)."""
    vs = settings.validation
    failures = []
    for outcome in outcomes:
        if outcome.rejected_fraction > vs.max_rejected_fraction:
            counts = table_report(outcome)["quarantined_by_check"]
            detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
            failures.append(f"{outcome.name}: {outcome.quarantined_rows} of {outcome.input_rows} rows quarantined "
                            f"({outcome.rejected_fraction:.2%} > {vs.max_rejected_fraction:.2%}): {detail}")
        if outcome.table_failures and (vs.fail_on_table_expectations or outcome.input_rows == outcome.quarantined_rows):
            failures.extend(f"{outcome.name}: {f}" for f in outcome.table_failures)
    return failures


def _run_report(base: dict[str, Any], settings: Settings, failures: list[str], outcomes: list[TableOutcome],
                products: pd.DataFrame, judgments: pd.DataFrame, versions: dict[str, str],
                paths: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """``report.json`` of a run that loaded its inputs (``versions``: dataset, catalog and judgments)."""
    passed = not failures
    return {
        **base,
        "passed": passed,
        "status": "accepted" if passed else "failed",
        "failures": failures,
        "tables": {o.name: table_report(o) for o in outcomes},
        "accepted": {"products": len(products), "judgments": len(judgments),
                     "queries": int(judgments["query_id"].nunique())},
        **versions,
        "text_template": settings.dataset.text_template,
        "duplicate_policy": {
            "catalog": "exact repeats: first kept, others quarantined; same product_id with different "
                       "content: all quarantined",
            "judgments": f"same (query key, product): merged by {settings.validation.duplicate_judgments} when "
                         f"grades differ by <= {settings.validation.max_duplicate_spread}, else all quarantined",
        },
        "paths": paths,
        "previous_accepted": previous,
    }


def validate_dataset(settings: Settings, catalog_path: str | Path | None, judgments_path: str | Path | None = None,
                     fmt: str | None = None, report_dir: str | Path | None = None,
                     raise_on_failure: bool = True) -> ValidationResult:
    """Validate, quarantine and report; see the module doc.

    ``report_dir`` defaults to ``<home>/validation/<dataset name>``. Raises ValidationFailed (exit 1
    on the CLI) naming the failing expectations and counts when the run must stop, unless
    ``raise_on_failure`` is False, in which case the result says ``passed=False``.
    """
    from near2_tasks.data.adapters import load_dataset

    began = time.monotonic()
    report_dir = Path(report_dir) if report_dir is not None else settings.home / "validation" / settings.dataset.name
    report_path, accepted_dir, quarantine_dir, docs_dir = _fresh_report_dir(report_dir)
    catalog_path, judgments_path = _resolve_inputs(
        settings, Path(catalog_path) if catalog_path is not None else None,
        Path(judgments_path) if judgments_path is not None else None)
    base = _report_base(settings, catalog_path, judgments_path)
    try:
        loaded = load_dataset(settings, catalog_path, judgments_path, fmt)
    except SchemaError as exc:
        _failure_report(report_path, base, [str(exc)])
        raise ValidationFailed(f"validation failed: {exc.message}", hint=exc.hint or f"report: {report_path}") from exc
    base["format"] = loaded.format

    state_path = _previous_state_path(settings, str(Path(catalog_path).resolve()))
    previous = json.loads(state_path.read_text()) if state_path.exists() else None
    runner = ExpectationRunner(docs_dir if settings.validation.data_docs else None)
    outcomes, products, judgments = _validate_tables(runner, loaded, settings, previous)
    docs_index = runner.build_docs()
    quarantine_paths = write_quarantines(quarantine_dir, outcomes, [loaded.catalog, loaded.judgments])

    catalog_version = frame_hash(products, CATALOG_HASH_COLUMNS)
    judgments_version = frame_hash(judgments, ACCEPTED_JUDGMENT_COLUMNS)
    versions = {"dataset_version": combine_hashes(catalog_version, judgments_version),
                "catalog_version": catalog_version, "judgments_version": judgments_version}
    failures = _decide(outcomes, settings)
    passed = not failures
    report = _run_report(base, settings, failures, outcomes, products, judgments, versions, {
        "report": str(report_path),
        "data_docs": str(docs_index) if docs_index else None,
        "quarantine": {k: str(v) for k, v in quarantine_paths.items()},
    }, previous)
    accepted_paths: dict[str, Path] = {}
    if passed:
        accepted_paths = write_accepted(accepted_dir, products, judgments, {
            **versions, "products": len(products), "judgments": len(judgments), "dataset": settings.dataset.name,
            "report": str(report_path)})
        report["paths"]["accepted"] = {k: str(v) for k, v in accepted_paths.items()}
        _remember_accepted(state_path, len(products), versions, base["started_at"], report_path)
    report["duration_s"] = round(time.monotonic() - began, 3)
    report_path.write_text(json.dumps(report, indent=2, default=str))

    result = ValidationResult(passed, products, judgments, versions["dataset_version"], catalog_version, report,
                              report_path, quarantine_paths, accepted_paths)
    if not passed and raise_on_failure:
        raise ValidationFailed("validation failed: " + "; ".join(failures), hint=f"report: {report_path}")
    return result
