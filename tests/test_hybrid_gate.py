"""The hybrid gate (``gates.hybrid``): hybrid-RRF checks in the gate's decision on given reports, the
retriever against the serving path's hybrid RRF, then the whole gate step on the real Elasticsearch and
MLflow registry (lexical index built once and reused, Elasticsearch down is a clear error)."""

from __future__ import annotations

import json

import pytest

from near2_tasks.conventions import TAG_GATE, gate_tag
from near2_tasks.errors import Near2Error
from near2_tasks.evaluate.evaluation import mlflow_metrics, prepare_data
from near2_tasks.evaluate.hybrid import HybridExactRetriever, LexicalSide, ensure_lexical_index
from near2_tasks.evaluate.report import EvaluationReport, render_markdown
from near2_tasks.evaluate.retrieval import evaluate_retriever, overlap_at, scale_of
from near2_tasks.promote.gates import decide
from near2_tasks.promote.settings import GateRules, GateSettings, HybridGate, MetricGate
from near2_tasks.promote.step import gate_version
from tests.serving_support import module_settings, titled_catalog, with_sections
from tests.test_gates import report
from tests.tiny_model import TINY_DIMS

LOOSE = GateRules(metrics={"ndcg@10": MetricGate(max_drop=0.5)})  # the exact-search gate out of the way


def with_hybrid(ndcg: dict[int, float], hybrid: dict[int, float], label: str) -> EvaluationReport:
    out = report(ndcg, label=label, slices={"short": dict(ndcg)})
    out.hybrid = report(hybrid, label=label, slices={"short": dict(hybrid)})
    return out


# ----- the decision (pure) ----------------------------------------------------------------------------------
def test_hybrid_rules_add_marked_checks_to_the_same_decision():
    champion = with_hybrid({64: 0.4, 32: 0.4}, {64: 0.5, 32: 0.5}, "champion v1")
    challenger = with_hybrid({64: 0.4, 32: 0.4}, {64: 0.5, 32: 0.45}, "challenger v2")
    gates = GateSettings(hybrid=HybridGate(slices={"short": GateRules(metrics={"recall@100": MetricGate(floor=0.6)})}))
    decision = decide(challenger, champion, gates)
    hybrid = [c for c in decision.checks if c.retriever == "hybrid"]
    assert [(c.dim, c.slice, c.metric, c.kind) for c in hybrid] == [
        (64, None, "ndcg@10", "max_drop"), (64, "short", "recall@100", "floor"),
        (32, None, "ndcg@10", "max_drop"), (32, "short", "recall@100", "floor")]
    assert all(c.retriever is None for c in decision.checks if c not in hybrid)
    assert [(c.dim, c.slice) for c in decision.failures] == [(64, "short"), (32, None), (32, "short")]
    assert decision.reasons[1] == ("hybrid RRF: dim 32 ndcg@10 = 0.4500 dropped 0.0500 below the champion "
                                   "(0.5000); at most 0 allowed")
    tags = decision.tags()
    assert tags["gate.hybrid.dim_32.ndcg_at_10"] == "fail" and tags["gate.hybrid.dim_64.ndcg_at_10"] == "pass"
    assert tags["gate.hybrid.slice_short.dim_64.recall_at_100"] == "fail"
    assert tags[gate_tag(32, "ndcg@10")] == "pass" and tags[TAG_GATE] == "fail"
    assert "| hybrid, all queries | 32 | ndcg@10 | max_drop | 0.4500 | 0.5000 |" in decision.markdown()
    assert decision.to_dict()["checks"][-1]["retriever"] == "hybrid"


def test_the_hybrid_gate_off_ignores_hybrid_metrics_and_on_needs_them():
    champion = with_hybrid({64: 0.4}, {64: 0.9}, "champion v1")
    challenger = with_hybrid({64: 0.4}, {64: 0.1}, "challenger v2")
    off = decide(challenger, champion, GateSettings())
    assert off.passed and all(c.retriever is None for c in off.checks) and not any("hybrid" in t for t in off.tags())
    with pytest.raises(Near2Error, match="gates.hybrid is set, but the report of champion v1 has no hybrid metrics"):
        decide(challenger, report({64: 0.4}, label="champion v1"), GateSettings(hybrid=HybridGate()))
    floors_only = decide(challenger, None, GateSettings(overall=GateRules(), hybrid=HybridGate(
        overall=GateRules(metrics={"ndcg@10": MetricGate(floor=0.2, max_drop=0.0)}))))
    assert [(c.kind, c.passed) for c in floors_only.checks] == [("floor", False), ("max_drop", None)]


def test_hybrid_metrics_travel_in_the_report_json_markdown_and_mlflow_metrics():
    plain = report({64: 0.4}, label="base")
    assert "hybrid" not in plain.to_dict() and "Hybrid RRF" not in render_markdown(plain)
    challenger = with_hybrid({64: 0.4}, {64: 0.5}, "challenger v2")
    challenger.hybrid.dataset["lexical_index"] = "products-lexical-abc"
    challenger.references["base"] = with_hybrid({64: 0.3}, {64: 0.45}, "base")
    again = EvaluationReport.from_dict(json.loads(json.dumps(challenger.to_dict())))
    assert again.hybrid.dims[64]["ndcg@10"] == 0.5 and again.references["base"].hybrid.dims[64]["ndcg@10"] == 0.45
    assert "## Hybrid RRF: BM25 on `products-lexical-abc` + exact search" in render_markdown(again)
    metrics = mlflow_metrics(again)
    assert metrics["hybrid_ndcg_at_10_dim_64"] == 0.5 and metrics["hybrid_short_ndcg_at_10_dim_64"] == 0.5
    assert metrics["eval_ndcg_at_10_dim_64"] == 0.4


# ----- the retriever against the serving path -----------------------------------------------------------------
@pytest.fixture(scope="module")
def flat_index(tmp_path_factory, es_url, es_client, tiny_model_dir):
    """Exact float kNN fields at every dim: the serving path's hybrid RRF must rank like the offline one."""
    from near2_tasks.serving.publish import build_verify_swap

    settings = module_settings(tmp_path_factory, es_url, str(tiny_model_dir), TINY_DIMS, home="hybrid-gate-home")
    settings = with_sections(settings, elasticsearch={"index_options": {d: {"index_type": "flat"} for d in TINY_DIMS}})
    products = titled_catalog(150, seed=5)
    build_verify_swap(settings, str(tiny_model_dir), products, model_version=1)
    yield settings, products
    es_client.indices.delete(index=f"{settings.elasticsearch.alias}-*", ignore_unavailable=True)


def test_offline_hybrid_rrf_ranks_like_the_serving_path(flat_index, es_client, tiny_model_dir):
    from near2_tasks.data.synthetic import generate_catalog
    from near2_tasks.models.embeddings import encode, load_encoder
    from near2_tasks.serving.retrievers import ElasticsearchRetriever
    from near2_tasks.serving.search import Searcher

    settings, products = flat_index
    data = prepare_data(products, generate_catalog(150, 10, seed=5).judgments, settings.dataset.text_template)
    model = load_encoder(str(tiny_model_dir))
    queries = encode(model, data.query_texts)
    lexical = LexicalSide(settings, es_client, ensure_lexical_index(settings, es_client, products))
    offline = evaluate_retriever(HybridExactRetriever(encode(model, data.product_texts), lexical), data, TINY_DIMS,
                                 query_vectors=queries, keep_rankings=True, **scale_of(settings))
    searcher = Searcher(settings)
    served = searcher.serving_index(refresh=True)
    serving = evaluate_retriever(ElasticsearchRetriever(searcher, served, "hybrid_rrf"), data, TINY_DIMS,
                                 query_vectors=queries, keep_rankings=True, **scale_of(settings))
    for dim in TINY_DIMS:
        assert offline.dims[dim] == pytest.approx(serving.dims[dim], abs=1e-6), dim
        # the same top 10 (RRF gives exact ties, e.g. dense 3 + lexical 5 vs dense 5 + lexical 3, which the two
        # sides may order differently; the NDCG check above covers the order)
        assert overlap_at(serving.rankings[dim], offline.rankings[dim], 10) > 0.99, dim
    # the BM25 side is the serving index's own, query by query
    for query, ranked in zip(data.query_texts[:10], lexical.top(data.query_texts[:10], 10)):
        expected = [h.product_id for h in searcher.retrieve_lexical(served, query, 10).hits]
        assert [pid for pid, _ in ranked] == expected, query


# ----- the gate step on Elasticsearch and the registry ----------------------------------------------------------
def lexical_indices(es_client, settings) -> dict[str, str]:
    """name -> uuid of the alias's lexical indices."""
    found = es_client.indices.get(index=f"{settings.elasticsearch.alias}-lexical-*", allow_no_indices=True)
    return {name: body["settings"]["index"]["uuid"] for name, body in found.items()}


@pytest.fixture
def hybrid_settings(tiny_settings):
    return tiny_settings.model_copy(update={"gates": GateSettings(overall=LOOSE, hybrid=HybridGate())})


def test_the_hybrid_gate_is_measured_recorded_and_can_fail_and_its_index_is_reused(
        hybrid_settings, tiny_model_dir, register_model_dir, es_client, tmp_path):
    from near2_tasks.data.synthetic import generate_catalog
    from near2_tasks.models.registry import client

    catalog = generate_catalog(300, 60, 7)
    version = register_model_dir(hybrid_settings, tiny_model_dir)  # the base model itself: hybrid ties
    result = gate_version(hybrid_settings, catalog.products, catalog.judgments, output_dir=tmp_path / "first")
    assert result.decision.passed and result.decision.reference_role == "base"
    hybrid = [c for c in result.decision.checks if c.retriever == "hybrid"]
    assert [(c.dim, c.metric, c.kind) for c in hybrid] == [(d, "ndcg@10", "max_drop") for d in TINY_DIMS]
    assert all(c.value is not None and c.value == pytest.approx(c.reference) for c in hybrid)
    assert set(result.report.hybrid.dims) == set(TINY_DIMS) and result.report.references["base"].hybrid is not None
    assert result.report.hybrid.dims[64] != result.report.dims[64]  # BM25 moved the ranking
    written = json.loads((tmp_path / "first" / "report.json").read_text())
    assert written["hybrid"]["dataset"]["retriever"] == "hybrid_rrf" and "hybrid" in written["references"]["base"]
    assert "## Hybrid RRF" in (tmp_path / "first" / "report.md").read_text()
    assert "| hybrid, all queries | 64 | ndcg@10 |" in (tmp_path / "first" / "gate.md").read_text()
    registry, name = client(hybrid_settings), hybrid_settings.mlflow.registered_model
    recorded = registry.get_model_version(name, version)
    assert recorded.tags["gate.hybrid.dim_16.ndcg_at_10"] == "pass" and recorded.tags[TAG_GATE] == "pass"
    assert "hybrid_ndcg_at_10_dim_64" in registry.get_run(recorded.run_id).data.metrics
    first = lexical_indices(es_client, hybrid_settings)
    assert list(first) == [written["hybrid"]["dataset"]["lexical_index"]]
    assert es_client.count(index=list(first)[0])["count"] == len(catalog.products)

    # a hybrid rule no model can meet fails the gate, with reasons naming hybrid; the lexical index is reused
    impossible = hybrid_settings.model_copy(update={"gates": GateSettings(overall=LOOSE, hybrid=HybridGate(
        overall=GateRules(metrics={"ndcg@10": MetricGate(floor=1.01)})))})
    failed = gate_version(impossible, catalog.products, catalog.judgments, version=version,
                          output_dir=tmp_path / "again").decision
    assert not failed.passed and len(failed.failures) == len(TINY_DIMS)
    assert all(reason.startswith("hybrid RRF: dim ") and "below the floor 1.01" in reason for reason in failed.reasons)
    recorded = registry.get_model_version(name, version)
    assert recorded.tags[TAG_GATE] == "fail" and recorded.tags["gate.hybrid.dim_64.ndcg_at_10"] == "fail"
    assert recorded.tags[gate_tag(64, "ndcg@10")] == "pass"
    assert lexical_indices(es_client, hybrid_settings) == first  # same name, same uuid: not rebuilt

    # another catalog gets its own lexical index, and the older one goes
    smaller = catalog.products.iloc[:250]
    judged = catalog.judgments[catalog.judgments.product_id.isin(smaller.product_id)]
    gate_version(hybrid_settings, smaller, judged, version=version, output_dir=tmp_path / "smaller")
    now = lexical_indices(es_client, hybrid_settings)
    assert len(now) == 1 and set(now).isdisjoint(first)


def test_elasticsearch_down_fails_the_hybrid_gate_and_the_gate_off_does_not_need_it(
        hybrid_settings, tiny_model_dir, register_model_dir, tmp_path):
    from near2_tasks.data.synthetic import generate_catalog

    catalog = generate_catalog(300, 60, 7)
    down = with_sections(hybrid_settings, elasticsearch={"url": "http://127.0.0.1:9", "max_retries": 0})
    register_model_dir(down, tiny_model_dir)
    with pytest.raises(Near2Error, match=r"Elasticsearch at http://127\.0\.0\.1:9 is not reachable"):
        gate_version(down, catalog.products, catalog.judgments, output_dir=tmp_path / "down")
    off = down.model_copy(update={"gates": GateSettings()})
    result = gate_version(off, catalog.products, catalog.judgments, output_dir=tmp_path / "off")
    assert result.decision.passed and result.report.hybrid is None
    assert all(c.retriever is None for c in result.decision.checks)
    assert "hybrid" not in json.loads((tmp_path / "off" / "report.json").read_text())
