"""What validation leaves on disk, and reading the accepted tables back.

Under a validation's ``report_dir``: ``quarantine/<table>.jsonl`` (one line per quarantined row: the
failing checks with their messages, the record and, for a malformed line, its raw text) and, when the
run passed, ``accepted/products.parquet``, ``accepted/judgments.parquet`` and ``accepted/manifest.json``
(the versions), which :func:`load_accepted` reads. Also the columns and dtypes of the accepted tables
and each table's section of ``report.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from near2_tasks.data.expectations import TableOutcome
from near2_tasks.data.loaders import RawTable
from near2_tasks.data.text import product_texts
from near2_tasks.errors import Near2Error

#: Columns of the accepted products table, always present (missing optional ones hold None).
PRODUCT_COLUMNS = ["product_id", "title", "category", "brand", "price", "text"]
OPTIONAL_PRODUCT_COLUMNS = ["description", "attributes", "updated_at"]
ACCEPTED_JUDGMENT_COLUMNS = ["query_id", "query", "product_id", "relevance"]
#: Columns a catalog version is computed from (what gets indexed and embedded).
CATALOG_HASH_COLUMNS = PRODUCT_COLUMNS + OPTIONAL_PRODUCT_COLUMNS


@dataclass
class AcceptedData:
    products: pd.DataFrame
    judgments: pd.DataFrame
    dataset_version: str
    catalog_version: str


def normalise_dtypes(frame: pd.DataFrame) -> pd.DataFrame:
    """pandas' ``str`` dtype for text (missing = NaN), float64 for price and relevance.

    The same dtypes in memory and after a Parquet round trip, so a task that reloads the accepted
    tables sees exactly what validation returned.
    """
    frame = frame.copy()
    for column in frame.columns:
        frame[column] = frame[column].astype("float64" if column in ("price", "relevance") else "str")
    return frame


def accepted_products(frame: pd.DataFrame, template: str) -> pd.DataFrame:
    """The accepted products table: :data:`PRODUCT_COLUMNS` (``text`` from ``template``), then the optional ones."""
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


def write_quarantines(quarantine_dir: Path, outcomes: list[TableOutcome],
                      tables: list[RawTable | None]) -> dict[str, Path]:
    """``quarantine/<table>.jsonl`` for each outcome (with the raw table it came from); the paths by table."""
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    quarantine_paths: dict[str, Path] = {}
    for outcome, table in zip(outcomes, tables):
        path = quarantine_dir / f"{outcome.name}.jsonl"
        _write_quarantine(path, table, outcome, {c["check"]: c for c in outcome.checks})
        quarantine_paths[outcome.name] = path
    return quarantine_paths


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def write_accepted(accepted_dir: Path, products: pd.DataFrame, judgments: pd.DataFrame,
                   manifest: dict[str, Any]) -> dict[str, Path]:
    """The accepted tables and their manifest under ``accepted_dir``; their paths."""
    accepted_dir.mkdir(parents=True, exist_ok=True)
    accepted_paths = {"products": accepted_dir / "products.parquet",
                      "judgments": accepted_dir / "judgments.parquet",
                      "manifest": accepted_dir / "manifest.json"}
    _write_parquet(products, accepted_paths["products"])
    _write_parquet(judgments, accepted_paths["judgments"])
    accepted_paths["manifest"].write_text(json.dumps(manifest, indent=2))
    return accepted_paths


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


def table_report(outcome: TableOutcome) -> dict[str, Any]:
    """A table's section of ``report.json``: counts, quarantined rows by check, table failures, checks, notes."""
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
