"""The one evaluation entry point (near2_tasks.evaluate.retrieval.evaluate_retriever): exact search, and the
Elasticsearch retrievers (near2_tasks.serving.retrievers) against the real server, scored by the same code."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from near2_tasks.errors import Near2Error
from near2_tasks.evaluate.evaluation import evaluate_model, prepare_data
from near2_tasks.evaluate.retrieval import (
    ExactRetriever, Ranked, evaluate_retriever, overlap_at, rows_of, scale_of,
)
from near2_tasks.models.embeddings import encode, load_encoder
from near2_tasks.serving.publish import build_verify_swap
from near2_tasks.serving.retrievers import ElasticsearchRetriever
from near2_tasks.serving.search import Searcher
from tests.serving_support import module_settings, titled_catalog, with_sections
from tests.tiny_model import TINY_DIMS

N = 150


def small_data():
    products = pd.DataFrame({"product_id": ["p0", "p1", "p2", "p3"], "title": ["a", "b", "c", "d"]})
    judgments = pd.DataFrame({"query": ["drill", "drill", "saw 12v", "saw 12v", "hose"],
                              "product_id": ["p0", "p1", "p2", "p9", "p3"], "relevance": [3, 2, 3, 3, 1]})
    return prepare_data(products, judgments, "{title}")


class FixedRetriever:
    """Returns the given product ids per query (what a search engine would)."""

    name = "fixed"

    def __init__(self, ids):
        self.ids = ids

    def rank(self, data, query_vectors, dim, depth):
        return Ranked(rows_of(data, self.ids, depth), seconds=[0.001 * (i + 1) for i in range(len(self.ids))])


def test_ids_map_to_catalog_rows_and_the_ideal_ranking_scores_one():
    data = small_data()  # queries sorted by text: drill, hose, saw 12v; p9 is outside the catalog
    assert data.product_ids == ["p0", "p1", "p2", "p3"] and data.n_judgments_outside_catalog == 1
    rows = rows_of(data, [["p1", "p9", "p0"], [], ["p2"]], depth=3)
    assert rows.tolist() == [[1, 0, -1], [-1, -1, -1], [2, -1, -1]]
    ideal = evaluate_retriever(FixedRetriever([["p0", "p1"], ["p3"], ["p2"]]), data, [8, 4], k=2,
                               metrics=["ndcg@2", "mrr@2"], floor=1.0, threshold=2.0)
    # hose's only judgment has gain 0 (relevance = floor): NDCG is undefined there and left out of the mean
    assert ideal.dims[8] == {"ndcg@2": pytest.approx(1.0), "mrr@2": pytest.approx(1.0)}
    assert ideal.dims[4] == ideal.dims[8] and ideal.n_queries == 3
    assert ideal.slices["alphanumeric"][8]["ndcg@2"] == pytest.approx(1.0)  # "saw 12v"
    assert ideal.slice_sizes["alphanumeric"] == 1 and ideal.latency_ms[8] == {"p50": 2.0, "p99": 2.0}
    swapped = evaluate_retriever(FixedRetriever([["p1", "p0"], ["p3"], []]), data, [8], k=2, metrics=["ndcg@2"],
                                 floor=1.0, threshold=2.0)
    # drill: gains (1, 2) instead of (2, 1); saw 12v: nothing found
    drill = (1 + 2 / np.log2(3)) / (2 + 1 / np.log2(3))
    assert swapped.dims[8]["ndcg@2"] == pytest.approx((drill + 0.0) / 2)
    with pytest.raises(Near2Error, match="k must be positive"):
        evaluate_retriever(FixedRetriever([]), data, [8], k=0, floor=1.0, threshold=2.0)


def test_overlap_counts_the_reference_top_k_found():
    reference = np.array([[1, 2, 3], [4, 5, -1]])
    assert overlap_at(reference, reference, 3) == 1.0
    assert overlap_at(np.array([[3, 9, 1], [6, 7, 8]]), reference, 3) == pytest.approx((2 / 3 + 0) / 2)


def test_evaluate_model_is_exact_retrieval_through_the_entry_point(tiny_settings, tiny_model_dir):
    from near2_tasks.data.synthetic import generate_catalog

    synthetic = generate_catalog(80, 12, seed=4)
    tiny_settings = with_sections(tiny_settings, model={"backend": "torch"})  # the same vectors as encode() below
    report = evaluate_model(tiny_settings, str(tiny_model_dir), synthetic.products, synthetic.judgments,
                            dims=TINY_DIMS)
    data = prepare_data(synthetic.products, synthetic.judgments, tiny_settings.dataset.text_template)
    model = load_encoder(str(tiny_model_dir))
    scores = evaluate_retriever(ExactRetriever(encode(model, data.product_texts)), data, TINY_DIMS,
                                query_vectors=encode(model, data.query_texts), **scale_of(tiny_settings))
    for dim in TINY_DIMS:
        assert scores.dims[dim] == pytest.approx(report.dims[dim], abs=1e-6)
    assert scores.slice_sizes == report.slice_sizes


# ----- through Elasticsearch ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flat_index(tmp_path_factory, es_url, es_client, tiny_model_dir):
    """Exact float kNN fields (index_type flat) at every dim: Elasticsearch must rank like numpy."""
    settings = module_settings(tmp_path_factory, es_url, str(tiny_model_dir), TINY_DIMS, home="retrieval-home")
    settings = with_sections(settings, elasticsearch={
        "index_options": {d: {"index_type": "flat"} for d in TINY_DIMS}, "binary_dims": [min(TINY_DIMS)]})
    products = titled_catalog(N, seed=5)
    build_verify_swap(settings, str(tiny_model_dir), products, model_version=1)
    yield settings, products
    es_client.indices.delete(index=f"{settings.elasticsearch.alias}-*", ignore_unavailable=True)


def test_elasticsearch_knn_scores_like_exact_search_and_every_mode_is_scored_the_same_way(flat_index, tiny_model_dir):
    from near2_tasks.data.synthetic import generate_catalog

    settings, products = flat_index
    judgments = generate_catalog(N, 10, seed=5).judgments
    data = prepare_data(products, judgments, settings.dataset.text_template)
    model = load_encoder(str(tiny_model_dir))
    queries = encode(model, data.query_texts)
    exact = evaluate_retriever(ExactRetriever(encode(model, data.product_texts)), data, TINY_DIMS,
                               query_vectors=queries, metrics=["ndcg@10", "recall@10"], keep_rankings=True,
                               **scale_of(settings))
    searcher = Searcher(settings)
    served = searcher.serving_index(refresh=True)
    knn = evaluate_retriever(ElasticsearchRetriever(searcher, served, "knn"), data, TINY_DIMS, query_vectors=queries,
                             metrics=["ndcg@10", "recall@10"], keep_rankings=True, **scale_of(settings))
    for dim in TINY_DIMS:
        assert knn.dims[dim] == pytest.approx(exact.dims[dim], abs=1e-6), dim
        assert overlap_at(knn.rankings[dim], exact.rankings[dim], 10) == pytest.approx(1.0)
        assert knn.latency_ms[dim]["p50"] > 0
    others = {mode: evaluate_retriever(
        ElasticsearchRetriever(searcher, served, mode, shortlist_dim=min(TINY_DIMS) if mode == "funnel" else None),
        data, [max(TINY_DIMS)], query_vectors=queries, metrics=["ndcg@10"], **scale_of(settings))
        for mode in ("funnel", "bm25", "hybrid_rrf", "hybrid_linear")}
    for mode, scores in others.items():
        value = scores.dims[max(TINY_DIMS)]["ndcg@10"]
        assert value is not None and 0.0 <= value <= 1.0, mode
        assert set(scores.slices) == set(exact.slices)
    # the linear fusion at weight 1 is the dense side alone: kNN's top 10 with the hybrid's candidates
    dense_only = evaluate_retriever(ElasticsearchRetriever(searcher, served, "hybrid_linear",
                                                           weights={max(TINY_DIMS): 1.0}),
                                    data, [max(TINY_DIMS)], query_vectors=queries, metrics=["ndcg@10"],
                                    **scale_of(settings))
    assert dense_only.dims[max(TINY_DIMS)]["ndcg@10"] == pytest.approx(exact.dims[max(TINY_DIMS)]["ndcg@10"], abs=1e-6)
    with pytest.raises(Near2Error, match="shortlist_dim"):
        ElasticsearchRetriever(searcher, served, "funnel")
    with pytest.raises(Near2Error, match="query vectors"):
        ElasticsearchRetriever(searcher, served, "knn").rank(data, None, max(TINY_DIMS), 10)
