"""Publish a catalog with one call: build the index, verify it, move the alias (compare-and-swap), prune.

The library form of the DAG's index steps, for the benchmarks and tests that hold the vectors already;
the DAGs and ``near2 index`` run the same pieces as separate steps (``serving/step.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Unpack

from near2_tasks.serving.alias import current_target, prune_indices, swap_to_champion_index
from near2_tasks.serving.es_client import es_errors, make_client
from near2_tasks.serving.build import BuildOptions, build_with_encoder
from near2_tasks.serving.index import BuiltIndex
from near2_tasks.serving.verify import VerificationReport, verify_index

if TYPE_CHECKING:
    import pandas as pd
    from sentence_transformers import SentenceTransformer

    from near2_tasks.config import Settings


@dataclass(frozen=True)
class SwapResult:
    index: BuiltIndex
    report: VerificationReport
    previous: str | None
    deleted: list[str]


def build_verify_swap(
    settings: Settings,
    model_ref: str,
    products: pd.DataFrame,
    model_version: str | int,
    *,
    expected_current: str | None | type[Ellipsis] = ...,
    champion: str | None = None,
    before_verify: Callable[[BuiltIndex, SentenceTransformer | None], BuiltIndex] | None = None,
    **options: Unpack[BuildOptions],
) -> SwapResult:
    """Build, verify, swap (compare-and-swap against the target read before the build), prune.

    ``before_verify(built, model)``: runs on the loaded index before verification and swap and returns it
    with whatever ``_meta`` it added, e.g. :func:`near2_tasks.serving.hybrid_tuning.weight_tuning` (the hybrid
    weights measured on the validation split).

    ``expected_current``: the alias target the caller based its decision on (default: the target
    when this call starts). If the alias moved meanwhile, AliasChanged is raised after the build
    and the alias stays where the other run put it, unless :func:`swap_to_champion_index` retries
    (``champion``: the champion's version as the caller read it; this model is that version).
    ``options``: those of :func:`near2_tasks.serving.build.build_index` (dims, vectors, shards, ...).
    """
    es = settings.elasticsearch
    client = options.get("client") or make_client(settings)
    options = {**options, "client": client}
    if expected_current is ...:
        with es_errors(es.url, "reading the alias"):
            expected_current = current_target(client, es.alias)
    built, model = build_with_encoder(settings, model_ref, products, model_version, options)
    if before_verify is not None:
        built = before_verify(built, model)
    report = verify_index(settings, built.name, products, model=model, client=client)
    previous = swap_to_champion_index(client, es.alias, built.name, expected_current,  # type: ignore[arg-type]
                                      model_version, champion)
    deleted = prune_indices(settings, client)
    return SwapResult(index=built, report=report, previous=previous, deleted=deleted)

