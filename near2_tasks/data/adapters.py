"""Adapters for the public relevance sets users bring, onto near2's canonical tables.

Formats (``--format`` / ``dataset.format``):

* ``csv`` / ``parquet`` / ``jsonl``: a catalog file and a judgments file with canonical column names,
  or names mapped in ``dataset.catalog_columns`` / ``dataset.judgment_columns``. A directory holding
  ``products.<ext>`` and ``judgments.<ext>`` (the normalised layout of ``../shared/data/homedepot``)
  works too.
* ``homedepot``: the Kaggle "Home Depot Product Search Relevance" files: ``train.csv``
  (``id,product_uid,product_title,search_term,relevance``, latin-1), optionally
  ``product_descriptions.csv`` and ``attributes.csv`` (brand from ``MFG Brand Name``) beside it.
  Relevance is already numeric (1–3).
* ``wands``: Wayfair WANDS, tab-separated ``product.csv``, ``query.csv``, ``label.csv``; labels
  Exact / Partial / Irrelevant mapped with ``dataset.wands_labels``.
* ``esci``: Amazon Shopping Queries ``shopping_queries_dataset_products.parquet`` and
  ``shopping_queries_dataset_examples.parquet``; labels E/S/C/I mapped with ``dataset.esci_labels``;
  rows of other locales than ``dataset.esci_locale`` are left out at load time (counted in the
  report's notes: they are outside the dataset, not rejected rows).

A label that is not in the map stays as text in ``relevance`` and is quarantined by validation as
"not a number", so an unexpected label is visible, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from near2_tasks.config import Settings
from near2_tasks.data.loaders import (
    BOOKKEEPING,
    CATALOG_COLUMNS,
    CATALOG_REQUIRED,
    JUDGMENT_COLUMNS,
    JUDGMENT_REQUIRED,
    RawTable,
    SchemaError,
    format_from_suffix,
    load_table,
    read_csv_records,
    read_parquet_records,
    text_column,
    to_canonical,
)

FORMATS = ("auto", "csv", "parquet", "jsonl", "homedepot", "wands", "esci")
ESCI_PRODUCTS = "shopping_queries_dataset_products.parquet"
ESCI_EXAMPLES = "shopping_queries_dataset_examples.parquet"


@dataclass
class LoadedDataset:
    catalog: RawTable
    judgments: RawTable | None
    format: str


def detect_format(catalog_path: Path, fmt: str | None) -> str:
    """The format to read ``catalog_path`` with: the explicit one, else guessed from names."""
    if fmt and fmt != "auto":
        if fmt not in FORMATS:
            raise SchemaError(f"unknown format {fmt!r}", hint=f"use one of {', '.join(FORMATS[1:])}")
        return fmt
    path = Path(catalog_path)
    if path.is_dir():
        if (path / "train.csv").exists():
            return "homedepot"
        if (path / "product.csv").exists() and (path / "label.csv").exists():
            return "wands"
        if (path / ESCI_PRODUCTS).exists():
            return "esci"
        for ext, guessed in ((".csv", "csv"), (".parquet", "parquet"), (".jsonl", "jsonl")):
            if (path / f"products{ext}").exists():
                return guessed
        raise SchemaError(f"cannot tell the dataset format of directory {path}",
                          hint="pass --format (homedepot, wands, esci, csv, parquet, jsonl)")
    if path.name == ESCI_PRODUCTS:
        return "esci"
    return format_from_suffix(path)


def _file_in(path: Path, name: str, what: str) -> Path:
    """``path`` itself, or ``path/name`` when ``path`` is a directory."""
    path = Path(path)
    candidate = path / name if path.is_dir() else path
    if not candidate.exists():
        raise SchemaError(f"{what} file {candidate} does not exist", hint=f"expected {name}")
    return candidate


def _relabel(labels: pd.Series, label_map: dict[str, float]) -> list:
    """Map text labels to numbers; unknown labels stay as they are (validation rejects them)."""
    return [None if v is None else (str(label_map[v]) if v in label_map else v) for v in labels.tolist()]


# ---------------------------------------------------------------------------------------------
# generic tables


def load_generic(settings: Settings, catalog_path: Path, judgments_path: Path | None, fmt: str,
                 by_suffix: bool = False) -> LoadedDataset:
    """Canonical tables; ``by_suffix``: each file's format comes from its own suffix."""
    ds = settings.dataset
    catalog_path = Path(catalog_path)
    if catalog_path.is_dir():
        ext = {"csv": ".csv", "parquet": ".parquet", "jsonl": ".jsonl"}[fmt]
        if judgments_path is None and (catalog_path / f"judgments{ext}").exists():
            judgments_path = catalog_path / f"judgments{ext}"
        catalog_path = _file_in(catalog_path, f"products{ext}", "catalog")
    encoding = ds.encoding or "utf-8"
    catalog = load_table(catalog_path, fmt, name="catalog", encoding=encoding, delimiter=ds.delimiter,
                         mapping=ds.catalog_columns)
    judgments = None
    if judgments_path is not None:
        judgments_fmt = format_from_suffix(Path(judgments_path)) if by_suffix else fmt
        judgments = load_table(Path(judgments_path), judgments_fmt, name="judgments", encoding=encoding,
                               delimiter=ds.delimiter, mapping=ds.judgment_columns)
    return LoadedDataset(catalog, judgments, fmt)


# ---------------------------------------------------------------------------------------------
# Home Depot (Kaggle raw files)


def load_homedepot(settings: Settings, catalog_path: Path, judgments_path: Path | None) -> LoadedDataset:
    """Products are the distinct (product_uid, product_title) pairs of train.csv; judgments its rows."""
    ds = settings.dataset
    encoding = ds.encoding or "latin-1"
    train_path = _file_in(catalog_path, "train.csv", "Home Depot train")
    train = read_csv_records(train_path, encoding=encoding, delimiter=ds.delimiter or ",", what="Home Depot train")
    catalog_map = {"product_id": "product_uid", "title": "product_title", **ds.catalog_columns}
    judgment_map = {"query": "search_term", "product_id": "product_uid", **ds.judgment_columns}

    catalog = to_canonical(train, name="catalog", path=train_path, mapping=catalog_map,
                           columns=CATALOG_COLUMNS, required=CATALOG_REQUIRED)
    frame = catalog.frame
    good = frame["_well_formed"].astype(bool)
    repeated = good & frame.duplicated(subset=["product_id", "title"], keep="first")
    frame = frame[~repeated].reset_index(drop=True)

    directory = train_path.parent
    descriptions = directory / "product_descriptions.csv"
    if descriptions.exists():
        table = read_csv_records(descriptions, encoding=encoding, delimiter=",", what="Home Depot descriptions")
        table = table[table["_well_formed"].astype(bool)]
        lookup = dict(zip(table["product_uid"], table["product_description"]))
        frame["description"] = text_column([lookup.get(pid) for pid in frame["product_id"]], frame.index)
    attributes = directory / "attributes.csv"
    if attributes.exists():
        table = read_csv_records(attributes, encoding=encoding, delimiter=",", what="Home Depot attributes")
        table = table[table["_well_formed"].astype(bool) & (table["name"] == "MFG Brand Name")]
        lookup = dict(zip(table["product_uid"], table["value"]))
        frame["brand"] = text_column([lookup.get(pid) for pid in frame["product_id"]], frame.index)
    frame = frame[[c for c in CATALOG_COLUMNS if c in frame.columns] + list(BOOKKEEPING)]
    catalog = RawTable("catalog", frame, [str(train_path)],
                       notes={"train_rows": len(train), "repeated_product_rows_collapsed": int(repeated.sum())})

    judgments_file = _file_in(judgments_path, "train.csv", "Home Depot train") if judgments_path else train_path
    judgment_rows = train if judgments_file == train_path else read_csv_records(
        judgments_file, encoding=encoding, delimiter=ds.delimiter or ",", what="Home Depot judgments")
    judgments = to_canonical(judgment_rows, name="judgments", path=judgments_file, mapping=judgment_map,
                             columns=JUDGMENT_COLUMNS, required=JUDGMENT_REQUIRED)
    return LoadedDataset(catalog, judgments, "homedepot")


# ---------------------------------------------------------------------------------------------
# Wayfair WANDS


def load_wands(settings: Settings, catalog_path: Path, judgments_path: Path | None) -> LoadedDataset:
    ds = settings.dataset
    encoding = ds.encoding or "utf-8"
    delimiter = ds.delimiter or "\t"
    product_path = _file_in(catalog_path, "product.csv", "WANDS product")
    products = read_csv_records(product_path, encoding=encoding, delimiter=delimiter, what="WANDS product")
    catalog_map = {"title": "product_name", "category": "category hierarchy", "description": "product_description",
                   "attributes": "product_features", **ds.catalog_columns}
    catalog = to_canonical(products, name="catalog", path=product_path, mapping=catalog_map,
                           columns=CATALOG_COLUMNS, required=CATALOG_REQUIRED)
    if "category" in catalog.frame.columns:  # "Furniture / Chairs" -> "Furniture > Chairs"
        catalog.frame["category"] = text_column(
            [None if v is None else " > ".join(p.strip() for p in v.split("/")) for v in catalog.frame["category"]],
            catalog.frame.index)

    label_dir = Path(judgments_path) if judgments_path else Path(catalog_path)
    label_path = _file_in(label_dir, "label.csv", "WANDS label")
    query_path = _file_in(label_path.parent, "query.csv", "WANDS query")
    labels = read_csv_records(label_path, encoding=encoding, delimiter=delimiter, what="WANDS label")
    queries = read_csv_records(query_path, encoding=encoding, delimiter=delimiter, what="WANDS query")
    for frame, path, needed in ((labels, label_path, ("query_id", "product_id", "label")),
                                (queries, query_path, ("query_id", "query"))):
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise SchemaError(f"WANDS file {path} has no column(s) {', '.join(missing)}",
                              hint="WANDS files are tab-separated; check dataset.delimiter")
    good_queries = queries[queries["_well_formed"].astype(bool)]
    query_text = dict(zip(good_queries["query_id"], good_queries["query"]))
    labels["query"] = text_column([query_text.get(q) for q in labels["query_id"]], labels.index)
    labels["relevance"] = text_column(_relabel(labels["label"], ds.wands_labels), labels.index)
    judgments = to_canonical(labels, name="judgments", path=label_path, mapping=ds.judgment_columns,
                             columns=JUDGMENT_COLUMNS, required=JUDGMENT_REQUIRED)
    judgments.notes = {"labels": labels["label"].value_counts(dropna=False).to_dict()}
    return LoadedDataset(catalog, judgments, "wands")


# ---------------------------------------------------------------------------------------------
# Amazon ESCI


def _locale_rows(path: Path, locale: str | None, what: str) -> tuple[pd.DataFrame, int]:
    """Rows of one locale, and how many rows of other locales were left out."""
    import pyarrow.parquet as pq

    total = pq.ParquetFile(path).metadata.num_rows
    filters = [("product_locale", "=", locale)] if locale else None
    if locale and "product_locale" not in pq.read_schema(path).names:
        raise SchemaError(f"ESCI file {path} has no product_locale column", hint="set dataset.esci_locale: null")
    frame = read_parquet_records(path, what=what, filters=filters)
    return frame, total - len(frame)


def load_esci(settings: Settings, catalog_path: Path, judgments_path: Path | None) -> LoadedDataset:
    ds = settings.dataset
    products_path = _file_in(catalog_path, ESCI_PRODUCTS, "ESCI products")
    products, products_excluded = _locale_rows(products_path, ds.esci_locale, "ESCI products")
    catalog_map = {"title": "product_title", "description": "product_description", "brand": "product_brand",
                   "attributes": "product_bullet_point", **ds.catalog_columns}
    catalog = to_canonical(products, name="catalog", path=products_path, mapping=catalog_map,
                           columns=CATALOG_COLUMNS, required=CATALOG_REQUIRED)
    catalog.notes = {"locale": ds.esci_locale, "excluded_other_locales": products_excluded}

    examples_dir = Path(judgments_path) if judgments_path else products_path.parent
    examples_path = _file_in(examples_dir, ESCI_EXAMPLES, "ESCI examples")
    examples, examples_excluded = _locale_rows(examples_path, ds.esci_locale, "ESCI examples")
    if "esci_label" not in examples.columns:
        raise SchemaError(f"ESCI file {examples_path} has no esci_label column")
    examples["relevance"] = text_column(_relabel(examples["esci_label"], ds.esci_labels), examples.index)
    judgments = to_canonical(examples, name="judgments", path=examples_path, mapping=ds.judgment_columns,
                             columns=JUDGMENT_COLUMNS, required=JUDGMENT_REQUIRED)
    judgments.notes = {"locale": ds.esci_locale, "excluded_other_locales": examples_excluded,
                       "labels": examples["esci_label"].value_counts(dropna=False).to_dict()}
    return LoadedDataset(catalog, judgments, "esci")


# ---------------------------------------------------------------------------------------------


def load_dataset(settings: Settings, catalog_path: Path, judgments_path: Path | None = None,
                 fmt: str | None = None) -> LoadedDataset:
    """Load a catalog (and judgments) in any supported format into canonical raw tables."""
    catalog_path = Path(catalog_path)
    if not catalog_path.exists():
        raise SchemaError(f"catalog path {catalog_path} does not exist", hint="check --catalog")
    if judgments_path is not None and not Path(judgments_path).exists():
        raise SchemaError(f"judgments path {judgments_path} does not exist", hint="check --judgments")
    requested = fmt or settings.dataset.format
    fmt = detect_format(catalog_path, requested)
    if fmt == "homedepot":
        return load_homedepot(settings, catalog_path, judgments_path)
    if fmt == "wands":
        return load_wands(settings, catalog_path, judgments_path)
    if fmt == "esci":
        return load_esci(settings, catalog_path, judgments_path)
    return load_generic(settings, catalog_path, judgments_path, fmt, by_suffix=requested == "auto")
