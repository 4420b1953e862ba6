"""Read catalog and judgment tables from CSV, Parquet and JSON Lines, keeping every bad row.

Validation must be able to say what happened to *every* input row, so these readers never drop
anything: a CSV line with the wrong number of fields, or bytes that are not valid in the declared
encoding, becomes a row flagged in the bookkeeping columns below (and is later quarantined with
that reason) instead of an exception or a silently skipped line.

Only problems that make the whole table unreadable (missing file, empty file, missing required
column, what looks like the wrong delimiter) raise :class:`SchemaError`, naming the fix.

Every loaded table has the canonical columns (object dtype, ``None`` for missing values, values as
read: text) plus:

* ``_source``: ``file:line`` of the record (Parquet: ``file:#row``);
* ``_well_formed``: False when the record could not be split into the header's fields;
* ``_valid_encoding``: False when some bytes were not valid in the declared encoding;
* ``_raw``: the raw text of a malformed record (else ``None``).
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from near2_tasks.errors import ValidationFailed

CATALOG_COLUMNS = ("product_id", "title", "description", "category", "brand", "attributes", "price", "updated_at")
CATALOG_REQUIRED = ("product_id", "title")
JUDGMENT_COLUMNS = ("query_id", "query", "product_id", "relevance")
JUDGMENT_REQUIRED = ("query", "product_id", "relevance")
BOOKKEEPING = ("_source", "_well_formed", "_valid_encoding", "_raw")

#: Fields longer than this are still read (and then rejected by the length checks), never a crash.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class SchemaError(ValidationFailed):
    """A table that cannot be validated at all (missing, empty, wrong columns or delimiter)."""


@dataclass
class RawTable:
    """A loaded table before validation: canonical columns plus bookkeeping (see module doc)."""

    name: str  # "catalog" or "judgments"
    frame: pd.DataFrame
    sources: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        return [c for c in self.frame.columns if not c.startswith("_")]


# ---------------------------------------------------------------------------------------------
# CSV


class _LineFeed:
    """Feeds decoded physical lines to ``csv.reader`` and remembers those of the current record."""

    def __init__(self, binary: Iterator[bytes], encoding: str) -> None:
        self._binary = binary
        self._encoding = encoding
        self.line_no = 0
        self.lines: list[str] = []
        self.bad_encoding = False

    def __iter__(self) -> _LineFeed:
        return self

    def __next__(self) -> str:
        raw = next(self._binary)
        self.line_no += 1
        try:
            text = raw.decode(self._encoding)
        except UnicodeDecodeError:
            text = raw.decode(self._encoding, errors="replace")
            self.bad_encoding = True
        if self.line_no == 1 and text.startswith("\ufeff"):
            text = text[1:]
        self.lines.append(text)
        return text

    def take(self) -> tuple[list[str], bool, int]:
        """The current record's lines, whether one had bad bytes, and its first line number."""
        lines, bad = self.lines, self.bad_encoding
        first = self.line_no - len(lines) + 1
        self.lines, self.bad_encoding = [], False
        return lines, bad, first


def _check_encoding(encoding: str) -> None:
    import codecs

    try:
        codecs.lookup(encoding)
    except LookupError as exc:
        raise SchemaError(f"unknown text encoding {encoding!r}", hint="set dataset.encoding, e.g. utf-8 or latin-1") from exc
    if "\n".encode(encoding) != b"\n":
        raise SchemaError(f"encoding {encoding!r} is not ASCII-compatible",
                          hint="convert the file to UTF-8 (iconv -f ... -t utf-8)")


def _guess_delimiter(header: str) -> str | None:
    counts = {d: header.count(d) for d in (";", "\t", "|", ",")}
    best = max(counts, key=counts.get)
    return best if counts[best] else None


def read_csv_records(path: Path, *, encoding: str = "utf-8", delimiter: str = ",", what: str = "table") -> pd.DataFrame:
    """Every record of a delimited file, with the header's column names and bookkeeping columns.

    A record whose field count differs from the header is kept (padded or cut) and flagged
    ``_well_formed=False`` with its raw text. A quoted record that spans several physical lines
    whose lines each parse on their own (a stray quote swallowing the rows after it) is split back
    into those rows, so the rows after the stray quote are not lost.
    """
    _check_encoding(encoding)
    if path.stat().st_size == 0:
        raise SchemaError(f"{what} file {path} is empty", hint="export the table again with a header row")
    with path.open("rb") as handle:
        feed = _LineFeed(iter(handle), encoding)
        reader = csv.reader(feed, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise SchemaError(f"{what} file {path} is empty", hint="export the table again with a header row") from None
        except csv.Error as exc:
            raise SchemaError(f"{what} file {path}: unreadable header line ({exc})") from exc
        feed.take()
        header = [h.strip() for h in header]
        if len(header) == 1 and (guess := _guess_delimiter(header[0])) and guess != delimiter:
            raise SchemaError(
                f"{what} file {path} has a single column {header[0][:80]!r}: the delimiter looks like {guess!r}, "
                f"not {delimiter!r}",
                hint=f"set dataset.delimiter: {guess!r} (or pass the right --format)",
            )
        duplicates = sorted({h for h in header if header.count(h) > 1})
        if duplicates:
            raise SchemaError(f"{what} file {path} repeats column(s) {', '.join(duplicates)} in its header")
        width = len(header)
        rows: list[list[Any]] = []
        name = path.name

        def add(values: list[str], lines: list[str], bad_encoding: bool, line_no: int, error: bool = False) -> None:
            well_formed = len(values) == width and not error
            cells: list[Any] = (values + [None] * width)[:width]
            raw = None if well_formed else "".join(lines)
            rows.append(cells + [f"{name}:{line_no}", well_formed, not bad_encoding, raw])

        while True:
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error:
                lines, bad, first = feed.take()
                add([], lines, bad, first, error=True)
                continue
            lines, bad, first = feed.take()
            if not values and len(lines) == 1 and not lines[0].strip():
                continue  # a blank line is not a record
            if len(lines) > 1:
                pieces = [next(csv.reader([line], delimiter=delimiter), []) for line in lines]
                if all(len(p) == width for p in pieces):
                    for offset, (piece, line) in enumerate(zip(pieces, lines)):
                        add(piece, [line], bad, first + offset)
                    continue
            add(values, lines, bad, first)
    if not rows:
        raise SchemaError(f"{what} file {path} has a header but no rows", hint="check the export")
    columns = header + list(BOOKKEEPING)
    return pd.DataFrame(rows, columns=columns, dtype=object)


# ---------------------------------------------------------------------------------------------
# JSON Lines and Parquet


def _cell(value: Any) -> Any:
    """A JSON/Parquet value as the text a CSV would have held (None stays None)."""
    if value is None:
        return None
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 2**53 else str(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    if hasattr(value, "tolist"):  # numpy arrays / scalars
        return _cell(value.tolist())
    return str(value)


def read_jsonl_records(path: Path, *, encoding: str = "utf-8", what: str = "table") -> pd.DataFrame:
    """One record per non-blank line; a line that is not a JSON object is kept, flagged malformed."""
    _check_encoding(encoding)
    if path.stat().st_size == 0:
        raise SchemaError(f"{what} file {path} is empty")
    records: list[dict[str, Any]] = []
    keys: dict[str, None] = {}
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                text, valid = raw.decode(encoding), True
            except UnicodeDecodeError:
                text, valid = raw.decode(encoding, errors="replace"), False
            if line_no == 1:
                text = text.lstrip("\ufeff")
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                obj = None
            well_formed = isinstance(obj, dict)
            record = {k: _cell(v) for k, v in obj.items()} if well_formed else {}
            keys.update(dict.fromkeys(record))
            record.update({"_source": f"{path.name}:{line_no}", "_well_formed": well_formed,
                           "_valid_encoding": valid, "_raw": None if well_formed else text})
            records.append(record)
    if not records:
        raise SchemaError(f"{what} file {path} has no records")
    columns = list(keys) + list(BOOKKEEPING)
    return pd.DataFrame.from_records(records, columns=columns).astype(object).where(lambda f: f.notna(), None)


def read_parquet_records(path: Path, *, what: str = "table", filters: list | None = None) -> pd.DataFrame:
    """All rows of a Parquet file (or dataset directory), values as text."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, filters=filters)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types; the message is what matters
        raise SchemaError(f"{what} file {path} is not readable Parquet: {str(exc).splitlines()[0]}") from exc
    if table.num_rows == 0:
        raise SchemaError(f"{what} file {path} has no rows")
    frame = pd.DataFrame({name: [_cell(v) for v in table.column(name).to_pylist()] for name in table.column_names},
                         dtype=object)
    frame["_source"] = [f"{path.name}:#{i}" for i in range(len(frame))]
    frame["_well_formed"] = True
    frame["_valid_encoding"] = True
    frame["_raw"] = None
    return frame


# ---------------------------------------------------------------------------------------------
# canonical columns


def _missing(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and value != value)


def text_column(values: list, index: pd.Index) -> pd.Series:
    """A column of text values that keeps ``None`` as ``None`` (pandas would make it NaN)."""
    return pd.Series([None if _missing(v) else v for v in values], index=index, dtype=object)


def to_canonical(
    frame: pd.DataFrame,
    *,
    name: str,
    path: Path,
    mapping: dict[str, str],
    columns: tuple[str, ...],
    required: tuple[str, ...],
) -> RawTable:
    """Rename the file's columns to canonical ones (``mapping``: canonical -> file column).

    Blank cells become ``None``; unknown columns are dropped. A missing required column raises
    :class:`SchemaError` that lists the columns the file does have.
    """
    unknown = sorted(set(mapping) - set(columns))
    if unknown:
        raise SchemaError(f"column mapping for the {name} names unknown column(s) {', '.join(unknown)}",
                          hint=f"canonical {name} columns are: {', '.join(columns)}")
    present = [c for c in frame.columns if not c.startswith("_")]
    out = pd.DataFrame(index=frame.index)
    for canonical in columns:
        source = mapping.get(canonical, canonical)
        if source in frame.columns:
            values = frame[source]
            strip = canonical in ("product_id", "query_id")  # ids are compared across tables
            out[canonical] = pd.Series(
                [None if _missing(v) else (v.strip() or None if strip else v) for v in values.tolist()],
                index=frame.index, dtype=object)
        elif canonical in required:
            raise SchemaError(
                f"{name} file {path} has no column {source!r} (columns: {', '.join(present)[:200]})",
                hint=f"map it in config: dataset.{'catalog' if name == 'catalog' else 'judgment'}_columns: "
                     f"{{{canonical}: <column name>}}",
            )
    for column in BOOKKEEPING:
        out[column] = frame[column].values
    out = out.reset_index(drop=True)
    return RawTable(name=name, frame=out, sources=[str(path)])


def read_records(path: Path, fmt: str, *, encoding: str, delimiter: str | None, what: str) -> pd.DataFrame:
    """Dispatch on a generic format: csv (also .tsv), parquet, jsonl."""
    if not path.exists():
        raise SchemaError(f"{what} file {path} does not exist", hint="check --catalog / --judgments")
    if path.is_dir() and fmt != "parquet":
        raise SchemaError(f"{what} path {path} is a directory", hint="name the file, or pass --format for a dataset directory")
    if fmt == "csv":
        default = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
        return read_csv_records(path, encoding=encoding, delimiter=delimiter or default, what=what)
    if fmt == "jsonl":
        return read_jsonl_records(path, encoding=encoding, what=what)
    if fmt == "parquet":
        return read_parquet_records(path, what=what)
    raise SchemaError(f"unsupported table format {fmt!r}", hint="use csv, parquet or jsonl")


def format_from_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    return "csv"


def load_table(path: Path, fmt: str, *, name: str, encoding: str, delimiter: str | None,
               mapping: dict[str, str]) -> RawTable:
    """Read a generic catalog or judgments file into a :class:`RawTable`."""
    path = Path(path)
    if fmt == "auto":
        fmt = format_from_suffix(path)
    frame = read_records(path, fmt, encoding=encoding, delimiter=delimiter, what=name)
    if name == "catalog":
        return to_canonical(frame, name=name, path=path, mapping=mapping,
                            columns=CATALOG_COLUMNS, required=CATALOG_REQUIRED)
    return to_canonical(frame, name=name, path=path, mapping=mapping,
                        columns=JUDGMENT_COLUMNS, required=JUDGMENT_REQUIRED)
