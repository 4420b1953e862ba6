"""The promotion gate: decisions on given reports, then the whole step on a real MLflow registry."""

from __future__ import annotations

import json

import pytest

from near2_tasks.config import load_settings

from near2_tasks.promote.settings import GateRules, GateSettings, MetricGate
from near2_tasks.conventions import CHAMPION, TAG_GATE, gate_tag
from near2_tasks.errors import Near2Error
from near2_tasks.evaluate.report import EvaluationReport
from near2_tasks.promote.gates import SUMMARY_MARKER, decide, slice_gate_tag
from near2_tasks.promote.step import gate_version

DIMS = [64, 32, 16]
NO_DROP = GateSettings()  # default: ndcg@10 may not drop at any dimension


def report(ndcg: dict[int, float], *, slices: dict[str, dict[int, float]] | None = None, recall: float = 0.5,
           label: str = "model", catalog: str = "catalog-a") -> EvaluationReport:
    """A report with the given NDCG@10 per dimension (other metrics fixed)."""

    def values(value: float) -> dict[str, float | None]:
        return {"ndcg@10": value, "mrr@10": 0.5, "precision@10": 0.1, "recall@10": 0.3, "recall@100": recall,
                "map@100": 0.2}

    slices = slices or {}
    return EvaluationReport(
        model=label, label=label, dims={dim: values(v) for dim, v in ndcg.items()},
        slices={name: {dim: values(v) for dim, v in table.items()} for name, table in slices.items()},
        slice_sizes={name: 10 if table else 0 for name, table in slices.items()}, n_queries=50, k=10,
        metrics=list(values(0.0)), dataset={"catalog_fingerprint": catalog, "queries_fingerprint": "queries-a"})


def test_a_drop_at_one_dimension_fails_that_dimension_only():
    champion = report({64: 0.40, 32: 0.35, 16: 0.25}, label="champion v1")
    challenger = report({64: 0.42, 32: 0.35, 16: 0.20}, label="challenger v2")
    decision = decide(challenger, champion, NO_DROP)
    assert not decision.passed and decision.status == "fail"
    assert [(c.dim, c.metric, c.kind) for c in decision.failures] == [(16, "ndcg@10", "max_drop")]
    assert decision.reasons == ["dim 16 ndcg@10 = 0.2000 dropped 0.0500 below the champion (0.2500); "
                                "at most 0 allowed"]
    assert decision.tags() == {gate_tag(64, "ndcg@10"): "pass", gate_tag(32, "ndcg@10"): "pass",
                               gate_tag(16, "ndcg@10"): "fail", TAG_GATE: "fail"}
    assert "gate.dim_16.ndcg_at_10" in decision.tags()
    assert decision.markdown().startswith("## Gate FAILED: challenger v2 against the champion (champion v1)")


def test_equal_or_better_everywhere_passes():
    champion = report({64: 0.40, 32: 0.35, 16: 0.25})
    assert decide(report({64: 0.40, 32: 0.36, 16: 0.25}), champion, NO_DROP).passed


def test_floors_relative_drops_and_per_dimension_overrides():
    gates = GateSettings(overall=GateRules(
        metrics={"ndcg@10": MetricGate(floor=0.3, max_relative_drop=0.10), "recall@100": MetricGate(floor=0.6)},
        dims={16: {"ndcg@10": MetricGate(floor=0.1, max_relative_drop=0.25)}},  # smallest dim: looser
    ))
    champion = report({64: 0.40, 32: 0.40, 16: 0.24})
    challenger = report({64: 0.37, 32: 0.35, 16: 0.19}, recall=0.7)
    decision = decide(challenger, champion, gates)
    # 64: -7.5% ok; 32: -12.5% > 10% fails; 16: floor 0.1 (not 0.3), -20.8% within 25%
    assert [(c.dim, c.kind) for c in decision.failures] == [(32, "max_relative_drop")]
    assert "dropped 12.5% below the champion" in decision.reasons[0]

    low_recall = decide(report({64: 0.5, 32: 0.5, 16: 0.5}, recall=0.55), champion, gates)
    assert {(c.dim, c.metric, c.kind) for c in low_recall.failures} == {(d, "recall@100", "floor") for d in DIMS}
    assert "dim 64 recall@100 = 0.5500 is below the floor 0.6" in low_recall.reasons


def test_slice_rules_are_checked_and_tagged_and_an_empty_slice_is_skipped():
    gates = GateSettings(overall=GateRules(), slices={
        "alphanumeric": GateRules(metrics={"ndcg@10": MetricGate(max_drop=0.02)}),
        "long": GateRules(metrics={"ndcg@10": MetricGate(max_drop=0.0)}),
    })
    champion = report({64: 0.4, 32: 0.4, 16: 0.4}, slices={"alphanumeric": {64: 0.30, 32: 0.25, 16: 0.2},
                                                             "long": {}})
    challenger = report({64: 0.4, 32: 0.4, 16: 0.4}, slices={"alphanumeric": {64: 0.30, 32: 0.20, 16: 0.19},
                                                               "long": {}})
    decision = decide(challenger, champion, gates)
    assert [(c.slice, c.dim) for c in decision.failures] == [("alphanumeric", 32)]
    assert decision.reasons[0].startswith("dim 32 ndcg@10 on slice alphanumeric = 0.2000 dropped 0.0500")
    tags = decision.tags()
    assert tags[slice_gate_tag("alphanumeric", 32, "ndcg@10")] == "fail"
    assert tags["gate.slice_alphanumeric.dim_16.ndcg_at_10"] == "pass"
    skipped = [c for c in decision.checks if c.slice == "long"]
    assert len(skipped) == 3 and all(c.passed is None and "empty" in c.reason for c in skipped)
    assert "slice long is empty" in decision.markdown()


def test_without_a_reference_only_floors_apply():
    gates = GateSettings(overall=GateRules(metrics={"ndcg@10": MetricGate(floor=0.3, max_drop=0.0)}))
    decision = decide(report({64: 0.4, 32: 0.31, 16: 0.2}), None, gates)
    assert decision.reference_role == "none"
    assert [(c.dim, c.kind) for c in decision.failures] == [(16, "floor")]
    assert all(c.passed is None for c in decision.checks if c.kind == "max_drop")


def test_inconsistent_inputs_are_clear_errors():
    champion = report({64: 0.4, 32: 0.4, 16: 0.4})
    with pytest.raises(Near2Error, match="evaluated on different data"):
        decide(report({64: 0.4, 32: 0.4, 16: 0.4}, catalog="catalog-b"), champion, NO_DROP)
    with pytest.raises(Near2Error, match="the gate names slice 'brands', which the evaluation does not report"):
        decide(champion, champion, GateSettings(slices={"brands": GateRules(metrics={"ndcg@10": MetricGate()})}))
    at_five = report({64: 0.4, 32: 0.4, 16: 0.4})
    at_five.dims = {dim: {"ndcg@5": 0.4} for dim in DIMS}
    at_five.metrics = ["ndcg@5"]
    with pytest.raises(Near2Error, match="has no metric 'ndcg@10'"):
        decide(at_five, None, NO_DROP)


@pytest.mark.parametrize("gates, unknown", [
    ({"overall": {"metrics": {"ndgc@10": {"floor": 0.2}}}}, "ndgc@10"),
    ({"overall": {"dims": {64: {"ndcg@5": {"max_drop": 0.0}}}}}, "ndcg@5"),
    ({"slices": {"short": {"metrics": {"recall@50": {"floor": 0.1}}}}}, "recall@50"),
])
def test_a_gate_config_naming_an_unknown_metric_is_a_clear_error(gates, unknown):
    with pytest.raises(Near2Error, match=rf"invalid configuration: gates\..*unknown metrics \['{unknown}'\]; "
                                          r"known metrics: \['ndcg@10', 'mrr@10'"):
        load_settings(gates=gates)


# ----- the whole step on a real registry -------------------------------------------------------------------
@pytest.fixture
def gate_settings(tiny_settings):
    """Tiny encoder settings; NDCG@10 may drop by float noise only."""
    return tiny_settings.model_copy(update={"gates": GateSettings(
        overall=GateRules(metrics={"ndcg@10": MetricGate(max_drop=1e-4)}))})


def test_gate_step_against_the_champion_records_the_failure_on_the_version(
        gate_settings, tiny_prefix_variants, register_model_dir, tmp_path):
    from near2_tasks.data.synthetic import generate_catalog
    from near2_tasks.models.registry import client

    catalog = generate_catalog(300, 60, 7)
    registry, name = client(gate_settings), gate_settings.mlflow.registered_model
    champion = register_model_dir(gate_settings, tiny_prefix_variants["strong"])
    registry.set_registered_model_alias(name, CHAMPION, champion)  # arrange: an existing champion
    challenger = register_model_dir(gate_settings, tiny_prefix_variants["weak"])

    result = gate_version(gate_settings, catalog.products, catalog.judgments, output_dir=tmp_path / "gate")
    assert result.version == challenger
    assert result.decision.reference_role == "champion"
    # the weak variant ties at 64 and 32 dimensions and loses at 16
    assert [(c.dim, c.metric) for c in result.decision.failures] == [(16, "ndcg@10")]
    champion_report = result.report.references["champion"]
    assert result.report.dims[64]["ndcg@10"] == pytest.approx(champion_report.dims[64]["ndcg@10"], abs=1e-4)
    assert result.report.dims[16]["ndcg@10"] < champion_report.dims[16]["ndcg@10"]

    version = registry.get_model_version(name, challenger)
    assert version.tags[TAG_GATE] == "fail"
    assert version.tags[gate_tag(16, "ndcg@10")] == "fail"
    assert version.tags[gate_tag(64, "ndcg@10")] == version.tags[gate_tag(32, "ndcg@10")] == "pass"
    assert SUMMARY_MARKER in version.description and "Gate FAILED" in version.description
    assert str(registry.get_model_version_by_alias(name, CHAMPION).version) == champion  # untouched
    # the reviewer's page also carries NDCG@10 per slice and dimension against the champion, and the plot
    rows = {line.split(" | ")[0].lstrip("| "): line for line in version.description.splitlines()
            if line.startswith("| ") and " | queries | " not in line}
    short = result.report.slices["short"]
    champion_short = champion_report.slices["short"]
    assert {"all queries", "`short`", "`long`", "`alphanumeric`"} <= set(rows)
    assert f"{short[16]['ndcg@10']:.4f} ({short[16]['ndcg@10'] - champion_short[16]['ndcg@10']:+.4f})" in rows["`short`"]
    assert f"In brackets: this model minus the champion v{champion}." in version.description
    experiment = registry.get_run(version.run_id).info.experiment_id
    assert (f"(http://127.0.0.1:5000/#/experiments/{experiment}/runs/{version.run_id}/artifacts/"
            "evaluation/report_ndcg_by_dim.png)") in version.description
    assert "evaluation/report_ndcg_by_dim.png" in {item.path for item in
                                                    registry.list_artifacts(version.run_id, "evaluation")}

    artifacts = {item.path for item in registry.list_artifacts(version.run_id, "gate")}
    assert artifacts == {"gate/summary.md", "gate/decision.json"}
    written = json.loads((tmp_path / "gate" / "report.json").read_text())
    assert set(written["references"]) == {"champion", "base"}
    assert written["references"]["champion"]["label"] == f"champion v{champion}"
    assert (tmp_path / "gate" / "report_ndcg_by_dim.png").exists()

    # gating again with a looser rule replaces the earlier verdict, tags and summary
    looser = gate_settings.model_copy(update={"gates": GateSettings(overall=GateRules(
        metrics={"ndcg@10": MetricGate(max_drop=0.5)}))})
    assert gate_version(looser, catalog.products, catalog.judgments, version=challenger,
                        output_dir=tmp_path / "again").decision.passed
    version = registry.get_model_version(name, challenger)
    assert version.tags[TAG_GATE] == "pass" and version.tags[gate_tag(16, "ndcg@10")] == "pass"
    assert version.description.count(SUMMARY_MARKER) == 1 and "Gate PASSED" in version.description


def test_without_a_champion_the_base_model_is_the_reference(gate_settings, tiny_model_dir, register_model_dir,
                                                            tmp_path):
    from near2_tasks.data.synthetic import generate_catalog

    catalog = generate_catalog(300, 60, 7)
    register_model_dir(gate_settings, tiny_model_dir)  # the base model itself, registered
    result = gate_version(gate_settings, catalog.products, catalog.judgments, output_dir=tmp_path)
    assert result.decision.reference_role == "base" and result.decision.passed
    assert list(result.report.references) == ["base"]
