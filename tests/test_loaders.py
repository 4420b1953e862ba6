"""Loading: readers keep every row (bad ones flagged), adapters map public datasets, product text."""

from __future__ import annotations

import string
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from near2_tasks.config import load_settings
from near2_tasks.data.adapters import detect_format, load_dataset
from near2_tasks.data.loaders import SchemaError, load_table, read_csv_records, read_jsonl_records
from near2_tasks.data.text import product_text, product_texts, query_key
from near2_tasks.errors import Near2Error

DATA = Path(__file__).parent / "data"


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


@pytest.fixture
def cfg(tmp_path):
    return load_settings(home=str(tmp_path / "home"))


# ----------------------------------------------------------------------------------- product text


def test_template_drops_empty_fields_with_their_separator():
    template = "{title} | {brand} | {category}"
    assert product_text({"title": "Drill", "brand": "DeWalt", "category": "Tools"}, template) == "Drill | DeWalt | Tools"
    assert product_text({"title": "Drill", "brand": None, "category": "Tools"}, template) == "Drill | Tools"
    assert product_text({"title": "Drill", "brand": "  ", "category": float("nan")}, template) == "Drill"
    assert product_text({"title": " Drill "}, "passage: {title}.") == "passage: Drill."


def test_template_rejects_unknown_fields_and_format_specs():
    with pytest.raises(Near2Error, match="unknown field"):
        product_text({"title": "x"}, "{title} {colour}")
    with pytest.raises(Near2Error, match="format spec"):
        product_text({"title": "x"}, "{title!r}")
    with pytest.raises(Near2Error, match="names no field"):
        product_text({"title": "x"}, "just text")


def test_product_texts_follow_the_frame_and_missing_columns():
    frame = pd.DataFrame({"title": ["A", "B"], "brand": ["X", None]})
    assert product_texts(frame, "{title} | {brand} | {category}") == ["A | X", "B"]


def test_query_key_ignores_case_and_spacing():
    assert query_key("  Cordless   DRILL ") == query_key("cordless drill")
    assert query_key("drill") != query_key("drills")


# ----------------------------------------------------------------------------------- CSV reader


def test_malformed_lines_are_kept_and_flagged(tmp_path):
    path = write(tmp_path / "p.csv", "product_id,title\n1,ok\n2,too,many,fields\n3\n4,fine\n")
    frame = read_csv_records(path)
    assert frame["product_id"].tolist() == ["1", "2", "3", "4"]
    assert frame["_well_formed"].tolist() == [True, False, False, True]
    assert frame.loc[1, "_raw"] == "2,too,many,fields\n"
    assert frame["_source"].tolist() == ["p.csv:2", "p.csv:3", "p.csv:4", "p.csv:5"]


def test_a_stray_quote_does_not_swallow_the_rows_after_it(tmp_path):
    path = write(tmp_path / "p.csv", 'product_id,title\n1,"unterminated\n2,second\n3,third\n')
    frame = read_csv_records(path)
    assert frame["product_id"].tolist() == ["1", "2", "3"]
    assert frame.loc[1, "title"] == "second" and frame.loc[2, "title"] == "third"


def test_quoted_line_breaks_inside_a_field_stay_one_record(tmp_path):
    path = write(tmp_path / "p.csv", 'product_id,title,description\n1,Drill,"line one\nline two"\n2,Saw,x\n')
    frame = read_csv_records(path)
    assert len(frame) == 2 and frame.loc[0, "description"] == "line one\nline two"
    assert frame["_well_formed"].all()


def test_invalid_bytes_are_flagged_not_fatal(tmp_path):
    path = write(tmp_path / "p.csv", b"product_id,title\n1,caf\xe9 table\n2,plain\n")
    frame = read_csv_records(path, encoding="utf-8")
    assert frame["_valid_encoding"].tolist() == [False, True]
    assert frame.loc[0, "title"] == "caf\ufffd table"
    latin = read_csv_records(path, encoding="latin-1")
    assert latin["_valid_encoding"].all() and latin.loc[0, "title"] == "café table"


def test_bom_blank_lines_crlf_and_a_megabyte_field(tmp_path):
    big = "x" * 1_000_000
    path = write(tmp_path / "p.csv", ("\ufeffproduct_id,title\r\n1,a\r\n\r\n2," + big + "\r\n").encode("utf-8"))
    frame = read_csv_records(path)
    assert list(frame.columns[:2]) == ["product_id", "title"]
    assert frame["product_id"].tolist() == ["1", "2"] and len(frame.loc[1, "title"]) == 1_000_000


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("product_id,title\n", "no rows"),
    ("product_id;title\n1;a\n", "delimiter looks like ';'"),
    ("product_id\ttitle\n1\ta\n", "delimiter looks like"),
    ("product_id,name\n1,a\n", "no column 'title'"),
    ("product_id,title,title\n1,a,b\n", "repeats column"),
])
def test_unreadable_tables_name_the_problem(tmp_path, content, message):
    path = write(tmp_path / "p.csv", content)
    with pytest.raises(SchemaError, match=message):
        load_table(path, "csv", name="catalog", encoding="utf-8", delimiter=None, mapping={})


def test_column_mapping_renames_to_canonical(tmp_path):
    path = write(tmp_path / "p.csv", "sku,name,maker\nA1,Drill,DeWalt\n")
    table = load_table(path, "csv", name="catalog", encoding="utf-8", delimiter=None,
                       mapping={"product_id": "sku", "title": "name", "brand": "maker"})
    assert table.frame.loc[0, ["product_id", "title", "brand"]].tolist() == ["A1", "Drill", "DeWalt"]
    with pytest.raises(SchemaError, match="unknown column"):
        load_table(path, "csv", name="catalog", encoding="utf-8", delimiter=None, mapping={"colour": "x"})


_cell = st.text(alphabet=string.ascii_letters + string.digits + " ,;\t\x01\x7f\u00e9\u2603", max_size=12)


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.lists(_cell, min_size=0, max_size=4), min_size=1, max_size=25))
def test_every_line_becomes_exactly_one_record(tmp_path, rows):
    """Whatever unquoted lines hold, each non-empty line is one record, well-formed iff it has 2 fields."""
    lines = [",".join(r) for r in rows]
    path = write(tmp_path / "h.csv", "product_id,title\n" + "\n".join(lines) + "\n")
    records = [line for line in lines if line != ""]
    if not records:
        with pytest.raises(SchemaError, match="no rows"):
            read_csv_records(path)
        return
    frame = read_csv_records(path)
    assert len(frame) == len(records)
    assert frame["_well_formed"].tolist() == [len(line.split(",")) == 2 for line in records]
    assert frame["product_id"].fillna("").tolist() == [line.split(",")[0] for line in records]


# ----------------------------------------------------------------------------------- JSONL, Parquet


def test_jsonl_keeps_broken_lines(tmp_path):
    path = write(tmp_path / "p.jsonl", '{"product_id": 1, "title": "a", "price": 9.5}\nnot json\n[1, 2]\n\n'
                                      '{"product_id": "2", "title": "b", "attributes": {"color": "red"}}\n')
    frame = read_jsonl_records(path)
    assert frame["_well_formed"].tolist() == [True, False, False, True]
    assert frame.loc[0, "product_id"] == "1" and frame.loc[0, "price"] == "9.5"
    assert frame.loc[3, "attributes"] == '{"color": "red"}'
    assert frame.loc[1, "_raw"] == "not json\n"


def test_parquet_ids_become_text(tmp_path, cfg):
    frame = pd.DataFrame({"product_id": [101, 102], "title": ["a", "b"], "price": [1.5, None]})
    frame.to_parquet(tmp_path / "products.parquet")
    pd.DataFrame({"query": ["q"], "product_id": [101], "relevance": [3.0]}).to_parquet(tmp_path / "judgments.parquet")
    loaded = load_dataset(cfg, tmp_path)  # a directory with products.parquet / judgments.parquet
    assert loaded.format == "parquet"
    assert loaded.catalog.frame["product_id"].tolist() == ["101", "102"]
    assert loaded.catalog.frame["price"].tolist() == ["1.5", None]
    assert loaded.judgments.frame.loc[0, ["product_id", "relevance"]].tolist() == ["101", "3"]


# ----------------------------------------------------------------------------------- adapters


def test_format_detection(tmp_path):
    assert detect_format(DATA / "homedepot", None) == "homedepot"
    assert detect_format(DATA / "wands", "auto") == "wands"
    assert detect_format(DATA / "generic", None) == "csv"
    assert detect_format(tmp_path / "x.parquet", None) == "parquet"
    assert detect_format(tmp_path / "x.ndjson", None) == "jsonl"
    with pytest.raises(SchemaError, match="cannot tell"):
        detect_format(tmp_path, None)


def test_homedepot_raw_files(cfg):
    loaded = load_dataset(cfg, DATA / "homedepot", fmt="homedepot")
    products = loaded.catalog.frame.set_index("product_id")
    # one product per distinct (uid, title); latin-1 decoded; brand and description joined in
    assert sorted(products.index) == ["100001", "100002", "100005", "100006", "100007", "100009", "100010", "100011"]
    assert products.loc["100010", "title"].endswith("Café Flag")
    assert products.loc["100001", "brand"] == "Simpson Strong-Tie" and products.loc["100002", "brand"] is None
    assert products.loc["100001", "description"] == "Angle made from 12-gauge steel."
    judgments = loaded.judgments.frame
    assert len(judgments) == 13 and judgments.loc[0, ["query", "product_id", "relevance"]].tolist() == [
        "angle bracket", "100001", "3"]
    assert loaded.catalog.notes["repeated_product_rows_collapsed"] == 5


def test_wands_files_map_labels_from_config(tmp_path):
    cfg = load_settings(home=str(tmp_path), dataset={"wands_labels": {"Exact": 2.0, "Partial": 1.0, "Irrelevant": 0.0}})
    loaded = load_dataset(cfg, DATA / "wands")
    assert loaded.format == "wands"
    products = loaded.catalog.frame.set_index("product_id")
    assert products.loc["1", "title"] == "all-clad 7 qt. slow cooker"
    assert products.loc["0", "category"] == "Furniture > Bedroom Furniture > Beds & Headboards > Beds"
    judgments = loaded.judgments.frame
    first = judgments.iloc[0]
    assert (first["query"], first["product_id"], first["relevance"]) == ("slow cooker", "1", "2.0")
    assert judgments["relevance"].tolist() == ["2.0", "1.0", "0.0", "2.0", "0.0", "0.0"]


def test_wands_unknown_label_is_kept_visible(tmp_path, cfg):
    for name in ("product.csv", "query.csv"):
        (tmp_path / name).write_bytes((DATA / "wands" / name).read_bytes())
    write(tmp_path / "label.csv", "id\tquery_id\tproduct_id\tlabel\n0\t1\t1\tMaybe\n1\t9\t1\tExact\n")
    judgments = load_dataset(cfg, tmp_path, fmt="wands").judgments.frame
    assert judgments["relevance"].tolist() == ["Maybe", "3.0"]
    assert judgments["query"].tolist() == ["slow cooker", None]  # query 9 is not in query.csv


def write_esci(directory: Path) -> None:
    pd.DataFrame({
        "product_id": ["B01", "B02", "B03", "B01"],
        "product_title": ["Drill", "Hammer", "Bohrmaschine", "Drill"],
        "product_description": [None, "steel", None, None],
        "product_bullet_point": ["20V", None, None, "20V"],
        "product_brand": ["DeWalt", "Estwing", "Bosch", "DeWalt"],
        "product_color": [None] * 4,
        "product_locale": ["us", "us", "de", "jp"],
    }).to_parquet(directory / "shopping_queries_dataset_products.parquet")
    pd.DataFrame({
        "example_id": [0, 1, 2, 3],
        "query": ["cordless drill", "cordless drill", "bohrmaschine", "hammer"],
        "query_id": [10, 10, 11, 12],
        "product_id": ["B01", "B02", "B03", "B02"],
        "product_locale": ["us", "us", "de", "us"],
        "esci_label": ["E", "C", "E", "S"],
        "small_version": [1, 1, 1, 1],
        "large_version": [1, 1, 1, 1],
        "split": ["train"] * 4,
    }).to_parquet(directory / "shopping_queries_dataset_examples.parquet")


def test_esci_locale_filter_and_labels(tmp_path, cfg):
    write_esci(tmp_path)
    loaded = load_dataset(cfg, tmp_path)
    assert loaded.format == "esci"
    assert loaded.catalog.frame["product_id"].tolist() == ["B01", "B02"]
    assert loaded.catalog.frame["brand"].tolist() == ["DeWalt", "Estwing"]
    assert loaded.catalog.notes["excluded_other_locales"] == 2
    judgments = loaded.judgments.frame
    assert judgments["query_id"].tolist() == ["10", "10", "12"]
    assert judgments["relevance"].tolist() == [str(cfg.dataset.esci_labels[x]) for x in ("E", "C", "S")]
    everything = load_settings(home=str(tmp_path / "h"), dataset={"esci_locale": None})
    assert len(load_dataset(everything, tmp_path).catalog.frame) == 4


def test_missing_paths_are_schema_errors(tmp_path, cfg):
    with pytest.raises(SchemaError, match="does not exist"):
        load_dataset(cfg, tmp_path / "nope.csv")
    with pytest.raises(SchemaError, match="judgments path"):
        load_dataset(cfg, DATA / "generic" / "products.csv", tmp_path / "nope.csv")
