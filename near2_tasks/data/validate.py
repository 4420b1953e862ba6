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
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from near2_tasks.config import Settings
from near2_tasks.data.hashing import combine_hashes, frame_hash
from near2_tasks.data.loaders import CATALOG_COLUMNS, JUDGMENT_COLUMNS, RawTable, SchemaError
from near2_tasks.data.text import product_texts, query_key
from near2_tasks.errors import Near2Error, ValidationFailed

#: Columns of the accepted products table, always present (missing optional ones hold None).
PRODUCT_COLUMNS = ["product_id", "title", "category", "brand", "price", "text"]
OPTIONAL_PRODUCT_COLUMNS = ["description", "attributes", "updated_at"]
ACCEPTED_JUDGMENT_COLUMNS = ["query_id", "query", "product_id", "relevance"]
#: Columns a catalog version is computed from (what gets indexed and embedded).
CATALOG_HASH_COLUMNS = PRODUCT_COLUMNS + OPTIONAL_PRODUCT_COLUMNS

#: Control characters: C0 (tab and line breaks included), DEL and C1. Single-line fields allow none.
CONTROL_CHARS = r"[\x00-\x1f\x7f-\x9f]"
#: Multi-line fields (description, attributes) may hold tabs and line breaks.
CONTROL_CHARS_MULTILINE = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"
SINGLE_LINE_FIELDS = ("product_id", "title", "category", "brand", "query_id", "query")
MULTI_LINE_FIELDS = ("description", "attributes")


# ---------------------------------------------------------------------------------------------
# results


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


@dataclass
class AcceptedData:
    products: pd.DataFrame
    judgments: pd.DataFrame
    dataset_version: str
    catalog_version: str


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


# ---------------------------------------------------------------------------------------------
# Great Expectations plumbing


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


def _run_stage(runner: ExpectationRunner, suite_name: str, checks: list[Check], frame: pd.DataFrame,
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


# ---------------------------------------------------------------------------------------------
# catalog


def _text_checks(gxe: Any, columns: list[str], stage: str = "rows") -> list[Check]:
    checks = []
    for column in columns:
        if column in SINGLE_LINE_FIELDS:
            checks.append(Check(f"{column}_no_control_chars", stage,
                                gxe.ExpectColumnValuesToNotMatchRegex(column=column, regex=CONTROL_CHARS),
                                f"{column} contains control characters or line breaks (often a wrongly "
                                f"declared encoding)"))
        elif column in MULTI_LINE_FIELDS:
            checks.append(Check(f"{column}_no_control_chars", stage,
                                gxe.ExpectColumnValuesToNotMatchRegex(column=column, regex=CONTROL_CHARS_MULTILINE),
                                f"{column} contains control characters"))
    return checks


def _record_checks(gxe: Any, encoding: str) -> list[Check]:
    return [
        Check("record_well_formed", "rows", gxe.ExpectColumnValuesToBeInSet(column="_well_formed", value_set=[True]),
              "malformed record: its number of fields differs from the header (raw text kept)"),
        Check("valid_encoding", "rows", gxe.ExpectColumnValuesToBeInSet(column="_valid_encoding", value_set=[True]),
              f"bytes that are not valid {encoding} (replaced by U+FFFD in the record shown)"),
    ]


def _numeric(values: pd.Series) -> pd.Series:
    return pd.to_numeric(pd.Series(values.tolist(), index=values.index, dtype=object), errors="coerce").astype(float)


def _previous_state_path(settings: Settings, source: str) -> Path:
    key = hashlib.sha256(f"{settings.dataset.name}\0{source}".encode()).hexdigest()[:12]
    return settings.home / "validation" / f"last-accepted-{key}.json"


def validate_catalog(runner: ExpectationRunner, table: RawTable, settings: Settings,
                     previous_rows: int | None) -> TableOutcome:
    import great_expectations.expectations as gxe

    vs = settings.validation
    raw = table.frame.reset_index(drop=True)
    present = [c for c in CATALOG_COLUMNS if c in raw.columns]
    frame = raw.copy()
    checks = _record_checks(gxe, settings.dataset.encoding or "utf-8") + [
        Check("product_id_present", "rows", gxe.ExpectColumnValuesToNotBeNull(column="product_id"),
              "product_id is missing"),
        Check("title_present", "rows", gxe.ExpectColumnValuesToNotBeNull(column="title"), "title is missing"),
        Check("title_not_blank", "rows", gxe.ExpectColumnValuesToMatchRegex(column="title", regex=r"\S"),
              "title is only whitespace"),
        Check("title_length", "rows", gxe.ExpectColumnValueLengthsToBeBetween(
            column="title", min_value=vs.title_min_chars, max_value=vs.title_max_chars),
              f"title length outside [{vs.title_min_chars}, {vs.title_max_chars}] characters"),
    ]
    checks += _text_checks(gxe, present)
    if "price" in present:
        numeric = _numeric(frame["price"])
        # "inf" and "1e999" parse as infinity, which Elasticsearch refuses (one such row failed a whole index build)
        frame["_price_is_number"] = frame["price"].isna() | np.isfinite(numeric)
        frame["price"] = numeric
        checks += [
            Check("price_is_number", "rows", gxe.ExpectColumnValuesToBeInSet(column="_price_is_number", value_set=[True]),
                  "price is present but not a finite number"),
            Check("price_non_negative", "rows", gxe.ExpectColumnValuesToBeBetween(column="price", min_value=0),
                  "price is negative"),
        ]
    if "updated_at" in present:
        parsed = pd.to_datetime(frame["updated_at"], errors="coerce", utc=True, format="mixed")
        frame["_updated_at_is_time"] = frame["updated_at"].isna() | parsed.notna()
        checks.append(Check("updated_at_is_time", "rows",
                            gxe.ExpectColumnValuesToBeInSet(column="_updated_at_is_time", value_set=[True]),
                            "updated_at is present but not a date/time (ISO 8601 expected)"))
    vocabularies = {"category": ("allowed_categories", vs.allowed_categories),
                    "brand": ("allowed_brands", vs.allowed_brands)}
    for column, (setting, allowed) in vocabularies.items():
        if allowed is not None and column in present:
            checks.append(Check(f"{column}_in_vocabulary", "rows",
                                gxe.ExpectColumnValuesToBeInSet(column=column, value_set=list(allowed)),
                                f"{column} is not in validation.{setting}"))
    frame["_first_occurrence"] = ~raw.duplicated(subset=present, keep="first") | ~raw["_well_formed"].astype(bool)
    checks.append(Check("not_exact_repeat", "rows",
                        gxe.ExpectColumnValuesToBeInSet(column="_first_occurrence", value_set=[True]),
                        "exact repeat of an earlier row (the first one is kept)"))
    for column in ("_well_formed", "_valid_encoding"):
        frame[column] = frame[column].astype(bool)

    reasons: dict[int, list[str]] = {}
    described: list[dict[str, Any]] = []
    table_failures: list[str] = []
    _run_stage(runner, "catalog_rows", checks, frame.drop(columns=["_raw"]), reasons, described, table_failures)

    survivors = frame.drop(index=list(reasons))[present]
    set_checks = [
        Check("product_id_unique", "set", gxe.ExpectColumnValuesToBeUnique(column="product_id"),
              "product_id shared by different rows (all of them are quarantined)"),
        Check("catalog_not_empty", "set", gxe.ExpectTableRowCountToBeBetween(min_value=1),
              "no catalog row passed the row checks", row_level=False),
    ]
    if previous_rows is not None and vs.max_row_count_drift is not None:
        low = int(np.floor(previous_rows * (1 - vs.max_row_count_drift)))
        high = int(np.ceil(previous_rows * (1 + vs.max_row_count_drift)))
        set_checks.append(Check(
            "catalog_row_count_drift", "set", gxe.ExpectTableRowCountToBeBetween(min_value=low, max_value=high),
            f"row count moved more than {vs.max_row_count_drift:.0%} from the previous accepted catalog "
            f"({previous_rows} rows)", row_level=False))
    _run_stage(runner, "catalog_set", set_checks, survivors, reasons, described, table_failures)

    accepted = frame.drop(index=list(reasons))
    return TableOutcome("catalog", len(raw), accepted[present], reasons, described, table_failures, dict(table.notes))


# ---------------------------------------------------------------------------------------------
# judgments


def validate_judgments(runner: ExpectationRunner, table: RawTable, settings: Settings,
                       catalog_ids: set[str], accepted_ids: set[str]) -> TableOutcome:
    import great_expectations.expectations as gxe

    ds, vs = settings.dataset, settings.validation
    raw = table.frame.reset_index(drop=True)
    present = [c for c in JUDGMENT_COLUMNS if c in raw.columns]
    frame = raw.copy()
    relevance = _numeric(frame["relevance"])
    frame["_relevance_is_number"] = relevance.notna()
    frame["relevance"] = relevance
    ids = frame["product_id"].tolist()
    frame["_product_known"] = [pid is None or pid in catalog_ids for pid in ids]
    frame["_product_accepted"] = [pid is None or pid not in catalog_ids or pid in accepted_ids for pid in ids]
    for column in ("_well_formed", "_valid_encoding"):
        frame[column] = frame[column].astype(bool)
    checks = _record_checks(gxe, ds.encoding or "utf-8") + [
        Check("query_present", "rows", gxe.ExpectColumnValuesToNotBeNull(column="query"), "query is missing"),
        Check("query_not_blank", "rows", gxe.ExpectColumnValuesToMatchRegex(column="query", regex=r"\S"),
              "query is only whitespace"),
        Check("query_length", "rows", gxe.ExpectColumnValueLengthsToBeBetween(
            column="query", min_value=1, max_value=vs.query_max_chars),
              f"query longer than {vs.query_max_chars} characters"),
        Check("product_id_present", "rows", gxe.ExpectColumnValuesToNotBeNull(column="product_id"),
              "product_id is missing"),
        Check("relevance_is_number", "rows",
              gxe.ExpectColumnValuesToBeInSet(column="_relevance_is_number", value_set=[True]),
              "relevance is missing, NaN, or not a number (an unmapped label?)"),
        Check("relevance_in_scale", "rows", gxe.ExpectColumnValuesToBeBetween(
            column="relevance", min_value=ds.relevance_floor, max_value=ds.relevance_max),
              f"relevance outside the declared scale [{ds.relevance_floor}, {ds.relevance_max}]"),
        Check("product_in_catalog", "rows", gxe.ExpectColumnValuesToBeInSet(column="_product_known", value_set=[True]),
              "product_id is not in the catalog"),
        Check("product_accepted", "rows", gxe.ExpectColumnValuesToBeInSet(column="_product_accepted", value_set=[True]),
              "the judged product was quarantined in the catalog"),
    ]
    checks += _text_checks(gxe, [c for c in present if c in ("query", "query_id")])

    reasons: dict[int, list[str]] = {}
    described: list[dict[str, Any]] = []
    table_failures: list[str] = []
    _run_stage(runner, "judgments_rows", checks, frame.drop(columns=["_raw"]), reasons, described, table_failures)

    survivors = frame.drop(index=list(reasons)).copy()
    survivors["_query_key"] = [query_key(q) for q in survivors["query"]]
    grades = survivors.groupby(["_query_key", "product_id"])["relevance"]
    spread = grades.transform("max") - grades.transform("min")
    survivors["_duplicates_agree"] = (spread <= vs.max_duplicate_spread + 1e-9).astype(bool)
    set_checks = [
        Check("duplicates_agree", "set",
              gxe.ExpectColumnValuesToBeInSet(column="_duplicates_agree", value_set=[True]),
              f"repeated (query, product) judgments whose grades differ by more than "
              f"{vs.max_duplicate_spread} (all of them are quarantined)"),
        Check("judgments_not_empty", "set", gxe.ExpectTableRowCountToBeBetween(min_value=1),
              "no judgment passed the row checks", row_level=False),
    ]
    _run_stage(runner, "judgments_set", set_checks, survivors[present + ["_query_key", "_duplicates_agree"]],
               reasons, described, table_failures)

    accepted = survivors.drop(index=[r for r in reasons if r in survivors.index])
    merged, notes = merge_judgments(accepted, vs.duplicate_judgments)
    return TableOutcome("judgments", len(raw), merged, reasons, described, table_failures,
                        {**table.notes, **notes, "accepted_rows_before_merge": len(accepted)})


def merge_judgments(accepted: pd.DataFrame, how: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One row per (query key, product); one query_id and query text per query key (the first seen)."""
    frame = accepted.copy()
    if "_query_key" not in frame.columns:
        frame["_query_key"] = [query_key(q) for q in frame["query"]]
    if "query_id" not in frame.columns:
        frame["query_id"] = None
    derived = ["q-" + hashlib.sha1(k.encode()).hexdigest()[:12] for k in frame["_query_key"]]
    frame["query_id"] = [qid if qid is not None else d for qid, d in zip(frame["query_id"], derived)]
    first = frame.groupby("_query_key", sort=False).agg(query_id=("query_id", "first"), query=("query", "first"))
    first["query"] = [" ".join(q.split()) for q in first["query"]]
    ids_before = frame["query_id"].nunique()
    grouped = frame.groupby(["_query_key", "product_id"], sort=False)["relevance"].agg(how).reset_index()
    grouped = grouped.join(first, on="_query_key")
    merged = grouped[ACCEPTED_JUDGMENT_COLUMNS].copy()
    merged = normalise_dtypes(merged.sort_values(["query_id", "product_id"], kind="stable").reset_index(drop=True))
    return merged, {
        "duplicate_rows_merged": len(frame) - len(merged),
        "merge": how,
        "queries": int(merged["query_id"].nunique()),
        "query_ids_unified": int(ids_before - merged["query_id"].nunique()),
    }


# ---------------------------------------------------------------------------------------------
# outputs


def normalise_dtypes(frame: pd.DataFrame) -> pd.DataFrame:
    """pandas' ``str`` dtype for text (missing = NaN), float64 for price and relevance.

    The same dtypes in memory and after a Parquet round trip, so a task that reloads the accepted
    tables sees exactly what validation returned.
    """
    frame = frame.copy()
    for column in frame.columns:
        frame[column] = frame[column].astype("float64" if column in ("price", "relevance") else "str")
    return frame


def _accepted_products(frame: pd.DataFrame, template: str) -> pd.DataFrame:
    products = pd.DataFrame(index=frame.index)
    for column in PRODUCT_COLUMNS[:-1] + [c for c in OPTIONAL_PRODUCT_COLUMNS if c in frame.columns]:
        products[column] = frame[column] if column in frame.columns else None
    products["product_id"] = products["product_id"].astype(str)
    products["price"] = pd.to_numeric(products["price"], errors="coerce").astype(float)
    products["text"] = product_texts(products, template)
    ordered = PRODUCT_COLUMNS + [c for c in OPTIONAL_PRODUCT_COLUMNS if c in products.columns]
    return normalise_dtypes(products[ordered].reset_index(drop=True))


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return None if np.isnan(value) else value
    if hasattr(value, "item"):
        return _json_value(value.item())
    return str(value)


def _write_quarantine(path: Path, table: RawTable, outcome: TableOutcome, checks_by_name: dict[str, dict]) -> None:
    frame = table.frame.reset_index(drop=True)
    columns = [c for c in frame.columns if not c.startswith("_")]
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for row in sorted(outcome.reasons):
            record = frame.iloc[row]
            entry = {
                "table": outcome.name,
                "row": row,
                "source": record["_source"],
                "reasons": [{"check": name, "expectation": checks_by_name[name]["expectation"],
                             "column": checks_by_name[name]["column"], "message": checks_by_name[name]["reason"]}
                            for name in outcome.reasons[row]],
                "record": {c: _json_value(record[c]) for c in columns},
            }
            if record["_raw"] is not None:
                entry["raw"] = record["_raw"]
            out.write(json.dumps(entry, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def _table_report(outcome: TableOutcome) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for names in outcome.reasons.values():
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    return {
        "input_rows": outcome.input_rows,
        "accepted_rows": outcome.input_rows - outcome.quarantined_rows,
        "quarantined_rows": outcome.quarantined_rows,
        "rejected_fraction": round(outcome.rejected_fraction, 6),
        "quarantined_by_check": counts,
        "table_failures": outcome.table_failures,
        "checks": outcome.checks,
        "notes": outcome.notes,
    }


def _decide(outcomes: list[TableOutcome], settings: Settings) -> list[str]:
    """The reasons this run must stop (empty: it may continue)."""
    vs = settings.validation
    failures = []
    for outcome in outcomes:
        if outcome.rejected_fraction > vs.max_rejected_fraction:
            counts = _table_report(outcome)["quarantined_by_check"]
            detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
            failures.append(f"{outcome.name}: {outcome.quarantined_rows} of {outcome.input_rows} rows quarantined "
                            f"({outcome.rejected_fraction:.2%} > {vs.max_rejected_fraction:.2%}): {detail}")
        if outcome.table_failures and (vs.fail_on_table_expectations or outcome.input_rows == outcome.quarantined_rows):
            failures.extend(f"{outcome.name}: {f}" for f in outcome.table_failures)
    return failures


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


def _failure_report(report_path: Path, base: dict[str, Any], failures: list[str]) -> dict[str, Any]:
    report = {**base, "passed": False, "status": "failed", "failures": failures}
    report_path.write_text(json.dumps(report, indent=2, default=str))
    return report


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
    report_dir.mkdir(parents=True, exist_ok=True)
    report_path = report_dir / "report.json"
    accepted_dir, quarantine_dir, docs_dir = report_dir / "accepted", report_dir / "quarantine", report_dir / "data_docs"
    for stale in (accepted_dir, quarantine_dir, docs_dir):  # a re-run converges to a clean run's output
        shutil.rmtree(stale, ignore_errors=True)
    catalog_path, judgments_path = _resolve_inputs(
        settings, Path(catalog_path) if catalog_path is not None else None,
        Path(judgments_path) if judgments_path is not None else None)
    base: dict[str, Any] = {
        "dataset": settings.dataset.name,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": {"catalog": str(catalog_path), "judgments": str(judgments_path) if judgments_path else None},
        "thresholds": {"max_rejected_fraction": settings.validation.max_rejected_fraction,
                       "fail_on_table_expectations": settings.validation.fail_on_table_expectations},
        "relevance_scale": {"floor": settings.dataset.relevance_floor,
                            "relevant_threshold": settings.dataset.relevant_threshold,
                            "max": settings.dataset.relevance_max},
    }
    try:
        loaded = load_dataset(settings, catalog_path, judgments_path, fmt)
    except SchemaError as exc:
        _failure_report(report_path, base, [str(exc)])
        raise ValidationFailed(f"validation failed: {exc.message}", hint=exc.hint or f"report: {report_path}") from exc
    base["format"] = loaded.format

    state_path = _previous_state_path(settings, str(Path(catalog_path).resolve()))
    previous = json.loads(state_path.read_text()) if state_path.exists() else None
    runner = ExpectationRunner(docs_dir if settings.validation.data_docs else None)
    catalog = validate_catalog(runner, loaded.catalog, settings, previous["catalog_rows"] if previous else None)
    outcomes = [catalog]
    products = _accepted_products(catalog.accepted, settings.dataset.text_template)
    judgments = normalise_dtypes(pd.DataFrame({c: [] for c in ACCEPTED_JUDGMENT_COLUMNS}))
    if loaded.judgments is not None:
        catalog_ids = {pid for pid in loaded.catalog.frame["product_id"].tolist() if pid is not None}
        outcome = validate_judgments(runner, loaded.judgments, settings, catalog_ids, set(products["product_id"]))
        outcomes.append(outcome)
        judgments = outcome.accepted
    docs_index = runner.build_docs()

    quarantine_dir.mkdir(parents=True, exist_ok=True)
    quarantine_paths: dict[str, Path] = {}
    for outcome, table in zip(outcomes, [loaded.catalog, loaded.judgments]):
        path = quarantine_dir / f"{outcome.name}.jsonl"
        _write_quarantine(path, table, outcome, {c["check"]: c for c in outcome.checks})
        quarantine_paths[outcome.name] = path

    catalog_version = frame_hash(products, CATALOG_HASH_COLUMNS)
    judgments_version = frame_hash(judgments, ACCEPTED_JUDGMENT_COLUMNS)
    dataset_version = combine_hashes(catalog_version, judgments_version)
    failures = _decide(outcomes, settings)
    passed = not failures
    report = {
        **base,
        "passed": passed,
        "status": "accepted" if passed else "failed",
        "failures": failures,
        "tables": {o.name: _table_report(o) for o in outcomes},
        "accepted": {"products": len(products), "judgments": len(judgments),
                     "queries": int(judgments["query_id"].nunique())},
        "dataset_version": dataset_version,
        "catalog_version": catalog_version,
        "judgments_version": judgments_version,
        "text_template": settings.dataset.text_template,
        "duplicate_policy": {
            "catalog": "exact repeats: first kept, others quarantined; same product_id with different "
                       "content: all quarantined",
            "judgments": f"same (query key, product): merged by {settings.validation.duplicate_judgments} when "
                         f"grades differ by <= {settings.validation.max_duplicate_spread}, else all quarantined",
        },
        "paths": {
            "report": str(report_path),
            "data_docs": str(docs_index) if docs_index else None,
            "quarantine": {k: str(v) for k, v in quarantine_paths.items()},
        },
        "previous_accepted": previous,
    }
    accepted_paths: dict[str, Path] = {}
    if passed:
        accepted_dir.mkdir(parents=True, exist_ok=True)
        accepted_paths = {"products": accepted_dir / "products.parquet",
                          "judgments": accepted_dir / "judgments.parquet",
                          "manifest": accepted_dir / "manifest.json"}
        _write_parquet(products, accepted_paths["products"])
        _write_parquet(judgments, accepted_paths["judgments"])
        manifest = {"dataset_version": dataset_version, "catalog_version": catalog_version,
                    "judgments_version": judgments_version, "products": len(products),
                    "judgments": len(judgments), "dataset": settings.dataset.name, "report": str(report_path)}
        accepted_paths["manifest"].write_text(json.dumps(manifest, indent=2))
        report["paths"]["accepted"] = {k: str(v) for k, v in accepted_paths.items()}
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps({
            "catalog_rows": len(products), "catalog_version": catalog_version, "dataset_version": dataset_version,
            "validated_at": base["started_at"], "report": str(report_path)}, indent=2))
    report["duration_s"] = round(time.monotonic() - began, 3)
    report_path.write_text(json.dumps(report, indent=2, default=str))

    result = ValidationResult(passed, products, judgments, dataset_version, catalog_version, report, report_path,
                              quarantine_paths, accepted_paths)
    if not passed and raise_on_failure:
        raise ValidationFailed("validation failed: " + "; ".join(failures), hint=f"report: {report_path}")
    return result


def load_accepted(report_dir: str | Path) -> AcceptedData:
    """The accepted tables a passed validation left under ``report_dir/accepted``."""
    accepted_dir = Path(report_dir) / "accepted"
    manifest_path = accepted_dir / "manifest.json"
    if not manifest_path.exists():
        raise Near2Error(f"no accepted data in {report_dir}",
                         hint="run `near2 validate ... --report-dir` first (a failed validation leaves none)")
    manifest = json.loads(manifest_path.read_text())
    products = normalise_dtypes(pd.read_parquet(accepted_dir / "products.parquet"))
    judgments = normalise_dtypes(pd.read_parquet(accepted_dir / "judgments.parquet"))
    return AcceptedData(products, judgments, manifest["dataset_version"], manifest["catalog_version"])
