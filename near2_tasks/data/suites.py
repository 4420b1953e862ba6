"""The Great Expectations suites of the catalog and the judgments, and the merge of repeated judgments.

Each table is checked in two stages (see :mod:`near2_tasks.data.validate` for the policy): ``rows``, the
checks of each row on its own, then ``set``, the checks of the rows that passed, together. Checks that
GX cannot express on the raw columns (a price that parses as a finite number, a judged product that is
in the catalog, repeated judgments that agree) are computed into helper columns (``_price_is_number``,
``_product_known``, ``_duplicates_agree`` …) that an expectation then tests.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pandas as pd

from near2_tasks.config import Settings
from near2_tasks.data.expectations import Check, ExpectationRunner, TableOutcome, run_stage
from near2_tasks.data.loaders import CATALOG_COLUMNS, JUDGMENT_COLUMNS, RawTable
from near2_tasks.data.outputs import ACCEPTED_JUDGMENT_COLUMNS, normalise_dtypes
from near2_tasks.data.text import query_key

#: Control characters: C0 (tab and line breaks included), DEL and C1. Single-line fields allow none.
CONTROL_CHARS = r"[\x00-\x1f\x7f-\x9f]"
#: Multi-line fields (description, attributes) may hold tabs and line breaks.
CONTROL_CHARS_MULTILINE = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"
SINGLE_LINE_FIELDS = ("product_id", "title", "category", "brand", "query_id", "query")
MULTI_LINE_FIELDS = ("description", "attributes")


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


# ---------------------------------------------------------------------------------------------
# catalog


def _catalog_row_checks(gxe: Any, frame: pd.DataFrame, raw: pd.DataFrame, present: list[str],
                        settings: Settings) -> list[Check]:
    """The ``rows`` checks of the catalog; adds the helper columns they test to ``frame``."""
    vs = settings.validation
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
    return checks


def _catalog_set_checks(gxe: Any, settings: Settings, previous_rows: int | None) -> list[Check]:
    """The ``set`` checks of the catalog; the row-count drift only against a previous accepted catalog."""
    vs = settings.validation
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
    return set_checks


def validate_catalog(runner: ExpectationRunner, table: RawTable, settings: Settings,
                     previous_rows: int | None) -> TableOutcome:
    import great_expectations.expectations as gxe

    raw = table.frame.reset_index(drop=True)
    present = [c for c in CATALOG_COLUMNS if c in raw.columns]
    frame = raw.copy()
    checks = _catalog_row_checks(gxe, frame, raw, present, settings)

    reasons: dict[int, list[str]] = {}
    described: list[dict[str, Any]] = []
    table_failures: list[str] = []
    run_stage(runner, "catalog_rows", checks, frame.drop(columns=["_raw"]), reasons, described, table_failures)

    survivors = frame.drop(index=list(reasons))[present]
    set_checks = _catalog_set_checks(gxe, settings, previous_rows)
    run_stage(runner, "catalog_set", set_checks, survivors, reasons, described, table_failures)

    accepted = frame.drop(index=list(reasons))
    return TableOutcome("catalog", len(raw), accepted[present], reasons, described, table_failures, dict(table.notes))


# ---------------------------------------------------------------------------------------------
# judgments


def _judgment_row_checks(gxe: Any, frame: pd.DataFrame, present: list[str], settings: Settings,
                         catalog_ids: set[str], accepted_ids: set[str]) -> list[Check]:
    """The ``rows`` checks of the judgments; adds the helper columns they test to ``frame``."""
    ds, vs = settings.dataset, settings.validation
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
    return checks + _text_checks(gxe, [c for c in present if c in ("query", "query_id")])


def _judgment_set_checks(gxe: Any, survivors: pd.DataFrame, max_spread: float) -> list[Check]:
    """The ``set`` checks of the judgments; adds ``_query_key`` and ``_duplicates_agree`` to ``survivors``."""
    survivors["_query_key"] = [query_key(q) for q in survivors["query"]]
    grades = survivors.groupby(["_query_key", "product_id"])["relevance"]
    spread = grades.transform("max") - grades.transform("min")
    survivors["_duplicates_agree"] = (spread <= max_spread + 1e-9).astype(bool)
    return [
        Check("duplicates_agree", "set",
              gxe.ExpectColumnValuesToBeInSet(column="_duplicates_agree", value_set=[True]),
              f"repeated (query, product) judgments whose grades differ by more than "
              f"{max_spread} (all of them are quarantined)"),
        Check("judgments_not_empty", "set", gxe.ExpectTableRowCountToBeBetween(min_value=1),
              "no judgment passed the row checks", row_level=False),
    ]


def validate_judgments(runner: ExpectationRunner, table: RawTable, settings: Settings,
                       catalog_ids: set[str], accepted_ids: set[str]) -> TableOutcome:
    import great_expectations.expectations as gxe

    vs = settings.validation
    raw = table.frame.reset_index(drop=True)
    present = [c for c in JUDGMENT_COLUMNS if c in raw.columns]
    frame = raw.copy()
    checks = _judgment_row_checks(gxe, frame, present, settings, catalog_ids, accepted_ids)

    reasons: dict[int, list[str]] = {}
    described: list[dict[str, Any]] = []
    table_failures: list[str] = []
    run_stage(runner, "judgments_rows", checks, frame.drop(columns=["_raw"]), reasons, described, table_failures)

    survivors = frame.drop(index=list(reasons)).copy()
    set_checks = _judgment_set_checks(gxe, survivors, vs.max_duplicate_spread)
    run_stage(runner, "judgments_set", set_checks, survivors[present + ["_query_key", "_duplicates_agree"]],
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
