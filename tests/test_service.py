"""The HTTP search service (FastAPI TestClient) against the real Elasticsearch."""

from __future__ import annotations

import time
import uuid

import pytest
from fastapi.testclient import TestClient

from near2_tasks.config import load_settings
from near2_tasks.serving.publish import build_verify_swap
from near2_tasks.serving.search import Searcher
from near2_tasks.serving.service import create_app
from tests.serving_support import serving_settings, titled_catalog, with_sections
from tests.tiny_model import TINY_DIMS


@pytest.fixture(scope="module")
def served(tmp_path_factory, es_url, es_client, tiny_model_dir):
    alias = f"test-products-{uuid.uuid4().hex[:8]}"
    settings = serving_settings(load_settings(
        home=str(tmp_path_factory.mktemp("service-home")), elasticsearch={"url": es_url, "alias": alias},
        model={"base_model": str(tiny_model_dir), "dims": TINY_DIMS}))
    products = titled_catalog(80)
    built = build_verify_swap(settings, str(tiny_model_dir), products, model_version=1)
    yield settings, products, built.index.name
    es_client.indices.delete(index=f"{alias}-*", ignore_unavailable=True)


@pytest.fixture(scope="module")
def api(served):
    settings, _, _ = served
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def test_search_returns_ranked_products_with_model_and_timings(api, served):
    _, products, index = served
    response = api.get("/search", params={"q": products.title[4], "k": 5, "dim": 32})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["hits"][0]["product_id"] == products.product_id[4]
    assert (body["dim"], body["mode"], body["k"], body["index"], body["model_version"]) == (32, "knn", 5, index, "1")
    assert len(body["hits"]) == 5 and {"encode", "search", "total"} <= set(body["timings_ms"])
    assert "model_uri" not in body  # a local path is an internal detail

    funnel = api.get("/search", params={"q": products.title[4], "k": 3, "mode": "funnel",
                                        "category": products.category[4]}).json()
    assert funnel["mode"] == "funnel" and funnel["shortlist_dim"] == min(TINY_DIMS)
    assert funnel["shortlist"] == "elasticsearch"  # a filter: the kNN in Elasticsearch shortlists
    assert funnel["hits"][0]["product_id"] == products.product_id[4]
    assert all(hit["category"] == products.category[4] for hit in funnel["hits"])


def test_health_and_openapi(api, served):
    _, _, index = served
    health = api.get("/health").json()
    assert health == {"status": "ok", "alias": served[0].elasticsearch.alias, "index": index,
                      "model_name": "model", "model_version": "1", "dims": TINY_DIMS, "error": None}
    spec = api.get("/openapi.json").json()
    parameters = {p["name"]: p for p in spec["paths"]["/search"]["get"]["parameters"]}
    assert set(parameters) == {"q", "k", "dim", "mode", "fusion", "category", "brand", "price_min", "price_max",
                               "num_candidates"}
    assert parameters["k"]["schema"]["maximum"] == 100
    assert "/health" in spec["paths"]


@pytest.mark.parametrize("params, status, message", [
    ({}, 422, "q: Field required"),
    ({"q": ""}, 422, "q: String should have at least 1 character"),
    ({"q": "   "}, 400, "the query is empty"),
    ({"q": "x" * 257}, 422, "q: String should have at most 256 characters"),
    ({"q": "drill", "k": 0}, 422, "k: Input should be greater than or equal to 1"),
    ({"q": "drill", "k": 101}, 422, "k: Input should be less than or equal to 100"),
    ({"q": "drill", "k": "ten"}, 422, "k: Input should be a valid integer"),
    ({"q": "drill", "dim": 48}, 400, "dim 48 is not served"),
    ({"q": "drill", "mode": "lexical"}, 422, "mode: Input should be 'knn', 'funnel' or 'hybrid'"),
    ({"q": "drill", "fusion": "linear"}, 400, "fusion applies to mode=hybrid only"),
    ({"q": "drill", "colour": "red"}, 400, "unknown parameter(s) ['colour']"),
    ({"q": "drill", "price_min": 50, "price_max": 10}, 400, "price_min 50.0 is above price_max 10.0"),
    ({"q": "drill", "price_max": "nan"}, 422, "price_max"),
    ({"q": "drill", "num_candidates": 100000}, 422, "num_candidates: Input should be less than or equal to 2000"),
    ({"q": "drill", "mode": "funnel", "dim": 16}, 400, "shortlist dimension below the rescore dimension"),
])
def test_bad_input_is_a_4xx_with_a_clear_message(api, params, status, message):
    response = api.get("/search", params=params)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_repeated_parameters_and_oversized_requests_are_refused(api):
    repeated = api.get("/search?q=drill&k=3&k=4")
    assert repeated.status_code == 400 and "given more than once" in repeated.json()["error"]
    long_url = api.get("/search", params={"q": "drill", "category": "c" * 9000})
    assert long_url.status_code == 414
    big_headers = api.get("/search", params={"q": "drill"}, headers={"x-padding": "p" * 9000})
    assert big_headers.status_code == 431
    big_body = api.request("GET", "/search", params={"q": "drill"}, content=b"x" * 10_000)
    assert big_body.status_code == 413 and "larger than 8192 bytes" in big_body.json()["error"]

    def chunks():
        for _ in range(10):
            yield b"y" * 1000

    chunked = api.request("GET", "/search", params={"q": "drill"}, content=chunks())
    assert chunked.status_code == 413
    small = api.request("GET", "/search", params={"q": "drill", "k": 2}, content=b"{}")
    assert small.status_code == 200


def test_service_errors_reveal_no_hostnames_or_traces(served):
    settings, _, _ = served
    down = with_sections(settings, elasticsearch={"url": "http://es-internal.example:9", "max_retries": 0,
                                                  "request_timeout": 2})
    with TestClient(create_app(down), raise_server_exceptions=False) as client:
        for path in ("/search?q=drill", "/health"):
            response = client.get(path)
            assert response.status_code == 503
            assert "es-internal" not in response.text and "Traceback" not in response.text
    missing = with_sections(settings, elasticsearch={"alias": f"absent-{uuid.uuid4().hex[:6]}"})
    with TestClient(create_app(missing), raise_server_exceptions=False) as client:
        response = client.get("/search", params={"q": "drill"})
        assert response.status_code == 503 and response.json()["error"] == "no product index is being served yet"


def test_a_backend_outage_is_a_503_with_retry_after_and_the_service_recovers(served, es_url):
    """Elasticsearch stops answering (a proxy in front of the shared test server drops every connection;
    the server itself is never stopped): searches and /health answer 503 with Retry-After; once it
    answers again, the same app serves 200 without a restart."""
    from tests.faults.harness import DROP, FaultyProxy

    settings, products, index = served
    proxy = FaultyProxy(es_url)
    try:
        via_proxy = with_sections(settings, elasticsearch={"url": proxy.url, "max_retries": 0, "request_timeout": 10})
        with TestClient(create_app(via_proxy), raise_server_exceptions=False) as client:
            assert client.get("/search", params={"q": products.title[1], "k": 3}).status_code == 200
            proxy.rule = lambda request: DROP
            for path in ("/search?q=drill", "/health"):
                down = client.get(path)
                assert down.status_code == 503 and down.headers["retry-after"] == str(settings.serving.retry_after_s)
            assert down.json()["status"] == "unavailable"
            assert proxy.answered["dropped"] >= 2
            proxy.rule = None
            back = client.get("/search", params={"q": products.title[1], "k": 3})
            assert back.status_code == 200 and back.json()["index"] == index
            assert back.json()["hits"][0]["product_id"] == products.product_id[1]
            assert client.get("/health").json()["status"] == "ok"
    finally:
        proxy.close()


def test_service_follows_an_alias_move_to_a_new_model(tiny_settings, tiny_model_dir, second_tiny_model_dir):
    settings = serving_settings(tiny_settings)
    products = titled_catalog(50)
    build_verify_swap(settings, str(tiny_model_dir), products, model_version=1)
    with TestClient(create_app(settings)) as client:
        def search() -> tuple[dict, str]:
            response = client.get("/search", params={"q": products.title[2], "k": 3})
            return response.json(), response.headers["server-timing"]

        first, timing = search()
        assert first["model_version"] == "1" and "qcache;desc=miss" in timing
        again, timing = search()  # the query vector is cached: same answer, no encoding
        assert "qcache;desc=hit" in timing and again["hits"] == first["hits"]
        assert {"encode;dur=", "search;dur=", "es;dur=", "handler;dur=", "app;dur="} <= {
            part.split("=")[0].strip() + "=" for part in timing.split(",") if "dur=" in part}
        moved = build_verify_swap(settings, str(second_tiny_model_dir), products, model_version=2)
        second, timing = search()
        # the cache is keyed by the model too: the new model encodes the query again (invariant 3)
        assert "qcache;desc=miss" in timing
        assert second["model_version"] == "2" and second["index"] == moved.index.name
        assert second["hits"][0]["product_id"] == products.product_id[2]
        assert client.get("/health").json()["model_version"] == "2"


def test_an_unexpected_failure_is_a_bare_500(served):
    settings, _, _ = served

    class BrokenSearcher(Searcher):
        def search(self, *args, **kwargs):
            raise RuntimeError("bug near http://es-internal.example:9200 in /srv/near2/search.py")

    with TestClient(create_app(settings, searcher=BrokenSearcher(settings)), raise_server_exceptions=False) as client:
        response = client.get("/search", params={"q": "drill"})
    assert response.status_code == 500 and response.json() == {"error": "internal error"}


def test_served_lists_dims_bytes_and_modes_and_the_page_is_locked_down(api, served):
    settings, _, index = served
    body = api.get("/served").json()
    assert (body["index"], body["model_version"], body["dims"], body["modes"]) == (index, "1", TINY_DIMS, ["knn", "funnel", "hybrid"])
    assert [(f["dim"], f["index_type"], f["bytes_per_product"]) for f in body["fields"]] == [
        (d, "hnsw", 4 * d) for d in TINY_DIMS]
    assert body["default_dim"] == max(TINY_DIMS) and body["default_mode"] == "knn"
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]  # no inline script can run
    assert api.get("/static/storefront.js").status_code == 200
    assert "/" not in api.get("/openapi.json").json()["paths"]  # the page is not part of the JSON API


def test_vector_bytes_follow_the_index_type():
    from near2_tasks.serving.served_index import vector_bytes

    assert [vector_bytes(kind, 384) for kind in ("hnsw", "int8_hnsw", "int4_hnsw", "bbq_hnsw", "flat", "bits")] == [
        1536, 388, 196, 62, 1536, 48]


def test_no_request_fails_while_the_alias_moves_to_another_model_and_back(tiny_settings, tiny_model_dir,
                                                                           second_tiny_model_dir):
    """Storefront clients keep searching through a real HTTP server while an index of another model is
    built, verified and swapped in, then rolled back: every request answers 200, and answers come from
    both models. (Counts only, no timings: the load benchmark measures speed.)"""
    import threading

    import httpx

    from near2_tasks.serving.alias import rollback
    from tests.browser_support import live_server

    settings = serving_settings(tiny_settings)
    products = titled_catalog(60)
    build_verify_swap(settings, str(tiny_model_dir), products, model_version=1)
    stop = threading.Event()
    answers: list[tuple[int, str | None]] = []

    def client(seed: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as http:
            i = seed
            while not stop.is_set():
                response = http.get("/search", params={"q": products.title[i % len(products)], "k": 3,
                                                       "mode": ("knn", "funnel", "hybrid")[i % 3]})
                body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
                answers.append((response.status_code, body.get("model_version")))
                i += 1

    with live_server(create_app(settings)) as base:
        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        def wait_for(version: str, since: int) -> None:
            deadline = time.monotonic() + 60
            while sum(1 for _, v in answers[since:] if v == version) < 5:
                assert time.monotonic() < deadline, f"no answers from model v{version} within 60 s"
                time.sleep(0.05)

        try:
            build_verify_swap(settings, str(second_tiny_model_dir), products, model_version=2)
            wait_for("2", 0)
            swapped_back_at = len(answers)
            rollback(settings)
            wait_for("1", swapped_back_at)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
    failed = [status for status, _ in answers if status != 200]
    assert not failed and len(answers) > 20, (len(failed), len(answers))
    assert {version for _, version in answers} == {"1", "2"}
