"""The storefront page at ``/`` in a real headless Chromium, against the real service (uvicorn) and the real
local Elasticsearch, with the tiny encoder over a synthetic catalog (as the service tests)."""

from __future__ import annotations

import uuid

import pytest

from near2_tasks.config import load_settings
from near2_tasks.serving.publish import build_verify_swap
from near2_tasks.serving.service import create_app
from tests.browser_support import NoBrowser, headless_chromium, live_server
from tests.serving_support import serving_settings, titled_catalog, with_sections
from tests.tiny_model import TINY_DIMS

XSS_TITLE = "<script>alert(1)</script><img src=x onerror=alert(2)>"
WAIT_S = 30


@pytest.fixture(scope="module")
def browser():
    try:
        with headless_chromium() as driver:
            yield driver
    except NoBrowser as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def storefront(tmp_path_factory, es_url, es_client, tiny_model_dir):
    alias = f"test-products-{uuid.uuid4().hex[:8]}"
    settings = serving_settings(load_settings(
        home=str(tmp_path_factory.mktemp("storefront-home")), elasticsearch={"url": es_url, "alias": alias},
        model={"base_model": str(tiny_model_dir), "dims": TINY_DIMS}))
    products = titled_catalog(80)
    products.loc[7, ["title", "text"]] = XSS_TITLE
    build_verify_swap(settings, str(tiny_model_dir), products, model_version=1)
    with live_server(create_app(settings)) as url:
        yield url, settings, products
    es_client.indices.delete(index=f"{alias}-*", ignore_unavailable=True)


def wait(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(condition, message)


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait(driver, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"
                                            " || !document.getElementById('status').hidden"), "the page never loaded")


def search(driver, query: str, dim: int | None = None) -> dict:
    """Type the query (and pick a dim) with the keyboard, press Enter, wait for new results."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    if dim is not None:
        Select(driver.find_element(By.ID, "dim")).select_by_value(str(dim))
    before = driver.execute_script("return document.getElementById('answered-by').textContent")
    box = driver.find_element(By.ID, "q")
    box.clear()
    box.send_keys(query, Keys.ENTER)
    wait(driver, lambda d: d.execute_script(
        "return document.getElementById('answered-by').textContent") not in ("", before), "no results appeared")
    section = driver.find_element(By.ID, "results-section")
    rows = driver.find_elements(By.CSS_SELECTOR, "#results tbody tr")
    return {"dim": int(section.get_attribute("data-dim")), "latency": float(section.get_attribute("data-latency-ms")),
            "ids": [row.get_attribute("data-product-id") for row in rows],
            "rows": [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")] for row in rows],
            "answered_by": driver.find_element(By.ID, "answered-by").text}


def test_a_typed_query_shows_ranked_products_with_the_model_and_index(browser, storefront, es_client):
    url, settings, products = storefront
    open_page(browser, url)
    index = next(iter(es_client.indices.get_alias(name=settings.elasticsearch.alias)))
    result = search(browser, products.title[4])
    assert len(result["ids"]) >= 3 and result["ids"][0] == products.product_id[4]
    rank, title, brand, category, price, score = result["rows"][0]
    assert (rank, title, brand, category) == ("1", products.title[4], products.brand[4], products.category[4])
    assert price == f"{products.price[4]:.2f}" and 0 < float(score) <= 1
    assert f"model model v1, index {index}" in result["answered_by"]
    assert result["dim"] == max(TINY_DIMS)


def test_switching_the_dimension_changes_results_and_latency(browser, storefront):
    url, _, products = storefront
    open_page(browser, url)
    query = "cordless drill with battery"
    at = {dim: search(browser, query, dim) for dim in (max(TINY_DIMS), min(TINY_DIMS))}
    assert [at[d]["dim"] for d in at] == [max(TINY_DIMS), min(TINY_DIMS)]
    high, low = at.values()
    assert high["ids"] != low["ids"], "the same products at 64 and 16 dims: the dim did not reach the search"
    assert high["latency"] != low["latency"] and f"at {min(TINY_DIMS)}-d" in low["answered_by"]


def test_hybrid_mode_and_its_fusion_are_chosen_on_the_page(browser, storefront):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url, _, products = storefront
    open_page(browser, url)
    fusion = browser.find_element(By.ID, "fusion")
    assert not fusion.is_enabled()  # the default mode is knn: fusion does not apply
    Select(browser.find_element(By.ID, "mode")).select_by_value("hybrid")
    assert fusion.is_enabled()
    assert [o.get_attribute("value") for o in Select(fusion).options] == ["rrf", "linear"]
    Select(fusion).select_by_value("linear")
    result = search(browser, products.title[6])
    assert result["ids"][0] == products.product_id[6]
    assert "hybrid (BM25 + kNN, linear, dense weight 0.50 from settings" in result["answered_by"]
    assert "mode=hybrid" in browser.current_url and "fusion=linear" in browser.current_url


def test_side_by_side_shows_every_served_dimension(browser, storefront):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, settings, products = storefront
    open_page(browser, url)
    browser.find_element(By.ID, "q").send_keys(products.title[9])
    button = browser.find_element(By.ID, "compare-button")
    button.send_keys(Keys.ENTER)  # keyboard: the button is focusable and activates on Enter
    wait(browser, lambda d: d.find_element(By.ID, "compare-section").get_attribute("data-complete") == "true",
         "the side-by-side view never completed")
    columns = browser.find_elements(By.CSS_SELECTOR, "#compare .column")
    assert [int(c.get_attribute("data-dim")) for c in columns] == TINY_DIMS
    for column, dim in zip(columns, TINY_DIMS):
        assert float(column.get_attribute("data-latency-ms")) > 0
        assert float(column.get_attribute("data-bytes-per-product")) == 4 * dim  # float hnsw below 128 dims
        assert f"{4 * dim} B per product" in column.text
        items = column.find_elements(By.CSS_SELECTOR, "li")
        assert len(items) == 10 and items[0].get_attribute("data-product-id") == products.product_id[9]
    assert "answered by model model v1" in browser.find_element(By.ID, "compare-answered-by").text


def test_a_script_in_a_catalog_title_is_shown_as_text(browser, storefront):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    url, _, products = storefront
    open_page(browser, url)
    result = search(browser, XSS_TITLE)
    assert result["ids"][0] == products.product_id[7] and result["rows"][0][1] == XSS_TITLE
    assert browser.find_elements(By.CSS_SELECTOR, "#results script, #results img") == []
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - raises when no alert() ran
    assert browser.execute_script("return document.querySelectorAll('script').length") == 1  # the page's own


def test_the_page_says_clearly_when_elasticsearch_is_down(browser, storefront):
    from selenium.webdriver.common.by import By

    _, settings, _ = storefront
    down = with_sections(settings, elasticsearch={"url": "http://127.0.0.1:9", "max_retries": 0,
                                                  "request_timeout": 2})
    with live_server(create_app(down)) as url:
        open_page(browser, url)
        status = browser.find_element(By.ID, "status")
        assert status.is_displayed() and status.get_attribute("data-kind") == "unavailable"
        assert status.text == "Search is unavailable: the search backend is unavailable; try again shortly."
        assert "127.0.0.1:9" not in browser.page_source
