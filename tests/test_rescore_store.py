"""The funnel's float16 rescoring store (``near2_tasks.serving.rescore_store``): written in parts, merged,
memory-mapped, checked against its index; scores like the Elasticsearch field; retention of orphans.

Against the real Elasticsearch (the two-request funnel, a missing or stale store, pruning): tests/test_search_local_rescore.py.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from near2_tasks import conventions
from near2_tasks.config import load_settings
from near2_tasks.errors import Near2Error
from near2_tasks.serving import compact, rescore_store
from near2_tasks.serving.index import prepare_products
from near2_tasks.serving.rescore_store import RescoreStore, StoreMismatch

INDEX = "products-v1-20260101t000000"
META = {"model_uri": "/models/a", "dims": [64, 32, 16], "catalog_version": "c1"}


@pytest.fixture
def local(tmp_path):
    return load_settings(home=str(tmp_path / "home"), serving={"funnel_rescore": "local"})


def _catalog(n: int = 50, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    products = prepare_products(pd.DataFrame({
        "product_id": [f"p{i}" for i in rng.permutation(n)], "title": [f"t{i}" for i in range(n)],
        "category": ["c"] * n, "brand": [None] * n, "price": [float(i) if i % 3 else np.nan for i in range(n)]}))
    vectors = rng.normal(size=(n, 64)).astype(np.float32)
    return products, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_parts_merge_into_one_store_that_scores_like_the_field(local):
    products, vectors = _catalog()
    rescore_store.write_part(local, INDEX, products.iloc[:20], vectors[:20])
    rescore_store.write_part(local, INDEX, products.iloc[20:], vectors[20:])
    rescore_store.write_part(local, INDEX, products.iloc[20:], vectors[20:])  # a retried shard: same part
    assert len(list((rescore_store.store_dir(local, INDEX) / "parts").glob("*.npz"))) == 2
    directory = rescore_store.finalize(local, INDEX, products, META, count=len(products))
    assert not (directory / "parts").exists()
    assert rescore_store.finalize(local, INDEX, products, META, count=len(products)) == directory  # a retry converges
    assert json.loads((directory / "store.json").read_text())["count"] == len(products)
    store = RescoreStore.open(local, INDEX, META["model_uri"], META["dims"], len(products))
    assert store.vectors.dtype == np.float16 and isinstance(store.vectors, np.memmap)

    query = vectors[7] + 0.1
    ids = products.product_id.tolist()[::2]
    rows, scores = store.top(ids, query, 32, k=5)
    # the exact float32 scores of the embedding_32 field over the same ids
    exact = (1 + conventions.truncate(vectors[::2], 32) @ conventions.truncate(query, 32)) / 2
    best = np.argsort(-exact)[:5]
    hits = store.hits(rows, scores)
    assert [h.product_id for h in hits] == [ids[i] for i in best]
    np.testing.assert_allclose(scores, exact[best], atol=2e-3)
    source = products.set_index("product_id")
    for hit in hits:
        assert hit.title == source.title[hit.product_id] and hit.brand is None
        price = source.price[hit.product_id]
        assert hit.price == (None if pd.isna(price) else price)


def _hamming_order(codes: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Rows by Hamming distance to ``code``, ties by row: the shortlist's order, computed bit by bit."""
    bits = np.unpackbits(codes, axis=1) != np.unpackbits(code[None, :], axis=1)
    distance = bits.sum(axis=1)
    return np.array(sorted(range(len(codes)), key=lambda r: (distance[r], r)))


@pytest.mark.parametrize("dim", [64, 32])  # 8 bytes at a time, and byte by byte
def test_the_store_holds_the_index_codes_and_shortlists_by_hamming_distance(local, dim):
    products, vectors = _catalog(200, seed=3)
    centres = {dim: compact.catalog_centre(vectors, dim)}
    rescore_store.write_part(local, INDEX, products.iloc[:120], vectors[:120], centres)
    rescore_store.write_part(local, INDEX, products.iloc[120:], vectors[120:], centres)
    meta = {**META, compact.META_CENTRES: {str(dim): centres[dim].tolist()}}
    directory = rescore_store.finalize(local, INDEX, products, meta, count=len(products))
    assert json.loads((directory / "store.json").read_text())["codes"] == [dim]
    store = RescoreStore.open(local, INDEX, META["model_uri"], META["dims"], len(products))
    # row r of the store is the product with the r-th smallest id: its code is the one bulk.py indexes
    order = np.argsort(products.product_id.astype(str).to_numpy(), kind="stable")
    np.testing.assert_array_equal(store.codes[dim], compact.binary_codes(vectors[order], dim, centres[dim]))
    # codes made with other centres than the index's would shortlist other products: refused
    meta_centres = {dim: centres[dim]}
    assert RescoreStore.open(local, INDEX, META["model_uri"], META["dims"], len(products), meta_centres).codes
    with pytest.raises(StoreMismatch, match=f"its {dim}-bit codes were made with other centres"):
        RescoreStore.open(local, INDEX, META["model_uri"], META["dims"], len(products), {dim: centres[dim] + 0.01})
    with pytest.raises(ValueError, match=f"a {dim}-bit code has {dim // 8} bytes"):
        store.shortlist(np.zeros(dim // 4, dtype=np.uint8), dim, 5)
    for seed in range(5):
        query = np.random.default_rng(seed).normal(size=64).astype(np.float32)
        code = compact.binary_codes(query[None, :], dim, centres[dim])[0]
        expected = _hamming_order(store.codes[dim], code)
        for size in (1, 17, 60, 200, 500):  # the cut-off falls inside a run of ties for most sizes
            np.testing.assert_array_equal(store.shortlist(code, dim, size), expected[:size])


def test_a_store_without_codes_has_none_and_a_mixed_merge_drops_them(local):
    products, vectors = _catalog()
    rescore_store.write_part(local, INDEX, products, vectors)
    rescore_store.finalize(local, INDEX, products, META, count=len(products))
    assert RescoreStore.open(local, INDEX, META["model_uri"], META["dims"], len(products)).codes == {}
    # one part with codes, one without (an older writer): the merge keeps the vectors, not half of the codes
    other = INDEX.replace("v1", "v2")
    rescore_store.write_part(local, other, products.iloc[:25], vectors[:25], {32: compact.catalog_centre(vectors, 32)})
    rescore_store.write_part(local, other, products.iloc[25:], vectors[25:])
    directory = rescore_store.finalize(local, other, products, META, count=len(products))
    assert not list(directory.glob("codes_*.npy"))
    assert RescoreStore.open(local, other, META["model_uri"], META["dims"], len(products)).codes == {}


def test_a_store_that_does_not_belong_to_its_index_is_refused(local):
    products, vectors = _catalog()
    with pytest.raises(StoreMismatch, match="no readable rescoring store"):
        RescoreStore.open(local, INDEX, META["model_uri"], META["dims"], len(products))
    rescore_store.write_part(local, INDEX, products.iloc[:30], vectors[:30])
    with pytest.raises(Near2Error, match="lacks 20 of 50 products"):  # a shard's part is missing
        rescore_store.finalize(local, INDEX, products, META, count=len(products))
    rescore_store.write_part(local, INDEX, products, vectors)
    rescore_store.finalize(local, INDEX, products, META, count=len(products))
    with pytest.raises(StoreMismatch, match="its model is /models/a"):
        RescoreStore.open(local, INDEX, "/models/b", META["dims"], len(products))
    with pytest.raises(StoreMismatch, match="holds 50 ids and 50 vectors, the index 51 documents"):
        RescoreStore.open(local, INDEX, META["model_uri"], META["dims"], len(products) + 1)
    with pytest.raises(StoreMismatch, match=r"need float16 \(n, 128\)"):
        RescoreStore.open(local, INDEX, META["model_uri"], [128], len(products))
    store = RescoreStore.open(local, INDEX, META["model_uri"], META["dims"], len(products))
    with pytest.raises(StoreMismatch, match="lacks product"):
        store.top(["p1", "not-a-product", "p10000000000000"], vectors[0], 32, k=2)


def test_orphans_are_stores_of_vanished_indices_no_newer_than_the_target(local):
    alias = "products"
    names = [f"{alias}-v{v}-2026010{v}t000000" for v in range(1, 5)]
    for name in names:
        rescore_store.store_dir(local, name).mkdir(parents=True)
    (rescore_store.store_root(local) / "other-v1-20260101t000000").mkdir()
    # v3 is served and v1 is kept; v2 vanished (deleted by hand); v4 is newer than the target: a build
    found = rescore_store.orphans(local, alias, existing={names[0], names[2]}, targets={names[2]})
    assert found == [names[1]]
    assert rescore_store.delete_stores(local, found) == [names[1]]
    assert not rescore_store.store_dir(local, names[1]).exists() and rescore_store.store_dir(local, names[3]).exists()
    with pytest.raises(Near2Error, match="not an index name"):
        rescore_store.store_dir(local, "../etc")
