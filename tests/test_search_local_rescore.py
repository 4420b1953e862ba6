"""``serving.funnel_rescore: local`` against the real Elasticsearch: the funnel scored from the index's float16
store ranks like the two-request funnel on a synthetic demo-style index (MiniLM), a missing or stale store
falls back to the two-request funnel with a WARNING (and fails verification), stores follow index retention.

The store on its own (parts, merge, checks, orphans): tests/test_rescore_store.py."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from near2_tasks.data.synthetic import generate_catalog
from near2_tasks.models.embeddings import encode, load_encoder
from near2_tasks.models.settings import PACKAGED_MINILM
from near2_tasks.serving import compact, rescore_store
from near2_tasks.serving.publish import build_verify_swap
from near2_tasks.serving.query_bodies import shortlist_body, shortlist_ids
from near2_tasks.serving.search import Searcher
from near2_tasks.serving.verify import IndexVerificationFailed, verify_index
from tests.serving_support import module_settings, serving_settings, titled_catalog, with_sections
from tests.tiny_model import TINY_DIMS

LOCAL = {"funnel_rescore": "local"}


@pytest.fixture(scope="module")
def demo_served(tmp_path_factory, es_url, es_client):
    """MiniLM over a 600-product synthetic catalog at 384/128/64 with the default bit codes
    (``elasticsearch.binary_dims``), its store written (funnel_rescore: local), and the synthetic queries."""
    base = module_settings(tmp_path_factory, es_url, PACKAGED_MINILM, [384, 128, 64], home="local-rescore-home")
    settings = with_sections(base, serving={**LOCAL, "funnel_shortlist_size": 100})
    catalog = generate_catalog(600, 40, seed=5)
    vectors = encode(load_encoder(PACKAGED_MINILM), catalog.products["title"].tolist())
    built = build_verify_swap(settings, PACKAGED_MINILM, catalog.products.assign(text=catalog.products.title),
                              model_version=1, vectors=vectors)
    yield settings, catalog, built.index.name
    es_client.indices.delete(index=f"{settings.elasticsearch.alias}-*", ignore_unavailable=True)


def _same_ranking(local, remote) -> None:
    """The i-th best scores agree within the store's float16 rounding, and products differ at a position only
    where Elasticsearch's own scores of the two are as close (a near-tie, either order is right)."""
    assert local and len(local) == len(remote)
    theirs = {hit.product_id: hit for hit in remote}
    for mine, other in zip(local, remote):
        assert abs(mine.score - other.score) < 2e-3, (mine, other)
        if mine.product_id != other.product_id:
            assert mine.product_id not in theirs or abs(theirs[mine.product_id].score - other.score) < 2e-3
        else:  # the product fields come from the store, as Elasticsearch's _source has them
            assert (mine.title, mine.category, mine.brand, mine.price) == \
                (other.title, other.category, other.brand, other.price)


def test_local_rescoring_ranks_like_the_two_request_funnel(demo_served):
    settings, catalog, index = demo_served
    assert (rescore_store.store_dir(settings, index) / "vectors.npy").exists()
    local = Searcher(settings)
    remote = Searcher(with_sections(settings, serving={"funnel_rescore": "elasticsearch"}))
    queries = catalog.judgments["query"].drop_duplicates().head(25).tolist() + catalog.products.title.head(5).tolist()
    category = catalog.products.category.value_counts().index[0]
    same = total = 0
    for query in queries:
        for dim, filters in ((384, None), (128, None), (384, {"category": category})):
            mine = local.search(query, k=10, mode="funnel", dim=dim, filters=filters)
            theirs = remote.search(query, k=10, mode="funnel", dim=dim, filters=filters)
            assert (mine.rescore, theirs.rescore) == ("local", "elasticsearch")
            # no request at all where the index has codes of the shortlist dim and there is no filter
            no_request = dim == 384 and not filters
            assert (mine.shortlist, theirs.shortlist) == ("local" if no_request else "elasticsearch", "elasticsearch")
            # the no-request funnel has no shortlist round trip to time (Elasticsearch's took is whole ms: 0 happens)
            assert ("shortlist" not in mine.timings_ms) == no_request
            assert not no_request or mine.timings_ms["es_took"] == 0
            coded = max([d for d in settings.elasticsearch.binary_dims if d < dim], default=64)  # else float 64-d
            assert (mine.shortlist_dim, mine.shortlist_size) == (theirs.shortlist_dim, theirs.shortlist_size) == \
                (coded, 100)
            _same_ranking(mine.hits, theirs.hits)
            assert not filters or all(h.category == category for h in mine.hits)
            same += sum(a.product_id == b.product_id for a, b in zip(mine.hits, theirs.hits))
            total += len(mine.hits)
    assert same >= 0.95 * total, (same, total)  # near-ties are rare: nearly every position is the same product
    assert local.stores.fallbacks == 0
    # hybrid with the funnel as its dense side: the dense side scored from the store, one request
    hybrid = with_sections(settings, serving={"hybrid_funnel": True})
    mine = Searcher(hybrid).search(queries[0], k=5, mode="hybrid")
    theirs = Searcher(with_sections(hybrid, serving={"funnel_rescore": "elasticsearch"})).search(
        queries[0], k=5, mode="hybrid")
    assert (mine.rescore, mine.hybrid["requests"], theirs.hybrid["requests"]) == ("local", 1, 2)
    assert [h.product_id for h in mine.hits] == [h.product_id for h in theirs.hits]


def test_the_local_shortlist_is_the_elasticsearch_hamming_knn(demo_served):
    """The store's codes are the index's: the shortlist found here is the one the kNN on embedding_128_bits
    returns, except for which of the products tied at the cut-off distance fill the last places."""
    settings, catalog, index = demo_served
    searcher = Searcher(settings)
    served = searcher.serving_index_of(index)
    store = searcher.local_store(served)
    assert sorted(store.codes) == [128]
    encoder = load_encoder(PACKAGED_MINILM)
    queries = catalog.judgments["query"].drop_duplicates().head(20).tolist()
    for vector in encode(encoder, queries):
        code = compact.binary_codes(vector[None, :], 128, served.binary_centres[128])[0]
        body, size = shortlist_body(settings.serving, served, vector, 10, 128, [], 100)
        remote, _ = shortlist_ids(searcher.client, index, body)
        rows = store.shortlist(code, 128, size)
        local = [store.ids[r].decode() for r in rows]
        assert len(local) == len(remote) == size == 100
        distance = dict(zip(local, np.bitwise_count(store.codes[128][rows] ^ code).sum(axis=1)))
        cut = max(distance.values())
        remote_rows = store.rows_of(remote)
        remote_distance = np.bitwise_count(store.codes[128][remote_rows] ^ code).sum(axis=1)
        assert remote_distance.max() == cut  # the same cut-off: Elasticsearch ranks by the same distances
        assert {p for p, d in distance.items() if d < cut} == {p for p, d in zip(remote, remote_distance) if d < cut}


def test_a_missing_or_stale_store_falls_back_to_elasticsearch_with_a_warning(tiny_settings, tiny_model_dir,
                                                                            second_tiny_model_dir, caplog):
    plain = serving_settings(tiny_settings, elasticsearch={"binary_dims": [32]},
                             serving={"funnel_rescore": "elasticsearch"})
    local = with_sections(plain, serving=LOCAL)
    products = titled_catalog(60)
    # an index built without a store (funnel_rescore: elasticsearch at build time) is served anyway
    without = build_verify_swap(plain, str(tiny_model_dir), products, model_version=1).index.name
    assert not rescore_store.store_dir(local, without).exists()
    searcher = Searcher(local)
    with caplog.at_level(logging.WARNING, logger="near2_tasks.serving.rescore_store"):
        first = searcher.search(products.title[3], k=3, mode="funnel")
        again = searcher.search(products.title[4], k=3, mode="funnel")
    assert (first.rescore, again.rescore) == ("elasticsearch", "elasticsearch")
    assert first.hits[0].product_id == products.product_id[3] and again.hits[0].product_id == products.product_id[4]
    warnings = [r.getMessage() for r in caplog.records if r.name == rescore_store.__name__]
    assert len(warnings) == 1 and f"no readable rescoring store for index {without}" in warnings[0]  # once, not per request
    assert searcher.stores.fallbacks == 2
    # and verification refuses it where funnel_rescore is local
    with pytest.raises(IndexVerificationFailed, match="no readable rescoring store"):
        verify_index(local, without, products)
    # a store without the codes (an older build's) rescores but cannot shortlist: Elasticsearch shortlists, with
    # a WARNING, and verification refuses it while funnel_shortlist is local
    coded = build_verify_swap(local, str(tiny_model_dir), products, model_version=3).index.name
    store = rescore_store.store_dir(local, coded)
    (store / "codes_32.npy").unlink()
    (store / "store.json").write_text(json.dumps({**json.loads((store / "store.json").read_text()), "codes": []}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="near2_tasks.serving.search"):
        older = Searcher(local).search(products.title[6], k=3, mode="funnel")
    assert (older.rescore, older.shortlist, older.index) == ("local", "elasticsearch", coded)
    assert older.hits[0].product_id == products.product_id[6]
    assert any("has no 32-bit codes" in r.getMessage() for r in caplog.records)
    with pytest.raises(IndexVerificationFailed, match=r"has no \[32\]-bit codes"):
        verify_index(local, coded, products)
    assert Searcher(with_sections(local, serving={"funnel_shortlist": "elasticsearch"})).search(
        products.title[6], k=3, mode="funnel").shortlist == "elasticsearch"
    verify_index(with_sections(local, serving={"funnel_shortlist": "elasticsearch"}), coded, products)

    # a store that does not belong to the index it sits beside (another model): refused, logged, ES rescoring
    built = build_verify_swap(local, str(second_tiny_model_dir), products, model_version=2).index.name
    assert Searcher(local).search(products.title[5], k=3, mode="funnel").rescore == "local"
    info = rescore_store.store_dir(local, built) / "store.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "model_uri": str(tiny_model_dir)}))
    caplog.clear()
    stale = Searcher(local)
    with caplog.at_level(logging.WARNING, logger="near2_tasks.serving.rescore_store"):
        response = stale.search(products.title[5], k=3, mode="funnel")
    assert response.rescore == "elasticsearch" and response.index == built
    assert response.hits[0].product_id == products.product_id[5]
    assert any("does not match index" in r.getMessage() and "its model is" in r.getMessage()
               for r in caplog.records if r.name == rescore_store.__name__)


def test_stores_follow_index_retention(tiny_settings, tiny_model_dir, es_client):
    settings = with_sections(serving_settings(tiny_settings, elasticsearch={"binary_dims": [32], "keep_indices": 1}),
                             serving=LOCAL)
    products = titled_catalog(40)
    names = []
    for version in (1, 2, 3):
        result = build_verify_swap(settings, str(tiny_model_dir), products, model_version=version)
        names.append(result.index.name)
    # v3 serves, v2 is kept for rollback, v1 was pruned: its store went with it
    assert result.deleted == [names[0]]
    assert [rescore_store.store_dir(settings, n).exists() for n in names] == [False, True, True]
    # an index deleted by hand leaves an orphan store: the next pruning removes it
    es_client.indices.delete(index=names[1])
    from near2_tasks.serving.alias import prune_indices

    assert prune_indices(settings, es_client) == []
    assert [rescore_store.store_dir(settings, n).exists() for n in names] == [False, False, True]
    assert Searcher(settings).search(products.title[2], k=3, mode="funnel").rescore == "local"
    assert np.load(rescore_store.store_dir(settings, names[2]) / "vectors.npy", mmap_mode="r").shape == (40, max(TINY_DIMS))
