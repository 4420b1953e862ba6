"""Settings of the promotion stage: the per-dimension gates and approval."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from near2_tasks.section import Section


class MetricGate(Section):
    """The checks on one metric: an absolute floor and the largest allowed drop against the reference."""

    floor: float | None = Field(None, description="The challenger's value must be >= floor.")
    max_drop: float | None = Field(None, ge=0, description="reference - challenger must be <= max_drop.")
    max_relative_drop: float | None = Field(
        None, ge=0, description="(reference - challenger) / reference must be <= this fraction.")



def _check_metric_names(names: Any, where: str) -> None:
    from near2_tasks.conventions import REPORT_METRICS

    unknown = sorted(set(names) - set(REPORT_METRICS))
    if unknown:
        raise ValueError(f"{where} names unknown metrics {unknown}; known metrics: {list(REPORT_METRICS)}")



class GateRules(Section):
    """Metric gates applied at every dimension, with per-dimension overrides (a metric listed for a dimension
    replaces the all-dimension rule for that metric at that dimension)."""

    metrics: dict[str, MetricGate] = Field(default_factory=dict)
    dims: dict[int, dict[str, MetricGate]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_metrics(self) -> GateRules:
        _check_metric_names(self.metrics, "the gate")
        for dim, rules in self.dims.items():
            _check_metric_names(rules, f"the gate for dimension {dim}")
        return self

    def rules_at(self, dim: int) -> dict[str, MetricGate]:
        return {**self.metrics, **self.dims.get(dim, {})}



def _no_ndcg_drop() -> GateRules:
    return GateRules(metrics={"ndcg@10": MetricGate(max_drop=0.0)})



class HybridGate(Section):
    """The rules of the hybrid gate (``gates.hybrid``): the same rule kinds as the model's own gate, applied
    to hybrid-RRF retrieval (BM25 over a lexical-only index of the evaluated catalog, fused with the model's
    exact search at each dimension; :mod:`near2_tasks.evaluate.hybrid`) of the challenger against the
    reference's hybrid-RRF on the same judgments."""

    overall: GateRules = Field(default_factory=_no_ndcg_drop,
                               description="All queries; default: hybrid NDCG@10 may not drop at any dimension.")
    slices: dict[str, GateRules] = Field(default_factory=dict, description="Per query slice.")



class GateSettings(Section):
    """What a challenger must achieve before it may become champion (at every evaluated dimension).

    The reference is the champion, or the base model while there is none. Default: NDCG@10 may not drop
    at any dimension ("at least as good as the champion at every dimension we serve").
    """

    overall: GateRules = Field(default_factory=_no_ndcg_drop)
    slices: dict[str, GateRules] = Field(
        default_factory=dict, description="Per query slice (short, long, alphanumeric, config slices).")
    hybrid: HybridGate | None = Field(
        None, description="Also gate hybrid retrieval: the evaluation then measures hybrid-RRF (BM25 from a "
                          "lexical-only Elasticsearch index of the evaluated catalog, `<elasticsearch.alias>-lexical-"
                          "<fingerprint>`, fused by RRF with the model's exact search; serving.rrf_k, "
                          "serving.hybrid_candidates per side) per dimension for the challenger and its reference, "
                          "and these rules apply to it (tags gate.hybrid.dim_<d>.<metric>). `{}`: hybrid NDCG@10 may "
                          "not drop. None (default): off, Elasticsearch is not needed to evaluate.")
    auto_approve: bool = Field(False, description="Treat a passed gate as approved (no reviewer).")
    tolerance: float = Field(1e-9, ge=0, description="Float noise ignored when comparing with floors and drops.")

