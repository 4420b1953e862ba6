"""Hybrid retrieval (near2_tasks.serving.hybrid): the fusion functions on known rankings, then BM25 + kNN fused
against the real Elasticsearch (tiny encoder, synthetic catalog): a side that returns nothing, filters on
both sides, the weights tuned on validation judgments and read back from ``_meta`` by serving, the
evaluation per dim and slice, the HTTP service and the CLI."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from near2_tasks import conventions
from near2_tasks.cli import cli
from near2_tasks.data.synthetic import generate_catalog
from near2_tasks.serving.hybrid import METHODS, fuse, lexical_fields, linear, minmax, rrf
from near2_tasks.serving.hybrid_tuning import best_weight, evaluate_index, tune_weights, weight_tuning
from near2_tasks.serving.publish import build_verify_swap
from near2_tasks.serving.request import BadSearchRequest
from near2_tasks.serving.search import Searcher
from near2_tasks.serving.service import create_app
from tests.serving_support import module_settings, serving_settings, titled_catalog, with_sections
from tests.tiny_model import TINY_DIMS

N = 120
SEED = 3  # titled_catalog's seed: its judgments are generate_catalog(N, 10, SEED).judgments


# ----- pure functions ---------------------------------------------------------------------------------------
def ids(fused):
    return [f.product_id for f in fused]


def test_rrf_sums_reciprocal_ranks_and_breaks_ties_by_dense_then_bm25_rank():
    dense = [("a", 0.9), ("b", 0.8), ("c", 0.7)]
    lexical = [("c", 12.0), ("d", 7.0), ("a", 1.0)]
    fused = rrf(dense, lexical, k=60)
    # a and c both score 1/61 + 1/63 (a tie): a has the better dense rank; b and d both 1/62: b is on the dense side
    assert ids(fused) == ["a", "c", "b", "d"]
    assert fused[0].score == pytest.approx(1 / 61 + 1 / 63) and fused[1].score == pytest.approx(1 / 63 + 1 / 61)
    assert fused[2].score == pytest.approx(1 / 62) and fused[3].score == pytest.approx(1 / 62)
    assert [(f.dense_rank, f.lexical_rank) for f in fused] == [(1, 3), (3, 1), (2, None), (None, 2)]
    # k changes how much a first place is worth: with a tiny k, a lexical first place beats a double third
    assert ids(rrf([("x", 1), ("y", 1), ("z", 1)], [("w", 1), ("q", 1), ("z", 1)], k=0.01))[:2] == ["x", "w"]
    # the scores of the sides are ignored: scaling them changes nothing
    assert ids(rrf([(p, s * 1000) for p, s in dense], lexical, k=60)) == ids(fused)
    with pytest.raises(ValueError):
        rrf(dense, lexical, k=0)


def test_equal_rrf_scores_go_to_the_better_dense_rank_and_a_repeated_id_keeps_its_best_rank():
    fused = rrf([("b", 1.0), ("a", 1.0)], [("a", 1.0), ("b", 1.0)], k=60)
    assert fused[0].score == pytest.approx(fused[1].score)
    assert ids(fused) == ["b", "a"]  # the same score: b is first on the dense side
    same = rrf([], [("b", 2.0), ("b", 1.0), ("a", 1.0)], k=60)
    assert ids(same) == ["b", "a"] and same[0].lexical_rank == 1 and same[0].score == pytest.approx(1 / 61)


def test_linear_fusion_normalises_each_side_and_weights_the_dense_side():
    dense = [("a", 0.9), ("b", 0.8), ("c", 0.7)]
    lexical = [("c", 10.0), ("d", 5.0), ("a", 0.0)]
    assert minmax(dense) == pytest.approx({"a": 1.0, "b": 0.5, "c": 0.0})
    assert minmax(lexical) == pytest.approx({"c": 1.0, "d": 0.5, "a": 0.0})
    half = linear(dense, lexical, 0.5)
    # a = c = 0.5 and b = d = 0.25: ties broken by dense rank (absent counts as worst)
    assert ids(half) == ["a", "c", "b", "d"]
    assert [f.score for f in half] == pytest.approx([0.5, 0.5, 0.25, 0.25])
    # w = 1 is exactly the dense order, w = 0 exactly the BM25 order: a side's last hit normalises to 0, like
    # a product missing from that side, and the tie goes to the side that weighs more
    assert ids(linear(dense, lexical, 1.0)) == ["a", "b", "c", "d"]
    assert ids(linear(dense, [("c", 10.0), ("d", 5.0)], 0.0)) == ["c", "d", "a", "b"]
    assert ids(linear([("b", 0.9), ("a", 0.1)], [("c", 10.0), ("d", 5.0), ("a", 1.0)], 0.0)) == ["c", "d", "a", "b"]
    mostly_bm25 = linear(dense, lexical, 0.3)  # a 0.3, b 0.15, c 0.7, d 0.35
    assert ids(mostly_bm25) == ["c", "d", "a", "b"]
    assert [f.score for f in mostly_bm25] == pytest.approx([0.7, 0.35, 0.3, 0.15])
    with pytest.raises(ValueError):
        linear(dense, lexical, 1.5)


def test_equal_scores_on_a_side_normalise_to_one_and_an_empty_side_keeps_the_other_order():
    assert minmax([("a", 3.0), ("b", 3.0)]) == {"a": 1.0, "b": 1.0}
    assert minmax([]) == {}
    dense = [("a", 0.9), ("b", 0.5), ("c", 0.1)]
    for fusion in ("rrf", "linear"):
        assert ids(fuse(dense, [], fusion, weight=0.4)) == ["a", "b", "c"]
        assert ids(fuse([], dense, fusion, weight=0.4)) == ["a", "b", "c"]
        assert fuse([], [], fusion) == []
    with pytest.raises(ValueError):
        fuse(dense, [], "sum")


def test_best_weight_prefers_the_default_on_ties_and_lexical_fields_follow_the_index():
    assert best_weight({0.0: 0.1, 0.5: 0.3, 0.7: 0.3, 1.0: 0.2}, default=0.6) == 0.5
    assert best_weight({0.4: 0.3, 0.8: 0.3}, default=0.6) == 0.4
    assert best_weight({0.2: None}, default=0.6) == 0.6
    assert lexical_fields(["title^2", "brand.text", "category.text"], ["title"]) == ["title^2"]
    assert lexical_fields(["brand.text"], ["title"]) == ["title"]


# ----- against Elasticsearch ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory, es_url, es_client, tiny_model_dir):
    settings = module_settings(tmp_path_factory, es_url, str(tiny_model_dir), TINY_DIMS, home="hybrid-home")
    products = titled_catalog(N, seed=SEED)
    build_verify_swap(settings, str(tiny_model_dir), products, model_version=1)
    yield settings, products
    es_client.indices.delete(index=f"{settings.elasticsearch.alias}-*", ignore_unavailable=True)


def test_the_index_maps_lexical_text_fields_and_keeps_keyword_filters(served, es_client):
    settings, _ = served
    mapping = next(iter(es_client.indices.get_mapping(index=settings.elasticsearch.alias).values()))["mappings"]
    props = mapping["properties"]
    assert props["title"]["type"] == "text" and props["title"]["analyzer"] == "standard"
    for name in ("brand", "category"):
        assert props[name]["type"] == "keyword"  # exact filters
        assert props[name]["fields"]["text"] == {"type": "text", "analyzer": "standard"}
    assert mapping["_meta"]["lexical_fields"] == ["title", "brand.text", "category.text"]


def test_hybrid_search_answers_in_one_request_with_fused_scores(served):
    settings, products = served
    searcher = Searcher(settings)
    for dim in TINY_DIMS:
        for fusion in ("rrf", "linear"):
            response = searcher.search(products.title[5], k=5, dim=dim, mode="hybrid", fusion=fusion)
            assert response.mode == "hybrid" and response.dim == dim and len(response.hits) == 5
            assert response.hits[0].product_id == products.product_id[5], (dim, fusion)
            info = response.hybrid
            assert info["fusion"] == fusion and info["requests"] == 1 and info["candidates"] == 100
            assert info["dense_ranks"][0] == 1 and info["lexical_ranks"][0] == 1
            scores = [h.score for h in response.hits]
            assert scores == sorted(scores, reverse=True)
            if fusion == "rrf":
                assert scores[0] == pytest.approx(2 / 61) and info["rrf_k"] == 60
            else:
                assert scores[0] == pytest.approx(1.0)
                assert (info["weight"], info["weight_source"]) == (0.5, "settings")
    # the configured default fusion and the funnel as the dense side
    funnel = Searcher(with_sections(settings, serving={"hybrid_funnel": True, "hybrid_fusion": "linear"}))
    response = funnel.search(products.title[9], k=3, mode="hybrid")
    # the funnel's rescoring is local (the float16 store the build wrote): still one request in all
    assert response.hybrid["fusion"] == "linear" and response.rescore == "local" and response.hybrid["requests"] == 1
    in_es = Searcher(with_sections(settings, serving={"hybrid_funnel": True, "funnel_rescore": "elasticsearch"}))
    response = in_es.search(products.title[9], k=3, mode="hybrid")
    assert response.rescore == "elasticsearch" and response.hybrid["requests"] == 2  # rescored by a 2nd request
    assert response.hits[0].product_id == products.product_id[9]
    response = funnel.search(products.title[9], k=3, mode="hybrid")
    assert response.shortlist_dim == min(TINY_DIMS) and response.dim == max(TINY_DIMS)
    assert response.hits[0].product_id == products.product_id[9]


def test_a_model_number_is_found_by_the_lexical_side(served):
    settings, products = served
    searcher = Searcher(settings)
    row = next(p for p in products.itertuples() if any(c.isdigit() for c in p.title.split()[-1]))
    code = row.title.split()[-1]  # e.g. KLW7866Z: the random tiny encoder knows nothing of it
    response = searcher.search(code.lower(), k=3, mode="hybrid", fusion="rrf")
    assert response.hybrid["lexical_ranks"][0] == 1 and response.hits[0].product_id == row.product_id


def test_no_lexical_match_leaves_the_dense_order(served):
    settings, _ = served
    searcher = Searcher(settings)
    served_index = searcher.serving_index()
    query = "qqxzv zzvqq"  # no word of any title, brand or category
    from near2_tasks.models.embeddings import encode

    vector = encode(searcher.encoder(served_index), [query])[0]
    sides = searcher.hybrid_sides(served_index, query, vector, 20, 64, None, [], 100)
    assert sides.lexical == [] and len(sides.dense) == 20
    for fusion in ("rrf", "linear"):
        response = searcher.search(query, k=10, dim=64, mode="hybrid", fusion=fusion)
        assert response.hybrid["lexical_hits"] == 0
        assert [h.product_id for h in response.hits] == [pid for pid, _ in sides.dense[:10]]
        assert response.hybrid["lexical_ranks"] == [None] * 10


def test_filters_apply_to_both_sides(served):
    settings, products = served
    searcher = Searcher(settings)
    served_index = searcher.serving_index()
    # a word that many titles of several categories share
    words = Counter(w.lower() for t in products.title for w in set(t.split()) if w.isalpha() and len(w) > 3)
    word = next(w for w, _ in words.most_common()
                if products[products.title.str.lower().str.contains(w)].category.nunique() > 1)
    matching = products[products.title.str.lower().str.split().apply(lambda ws: word in ws)]
    category = matching.category.value_counts().index[0]
    from near2_tasks.models.embeddings import encode
    from near2_tasks.serving.request import SearchFilters

    vector = encode(searcher.encoder(served_index), [word])[0]
    unfiltered = searcher.hybrid_sides(served_index, word, vector, 50, 32, None, [], 100)
    assert {unfiltered.hits[p].category for p, _ in unfiltered.lexical} != {category}
    clauses = SearchFilters(category=category).clauses()
    filtered = searcher.hybrid_sides(served_index, word, vector, 50, 32, None, clauses, 100)
    in_category = int((products.category == category).sum())
    assert len(filtered.dense) == min(50, in_category) and filtered.lexical
    assert {filtered.hits[p].category for p, _ in filtered.dense + filtered.lexical} == {category}
    price = float(products.price.median())
    response = searcher.search(word, k=10, mode="hybrid", filters={"price_max": price})
    assert response.hits and all(h.price <= price for h in response.hits)
    nobody = searcher.search(word, k=10, mode="hybrid", filters={"category": "No Such Category"})
    assert nobody.hits == [] and nobody.hybrid["dense_hits"] == nobody.hybrid["lexical_hits"] == 0


def test_fusion_is_refused_outside_hybrid_mode(served):
    settings, _ = served
    with pytest.raises(BadSearchRequest, match="fusion applies to mode=hybrid only"):
        Searcher(settings).search("drill", mode="knn", fusion="rrf")
    with pytest.raises(BadSearchRequest, match="unknown fusion"):
        Searcher(settings).search("drill", mode="hybrid", fusion="sum")  # type: ignore[arg-type]


def test_evaluation_reports_every_method_dim_and_slice(served):
    settings, products = served
    judgments = generate_catalog(N, 10, seed=SEED).judgments
    report = evaluate_index(settings, products, judgments, grid=[0.0, 1.0])
    assert report.dims == TINY_DIMS and set(report.ndcg) == set(METHODS)
    assert report.n_queries == judgments["query_id"].nunique()
    for method in METHODS:
        for dim in TINY_DIMS:
            values = report.ndcg[method][dim]
            assert {"all", "short", "long", "alphanumeric"} <= set(values)
            assert 0 <= values["all"] <= 1
            assert report.latency_ms[method][dim]["p50"] <= report.latency_ms[method][dim]["p99"]
    for dim in TINY_DIMS:
        # w = 1 is dense alone (the same top 10 from the deeper list); w = 0 is BM25's order, and where BM25
        # finds fewer than 10 products the dense side fills the rest, so it can only gain
        assert report.grid[dim][1.0] == pytest.approx(report.ndcg["dense"][dim]["all"], abs=1e-9)
        assert report.grid[dim][0.0] >= report.ndcg["bm25"][dim]["all"] - 1e-9
    # BM25 does not depend on the dim; on titles with model numbers it beats a random encoder
    assert len({report.ndcg["bm25"][d]["all"] for d in TINY_DIMS}) == 1
    assert report.ndcg["bm25"][64]["all"] > report.ndcg["dense"][64]["all"]
    table = report.markdown()
    assert "hybrid_linear (w=" in table and table.count("\n| 64 |") == 4


def test_tuned_weights_go_into_meta_and_serving_uses_them(tiny_settings, tiny_model_dir, es_client):
    settings = serving_settings(tiny_settings)
    data = generate_catalog(N, 10, seed=SEED)
    products = data.products.assign(text=data.products.title)
    result = build_verify_swap(settings, str(tiny_model_dir), products, model_version=1,
                               before_verify=weight_tuning(settings, products, data.judgments))
    meta = es_client.indices.get_mapping(index=result.index.name)[result.index.name]["mappings"]["_meta"]
    weights = {int(d): w for d, w in meta[conventions.META_HYBRID_WEIGHTS].items()}
    assert sorted(weights) == sorted(TINY_DIMS) and "verified_at" in meta
    tuning = meta[conventions.META_HYBRID_TUNING]
    assert tuning["split"] == "validation" and tuning["queries"] == data.judgments["query_id"].nunique()
    for dim, weight in weights.items():
        grid = {float(w): s for w, s in tuning["grid"][str(dim)].items()}
        assert len(grid) == 11 and grid[weight] == max(grid.values())
    searcher = Searcher(settings)
    for dim in TINY_DIMS:
        response = searcher.search(products.title[2], k=3, dim=dim, mode="hybrid", fusion="linear")
        assert (response.hybrid["weight"], response.hybrid["weight_source"]) == (weights[dim], "index")

    # a weight written by hand is what serving reads (for a new index name: _meta is read once per index)
    es_client.indices.put_mapping(index=result.index.name, meta={**meta, "hybrid_weights": {"64": 0.25}})
    fresh = Searcher(settings)
    assert fresh.search("drill", dim=64, mode="hybrid", fusion="linear").hybrid["weight"] == 0.25
    assert fresh.search("drill", dim=32, mode="hybrid", fusion="linear").hybrid["weight_source"] == "settings"
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        fields = {f["dim"]: f for f in api.get("/served").json()["fields"]}
        assert (fields[64]["hybrid_weight"], fields[64]["hybrid_weight_source"]) == (0.25, "index")
        assert (fields[32]["hybrid_weight"], fields[32]["hybrid_weight_source"]) == (0.5, "settings")


def test_tuning_without_validation_queries_writes_nothing(served, es_client):
    import pandas as pd

    settings, products = served
    name = Searcher(settings).serving_index().name
    result = tune_weights(settings, name, products, pd.DataFrame(columns=["query", "product_id", "relevance"]))
    assert result.weights == {} and "hybrid_weights" not in es_client.indices.get_mapping(index=name)[name][
        "mappings"]["_meta"]


def test_service_accepts_mode_hybrid_and_fusion(served):
    settings, products = served
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        body = api.get("/search", params={"q": products.title[7], "k": 4, "mode": "hybrid", "fusion": "linear",
                                          "dim": 32}).json()
        assert body["mode"] == "hybrid" and body["hits"][0]["product_id"] == products.product_id[7]
        assert body["hybrid"]["fusion"] == "linear" and body["hybrid"]["weight_source"] == "settings"
        default_body = api.get("/search", params={"q": products.title[7], "mode": "hybrid"}).json()
        assert default_body["hybrid"]["fusion"] == settings.serving.hybrid_fusion == "linear"  # the measured better
        rrf_body = api.get("/search", params={"q": products.title[7], "mode": "hybrid", "fusion": "rrf",
                                              "category": products.category[7]}).json()
        assert rrf_body["hybrid"]["fusion"] == "rrf" and rrf_body["hybrid"]["rrf_k"] == 60
        assert {h["category"] for h in rrf_body["hits"]} == {products.category[7]}
        wrong = api.get("/search", params={"q": "drill", "mode": "knn", "fusion": "rrf"})
        assert wrong.status_code == 400 and "mode=hybrid only" in wrong.json()["error"]
        bogus = api.get("/search", params={"q": "drill", "mode": "hybrid", "fusion": "sum"})
        assert bogus.status_code == 422 and "fusion" in bogus.json()["error"]
        served_body = api.get("/served").json()
        assert served_body["modes"] == ["knn", "funnel", "hybrid"] and served_body["fusions"] == ["rrf", "linear"]
        assert served_body["lexical_fields"] == ["title", "brand.text", "category.text"]


def test_cli_index_tunes_and_search_uses_hybrid(tiny_settings, tiny_model_dir):
    settings = serving_settings(tiny_settings)
    env = {"NEAR2_ELASTICSEARCH__URL": settings.elasticsearch.url,
           "NEAR2_ELASTICSEARCH__ALIAS": settings.elasticsearch.alias, "NEAR2_HOME": str(settings.home),
           "NEAR2_DATASET__SYNTHETIC_PRODUCTS": "150", "NEAR2_DATASET__SYNTHETIC_QUERIES": "40",
           "NEAR2_MODEL__DIMS": json.dumps(TINY_DIMS), "NEAR2_ELASTICSEARCH__VERIFY_SAMPLE_SIZE": "10"}
    runner = CliRunner()
    built = runner.invoke(cli, ["index", "--model", str(tiny_model_dir), "--allow-non-champion", "--tune-hybrid",
                                "--json"], env=env)
    assert built.exit_code == 0, built.output
    meta = json.loads(built.stdout.strip().splitlines()[-1])["meta"]
    weights = meta["hybrid_weights"]
    assert sorted(int(d) for d in weights) == sorted(TINY_DIMS)
    result = runner.invoke(cli, ["search", "cordless drill", "--mode", "hybrid", "--fusion", "linear", "--dim", "32",
                                 "--k", "5", "--json"], env=env)
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["mode"] == "hybrid" and len(body["hits"]) == 5
    assert body["hybrid"]["weight"] == weights["32"] and body["hybrid"]["weight_source"] == "index"
    assert sum("drill" in h["title"].lower() for h in body["hits"]) >= 3  # BM25 brings the drills
    text = runner.invoke(cli, ["search", "cordless drill", "--mode", "hybrid", "--k", "3"], env=env)
    # the default fusion is linear, with the weight the index holds for the default dim
    assert text.exit_code == 0 and "hybrid at dim 64" in text.stdout and "linear w=" in text.stdout
    rrf_text = runner.invoke(cli, ["search", "cordless drill", "--mode", "hybrid", "--fusion", "rrf", "--k", "3"], env=env)
    assert rrf_text.exit_code == 0 and "rrf k=60" in rrf_text.stdout
    refused = runner.invoke(cli, ["search", "drill", "--fusion", "rrf"], env=env)
    # in process the error propagates (the `near2` entry point turns it into one "near2: error:" line)
    assert isinstance(refused.exception, BadSearchRequest) and "mode=hybrid only" in str(refused.exception)
    assert not math.isnan(body["hits"][0]["score"])
