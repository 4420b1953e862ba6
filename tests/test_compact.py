"""Binary codes of nested prefixes (near2_tasks.serving.compact) and Elasticsearch ``bit`` fields that search them."""

from __future__ import annotations

import numpy as np
import pytest

from near2_tasks.serving.compact import binary_codes, catalog_centre, to_hex
from near2_tasks.conventions import truncate


def test_codes_are_the_sign_bits_of_the_centred_prefix():
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(50, 64)).astype(np.float32) + 1.0  # a shared offset, as real embeddings have
    centre = catalog_centre(vectors, 32)
    codes = binary_codes(vectors, 32, centre)
    assert codes.shape == (50, 4) and codes.dtype == np.uint8
    expected_bits = (truncate(vectors, 32) - centre) > 0
    np.testing.assert_array_equal(np.unpackbits(codes, axis=1).astype(bool), expected_bits)
    # centring balances the bits; without it the offset makes most of them 1
    assert abs(np.unpackbits(codes).mean() - 0.5) < 0.1
    assert np.unpackbits(binary_codes(vectors, 32)).mean() > 0.75


def test_hex_and_dimension_rules():
    assert to_hex(np.array([0, 255, 16], dtype=np.uint8)) == "00ff10"
    with pytest.raises(ValueError, match="divisible by 8"):
        binary_codes(np.ones((2, 64), dtype=np.float32), 12)
    with pytest.raises(ValueError, match="centre has 64 components"):
        binary_codes(np.ones((2, 64), dtype=np.float32), 32, np.zeros(64, dtype=np.float32))


def test_elasticsearch_bit_field_ranks_by_hamming_distance(es_client, unique_alias):
    """ES's ``bit`` kNN over our codes returns the exact Hamming-nearest documents (flat: exhaustive)."""
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(300, 64)).astype(np.float32)
    centre = catalog_centre(vectors, 64)
    codes = binary_codes(vectors, 64, centre)
    index = f"{unique_alias}-bits"
    es_client.indices.create(index=index, mappings={"properties": {"code": {
        "type": "dense_vector", "element_type": "bit", "dims": 64, "index": True, "similarity": "l2_norm",
        "index_options": {"type": "flat"}}}})
    operations = []
    for i, code in enumerate(codes):
        operations += [{"index": {"_index": index, "_id": str(i)}}, {"code": to_hex(code)}]
    es_client.bulk(operations=operations, refresh=True)

    query = rng.normal(size=(1, 64)).astype(np.float32)
    query_code = binary_codes(query, 64, centre)[0]
    hamming = np.unpackbits(codes ^ query_code, axis=1).sum(axis=1)
    response = es_client.search(index=index, knn={"field": "code", "query_vector": to_hex(query_code), "k": 10,
                                                  "num_candidates": 300}, size=10, source=False)
    got = [int(hit["_id"]) for hit in response["hits"]["hits"]]
    assert sorted(hamming[got]) == sorted(np.sort(hamming)[:10])  # ties may come in any order
    assert [round(hit["_score"], 4) for hit in response["hits"]["hits"]] == \
        [round((64 - h) / 64, 4) for h in sorted(hamming[got])]


def test_index_with_bit_codes_serves_the_funnel_shortlist(tiny_settings, tiny_model_dir, es_client):
    """``elasticsearch.binary_dims``: the index gets ``embedding_32_bits`` and the centre in ``_meta``; the
    funnel's shortlist then compares codes, and every product still finds itself first."""
    from near2_tasks import conventions
    from near2_tasks.serving.publish import build_verify_swap
    from near2_tasks.serving.search import Searcher
    from tests.serving_support import serving_settings, titled_catalog

    settings = serving_settings(tiny_settings, elasticsearch={"binary_dims": [32, 64]})  # 64 is the full dim
    products = titled_catalog(80)
    build_verify_swap(settings, str(tiny_model_dir), products, model_version=1)
    index = next(iter(es_client.indices.get_alias(name=settings.elasticsearch.alias)))
    mapping = es_client.indices.get_mapping(index=index)[index]["mappings"]
    assert mapping["properties"][conventions.binary_vector_field(32)]["element_type"] == "bit"
    assert conventions.binary_vector_field(64) not in mapping["properties"]  # nothing to rescore above it
    assert len(mapping["_meta"]["binary_centres"]["32"]) == 32

    searcher = Searcher(settings)
    for product in products.iloc[::8].itertuples():
        response = searcher.search(product.title, k=5, mode="funnel")
        assert (response.dim, response.shortlist_dim) == (64, 32)
        assert response.hits[0].product_id == product.product_id
    knn = searcher.search(products.title[1], k=5, dim=16, mode="knn")  # the float fields are untouched
    assert knn.hits[0].product_id == products.product_id[1]
