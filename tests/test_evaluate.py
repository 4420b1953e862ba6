"""Offline evaluation: real tiny encoder, synthetic catalog, real MLflow store; numbers checked against
brute-force retrieval scored by pytrec_eval (trec_eval)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import pytrec_eval

from near2_tasks.conventions import REPORT_METRICS, metric_key
from near2_tasks.data.synthetic import generate_catalog, write_catalog
from near2_tasks.errors import Near2Error
from near2_tasks.evaluate.evaluation import evaluate_model, log_evaluation
from near2_tasks.evaluate.report import EvaluationReport, write_report
from tests.tiny_model import TINY_DIMS

TREC = {"ndcg@10": "ndcg_cut_10", "precision@10": "P_10", "recall@10": "recall_10", "recall@100": "recall_100",
        "map@100": "map_cut_100"}


@pytest.fixture(scope="module")
def catalog():
    return generate_catalog(300, 60, 7)


def full_embeddings(model_dir, catalog) -> tuple[np.ndarray, np.ndarray]:
    """Queries (in query_id order) and product titles, encoded by sentence-transformers directly."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    queries = catalog.judgments.groupby("query_id")["query"].first().tolist()
    return (model.encode(queries, convert_to_numpy=True),
            model.encode(catalog.products["title"].tolist(), convert_to_numpy=True))


def brute_force_trec(query_vectors, product_vectors, catalog, dim: int) -> dict[str, dict[str, float]]:
    """Independent reference: sort every product by cosine at ``dim`` with numpy, score the top 100 with
    trec_eval (MRR@10 as recip_rank over the top 10)."""
    products, judgments = catalog.products, catalog.judgments
    queries = judgments.groupby("query_id")["query"].first()

    def prefix(vectors):
        cut = vectors[:, :dim]
        return cut / np.linalg.norm(cut, axis=1, keepdims=True)

    scores = prefix(query_vectors) @ prefix(product_vectors).T
    ids = products["product_id"].astype(str).to_numpy()
    qrels: dict[str, dict[str, int]] = {}
    for row in judgments.itertuples():
        # trec_eval wants integer grades: gain = (rel - floor) in hundredths (grades are 1, 1.33, ... 3)
        qrels.setdefault(row.query_id, {})[str(row.product_id)] = round((row.relevance - 1) * 100)
    run, run_top10 = {}, {}
    for i, query_id in enumerate(queries.index):
        order = np.argsort(-scores[i], kind="stable")[:100]
        run[query_id] = {ids[j]: float(100 - r) for r, j in enumerate(order)}
        run_top10[query_id] = {ids[j]: float(100 - r) for r, j in enumerate(order[:10])}
    level = 100  # relevance >= 2.0 is gain >= 100 hundredths
    result = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "P.10", "recall.10,100", "map_cut.100"},
                                            relevance_level=level).evaluate(run)
    mrr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}, relevance_level=level).evaluate(run_top10)
    for query_id in result:
        result[query_id]["mrr@10"] = mrr[query_id]["recip_rank"]
        judged = qrels[query_id].values()
        result[query_id]["_graded"] = max(judged) > 0
        result[query_id]["_relevant"] = max(judged) >= level
    return result


def test_numbers_equal_trec_eval_on_brute_force_retrieval_at_every_dimension(tiny_settings, tiny_model_dir,
                                                                             catalog):
    titles_only = catalog.products[["product_id", "title"]]  # like Home Depot: the embedded text is the title
    fp32 = tiny_settings.model_copy(update={"model": tiny_settings.model.model_copy(update={"backend": "torch"})})
    report = evaluate_model(fp32, str(tiny_model_dir), titles_only, catalog.judgments)  # the reference's encoder
    assert sorted(report.dims, reverse=True) == TINY_DIMS
    assert report.n_queries == catalog.judgments["query_id"].nunique()
    query_vectors, product_vectors = full_embeddings(tiny_model_dir, catalog)
    for dim in TINY_DIMS:
        reference = brute_force_trec(query_vectors, product_vectors, catalog, dim)
        for metric in REPORT_METRICS:
            counted = [q for q in reference.values() if q["_graded" if metric.startswith("ndcg") else "_relevant"]]
            expected = np.mean([q[TREC.get(metric, metric)] for q in counted])
            assert report.dims[dim][metric] == pytest.approx(expected, abs=1e-6), (dim, metric)
        # a slice averages the same per-query values over its queries only
        short = [qid for qid, text in catalog.judgments.groupby("query_id")["query"].first().items()
                 if len(text.split()) <= 2 and reference[qid]["_graded"]]
        assert report.slices["short"][dim]["ndcg@10"] == pytest.approx(
            np.mean([reference[q]["ndcg_cut_10"] for q in short]), abs=1e-6)


def test_report_files_have_the_documented_shape(tiny_settings, tiny_model_dir, second_tiny_model_dir, catalog,
                                                tmp_path):
    champion = evaluate_model(tiny_settings, str(second_tiny_model_dir), catalog.products, catalog.judgments)
    champion.label = "champion"
    report = evaluate_model(tiny_settings, str(tiny_model_dir), catalog.products, catalog.judgments,
                            reference_reports={"champion": champion})
    files = write_report(report, tmp_path / "out" / "report.json")

    def no_nan(constant):
        raise AssertionError(f"report.json holds {constant}")

    data = json.loads(files.json.read_text(), parse_constant=no_nan)
    assert data["model"] == str(tiny_model_dir)
    assert data["n_queries"] == report.n_queries
    assert set(data["dims"]) == {"64", "32", "16"}
    assert set(data["dims"]["64"]) == set(REPORT_METRICS)
    assert set(data["slices"]) == {"short", "long", "alphanumeric"}
    assert set(data["slices"]["short"]["16"]) == set(REPORT_METRICS)
    assert data["references"]["champion"]["dims"]["64"]["ndcg@10"] == champion.dims[64]["ndcg@10"]
    assert EvaluationReport.from_dict(data).dims == report.dims  # round trip

    markdown = files.markdown.read_text()
    for dim in TINY_DIMS:
        assert f"| {dim} | {report.dims[dim]['ndcg@10']:.4f} |" in markdown
    assert "against the references" in markdown and "champion" in markdown
    assert files.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_embeddings_are_cached_per_model_version_and_catalog_version(tiny_settings, tiny_model_dir,
                                                                      second_tiny_model_dir, catalog):
    cache = tiny_settings.home / "cache" / "embeddings"
    evaluate_model(tiny_settings, str(tiny_model_dir), catalog.products, catalog.judgments)
    first = {path.name: path.stat().st_mtime_ns for path in cache.iterdir()}
    assert len(first) == 2  # the catalog and the queries

    evaluate_model(tiny_settings, str(tiny_model_dir), catalog.products, catalog.judgments)
    assert {path.name: path.stat().st_mtime_ns for path in cache.iterdir()} == first  # reused, not rewritten

    smaller = catalog.products.iloc[1:]  # a new catalog version: re-encoded, the queries are not
    evaluate_model(tiny_settings, str(tiny_model_dir), smaller, catalog.judgments)
    assert len(list(cache.iterdir())) == 3
    evaluate_model(tiny_settings, str(second_tiny_model_dir), catalog.products, catalog.judgments)
    assert len(list(cache.iterdir())) == 5  # another model: its own catalog and queries


def test_a_registered_version_is_evaluated_by_number_and_logged_to_its_run(
        tiny_settings, tiny_model_dir, catalog, register_model_dir, tmp_path):
    from near2_tasks.models.registry import client

    version = register_model_dir(tiny_settings, tiny_model_dir)
    name = tiny_settings.mlflow.registered_model
    report = evaluate_model(tiny_settings, f"models:/{name}@challenger", catalog.products, catalog.judgments)
    from_dir = evaluate_model(tiny_settings, str(tiny_model_dir), catalog.products, catalog.judgments)
    assert (report.registered_model, report.model_version, report.model_key) == (name, version, f"{name}-v{version}")
    for dim in TINY_DIMS:  # the MLflow model reloads to the same encoder
        assert report.dims[dim] == pytest.approx(from_dir.dims[dim], abs=1e-6)

    files = write_report(report, tmp_path / "report.json")
    run_id = log_evaluation(tiny_settings, report, files)
    run = client(tiny_settings).get_run(run_id)
    assert run_id == client(tiny_settings).get_model_version(name, version).run_id
    for dim in TINY_DIMS:
        assert run.data.metrics[metric_key("eval", "ndcg@10", dim)] == pytest.approx(report.dims[dim]["ndcg@10"])
    assert metric_key("eval_short", "ndcg@10", 16) in run.data.metrics
    logged = {item.path for item in client(tiny_settings).list_artifacts(run_id, "evaluation")}
    assert logged == {"evaluation/report.json", "evaluation/report.md", "evaluation/report_ndcg_by_dim.png"}


def test_an_empty_slice_is_reported_as_empty_not_nan(tiny_settings, tiny_model_dir, catalog, tmp_path):
    settings = tiny_settings.model_copy(update={"evaluation": tiny_settings.evaluation.model_copy(
        update={"slices": {"garden": r"(?i)\bgarden\b", "nothing": "zzzz-no-such-query"}})})
    report = evaluate_model(settings, str(tiny_model_dir), catalog.products, catalog.judgments)
    assert report.slices["nothing"] == {} and report.slice_sizes["nothing"] == 0
    assert report.value("ndcg@10", 16, "nothing") is None
    files = write_report(report, tmp_path / "report.json")
    text = files.json.read_text()
    assert "NaN" not in text and json.loads(text)["slices"]["nothing"] == {}
    assert "## Slice `nothing` (config slice): 0 queries\n\nEmpty" in files.markdown.read_text()
    garden = report.slice_sizes["garden"]
    assert garden == sum("garden" in q.lower().split() for q in catalog.judgments.groupby("query_id")["query"].first())


@pytest.mark.parametrize("case, message", [
    ("unknown_uri", "unknown model URI 'models:/near2-encoder@champion'"),
    ("missing_dir", "not found"),
    ("dims_too_big", r"dims \[128\] exceed the model's embedding dimension 64"),
    ("no_overlap", "none of the .* judgments refers to a product in the catalog"),
    ("missing_column", r"the judgments lack the column\(s\) \['relevance'\]"),
    ("bad_relevance", "1 judgment\\(s\\) have a missing or non-numeric relevance"),
    ("no_judgments", "the judgments are empty"),
])
def test_bad_input_fails_with_a_clear_message(case, message, tiny_settings, tiny_model_dir, catalog, tmp_path):
    products, judgments = catalog.products, catalog.judgments.copy()
    model, dims = str(tiny_model_dir), None
    if case == "unknown_uri":
        model = "models:/near2-encoder@champion"  # the store is empty
    elif case == "missing_dir":
        model = str(tmp_path / "no-such-model")
    elif case == "dims_too_big":
        dims = [128, 64]
    elif case == "no_overlap":
        judgments["product_id"] = "other-" + judgments["product_id"].astype(str)
    elif case == "missing_column":
        judgments = judgments.drop(columns=["relevance"])
    elif case == "no_judgments":
        judgments = judgments.iloc[:0]
    elif case == "bad_relevance":
        judgments["relevance"] = judgments["relevance"].astype(object)
        judgments.loc[0, "relevance"] = "high"
    with pytest.raises(Near2Error, match=message):
        evaluate_model(tiny_settings, model, products, judgments, dims=dims)


def test_judgments_outside_the_catalog_are_dropped_and_counted(tiny_settings, tiny_model_dir, catalog):
    judgments = pd.concat([catalog.judgments, pd.DataFrame(
        [{"query_id": "q-extra", "query": "unknown thing", "product_id": "no-such-product", "relevance": 3.0}])])
    report = evaluate_model(tiny_settings, str(tiny_model_dir), catalog.products, judgments, dims=[16])
    assert report.dataset["judgments_outside_catalog"] == 1
    assert report.n_queries == catalog.judgments["query_id"].nunique()


def test_cli_evaluate_writes_the_report_and_prints_the_table(tiny_settings, tiny_model_dir, tmp_path, capsys,
                                                           monkeypatch):
    from near2_tasks.cli import main

    catalog_csv, judgments_csv = write_catalog(tmp_path / "data", n_products=200, n_queries=40, seed=3)
    monkeypatch.setenv("NEAR2_HOME", str(tiny_settings.home))
    output = tmp_path / "eval" / "report.json"

    def args(dims: str) -> list[str]:
        return ["evaluate", "--model", str(tiny_model_dir), "--catalog", str(catalog_csv),
                "--judgments", str(judgments_csv), "--dims", dims, "--k", "10",
                "--output", str(output), "--no-mlflow"]

    main(args("64,16"))  # success returns normally
    printed = capsys.readouterr().out
    data = json.loads(output.read_text())
    assert set(data["dims"]) == {"64", "16"} and data["n_queries"] == 40
    assert not math.isnan(data["dims"]["64"]["ndcg@10"])
    assert f"| 16 | {data['dims']['16']['ndcg@10']:.4f} |" in printed
    assert (tmp_path / "eval" / "report.md").exists() and (tmp_path / "eval" / "report_ndcg_by_dim.png").exists()

    with pytest.raises(SystemExit) as exit_info:
        main(args("64,512"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert [line for line in err.splitlines() if line.startswith("near2: error:")] == [
        "near2: error: dims [512] exceed the model's embedding dimension 64"]
    assert "Traceback" not in err
