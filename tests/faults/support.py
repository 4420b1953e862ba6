"""What the fault tests read before and after a fault (alias target, document counts, ids, ``_meta``)
and the index steps of a pipeline run, called the way the DAG calls them."""

from __future__ import annotations

from typing import Any

from near2_tasks import pipeline
from near2_tasks.config import Settings
from near2_tasks.index import VERIFIED_AT, alias_targets


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
    return VERIFIED_AT in index_meta(client, index)


def alias_indices(client, alias: str) -> list[str]:
    """Every index of this alias's naming scheme, serving or not."""
    return sorted(client.indices.get(index=f"{alias}-*", expand_wildcards="all").keys())


def index_steps(ctx: pipeline.StepContext, validation: dict, model: dict) -> dict:
    """build_index -> verify_index -> swap_alias of one run, as the DAG chains them; the swap's result."""
    built = pipeline.build_index(ctx, validation, model)
    pipeline.verify_index(ctx, validation, built)
    return pipeline.swap_alias(ctx, built)


def local_model(model_dir, version: str) -> dict:
    """A model step result for an encoder saved in a directory (no registry involved)."""
    return {"model_uri": str(model_dir), "model_version": version, "run_id": None}
