"""The foundation: settings, naming conventions, synthetic data, the local server, the tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from near2_tasks import conventions
from near2_tasks.config import load_settings
from near2_tasks.data.synthetic import generate_catalog
from near2_tasks.errors import Near2Error
from tests.stack_support import REPO


def test_dims_must_descend_and_be_unique():
    for bad in ([32, 64], [64, 64, 32], [], [64, -1]):
        with pytest.raises(Near2Error, match="model.dims"):
            load_settings(model={"dims": bad})


def test_environment_overrides_yaml(tmp_path, monkeypatch):
    cfg = tmp_path / "near2.yaml"
    cfg.write_text("elasticsearch:\n  alias: from-yaml\n  num_candidates: 50\n")
    monkeypatch.setenv("NEAR2_ELASTICSEARCH__ALIAS", "from-env")
    settings = load_settings(cfg)
    assert settings.elasticsearch.alias == "from-env"
    assert settings.elasticsearch.num_candidates == 50


def test_unknown_config_key_is_named(tmp_path):
    cfg = tmp_path / "near2.yaml"
    cfg.write_text("elasticsearch:\n  allias: typo\n")
    with pytest.raises(Near2Error, match="elasticsearch.allias"):
        load_settings(cfg)


def test_names_follow_the_conventions():
    assert conventions.vector_field(64) == "embedding_64"
    assert conventions.dim_of_field("embedding_64") == 64
    assert conventions.metric_key("eval", "ndcg@10", 64) == "eval_ndcg_at_10_dim_64"
    assert conventions.gate_tag(64, "ndcg@10") == "gate.dim_64.ndcg_at_10"
    from datetime import datetime, timezone

    when = datetime(2026, 11, 21, 12, 3, 1, tzinfo=timezone.utc)
    assert conventions.index_name("products", 7, when) == "products-v7-20261121t120301"


def test_truncate_renormalises_prefix():
    rng = np.random.default_rng(0)
    full = rng.normal(size=(5, 8)).astype(np.float32)
    out = conventions.truncate(full, 3)
    assert out.shape == (5, 3)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    # same direction as the raw prefix
    cos = np.sum(out * full[:, :3], axis=1) / np.linalg.norm(full[:, :3], axis=1)
    np.testing.assert_allclose(cos, 1.0, rtol=1e-6)
    assert np.all(conventions.truncate(np.zeros((1, 4)), 2) == 0)
    with pytest.raises(ValueError):
        conventions.truncate(full, 9)


def test_synthetic_catalog_is_deterministic_and_graded():
    a, b = generate_catalog(300, 60, seed=3), generate_catalog(300, 60, seed=3)
    assert a.products.equals(b.products) and a.judgments.equals(b.judgments)
    assert not generate_catalog(300, 60, seed=4).products.equals(a.products)
    assert a.products.product_id.is_unique and a.products.title.is_unique
    assert set(a.judgments.product_id) <= set(a.products.product_id)
    assert a.judgments.relevance.between(1, 3).all()
    assert a.judgments.query_id.nunique() == 60
    # every slice the evaluation reports is present
    queries = a.judgments.drop_duplicates("query_id")["query"]
    assert (queries.str.split().str.len() <= 2).any()
    assert (queries.str.split().str.len() >= 5).any()
    assert queries.str.contains(r"(?=\S*\d)(?=\S*[a-zA-Z])\S+", regex=True).any()


def test_local_elasticsearch_answers(es_client):
    # the minimal distribution has no GET / handler; the nodes API tells the version
    import importlib.metadata

    versions = [node["version"] for node in es_client.nodes.info()["nodes"].values()]
    client_major = importlib.metadata.version("elasticsearch").split(".")[0]
    assert versions and all(v.split(".")[0] == client_major for v in versions)
    assert es_client.cluster.health()["status"] in ("green", "yellow")


def test_tiny_model_encodes_with_its_dims(tiny_model_dir):
    from near2_tasks.models.embeddings import encode, load_encoder, model_dimension

    model = load_encoder(str(tiny_model_dir), device="cpu")
    assert model_dimension(model) == 64
    vectors = encode(model, ["cordless drill", "garden hose"])
    assert vectors.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_missing_model_directory_is_a_clear_error(tmp_path):
    from near2_tasks.models.embeddings import load_encoder

    with pytest.raises(Near2Error, match="not found"):
        load_encoder(str(tmp_path / "nope"))


def test_the_package_has_no_import_cycle_even_through_imports_inside_functions():
    """ARCHITECTURE.md's module map is a layering: config and conventions at the bottom, stages above them,
    pipeline and the CLI on top. A lazy import inside a function still makes a cycle (config -> embeddings ->
    registry -> config was one): every ``near2_tasks`` import that runs, wherever it sits, is an edge here
    (only ``if TYPE_CHECKING:`` imports, which never run, are not)."""
    import ast
    from graphlib import CycleError, TopologicalSorter

    package = REPO / "near2_tasks"
    graph: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        name = ".".join(("near2_tasks", *path.relative_to(package).with_suffix("").parts)).removesuffix(".__init__")
        edges = graph.setdefault(name, set())
        tree = ast.parse(path.read_text())
        type_only = {id(inner) for node in ast.walk(tree)  # `if TYPE_CHECKING:` imports never run
                     if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
                     for inner in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("near2_tasks"):
                edges.add(node.module)
                edges.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from near2_tasks import x`
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name.startswith("near2_tasks"))
    graph = {name: {edge for edge in edges if edge in graph and edge != name} for name, edges in graph.items()}
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as cycle:
        pytest.fail(f"import cycle: {' -> '.join(cycle.args[1])}")
