"""Validation during training: a sample of the validation split scored per nested dimension (one
``InformationRetrievalEvaluator`` per dim with ``truncate_dim``); the checkpoint kept maximises their mean NDCG@10."""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

from near2_tasks.conventions import REPORT_METRICS, metric_key
from near2_tasks.errors import Near2Error

if TYPE_CHECKING:
    from sentence_transformers.base.evaluation.sequential import SequentialEvaluator


log = logging.getLogger(__name__)


#: What the trainer maximises to pick the checkpoint: the mean over dimensions of validation NDCG@10.
BEST_METRIC = "eval_sequential_score"


#: Validation metrics reported per dimension (names as in reports; MLflow gets ``val_<m>_dim_<d>``).
VAL_METRICS = ("ndcg@10", "mrr@10", "recall@100")


class ValidationData(NamedTuple):
    """What ``examples.ir_eval_data`` returns: the validation split as an IR task."""

    queries: dict[str, str]  # query_id -> query text
    corpus: dict[str, str]  # product_id -> product text
    relevant_docs: dict[str, set[str]]  # query_id -> relevant product_ids


def check_validation(validation_data: Any) -> ValidationData:
    try:
        data = ValidationData(*validation_data)
    except TypeError as exc:
        raise Near2Error("validation data must be (queries, corpus, relevant_docs) as ir_eval_data returns") from exc
    usable = [q for q in data.queries if data.relevant_docs.get(q)]
    if not usable or not data.corpus:
        raise Near2Error("the validation split has no query with a relevant product",
                         hint="more judged queries are needed, or larger examples.split_fractions[1]")
    return data


def validation_sample(data: ValidationData, max_queries: int, corpus_size: int, seed: int) -> ValidationData:
    """At most ``max_queries`` queries; the corpus keeps every relevant product plus random others.

    Bounded so that validating every ``eval_steps`` stays cheap on a CPU; the full-catalog evaluation
    of the finished model is evaluate.py's.
    """
    rng = random.Random(seed)
    query_ids = sorted(q for q in data.queries if data.relevant_docs.get(q))
    if len(query_ids) > max_queries:
        query_ids = sorted(rng.sample(query_ids, max_queries))
    relevant = {q: {p for p in data.relevant_docs[q] if p in data.corpus} for q in query_ids}
    relevant = {q: docs for q, docs in relevant.items() if docs}
    keep = set().union(*relevant.values()) if relevant else set()
    others = sorted(set(data.corpus) - keep)
    keep |= set(rng.sample(others, max(0, min(len(others), corpus_size - len(keep)))))
    return ValidationData({q: data.queries[q] for q in relevant}, {p: data.corpus[p] for p in sorted(keep)},
                          relevant)


def nested_evaluator(data: ValidationData, dims: list[int], batch_size: int) -> SequentialEvaluator:
    """One IR evaluator per dimension; the main score is the mean NDCG@10 over the dimensions."""
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator,
        SequentialEvaluator,
    )

    evaluators = [
        InformationRetrievalEvaluator(
            data.queries, data.corpus, data.relevant_docs, name=f"dim_{dim}", truncate_dim=dim,
            mrr_at_k=[10], ndcg_at_k=[10], precision_recall_at_k=[10, 100], map_at_k=[100],
            accuracy_at_k=[1], batch_size=batch_size, write_csv=False, main_score_function="cosine",
        )
        for dim in dims
    ]
    return SequentialEvaluator(evaluators, main_score_function=lambda scores: sum(scores) / len(scores))


def val_metrics_from(evaluation: Mapping[str, float], dims: list[int], prefix: str = "eval_") -> dict[str, float]:
    """``eval_dim_64_cosine_ndcg@10`` -> ``val_ndcg_at_10_dim_64`` for every reported metric found."""
    found = {}
    for dim in dims:
        for metric in REPORT_METRICS:
            value = evaluation.get(f"{prefix}dim_{dim}_cosine_{metric}")
            if value is not None:
                found[metric_key("val", metric, dim)] = float(value)
    return found

