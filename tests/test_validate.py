"""Validation: every row accepted or quarantined with its reason, reports, thresholds, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from near2_tasks.cli import main
from near2_tasks.config import load_settings
from near2_tasks.errors import ValidationFailed
from near2_tasks.data.outputs import load_accepted
from near2_tasks.data.validate import validate_dataset

DATA = Path(__file__).parent / "data"


def cfg(tmp_path: Path, **validation):
    return load_settings(home=str(tmp_path / "home"),
                         dataset={"synthetic_products": 300, "synthetic_queries": 60},
                         validation={"data_docs": False, **validation})


def quarantine(path: Path) -> dict[str, list[str]]:
    """source (file:line) -> failing check names, read from a quarantine file."""
    entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return {e["source"]: [r["check"] for r in e["reasons"]] for e in entries}


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
        raise SystemExit(0)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


# --------------------------------------------------------------------------------------- clean data


def test_synthetic_catalog_is_accepted_versioned_and_reloadable(tmp_path):
    settings = load_settings(home=str(tmp_path / "home"), dataset={"synthetic_products": 300, "synthetic_queries": 60})
    result = validate_dataset(settings, None, report_dir=tmp_path / "report")
    assert result.passed
    catalog, judgments = result.report["tables"]["catalog"], result.report["tables"]["judgments"]
    assert catalog["input_rows"] == 300 == catalog["accepted_rows"] + catalog["quarantined_rows"]
    assert judgments["input_rows"] == judgments["accepted_rows"] + judgments["quarantined_rows"]
    assert list(result.products.columns) == ["product_id", "title", "category", "brand", "price", "text"]
    assert result.products["text"].str.startswith(tuple(result.products["title"])).all()
    assert result.judgments["relevance"].between(1.0, 3.0).all()
    assert not result.judgments.duplicated(["query_id", "product_id"]).any()
    assert set(result.judgments["product_id"]) <= set(result.products["product_id"])
    # outputs on disk: report, GX data docs, empty quarantine, accepted parquet
    report = json.loads(result.report_path.read_text())
    assert report["passed"] and report["dataset_version"] == result.dataset_version
    assert {c["check"] for c in report["tables"]["catalog"]["checks"]} >= {"product_id_unique", "title_length"}
    docs = Path(report["paths"]["data_docs"])
    assert docs.name == "index.html" and "catalog_rows" in docs.read_text()
    assert result.quarantine_paths["catalog"].read_text() == ""
    accepted = load_accepted(tmp_path / "report")
    pd.testing.assert_frame_equal(accepted.products, result.products)
    pd.testing.assert_frame_equal(accepted.judgments, result.judgments)
    assert (accepted.dataset_version, accepted.catalog_version) == (result.dataset_version, result.catalog_version)
    # a re-run converges to the same versions; another text template is another catalog version
    again = validate_dataset(settings, None, report_dir=tmp_path / "report")
    assert (again.dataset_version, again.catalog_version) == (result.dataset_version, result.catalog_version)
    titles_only = settings.model_copy(update={"dataset": settings.dataset.model_copy(
        update={"text_template": "{title}"}), "validation": settings.validation.model_copy(update={"data_docs": False})})
    other = validate_dataset(titles_only, None, report_dir=tmp_path / "titles")
    assert other.catalog_version != result.catalog_version
    assert other.products["text"].tolist() == other.products["title"].tolist()


# --------------------------------------------------------------------------------------- bad catalog

GOOD = ["g1,DeWalt Drill,Tools,DeWalt,99", "g2,Makita Saw,Tools,Makita,", "g3,Moen Faucet,Bath,Moen,150.5",
        "g4,Behr Paint,Paint,,30"]
# source line -> (bytes of the line, the check that must reject it); line 1 is the header
BAD = {
    "malformed": (b"m1,too,many,fields,1,2,3", "record_well_formed"),
    "dup_a": (b"d1,First version,Tools,X,1", "product_id_unique"),
    "dup_b": (b"d1,Second version,Tools,X,1", "product_id_unique"),
    "repeat": (b"g1,DeWalt Drill,Tools,DeWalt,99", "not_exact_repeat"),
    "empty_title": (b"e1,,Tools,X,1", "title_present"),
    "blank_title": (b"w1,   ,Tools,X,1", "title_not_blank"),
    "bad_bytes": (b"u1,Caf\xe9 Table,Furniture,X,1", "valid_encoding"),
    "control": (b"c1,Bell\x07Ringer,Tools,X,1", "title_no_control_chars"),
    "huge_title": (b"h1," + b"x" * 1_000_000 + b",Tools,X,1", "title_length"),
    "negative_price": (b"n1,Cheap,Tools,X,-5", "price_non_negative"),
    "price_text": (b"t1,Odd price,Tools,X,abc", "price_is_number"),
    "no_id": (b",No id,Tools,X,1", "product_id_present"),
}


def write_bad_catalog(path: Path) -> dict[str, str]:
    """Write the crafted catalog; return source (products.csv:<line>) -> expected check."""
    lines = [b"product_id,title,category,brand,price"] + [g.encode() for g in GOOD]
    expected = {}
    for line, check in BAD.values():
        lines.append(line)
        expected[f"{path.name}:{len(lines)}"] = check
    path.write_bytes(b"\n".join(lines) + b"\n")
    return expected


def test_every_bad_catalog_row_is_quarantined_with_its_reason(tmp_path):
    catalog = tmp_path / "products.csv"
    expected = write_bad_catalog(catalog)
    result = validate_dataset(cfg(tmp_path, max_rejected_fraction=1.0), catalog, report_dir=tmp_path / "r")
    table = result.report["tables"]["catalog"]
    assert table["input_rows"] == len(GOOD) + len(BAD)
    assert table["accepted_rows"] + table["quarantined_rows"] == table["input_rows"]
    assert sorted(result.products["product_id"]) == ["g1", "g2", "g3", "g4"]
    found = quarantine(result.quarantine_paths["catalog"])
    assert set(found) == set(expected)
    for source, check in expected.items():
        assert check in found[source], (source, found[source])
    raw = [json.loads(line) for line in result.quarantine_paths["catalog"].read_text().splitlines()]
    assert any(entry.get("raw", "").startswith("m1,too,many") for entry in raw)
    assert table["quarantined_by_check"]["product_id_unique"] == 2


def test_too_many_rejections_stop_the_run_naming_checks_and_counts(tmp_path):
    catalog = tmp_path / "products.csv"
    write_bad_catalog(catalog)
    report_dir = tmp_path / "r"
    validate_dataset(cfg(tmp_path, max_rejected_fraction=1.0), catalog, report_dir=report_dir)
    assert (report_dir / "accepted" / "manifest.json").exists()
    with pytest.raises(ValidationFailed) as failure:
        validate_dataset(cfg(tmp_path), catalog, report_dir=report_dir)
    message = str(failure.value)
    assert f"{len(BAD)} of {len(GOOD) + len(BAD)} rows quarantined" in message
    assert "product_id_unique 2" in message and "title_length 1" in message
    assert not (report_dir / "accepted").exists()  # nothing stale left for downstream tasks
    report = json.loads((report_dir / "report.json").read_text())
    assert report["passed"] is False and report["failures"]
    assert len(quarantine(report_dir / "quarantine" / "catalog.jsonl")) == len(BAD)
    result = validate_dataset(cfg(tmp_path), catalog, report_dir=report_dir, raise_on_failure=False)
    assert not result.passed and result.accepted_paths == {}


# --------------------------------------------------------------------------------------- bad judgments


def test_bad_judgments_are_quarantined_and_agreeing_duplicates_merged(tmp_path):
    catalog = tmp_path / "products.csv"
    shutil.copy(DATA / "generic" / "products.csv", catalog)
    with catalog.open("a") as handle:
        handle.write("p7,\x01broken title,Tools,X,1\n")
    judgments = tmp_path / "judgments.csv"
    rows = {
        "good": ("q1,cordless drill,p1,3", None),
        "dup_agree_a": ("q2,Kitchen Faucet,p3,3", None),
        "dup_agree_b": ("q9,kitchen  faucet,p3,2.5", None),  # same query key, another id: merged and unified
        "dup_conflict_a": ("q3,tape measure,p5,3", "duplicates_agree"),
        "dup_conflict_b": ("q3,tape measure,p5,1", "duplicates_agree"),
        "nan": ("q1,cordless drill,p2,NaN", "relevance_is_number"),
        "text": ("q1,cordless drill,p4,high", "relevance_is_number"),
        "empty": ("q1,cordless drill,p6,", "relevance_is_number"),
        "above": ("q1,cordless drill,p3,5", "relevance_in_scale"),
        "below": ("q2,kitchen faucet,p6,0.5", "relevance_in_scale"),
        "unknown": ("q1,cordless drill,zzz,2", "product_in_catalog"),
        "quarantined_product": ("q1,cordless drill,p7,2", "product_accepted"),
        "blank_query": ("q4,   ,p1,2", "query_not_blank"),
        "control_query": ("q5,drill\x1b[0m,p1,2", "query_no_control_chars"),
        "malformed": ("q6,drill,p1", "record_well_formed"),
    }
    judgments.write_text("query_id,query,product_id,relevance\n" + "\n".join(r for r, _ in rows.values()) + "\n")
    result = validate_dataset(cfg(tmp_path, max_rejected_fraction=1.0), catalog, judgments, report_dir=tmp_path / "r")
    table = result.report["tables"]["judgments"]
    assert table["input_rows"] == len(rows) == table["accepted_rows"] + table["quarantined_rows"]
    found = quarantine(result.quarantine_paths["judgments"])
    for offset, (_, check) in enumerate(rows.values()):
        source = f"judgments.csv:{offset + 2}"
        if check is None:
            assert source not in found
        else:
            assert check in found.get(source, []), (source, found.get(source))
    merged = result.judgments.set_index(["query_id", "product_id"])["relevance"]
    assert merged[("q2", "p3")] == pytest.approx(2.75)  # mean of 3 and 2.5, under the first query id
    assert set(result.judgments["query_id"]) == {"q1", "q2"}
    assert table["notes"]["duplicate_rows_merged"] == 1


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"product_id;title\n1;a\n", "delimiter looks like ';'"),
    (b"id,name\n1,a\n", "no column 'product_id'"),
])
def test_unreadable_catalog_exits_1_with_one_line(tmp_path, capsys, content, message):
    catalog = tmp_path / "products.csv"
    catalog.write_bytes(content)
    code, _, err = run_cli(["validate", "--catalog", str(catalog), "--report-dir", str(tmp_path / "r")], capsys)
    assert code == 1
    assert err.startswith("near2: error: validation failed") and message in err
    assert "Traceback" not in err
    assert json.loads((tmp_path / "r" / "report.json").read_text())["passed"] is False


def test_cli_accepts_clean_data_and_rejects_bad(tmp_path, capsys):
    env_home = ["--config", str(write_config(tmp_path))]
    code, out, _ = run_cli(env_home + ["validate", "--catalog", str(DATA / "generic"), "--report-dir",
                                        str(tmp_path / "ok")], capsys)
    assert code == 0 and "catalog: 6 rows, 6 accepted, 0 quarantined" in out
    assert "judgments: 7 rows, 7 accepted" in out
    bad = tmp_path / "bad.csv"
    write_bad_catalog(bad)
    code, _, err = run_cli(env_home + ["validate", "--catalog", str(bad), "--format", "csv", "--report-dir",
                                        str(tmp_path / "bad")], capsys)
    assert code == 1 and "rows quarantined" in err and "record_well_formed 1" in err


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "near2.yaml"
    path.write_text(f"home: {tmp_path / 'home'}\nvalidation:\n  data_docs: false\n")
    return path


# --------------------------------------------------------------------------------------- table checks


def test_row_count_drift_against_the_previous_accepted_catalog(tmp_path):
    catalog = tmp_path / "products.csv"
    header = "product_id,title\n"
    catalog.write_text(header + "".join(f"p{i},Product {i}\n" for i in range(40)))
    settings = cfg(tmp_path, max_row_count_drift=0.25)
    assert validate_dataset(settings, catalog, report_dir=tmp_path / "r").passed
    catalog.write_text(header + "".join(f"p{i},Product {i}\n" for i in range(20)))
    with pytest.raises(ValidationFailed, match="catalog_row_count_drift"):
        validate_dataset(settings, catalog, report_dir=tmp_path / "r")
    lenient = cfg(tmp_path, max_row_count_drift=0.25, fail_on_table_expectations=False)
    result = validate_dataset(lenient, catalog, report_dir=tmp_path / "r")
    assert result.passed and len(result.products) == 20
    assert any("catalog_row_count_drift" in f for f in result.report["tables"]["catalog"]["table_failures"])


def test_bounded_vocabulary(tmp_path):
    settings = cfg(tmp_path, allowed_brands=["DeWalt", "Makita", "Moen"], max_rejected_fraction=1.0)
    result = validate_dataset(settings, DATA / "generic" / "products.csv", report_dir=tmp_path / "r")
    assert sorted(result.products["product_id"]) == ["p1", "p2", "p3", "p4"]  # p4 has no brand: not checked
    assert quarantine(result.quarantine_paths["catalog"]) == {
        "products.csv:6": ["brand_in_vocabulary"], "products.csv:7": ["brand_in_vocabulary"]}


def test_updated_at_must_be_a_time(tmp_path):
    catalog = tmp_path / "products.csv"
    catalog.write_text("product_id,title,updated_at\np1,a,2024-01-05\np2,b,2024-01-05T10:00:00Z\np3,c,yesterday\n"
                       "p4,d,\n")
    result = validate_dataset(cfg(tmp_path, max_rejected_fraction=1.0), catalog, report_dir=tmp_path / "r")
    assert quarantine(result.quarantine_paths["catalog"]) == {"products.csv:4": ["updated_at_is_time"]}
    assert result.products["product_id"].tolist() == ["p1", "p2", "p4"]


# --------------------------------------------------------------------------------------- adapters end to end


def test_public_formats_validate(tmp_path):
    from tests.test_loaders import write_esci

    settings = cfg(tmp_path)
    hd = validate_dataset(settings, DATA / "homedepot", fmt="homedepot", report_dir=tmp_path / "hd")
    assert len(hd.products) == 8 and len(hd.judgments) == 12  # the repeated "american flag" judgment merged
    flag = hd.judgments[hd.judgments["query"] == "american flag"]
    assert flag["relevance"].tolist() == [pytest.approx(2.5)]
    assert hd.products.set_index("product_id").loc["100001", "text"] == "Simpson Strong-Tie 12-Gauge Angle | Simpson Strong-Tie"
    wands = validate_dataset(settings, DATA / "wands", report_dir=tmp_path / "wands")
    assert len(wands.products) == 4 and len(wands.judgments) == 6
    assert set(wands.judgments["relevance"]) == {1.0, 2.0, 3.0}
    esci_dir = tmp_path / "esci"
    esci_dir.mkdir()
    write_esci(esci_dir)
    esci = validate_dataset(settings, esci_dir, report_dir=tmp_path / "esci-report")
    assert sorted(esci.products["product_id"]) == ["B01", "B02"] and len(esci.judgments) == 3
    jsonl = tmp_path / "products.jsonl"
    jsonl.write_text('{"product_id": 1, "title": "Drill", "price": 10}\n{"product_id": 2, "title": ""}\n')
    result = validate_dataset(cfg(tmp_path, max_rejected_fraction=1.0), jsonl, report_dir=tmp_path / "jsonl")
    assert result.products["product_id"].tolist() == ["1"] and result.products["price"].tolist() == [10.0]


@pytest.mark.homedepot
@pytest.mark.slow
def test_homedepot_normalised_data_is_accepted(homedepot_dir, tmp_path):
    result = validate_dataset(cfg(tmp_path), homedepot_dir, report_dir=tmp_path / "r")
    catalog, judgments = result.report["tables"]["catalog"], result.report["tables"]["judgments"]
    source_rows = sum(1 for _ in (homedepot_dir / "products.csv").open(encoding="utf-8")) - 1
    assert result.passed and catalog["input_rows"] == source_rows
    assert catalog["accepted_rows"] + catalog["quarantined_rows"] == source_rows
    assert len(result.products) == catalog["accepted_rows"]
    assert judgments["accepted_rows"] + judgments["quarantined_rows"] == judgments["input_rows"]
    assert set(result.judgments["product_id"]) <= set(result.products["product_id"])
