"""Metrics agree with trec_eval (through pytrec_eval) on random rankings and graded judgments."""

from __future__ import annotations

import numpy as np
import pytest
import pytrec_eval

from near2_tasks.evaluate.metrics import Qrels, mean_over, metric_names, parse_metric, per_query_metrics

FLOOR, THRESHOLD = 1.0, 2.0
# trec_eval needs integer grades: half-step grades 1.0 .. 3.0 become 0 .. 4 after (rel - floor) * 2,
# which scales every gain by 2 (NDCG does not change) and moves the threshold to (2.0 - 1.0) * 2 = 2.
SCALE = 2
TREC_MEASURES = {"ndcg@10": "ndcg_cut_10", "precision@10": "P_10", "recall@10": "recall_10",
                 "recall@100": "recall_100", "map@100": "map_cut_100"}


def random_case(seed: int, n_queries: int = 60, n_products: int = 400, depth: int = 100):
    rng = np.random.default_rng(seed)
    ranking = np.stack([rng.permutation(n_products)[:depth] for _ in range(n_queries)])
    queries, products, grades = [], [], []
    for q in range(n_queries):
        n_judged = int(rng.integers(1, 25))
        # judge some ranked products (so hits happen) and some random ones (possibly unranked)
        judged = np.unique(np.concatenate([
            rng.choice(ranking[q, :30], size=n_judged // 2 + 1, replace=False),
            rng.choice(n_products, size=n_judged, replace=False),
        ]))
        queries += [q] * len(judged)
        products += judged.tolist()
        scale = [1.0] if q % 11 == 0 else [1.0, 1.5] if q % 7 == 0 else [1.0, 1.5, 2.0, 2.5, 3.0]
        grades += rng.choice(scale, size=len(judged)).tolist()  # some queries: nothing relevant / all at floor
    return ranking, np.array(queries), np.array(products), np.array(grades)


def trec_eval(ranking, queries, products, grades, mrr_cutoff=10):
    qrels: dict[str, dict[str, int]] = {}
    for q, p, g in zip(queries, products, grades):
        qrels.setdefault(f"q{q}", {})[f"p{p}"] = int(round((g - FLOOR) * SCALE))
    # strictly decreasing scores keep trec_eval's order equal to ours (it breaks ties by doc id)
    run = {f"q{q}": {f"p{p}": float(len(row) - r) for r, p in enumerate(row)} for q, row in enumerate(ranking)}
    run_top = {f"q{q}": {f"p{p}": float(len(row) - r) for r, p in enumerate(row[:mrr_cutoff])}
               for q, row in enumerate(ranking)}
    level = int(round((THRESHOLD - FLOOR) * SCALE))
    full = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "P.10", "recall.10,100", "map_cut.100"},
                                          relevance_level=level).evaluate(run)
    mrr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}, relevance_level=level).evaluate(run_top)
    for q in full:
        full[q]["mrr@10"] = mrr[q]["recip_rank"]
    return full


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_metric_equals_trec_eval_per_query_and_on_average(seed):
    ranking, queries, products, grades = random_case(seed)
    qrels = Qrels.from_pairs(queries, products, grades, n_queries=len(ranking), n_products=400)
    ours = per_query_metrics(ranking, qrels, metric_names(10), FLOOR, THRESHOLD)
    reference = trec_eval(ranking, queries, products, grades)

    n_relevant = qrels.count_relevant(THRESHOLD)
    ideal = qrels.ideal_dcg(FLOOR, 10)
    assert (n_relevant == 0).any() and (n_relevant > 0).any(), "the case must cover both kinds of query"
    assert (ideal == 0).any() and (ideal > 0).any()
    for name in metric_names(10):
        trec_name = TREC_MEASURES.get(name, name)
        counts = ideal > 0 if name.startswith("ndcg") else n_relevant > 0
        expected = np.array([reference[f"q{q}"][trec_name] for q in range(len(ranking))])
        np.testing.assert_allclose(ours[name][counts], expected[counts], atol=1e-6, err_msg=name)
        assert np.isnan(ours[name][~counts]).all(), f"{name}: skipped queries must be NaN, not 0"
        assert mean_over(ours[name]) == pytest.approx(expected[counts].mean(), abs=1e-6)


def test_duplicate_judgments_are_averaged_and_unjudged_products_gain_nothing():
    # query 0 judges product 2 twice (3 and 2 -> 2.5); product 0 ranked first is unjudged
    qrels = Qrels.from_pairs([0, 0, 0], [2, 2, 1], [3.0, 2.0, 1.0], n_queries=1, n_products=3)
    assert qrels.relevance.tolist() == [1.0, 2.5]
    ndcg = per_query_metrics(np.array([[0, 2, 1]]), qrels, ["ndcg@3"], FLOOR, THRESHOLD)["ndcg@3"]
    assert ndcg[0] == pytest.approx((1.5 / np.log2(3)) / 1.5)


def test_a_catalog_smaller_than_the_cut_off_pads_with_minus_one():
    qrels = Qrels.from_pairs([0], [1], [3.0], n_queries=1, n_products=2)
    result = per_query_metrics(np.array([[1, 0]]), qrels, ["precision@10", "recall@100", "ndcg@10"], FLOOR,
                               THRESHOLD)
    assert result["precision@10"][0] == pytest.approx(0.1)
    assert result["recall@100"][0] == 1.0
    assert result["ndcg@10"][0] == 1.0


def test_mean_over_an_empty_selection_is_none_not_nan():
    assert mean_over(np.array([np.nan, 0.5]), np.array([True, False])) is None
    assert mean_over(np.array([np.nan, 0.5])) == 0.5


@pytest.mark.parametrize("bad", ["ndgc@10", "ndcg", "ndcg@0", "NDCG@10", "recall@x"])
def test_unknown_metric_names_are_rejected(bad):
    with pytest.raises(ValueError, match="unknown metric"):
        parse_metric(bad)
