"""Serving indices against the real Elasticsearch: build, verify, compare-and-swap, rollback, prune."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from near2_tasks import conventions
from near2_tasks.models.embeddings import encode, load_encoder
from near2_tasks.errors import Near2Error, ServiceUnavailable
from near2_tasks.serving.alias import (
    AliasChanged, current_target, index_status, prune_indices, rollback, swap_alias, swap_to_champion_index,
)
from near2_tasks.serving.build import build_index
from near2_tasks.serving.mapping import index_body
from near2_tasks.serving.publish import build_verify_swap
from near2_tasks.serving.verify import IndexVerificationFailed, verify_index
from tests.serving_support import serving_settings, titled_catalog, with_sections

N = 80


@pytest.fixture
def cfg(tiny_settings):
    return serving_settings(tiny_settings, elasticsearch={"index_options": {
        32: {"index_type": "int8_hnsw", "m": 8}, 16: {"index_type": "flat", "similarity": "cosine"}}})


@pytest.fixture
def products():
    return titled_catalog(N)


def test_build_verify_swap_serves_a_verified_index_with_one_field_per_dim(cfg, products, es_client, tiny_model_dir):
    result = build_verify_swap(cfg, str(tiny_model_dir), products, model_version=7, run_id="run-1",
                               catalog_version="cat-1")
    alias = cfg.elasticsearch.alias
    name = result.index.name
    assert name.startswith(f"{alias}-v7-")
    assert current_target(es_client, alias) == name and result.previous is None
    assert es_client.count(index=alias)["count"] == N == result.index.count

    mapping = es_client.indices.get_mapping(index=name)[name]["mappings"]
    meta = mapping["_meta"]
    for key in conventions.INDEX_META_KEYS:
        assert key in meta
    assert meta["model_version"] == "7" and meta["run_id"] == "run-1" and meta["catalog_version"] == "cat-1"
    assert meta["dims"] == cfg.model.dims and meta["model_uri"] == str(tiny_model_dir.resolve())
    assert "verified_at" in meta
    fields = mapping["properties"]
    for dim in cfg.model.dims:
        field = fields[conventions.vector_field(dim)]
        options = cfg.elasticsearch.field_options(dim)
        assert field["type"] == "dense_vector" and field["dims"] == dim
        assert field["similarity"] == options.similarity
        assert field["index_options"]["type"] == options.index_type
    assert fields["embedding_32"]["index_options"]["m"] == 8
    assert fields["title"]["fields"]["keyword"]["type"] == "keyword"

    # loading mode is undone: the configured refresh interval and replicas are back
    index_settings = es_client.indices.get_settings(index=name)[name]["settings"]["index"]
    assert index_settings["refresh_interval"] == cfg.elasticsearch.refresh_interval
    assert index_settings["number_of_replicas"] == str(cfg.elasticsearch.number_of_replicas)

    # the product id is the document id; vectors live in the vector index, not in _source
    doc = es_client.get(index=name, id=products.product_id[0])["_source"]
    assert doc["product_id"] == products.product_id[0] and doc["title"] == products.title[0]
    assert not any(key.startswith("embedding_") for key in doc)
    # each field holds the truncated, re-normalised prefix: the product's own prefix scores 1.0
    full = encode(load_encoder(str(tiny_model_dir)), [products.text[0]])
    for dim in cfg.model.dims:
        hit = es_client.search(index=name, knn={
            "field": conventions.vector_field(dim), "query_vector": conventions.truncate(full, dim)[0].tolist(),
            "k": 1, "num_candidates": 10})["hits"]["hits"][0]
        assert hit["_id"] == products.product_id[0] and hit["_score"] == pytest.approx(1.0, abs=1e-3)
    assert result.report.self_hit_rate == {d: 1.0 for d in cfg.model.dims}


def test_failed_verification_leaves_the_alias_on_the_previous_index(cfg, products, es_client, tiny_model_dir,
                                                                     second_tiny_model_dir):
    first = build_verify_swap(cfg, str(tiny_model_dir), products, model_version=1).index.name

    # a wrong count: the catalog says one more product than the index holds
    second = build_index(cfg, str(tiny_model_dir), products.iloc[:-1], model_version=2)
    with pytest.raises(IndexVerificationFailed, match=f"holds {N - 1} documents.*{N} accepted rows"):
        verify_index(cfg, second.name, products)
    with pytest.raises(Near2Error, match="has not passed verification"):
        swap_alias(es_client, cfg.elasticsearch.alias, second.name, first)
    assert current_target(es_client, cfg.elasticsearch.alias) == first

    # vectors from another model than the one recorded: queries would not match the documents
    foreign = encode(load_encoder(str(second_tiny_model_dir)), products.text.tolist())
    with pytest.raises(IndexVerificationFailed, match="retrieve themselves") as failure:
        build_verify_swap(cfg, str(tiny_model_dir), products, model_version=3, vectors=foreign)
    assert all(rate < 0.8 for rate in failure.value.report.self_hit_rate.values())
    assert current_target(es_client, cfg.elasticsearch.alias) == first
    assert es_client.search(index=cfg.elasticsearch.alias, size=0)["hits"]["total"]["value"] == N


def test_rollback_returns_to_the_previous_verified_index(cfg, products, es_client, tiny_model_dir):
    alias = cfg.elasticsearch.alias
    with pytest.raises(Near2Error, match="does not exist"):
        rollback(cfg)
    v1 = build_verify_swap(cfg, str(tiny_model_dir), products, model_version=1).index.name
    with pytest.raises(Near2Error, match="no verified index older"):
        rollback(cfg)
    build_index(cfg, str(tiny_model_dir), products, model_version=2)  # never verified: skipped by rollback
    v3 = build_verify_swap(cfg, str(tiny_model_dir), products, model_version=3).index.name
    assert rollback(cfg) == (v3, v1)
    assert current_target(es_client, alias) == v1

    status = index_status(cfg)
    assert status.target == v1
    by_name = {info.name: info for info in status.indices}
    assert by_name[v1].serving and by_name[v1].verified and not by_name[v3].serving
    assert by_name[v3].model_version == "3" and by_name[v3].docs == N and by_name[v3].dims == cfg.model.dims
    assert sum(not info.verified for info in status.indices) == 1


def test_swap_is_compare_and_swap_and_only_one_concurrent_swap_wins(cfg, products, es_client, tiny_model_dir):
    alias = cfg.elasticsearch.alias
    v1 = build_verify_swap(cfg, str(tiny_model_dir), products, model_version=1).index.name
    candidates = []
    for version in (2, 3):
        built = build_index(cfg, str(tiny_model_dir), products, model_version=version)
        verify_index(cfg, built.name, products)
        candidates.append(built.name)

    # both runs read v1 as the current target; they swap at the same moment
    outcomes: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def run(name: str) -> None:
        barrier.wait()
        try:
            outcomes[name] = swap_alias(cfg, alias, name, v1)
        except AliasChanged as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=run, args=(name,)) for name in candidates]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [name for name, outcome in outcomes.items() if outcome == v1]
    assert len(winners) == 1, outcomes
    loser = next(name for name in candidates if name not in winners)
    assert isinstance(outcomes[loser], AliasChanged)
    assert sorted(es_client.indices.get_alias(name=alias)) == winners

    # a stale expectation is refused and changes nothing
    with pytest.raises(AliasChanged, match="another run moved it"):
        swap_alias(es_client, alias, loser, v1)
    with pytest.raises(AliasChanged):
        swap_alias(es_client, alias, loser, None)
    assert current_target(es_client, alias) == winners[0]


def test_the_champion_swap_retries_only_past_an_index_of_a_non_champion(cfg, products, es_client, tiny_model_dir):
    """The rule the DAG and `near2 index` share: if the alias moved after this run read it, the champion's
    index takes it from an index whose model is not the champion, never from the champion's own index."""
    alias = cfg.elasticsearch.alias
    v1 = build_verify_swap(cfg, str(tiny_model_dir), products, model_version=1).index.name
    built = {}
    for version in (2, 3, 4):
        built[version] = build_index(cfg, str(tiny_model_dir), products, model_version=version).name
        verify_index(cfg, built[version], products)

    swap_alias(es_client, alias, built[2], v1)  # another run served v2 after this one read v1
    with pytest.raises(AliasChanged):  # there is no champion to say v2 is stale: v2 stays
        swap_to_champion_index(es_client, alias, built[3], v1, model_version=3, champion=None)
    with pytest.raises(AliasChanged):  # this run's v3 is not the champion (v4 is): v2 stays
        swap_to_champion_index(es_client, alias, built[3], v1, model_version=3, champion="4")
    assert current_target(es_client, alias) == built[2]
    # v3 is the champion and v2 is not: the swap is retried from v2
    assert swap_to_champion_index(es_client, alias, built[3], v1, model_version=3, champion="3") == built[2]
    assert current_target(es_client, alias) == built[3]
    # a re-run after the swap changes nothing
    assert swap_to_champion_index(es_client, alias, built[3], v1, model_version=3, champion="3") == v1
    # an index serving the champion is never displaced by the retry (here: a second build of v3)
    with pytest.raises(AliasChanged):
        swap_to_champion_index(es_client, alias, built[4], v1, model_version=3, champion="3")
    assert current_target(es_client, alias) == built[3]


def test_rerunning_a_failed_load_converges_to_the_exact_catalog(cfg, products, es_client, tiny_model_dir):
    name = f"{cfg.elasticsearch.alias}-v5-20260101t000000"
    # a first attempt died after part of the catalog, and the index also holds a product since removed
    stale = titled_catalog(3, seed=99).assign(product_id=["gone-1", "gone-2", "gone-3"])
    import pandas as pd

    build_index(cfg, str(tiny_model_dir), pd.concat([products.iloc[:30], stale]), model_version=5,
                index_name=name)
    assert es_client.count(index=name)["count"] == 33

    rerun = build_index(cfg, str(tiny_model_dir), products, model_version=5, index_name=name)
    assert rerun.name == name and rerun.count == N
    ids = {hit["_id"] for hit in es_client.search(index=name, size=200, _source=False)["hits"]["hits"]}
    assert ids == set(products.product_id)
    verify_index(cfg, name, products)
    swap_alias(es_client, cfg.elasticsearch.alias, name, None)

    # another model cannot silently take over an existing index
    with pytest.raises(Near2Error, match="exists with another model"):
        build_index(cfg, str(tiny_model_dir), products, model_version=5, index_name=name, dims=[64, 32])


def test_old_indices_are_pruned_but_the_serving_one_and_rollback_targets_kept(tiny_settings, products, es_client,
                                                                             tiny_model_dir):
    cfg = serving_settings(tiny_settings, elasticsearch={"keep_indices": 1})
    names = [build_verify_swap(cfg, str(tiny_model_dir), products, model_version=v).index.name for v in (1, 2)]
    third = build_verify_swap(cfg, str(tiny_model_dir), products, model_version=3)
    assert third.deleted == [names[0]]
    assert not es_client.indices.exists(index=names[0])
    assert [i.name for i in index_status(cfg).indices] == [third.index.name, names[1]]
    assert prune_indices(cfg) == []


def test_writes_rejected_by_a_read_only_index_fail_with_a_clear_error(cfg, products, es_client, tiny_model_dir):
    name = f"{cfg.elasticsearch.alias}-v1-20260101t000000"
    build_index(cfg, str(tiny_model_dir), products.iloc[:10], model_version=1, index_name=name)
    es_client.indices.put_settings(index=name, settings={"index.blocks.write": True})
    try:
        with pytest.raises(Near2Error, match="cluster_block_exception") as failure:
            build_index(cfg, str(tiny_model_dir), products, model_version=1, index_name=name)
        assert "read-only" in failure.value.hint
    finally:
        es_client.indices.put_settings(index=name, settings={"index.blocks.write": False})
    assert current_target(es_client, cfg.elasticsearch.alias) is None


def test_unreachable_elasticsearch_names_the_url_and_the_fix(cfg, products, tiny_model_dir):
    down = with_sections(cfg, elasticsearch={"url": "http://127.0.0.1:9", "max_retries": 0})
    for call in (lambda: index_status(down), lambda: rollback(down),
                 lambda: swap_alias(down, "products", "products-v1-20260101t000000", None),
                 lambda: build_index(down, str(tiny_model_dir), products, model_version=1)):
        with pytest.raises(ServiceUnavailable, match=r"http://127.0.0.1:9 is not reachable") as failure:
            call()
        assert "near2 es start" in failure.value.hint


def test_impossible_requests_are_refused_before_any_work(cfg, products, tiny_model_dir, es_client):
    bbq_small = with_sections(cfg, elasticsearch={"index_options": {16: {"index_type": "bbq_hnsw"}}})
    with pytest.raises(Near2Error, match="bbq_hnsw needs at least 64 dimensions"):
        build_index(bbq_small, str(tiny_model_dir), products, model_version=1)
    with pytest.raises(Near2Error, match="exceed the model's embedding dimension"):
        build_index(cfg, str(tiny_model_dir), products, model_version=1, dims=[128, 64])
    with pytest.raises(Near2Error, match="repeats product_id"):
        build_index(cfg, str(tiny_model_dir), products.assign(product_id="same"), model_version=1)
    with pytest.raises(Near2Error, match="vectors have shape"):
        build_index(cfg, str(tiny_model_dir), products, model_version=1, vectors=np.zeros((3, 64)))
    assert es_client.indices.get(index=f"{cfg.elasticsearch.alias}-*", allow_no_indices=True) == {}


def test_a_registry_alias_is_pinned_to_its_version_in_meta(cfg, products, es_client, tiny_model_dir,
                                                           register_model_dir):
    from near2_tasks.serving.search import search

    version = register_model_dir(cfg, tiny_model_dir)
    name = cfg.mlflow.registered_model
    built = build_verify_swap(cfg, f"models:/{name}@challenger", products, model_version=version).index
    assert built.meta["model_uri"] == f"models:/{name}/{version}" and built.meta["model_name"] == name
    # the storefront loads exactly that version from the registry, whatever the alias does later
    response = search(cfg, products.title[3], k=3)
    assert response.model_uri == f"models:/{name}/{version}" and response.hits[0].product_id == products.product_id[3]
    with pytest.raises(Near2Error, match=f"is version {version}, but model_version=99"):
        build_index(cfg, f"models:/{name}@challenger", products, model_version=99)


# ----- the mapping means the same on any server version -----------------------------------------------
def test_vector_mappings_round_trip_unchanged_on_the_server(settings, es_client, unique_alias):
    """near2 sets every index_options parameter of every dense_vector field, so the server fills in none
    of its own defaults (they changed: a bbq field left to itself rescores 3x from 8.19 and 9.1, not before)."""
    cfg = with_sections(settings, elasticsearch={"binary_dims": [64], "index_options": {
        256: {"index_type": "bbq_hnsw", "oversample": 2.5, "m": 24},
        128: {"index_type": "int8_hnsw", "ef_construction": 64}, 96: {"index_type": "int8_hnsw", "confidence_interval": 0.95},
        64: {"index_type": "int4_hnsw"}, 32: {"index_type": "int8_flat"}, 16: {"index_type": "flat"}}})
    dims = [384, 256, 128, 96, 64, 32, 16]
    body = index_body(cfg, dims, meta={})
    name = f"{unique_alias}-roundtrip"
    es_client.indices.create(index=name, **body)
    sent = body["mappings"]["properties"]
    returned = es_client.indices.get_mapping(index=name)[name]["mappings"]["properties"]
    vector_fields = [f for f, m in sent.items() if m["type"] == "dense_vector"]
    assert len(vector_fields) == len(dims) + 1  # one per dim, plus the 64-bit codes
    for field in vector_fields:
        assert returned[field] == sent[field], field
    # the measured defaults: bbq from 128 dims rescoring 3x, float hnsw below; m/ef_construction explicit
    assert sent["embedding_384"]["index_options"] == {"type": "bbq_hnsw", "m": 16, "ef_construction": 100,
                                                       "rescore_vector": {"oversample": 3.0}}
    assert sent["embedding_128"]["index_options"]["rescore_vector"] == {"oversample": 0.0}  # int8: none
    assert sent["embedding_256"]["index_options"]["rescore_vector"] == {"oversample": 2.5}
    assert "rescore_vector" not in sent["embedding_16"]["index_options"]  # float: nothing to rescore

    # what the explicit options guard against: this server's own default for a bare bbq field
    es_client.indices.create(index=f"{unique_alias}-bare", mappings={"properties": {"v": {
        "type": "dense_vector", "dims": 384, "similarity": "dot_product", "index_options": {"type": "bbq_hnsw"}}}})
    bare = es_client.indices.get_mapping(index=f"{unique_alias}-bare")[f"{unique_alias}-bare"]
    assert bare["mappings"]["properties"]["v"]["index_options"]["rescore_vector"] == {"oversample": 3.0}


def test_oversample_on_a_float_field_is_refused(settings):
    cfg = with_sections(settings, elasticsearch={"index_options": {64: {"index_type": "hnsw", "oversample": 2}}})
    with pytest.raises(Near2Error, match="oversample 2.0 of embedding_64 needs a quantised index type, not hnsw"):
        index_body(cfg, [64], meta={})
    with pytest.raises(ValueError, match="oversample must be 0 .no rescoring. or from 1 to 10, got 0.5"):
        with_sections(settings, elasticsearch={"index_options": {64: {"oversample": 0.5}}})
