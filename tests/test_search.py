"""Storefront search against the real Elasticsearch: every dimension, the funnel, filters, bad input,
an alias move to a new model, the real MiniLM on a synthetic catalog, and the ``near2 search`` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from near2_tasks.cli import cli
from near2_tasks.models.settings import PACKAGED_MINILM
from near2_tasks.data.synthetic import generate_catalog
from near2_tasks.errors import Near2Error, ServiceUnavailable
from near2_tasks.serving.publish import build_verify_swap
from near2_tasks.serving.request import BadSearchRequest
from near2_tasks.serving.search import Searcher, search
from near2_tasks.serving.served_index import NoServingIndex
from tests.serving_support import module_settings, serving_settings, titled_catalog, with_sections
from tests.tiny_model import TINY_DIMS

N = 120


@pytest.fixture(scope="module")
def served(tmp_path_factory, es_url, es_client, tiny_model_dir):
    """A tiny-model index behind its own alias, shared by the read-only tests of this module."""
    settings = module_settings(tmp_path_factory, es_url, str(tiny_model_dir), TINY_DIMS)
    products = titled_catalog(N)
    build_verify_swap(settings, str(tiny_model_dir), products, model_version=1)
    yield settings, products
    es_client.indices.delete(index=f"{settings.elasticsearch.alias}-*", ignore_unavailable=True)


def test_own_title_comes_first_at_every_dimension_and_in_the_funnel(served):
    settings, products = served
    searcher = Searcher(settings)
    sample = products.iloc[::15]
    for mode, dims in (("knn", TINY_DIMS), ("funnel", [d for d in TINY_DIMS if d > min(TINY_DIMS)])):
        for dim in dims:
            for product in sample.itertuples():
                response = searcher.search(product.title, k=5, dim=dim, mode=mode)
                assert response.hits[0].product_id == product.product_id, (mode, dim, product.title)
                assert response.dim == dim and response.mode == mode and len(response.hits) == 5
                assert response.model_version == "1" and response.index.startswith(settings.elasticsearch.alias)
    funnel = searcher.search(products.title[0], k=5, mode="funnel")
    assert funnel.dim == max(TINY_DIMS) and funnel.shortlist_dim == min(TINY_DIMS)
    assert funnel.shortlist_size == settings.serving.funnel_shortlist_size
    assert {"encode", "search", "total", "es_took"} <= set(funnel.timings_ms)
    scores = [hit.score for hit in funnel.hits]
    assert scores == sorted(scores, reverse=True)


def test_filters_run_inside_the_knn_search(served):
    settings, products = served
    category = products.category.value_counts().index[0]
    query = products.title[0]
    response = search(settings, query, k=5, filters={"category": category})
    assert len(response.hits) == min(5, int((products.category == category).sum()))
    assert all(hit.category == category for hit in response.hits)
    low, high = products.price.quantile(0.25), products.price.quantile(0.5)
    in_range = products[(products.price >= low) & (products.price <= high)]
    response = search(settings, query, k=10, mode="funnel", dim=64,
                      filters={"price_min": float(low), "price_max": float(high)})
    assert response.hits and all(low <= hit.price <= high for hit in response.hits)
    assert len(response.hits) == min(10, len(in_range))
    brand = products.brand[3]
    assert {h.brand for h in search(settings, products.title[3], k=3, filters={"brand": brand}).hits} == {brand}


@pytest.mark.parametrize("kwargs, message", [
    ({"query": "   "}, "query is empty"),
    ({"query": "x" * 300}, "the limit is 256"),
    ({"k": 0}, "k must be an integer from 1 to 100"),
    ({"k": 101}, "k must be an integer from 1 to 100"),
    ({"dim": 48}, r"dim 48 is not served"),
    ({"mode": "lexical"}, "unknown mode"),
    ({"fusion": "rrf"}, "fusion applies to mode=hybrid only"),
    ({"filters": {"colour": "red"}}, r"unknown filter\(s\) \['colour'\]"),
    ({"filters": {"price_min": 50.0, "price_max": 10.0}}, "price_min 50.0 is above price_max 10.0"),
    ({"mode": "funnel", "dim": 16}, "shortlist dimension below the rescore dimension"),
    ({"num_candidates": 5000}, "num_candidates must be an integer from k=10 to 2000"),
])
def test_bad_requests_are_refused_with_a_clear_message(served, kwargs, message):
    settings, _ = served
    kwargs = {"query": "cordless drill", **kwargs}
    with pytest.raises(BadSearchRequest, match=message):
        search(settings, **kwargs)


def test_no_index_and_no_server_are_service_errors(served):
    settings, _ = served
    with pytest.raises(NoServingIndex, match="points at no index"):
        search(with_sections(settings, elasticsearch={"alias": f"absent-{uuid.uuid4().hex[:6]}"}), "drill")
    down = with_sections(settings, elasticsearch={"url": "http://127.0.0.1:9", "max_retries": 0})
    with pytest.raises(ServiceUnavailable, match="127.0.0.1:9 is not reachable"):
        search(down, "drill")


def test_a_moved_alias_brings_its_own_model_without_a_restart(tiny_settings, tiny_model_dir, second_tiny_model_dir):
    settings = serving_settings(tiny_settings)
    products = titled_catalog(60)
    build_verify_swap(settings, str(tiny_model_dir), products, model_version=1)
    searcher = Searcher(settings)  # long-lived, like the HTTP service
    before = searcher.search(products.title[7], k=3)
    assert before.model_version == "1" and before.hits[0].product_id == products.product_id[7]

    new = build_verify_swap(settings, str(second_tiny_model_dir), products, model_version=2, model_name="tiny-b")
    after = searcher.search(products.title[7], k=3)
    assert (after.model_version, after.model_name, after.index) == ("2", "tiny-b", new.index.name)
    assert after.model_uri == str(second_tiny_model_dir.resolve())
    # only the new model's query vector equals the new document vector exactly
    assert after.hits[0].product_id == products.product_id[7] and after.hits[0].score > 0.9999


@pytest.fixture(scope="module")
def minilm_served(tmp_path_factory, es_url, es_client):
    """The real all-MiniLM-L6-v2 over a 300-product synthetic catalog (embedded text per the template)."""
    settings = module_settings(tmp_path_factory, es_url, PACKAGED_MINILM, [384, 64])
    products = generate_catalog(300, 10, seed=11).products
    build_verify_swap(settings, PACKAGED_MINILM, products, model_version=1)
    yield settings, products
    es_client.indices.delete(index=f"{settings.elasticsearch.alias}-*", ignore_unavailable=True)


def test_minilm_finds_every_product_by_its_own_title_at_full_dimension(minilm_served):
    settings, products = minilm_served
    searcher = Searcher(settings)
    misses = [p.title for p in products.itertuples()
              if p.product_id not in {h.product_id for h in searcher.search(p.title, k=10, dim=384).hits}]
    assert not misses, f"{len(misses)} titles missed their product: {misses[:5]}"


def _near2(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "near2"), *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_cli_search_prints_ranked_products_and_json(minilm_served):
    settings, products = minilm_served
    env = {"NEAR2_ELASTICSEARCH__URL": settings.elasticsearch.url,
           "NEAR2_ELASTICSEARCH__ALIAS": settings.elasticsearch.alias, "NEAR2_HOME": str(settings.home)}
    # in-process (the encoder is already loaded), then the real entry point for the failures
    runner = CliRunner()
    result = runner.invoke(cli, ["search", "cordless drill", "--dim", "64", "--k", "10", "--json"], env=env)
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["dim"] == 64 and body["k"] == 10 and len(body["hits"]) == 10
    assert [h["score"] for h in body["hits"]] == sorted((h["score"] for h in body["hits"]), reverse=True)
    assert sum("drill" in h["title"].lower() for h in body["hits"]) >= 5
    text = runner.invoke(cli, ["search", "cordless drill", "--dim", "64", "--k", "3"], env=env)
    assert text.exit_code == 0 and "knn at dim 64" in text.stdout
    assert len([line for line in text.stdout.splitlines() if line.lstrip()[:2] in ("1.", "2.", "3.")]) == 3

    for args, extra_env, message in (
        (("search", "", "--dim", "64"), {}, "the query is empty"),
        (("search", "drill", "--dim", "48"), {}, "dim 48 is not served"),
        (("search", "drill"), {"NEAR2_ELASTICSEARCH__URL": "http://127.0.0.1:9"}, "is not reachable"),
    ):
        failed = _near2(*args, env={**env, **extra_env})
        assert failed.returncode != 0
        assert "Traceback" not in failed.stderr
        errors = [line for line in failed.stderr.splitlines() if line.startswith("near2: error:")]
        assert len(errors) == 1 and message in errors[0], failed.stderr


def test_search_rejects_non_string_query(served):
    settings, _ = served
    with pytest.raises(Near2Error):
        search(settings, None)  # type: ignore[arg-type]
