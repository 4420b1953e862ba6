"""Settings of the data stage: where the catalog and judgments come from, and how they are validated."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from near2_tasks.section import Section


class DatasetSettings(Section):
    """Where the catalog and the judgments come from, and how relevance is read."""

    name: str = "synthetic"
    catalog_path: Path | None = Field(None, description="None: the generated synthetic catalog.")
    judgments_path: Path | None = None
    format: Literal["auto", "csv", "parquet", "jsonl", "homedepot", "wands", "esci"] = Field(
        "auto", description="auto: from the file suffix (.parquet, .jsonl/.ndjson, else csv)."
    )
    encoding: str | None = Field(
        None, description="Text encoding of CSV/JSONL input (ASCII-compatible); None: utf-8, latin-1 for raw "
                          "Home Depot files.")
    delimiter: str | None = Field(None, description="CSV field separator; None: ',' (tab for .tsv and WANDS).")
    catalog_columns: dict[str, str] = Field(
        default_factory=dict,
        description="Canonical catalog column -> column name in the file, e.g. {product_id: sku, title: name}.",
    )
    judgment_columns: dict[str, str] = Field(
        default_factory=dict, description="Canonical judgment column -> column name in the file."
    )
    text_template: str = Field(
        "{title} | {brand} | {category}",
        description="The text embedded for a product; a field left empty is dropped with the separator before it.",
    )
    wands_labels: dict[str, float] = Field(
        default_factory=lambda: {"Exact": 3.0, "Partial": 2.0, "Irrelevant": 1.0},
        description="WANDS label -> relevance on this dataset's scale.",
    )
    esci_labels: dict[str, float] = Field(
        default_factory=lambda: {"E": 3.0, "S": 2.0, "C": 1.5, "I": 1.0},
        description="ESCI label (Exact, Substitute, Complement, Irrelevant) -> relevance.",
    )
    esci_locale: str | None = Field("us", description="Keep only this ESCI product_locale; None: all locales.")
    relevance_floor: float = Field(1.0, description="Lowest grade of the scale (NDCG gain = rel - floor).")
    relevance_max: float = 3.0
    relevant_threshold: float = Field(2.0, description="rel >= threshold counts as relevant.")
    synthetic_products: int = Field(2000, gt=0)
    synthetic_queries: int = Field(300, gt=0)
    synthetic_seed: int = 7

    @model_validator(mode="after")
    def _scale_is_ordered(self) -> DatasetSettings:
        if not self.relevance_floor <= self.relevant_threshold <= self.relevance_max:
            raise ValueError(
                "relevance scale must satisfy floor <= relevant_threshold <= max, got "
                f"{self.relevance_floor} / {self.relevant_threshold} / {self.relevance_max}"
            )
        return self



class ValidationSettings(Section):
    """Great Expectations checks of the catalog and judgments, and when a run must stop."""

    max_rejected_fraction: float = Field(
        0.01, ge=0, le=1, description="Stop when more than this share of a table's rows is quarantined.")
    fail_on_table_expectations: bool = Field(
        True, description="Stop when a table-level expectation (row-count drift) fails.")
    title_min_chars: int = Field(1, ge=1)
    title_max_chars: int = Field(1000, gt=0, description="Longer titles are quarantined.")
    query_max_chars: int = Field(1000, gt=0)
    allowed_categories: list[str] | None = Field(None, description="Bounded vocabulary; None: any category.")
    allowed_brands: list[str] | None = Field(None, description="Bounded vocabulary; None: any brand.")
    max_row_count_drift: float | None = Field(
        0.5, ge=0, description="Catalog rows may differ from the previous accepted catalog by this fraction; "
                               "None: no check.")
    duplicate_judgments: Literal["mean", "max", "min"] = Field(
        "mean", description="How repeated (query, product) judgments that agree are merged.")
    max_duplicate_spread: float = Field(
        1.0, ge=0, description="Repeated judgments whose grades differ by more than this conflict: all of them "
                               "are quarantined.")
    data_docs: bool = Field(True, description="Render the GX HTML data docs into the report directory.")

