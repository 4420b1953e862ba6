"""Helpers of the fault tests: their settings, what they read before and after a fault (alias target,
document counts, ids, ``_meta``), the index steps of a run called the way the DAG calls them, and
a few seconds of real training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from near2_tasks import conventions
from near2_tasks.run import StepContext

from near2_tasks.data import step as data_step

from near2_tasks.serving import step as serving_step
from near2_tasks.config import Settings
from near2_tasks.serving.alias import alias_targets


def make_fault_settings(home: Path, es_url: str, alias: str, model_dir: Path, **sections):
    """Tiny, fast-failing settings: the tiny encoder, small retries and backoffs, own MLflow store in home."""
    from near2_tasks.config import load_settings
    from tests.tiny_model import TINY_DIMS

    return load_settings(
        home=str(home),
        model={"base_model": str(model_dir), "dims": TINY_DIMS, "device": "cpu"},
        dataset={"synthetic_products": 200, "synthetic_queries": 40},
        elasticsearch={
            "url": es_url, "alias": alias, "request_timeout": 10,
            "max_retries": 1, "bulk_chunk_size": 50, "bulk_max_retries": 2,
            "bulk_initial_backoff_s": 0.05, "bulk_max_backoff_s": 0.2,
        },
        mlflow={"connect_retries": 2, "retry_backoff_s": 0.1},
        **sections,
    )


def drop_alias_indices(es, alias: str) -> None:
    """Delete every index of ``alias`` (the server is brought back first if a test left it down)."""
    from elasticsearch import Elasticsearch

    es.ensure_running()
    with Elasticsearch(es.url, request_timeout=30) as client:
        client.indices.delete(index=f"{alias}-*", ignore_unavailable=True, allow_no_indices=True)


def with_es_url(settings: Settings, url: str) -> Settings:
    """The same settings talking to Elasticsearch through ``url`` (e.g. the faulty proxy)."""
    return settings.model_copy(update={"elasticsearch": settings.elasticsearch.model_copy(update={"url": url})})


def alias_target(client, alias: str) -> str | None:
    targets = alias_targets(client, alias)
    assert len(targets) <= 1, f"alias {alias} points at several indices: {targets}"
    return targets[0] if targets else None


def doc_count(client, index: str) -> int:
    client.indices.refresh(index=index)
    return int(client.count(index=index)["count"])


def doc_ids(client, index: str) -> list[str]:
    """Every document id in ``index`` (with repeats, if there were any)."""
    from elasticsearch import helpers

    client.indices.refresh(index=index)
    return [hit["_id"] for hit in helpers.scan(client, index=index, query={"query": {"match_all": {}}},
                                               _source=False)]


def index_meta(client, index: str) -> dict[str, Any]:
    return next(iter(client.indices.get_mapping(index=index).values()))["mappings"].get("_meta") or {}


def is_verified(client, index: str) -> bool:
    return conventions.META_VERIFIED_AT in index_meta(client, index)


def alias_indices(client, alias: str) -> list[str]:
    """Every index of this alias's naming scheme, serving or not."""
    return sorted(client.indices.get(index=f"{alias}-*", expand_wildcards="all").keys())


def index_steps(ctx: StepContext, validation: dict, model: dict) -> dict:
    """build_index -> verify_index -> swap_alias of one run, as the DAG chains them; the swap's result."""
    built = serving_step.build_index(ctx, validation, model)
    serving_step.verify_index(ctx, validation, built)
    return serving_step.swap_alias(ctx, built)


def local_model(model_dir, version: str) -> dict:
    """A model step result for an encoder saved in a directory (no registry involved)."""
    return {"model_uri": str(model_dir), "model_version": version, "run_id": None}


# ----- a few seconds of real training ------------------------------------------------------------

#: The smallest real training: one step, a few validation queries (what the trainer is tested on elsewhere).
TINY_TRAINING = {"max_steps": 1, "batch_size": 8, "eval_steps": 1, "logging_steps": 1, "learning_rate": 1e-3,
                 "val_max_queries": 8, "val_corpus_size": 40}


@dataclass
class TrainingExamples:
    """The shape the trainer takes (``examples.mine_examples`` returns the same fields)."""

    triplets: Any
    pairs: Any
    counts: dict


def tiny_training_inputs(validation: dict, limit: int = 16) -> tuple[TrainingExamples, tuple, str]:
    """(examples, validation data, dataset version) from the validate step's accepted tables: top-graded
    products as positives, low-graded ones as negatives, their product texts as documents."""
    import pandas as pd

    products, judgments = data_step.accepted(validation)
    text = dict(zip(products.product_id, products.text))
    triplets, pairs = [], []
    for query, group in judgments.groupby("query"):
        positives = group.product_id[group.relevance >= 2.5].tolist()
        negatives = group.product_id[group.relevance < 2.0].tolist()
        for pos, neg in zip(positives, negatives):
            triplets.append((query, text[pos], text[neg]))
            pairs += [(query, text[pos], 1), (query, text[neg], 0)]
    queries = dict(zip(judgments.query_id, judgments["query"]))
    relevant = {q: set(g.product_id[g.relevance >= 2.0]) for q, g in judgments.groupby("query_id")}
    examples = TrainingExamples(pd.DataFrame(triplets[:limit], columns=["anchor", "positive", "negative"]),
                                pd.DataFrame(pairs[:limit], columns=["sentence1", "sentence2", "label"]),
                                {"triplets": min(limit, len(triplets)), "pairs": min(limit, len(pairs))})
    return examples, (queries, text, relevant), validation["dataset_version"]


def with_sections(settings: Settings, **sections: dict[str, Any]) -> Settings:
    """``settings`` with some keys of some sections replaced, validated like any configuration."""
    data = settings.model_dump()
    for name, values in sections.items():
        data[name] = {**data[name], **values}
    return Settings(**data)
