"""Settings of the evaluation stage."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from near2_tasks.section import Section


class EvaluationSettings(Section):
    """Offline evaluation: exact retrieval over the whole catalog, metrics per dimension and per query slice."""

    k: int = Field(10, gt=0, description="Cut-off of NDCG, MRR, precision and recall (Recall@100, MAP@100 too).")
    slices: dict[str, str] = Field(
        default_factory=dict,
        description="Extra query slices besides short/long/alphanumeric: name -> regex (re.search; (?i) for "
                    "case-insensitive).",
    )
    query_batch_size: int = Field(256, gt=0, description="Queries scored against the whole catalog per matrix product.")
    hybrid_weight_grid: list[float] = Field(
        default_factory=lambda: [round(0.1 * i, 1) for i in range(11)],
        description="Linear-fusion weights (of the dense side) tried per dimension on the validation split "
                    "(near2_tasks.serving.hybrid_tuning.tune_weights); the best is stored in the index _meta.hybrid_weights.")
    tune_hybrid: bool = Field(
        True, description="Tune the hybrid weights after the DAG's build_index step (needs judgments).")
    cache_dir: Path | None = Field(None, description="Embedding cache; default <home>/cache/embeddings.")

    @field_validator("slices")
    @classmethod
    def _slices_are_valid(cls, slices: dict[str, str]) -> dict[str, str]:
        import re

        from near2_tasks.evaluate.slices import BUILTIN_SLICES

        clash = sorted(set(slices) & set(BUILTIN_SLICES))
        if clash:
            raise ValueError(f"slices {clash} are built in; give config slices other names")
        for name, pattern in slices.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"slice {name!r}: {pattern!r} is not a valid regular expression ({exc})") from None
        return slices

