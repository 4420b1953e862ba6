"""Query splits and MMSE-style example mining, checked against the judgments they come from."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from near2_tasks.config import load_settings
from near2_tasks.data.text import query_key
from near2_tasks.errors import Near2Error
from near2_tasks.train.examples import ir_eval_data, mine_examples, split_by_query


@pytest.fixture(scope="module")
def accepted(tmp_path_factory):
    """The validated synthetic catalog (300 products, 60 queries)."""
    from near2_tasks.data.validate import validate_dataset

    home = tmp_path_factory.mktemp("examples")
    settings = load_settings(home=str(home / "home"), dataset={"synthetic_products": 300, "synthetic_queries": 60},
                             validation={"data_docs": False})
    result = validate_dataset(settings, None, report_dir=home / "report")
    return settings, result.products, result.judgments, home / "report"


def with_examples(settings, **examples):
    return settings.model_copy(update={"examples": settings.examples.model_copy(update=examples)})


# ----------------------------------------------------------------------------------------- splits


def test_split_is_deterministic_disjoint_and_complete(accepted):
    _, _, judgments, _ = accepted
    variant = judgments.iloc[:1].assign(query_id="q-variant", query=lambda f: "  " + f["query"].str.upper())
    judgments = pd.concat([judgments, variant], ignore_index=True)
    splits = split_by_query(judgments, seed=5)
    keys = {name: {query_key(q) for q in frame["query"]} for name, frame in splits.frames().items()}
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    assert sum(len(f) for f in splits.frames().values()) == len(judgments)
    assert len(keys["train"]) > len(keys["validation"]) and len(keys["train"]) > len(keys["test"])
    again = split_by_query(judgments.sample(frac=1.0, random_state=1), seed=5)  # row order does not matter
    assert again.hashes == splits.hashes and again.sizes == splits.sizes
    assert len(set(splits.hashes.values())) == 3
    assert split_by_query(judgments, seed=6).hashes != splits.hashes


def test_a_query_keeps_its_split_when_the_dataset_grows(accepted):
    _, _, judgments, _ = accepted
    full = split_by_query(judgments, seed=3)
    some_queries = sorted(judgments["query_id"].unique())[::2]
    part = split_by_query(judgments[judgments["query_id"].isin(some_queries)], seed=3)
    for name in ("train", "validation", "test"):
        assert set(part.frames()[name]["query_id"]) <= set(full.frames()[name]["query_id"])


def test_split_fractions_are_checked(accepted):
    with pytest.raises(Near2Error, match="fractions"):
        split_by_query(accepted[2], fractions=(0.8, 0.3, 0.1))


# ----------------------------------------------------------------------------------------- mining


def grade_lookup(judgments: pd.DataFrame) -> dict[tuple[str, str], float]:
    return {(q, p): r for q, p, r in zip(judgments["query_id"], judgments["product_id"], judgments["relevance"])}


def test_examples_follow_the_grades(accepted):
    settings, products, judgments, _ = accepted
    train = split_by_query(judgments, seed=settings.examples.seed).train
    mined = mine_examples(products, train, settings)
    grades = grade_lookup(train)
    ds, ex = settings.dataset, settings.examples
    # counts per kind equal what the judgments hold at the configured grade bounds
    assert mined.counts["strong_positives"] == int((train["relevance"] >= ex.strong_positive_min).sum()) > 0
    assert mined.counts["weak_positives"] == int(train["relevance"].between(
        ds.relevant_threshold, ex.strong_positive_min, inclusive="left").sum())
    assert mined.counts["hard_negatives"] == int((train["relevance"] < ex.hard_negative_max).sum()) > 0
    assert mined.counts["random_negatives"] == train["query_id"].nunique()  # 1 per query by default
    assert mined.counts["pairs"] == len(mined.pairs) and mined.counts["triplets"] == len(mined.triplets)
    assert list(mined.triplets.columns) == ["anchor", "positive", "negative"]
    assert list(mined.pairs.columns) == ["sentence1", "sentence2", "label"]
    # every pair's label agrees with its grade; unjudged negatives are only the configured random ones
    for (qid, pid, kind), label in zip(mined.pair_sources.itertuples(index=False), mined.pairs["label"]):
        grade = grades.get((qid, pid))
        if label == 1:
            assert grade is not None and grade >= ds.relevant_threshold
        elif kind == "random_negative":
            assert grade is None
        else:
            assert grade is not None and grade < ds.relevant_threshold
    # every triplet: a relevant positive and a negative that is not relevant for that query
    text = dict(zip(products["product_id"], products["text"]))
    for row, source in zip(mined.triplets.itertuples(index=False), mined.triplet_sources.itertuples(index=False)):
        assert grades[(source.query_id, source.positive_id)] >= ds.relevant_threshold
        assert grades.get((source.query_id, source.negative_id), ds.relevance_floor) < ds.relevant_threshold
        assert (row.positive, row.negative) == (text[source.positive_id], text[source.negative_id])
    # deterministic for a seed
    again = mine_examples(products, train, settings)
    pd.testing.assert_frame_equal(again.pairs, mined.pairs)
    pd.testing.assert_frame_equal(again.triplets, mined.triplets)


def test_unjudged_products_are_never_negatives_unless_configured(accepted):
    settings, products, judgments, _ = accepted
    train = split_by_query(judgments, seed=settings.examples.seed).train
    strict = mine_examples(products, train, with_examples(settings, random_negatives_per_query=0))
    grades = grade_lookup(train)
    assert strict.counts["random_negatives"] == 0
    assert all((q, p) in grades for q, p, _ in strict.pair_sources.itertuples(index=False))
    more = mine_examples(products, train, with_examples(settings, random_negatives_per_query=3, seed=99))
    assert more.counts["random_negatives"] == 3 * train["query_id"].nunique()


def test_grade_bounds_are_checked(accepted):
    settings, products, judgments, _ = accepted
    with pytest.raises(Near2Error, match="hard_negative_max"):
        mine_examples(products, judgments, with_examples(settings, hard_negative_max=2.5))
    with pytest.raises(Near2Error, match="strong_positive_min"):
        mine_examples(products, judgments, with_examples(settings, strong_positive_min=1.5))
    with pytest.raises(Near2Error, match="strong_positive_min 4.0 is above dataset.relevance_max 3.0"):
        mine_examples(products, judgments, with_examples(settings, strong_positive_min=4.0))


def test_model_mined_hard_negatives(accepted, tiny_model_dir, tmp_path):
    from near2_tasks.models.embeddings import encode, load_encoder

    settings, products, judgments, _ = accepted
    train = split_by_query(judgments, seed=settings.examples.seed).train
    model = load_encoder(str(tiny_model_dir), device="cpu")
    top_k = 40
    cfg = with_examples(settings, mined_top_k=top_k, mined_negatives_per_query=3, random_negatives_per_query=0,
                        mined_unjudged_as_negatives=False, embedding_cache_dir=tmp_path / "cache")
    mined = mine_examples(products, train, cfg, model=model, model_key="tiny-test")
    assert list((tmp_path / "cache").glob("tiny-test-*.npy"))  # product vectors cached under the key
    # recompute the model's ranking independently
    vectors = encode(model, products["text"].tolist())
    queries = train.groupby("query_id")["query"].first()
    scores = encode(model, queries.tolist()) @ vectors.T
    top = {qid: set(products["product_id"].iloc[np.argsort(-scores[i])[:top_k]]) for i, qid in enumerate(queries.index)}
    grades = grade_lookup(train)
    kinds = mined.pair_sources[mined.pair_sources["kind"] == "mined_negative"]
    assert len(kinds) == mined.counts["mined_negatives"] > 0
    for qid, pid, _ in kinds.itertuples(index=False):
        assert grades[(qid, pid)] < settings.dataset.relevant_threshold and pid in top[qid]
    assert mined.counts["mined_unjudged_negatives"] == 0
    # vectors a caller already has give the same examples without encoding the catalog again
    same = mine_examples(products, train, cfg, model=model, product_vectors=vectors)
    pd.testing.assert_frame_equal(same.pair_sources, mined.pair_sources)
    with pytest.raises(Near2Error, match="product_vectors"):
        mine_examples(products, train, cfg, model=model, product_vectors=vectors[:5])
    # unjudged top-ranked products only when the config says so
    loose = mine_examples(products, train, with_examples(cfg, mined_unjudged_as_negatives=True, mined_skip_top=2),
                          model=model, model_key="tiny-test")
    unjudged = loose.pair_sources[loose.pair_sources["kind"] == "mined_unjudged_negative"]
    assert len(unjudged) > 0
    assert all((q, p) not in grades and p in top[q] for q, p, _ in unjudged.itertuples(index=False))
    # the relative margin: an unjudged negative scores at most (1 - margin) x the query's best strong positive
    margin = 0.05
    strict = mine_examples(products, train, with_examples(cfg, mined_unjudged_as_negatives=True, mined_skip_top=0,
                                                          mined_relative_margin=margin),
                           model=model, model_key="tiny-test")
    no_margin = mine_examples(products, train, with_examples(cfg, mined_unjudged_as_negatives=True, mined_skip_top=0,
                                                             mined_relative_margin=None),
                              model=model, model_key="tiny-test")
    row_of = {pid: i for i, pid in enumerate(products["product_id"])}
    strong_min = settings.examples.strong_positive_min or settings.dataset.relevance_max
    checked = 0
    for qid, pid, _ in strict.pair_sources[strict.pair_sources["kind"] == "mined_unjudged_negative"].itertuples(
            index=False):
        i = list(queries.index).index(qid)
        positives = [row_of[p] for (q, p), rel in grades.items() if q == qid and rel >= strong_min]
        assert scores[i, row_of[pid]] <= scores[i, positives].max() * (1 - margin) + 1e-5
        checked += 1
    assert checked > 0
    assert strict.counts["mined_unjudged_negatives"] < no_margin.counts["mined_unjudged_negatives"]


# ----------------------------------------------------------------------------------------- evaluation data


def test_ir_eval_data_runs_in_the_sentence_transformers_evaluator(accepted, tiny_model_dir):
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    from near2_tasks.models.embeddings import load_encoder

    settings, products, judgments, _ = accepted
    test = split_by_query(judgments, seed=settings.examples.seed).test
    queries, corpus, relevant = ir_eval_data(products, test, settings.dataset.relevant_threshold)
    assert set(corpus) == set(products["product_id"])  # retrieval over the whole catalog
    assert set(queries) == set(relevant) and queries
    grades = grade_lookup(test)
    for qid, pids in relevant.items():
        assert all(grades[(qid, pid)] >= settings.dataset.relevant_threshold for pid in pids)
        expected = {p for (q, p), r in grades.items() if q == qid and r >= settings.dataset.relevant_threshold}
        assert pids == expected
    evaluator = InformationRetrievalEvaluator(queries, corpus, relevant, name="t", ndcg_at_k=[10],
                                              mrr_at_k=[10], accuracy_at_k=[1], precision_recall_at_k=[10],
                                              map_at_k=[10], show_progress_bar=False)
    metrics = evaluator(load_encoder(str(tiny_model_dir), device="cpu"))
    assert 0.0 <= metrics["t_cosine_ndcg@10"] <= 1.0


def test_cli_examples_writes_splits_and_counts(accepted, tmp_path, capsys):
    from near2_tasks.cli import main

    settings, _, _, report_dir = accepted
    config = tmp_path / "near2.yaml"
    config.write_text(f"home: {settings.home}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "examples", "--report-dir", str(report_dir), "--output", str(tmp_path / "ex")])
        raise SystemExit(0)
    assert exit_info.value.code == 0
    manifest = json.loads((tmp_path / "ex" / "manifest.json").read_text())
    pairs = pd.read_parquet(tmp_path / "ex" / "pairs.parquet")
    assert manifest["counts"]["pairs"] == len(pairs)
    for name in ("train", "validation", "test"):
        split = pd.read_parquet(tmp_path / "ex" / f"{name}_judgments.parquet")
        assert manifest["splits"]["sizes"][name]["judgments"] == len(split)
    assert "splits: train" in capsys.readouterr().out
