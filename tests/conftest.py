"""Shared fixtures: a real Elasticsearch, a temporary MLflow store, settings, a tiny encoder.

Elasticsearch: ``NEAR2_ES_URL`` when set (any reachable server of the same major version),
otherwise the project's own local server is started on port 9251 for the session and stopped at the
end. If it cannot start, the run fails with the reason: nothing is skipped silently.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HOMEDEPOT = REPO.parent / "shared" / "data" / "homedepot"
TEST_ES_PORT = 9251

# The suite is hermetic: NEAR2_* settings exported by the caller (the Makefile exports NEAR2_HOME)
# must not leak into the settings tests build, or every test would share one home and MLflow store.
# Only the downloaded Elasticsearch zip is shared with the caller's home, to fetch it once.
ES_DOWNLOAD_CACHE = Path(os.environ.get("NEAR2_HOME", REPO / ".near2")) / "cache" / "elasticsearch"
_KEPT = {"NEAR2_ES_URL", "NEAR2_FAULTS_REPORT", "NEAR2_FAULTS_ES_PORT", "NEAR2_FAULTS_ES_RUNTIME"}
for _key in [key for key in os.environ if key.startswith("NEAR2_") and key not in _KEPT]:
    del os.environ[_key]

# Airflow reads its configuration when it is first imported: before any test imports it, point it at
# a throwaway home (its SQLite metadata DB), this repository's dags/ and plugins/, and no examples.
# The DB itself is migrated by the `airflow_db` fixture, only in sessions that use Airflow.
AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="near2-airflow-"))
atexit.register(shutil.rmtree, AIRFLOW_HOME, ignore_errors=True)
os.environ.update({
    "AIRFLOW_HOME": str(AIRFLOW_HOME),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
})


@pytest.fixture(scope="session")
def es_url(tmp_path_factory) -> str:
    from near2_tasks.serving import elasticsearch_local
    from near2_tasks.config import load_settings

    url = os.environ.get("NEAR2_ES_URL")
    if url:
        if not elasticsearch_local.health(url):
            pytest.fail(f"NEAR2_ES_URL={url} does not answer", pytrace=False)
        yield url
        return
    settings = load_settings(
        home=str(tmp_path_factory.mktemp("es-home")),
        local_elasticsearch={"port": TEST_ES_PORT, "cache_dir": str(ES_DOWNLOAD_CACHE)},
    )
    try:
        server = elasticsearch_local.start(settings)
    except Exception as exc:  # noqa: BLE001 - the reason goes into the failure
        pytest.fail(f"the local Elasticsearch could not start: {exc}", pytrace=False)
    yield server.url
    elasticsearch_local.stop(settings)


@pytest.fixture(scope="session")
def es_client(es_url):
    from elasticsearch import Elasticsearch

    client = Elasticsearch(es_url, request_timeout=60)
    yield client
    client.close()


@pytest.fixture
def unique_alias(es_client):
    """A fresh alias name; every index behind it is deleted after the test."""
    alias = f"test-products-{uuid.uuid4().hex[:8]}"
    yield alias
    es_client.indices.delete(index=f"{alias}-*", ignore_unavailable=True, allow_no_indices=True)


@pytest.fixture
def settings(tmp_path, es_url, unique_alias):
    """Settings isolated in tmp_path: own MLflow SQLite store, own alias, the test Elasticsearch."""
    from near2_tasks.config import load_settings

    return load_settings(
        home=str(tmp_path / "home"),
        elasticsearch={"url": es_url, "alias": unique_alias},
        dataset={"synthetic_products": 300, "synthetic_queries": 60},
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def second_tiny_model_dir(tmp_path_factory) -> Path:
    """Another tiny encoder (same architecture and dims, other random weights): a "new model version"
    whose vectors do not match the first one's."""
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model-b"), seed=1)


@pytest.fixture
def tiny_settings(settings, tiny_model_dir):
    """``settings`` with the tiny encoder as base model and its dims (64, 32, 16)."""
    from tests.tiny_model import TINY_DIMS

    return settings.model_copy(update={"model": settings.model.model_copy(
        update={"base_model": str(tiny_model_dir), "dims": TINY_DIMS})})


@pytest.fixture(scope="session")
def tiny_prefix_variants(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Two encoders that differ at the smallest nested dimension only (TINY_DIMS 64, 32, 16).

    Both are the tiny encoder followed by an orthogonal map (a Dense layer) onto its principal axes on
    the synthetic catalog: ``strong`` puts the top 16 axes first; ``weak`` swaps axes 1-16 with 17-32.
    Orthogonal maps that keep the set of the first 32 axes leave every cosine at 64 and 32 dimensions
    unchanged, so only the 16-dimensional prefix is worse in ``weak``: a challenger that loses at one
    dimension and ties at the others.
    """
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense

    from near2_tasks.data.synthetic import generate_catalog
    from near2_tasks.models.embeddings import encode

    base = SentenceTransformer(str(tiny_model_dir), device="cpu")
    vectors = encode(base, generate_catalog(300, 60, 7).products["title"].tolist())
    centred = vectors - vectors.mean(axis=0)
    _, axes = np.linalg.eigh(centred.T @ centred)
    principal = axes[:, ::-1].T  # rows: principal axes, largest variance first
    maps = {"strong": principal, "weak": np.concatenate([principal[16:32], principal[:16], principal[32:]])}
    out: dict[str, Path] = {}
    directory = tmp_path_factory.mktemp("tiny-prefix-variants")
    transformer, pooling, normalize = list(base)
    for name, weight in maps.items():
        dense = Dense(weight.shape[1], weight.shape[0], bias=False, activation_function=torch.nn.Identity(),
                      init_weight=torch.tensor(np.ascontiguousarray(weight), dtype=torch.float32))
        SentenceTransformer(modules=[transformer, pooling, dense, normalize], device="cpu").save(str(directory / name))
        out[name] = directory / name
    return out


@pytest.fixture(scope="session")
def register_model_dir():
    """``register(settings, model_dir) -> version``: log a saved encoder to MLflow (real store) and
    register it as a new version of ``settings.mlflow.registered_model`` (it becomes ``challenger``)."""

    def register(settings, model_dir: Path, dims: list[int] | None = None) -> str:
        import mlflow
        from sentence_transformers import SentenceTransformer

        from near2_tasks.models import registry
        from tests.tiny_model import TINY_DIMS

        dims = dims or TINY_DIMS
        registry.configure_mlflow(settings)
        with mlflow.start_run() as run:
            info = registry.log_model(SentenceTransformer(str(model_dir), device="cpu"), dims[0])
        version = registry.register_model(settings, info.model_uri, run.info.run_id, "test-dataset", dims,
                                          model_id=info.model_id)
        return str(version.version)

    return register


@pytest.fixture(scope="session")
def homedepot_dir() -> Path:
    if not (HOMEDEPOT / "products.csv").exists():
        pytest.skip(f"Home Depot data not found at {HOMEDEPOT} (research-only, not in the repo)")
    return HOMEDEPOT


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """Airflow's metadata DB (SQLite in the session's throwaway AIRFLOW_HOME), created once."""
    from airflow.utils import db

    db.initdb()
    return AIRFLOW_HOME
