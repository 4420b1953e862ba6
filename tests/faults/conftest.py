"""Fixtures for the fault-injection tests: services we are allowed to break.

- ``dedicated_es``: an Elasticsearch of our own on a free port (``NEAR2_FAULTS_ES_PORT`` to choose one),
  started once per session with an empty data directory, and running again before every test (a test
  that kills it restarts it, or the next test does). Never the shared server (9200) or the test server
  (9251), nor another session's.
- ``faulty_proxy``: a loopback HTTP proxy in front of it whose ``rule`` a test sets (429 for bulk
  requests, a crash on the n-th bulk request, ...).
- ``mlflow_server``: a real ``mlflow server`` with a SQLite store in tmp, stopped and restarted at will.
- ``fault_settings``: tiny everything (catalog, model, retries, backoffs) pointed at ``dedicated_es``.
- ``validation``, ``examples``: the validate and mine_examples steps' results for a small synthetic
  catalog (once per session).
- ``fault_record``: the counts a test saw before and after its fault, printed at teardown (``pytest -rP``)
  and appended as a JSON line to ``$NEAR2_FAULTS_REPORT`` when set.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from tests.conftest import ES_DOWNLOAD_CACHE
from tests.faults.harness import DedicatedElasticsearch, FaultyProxy, MlflowServer, free_elasticsearch_port
from tests.faults.support import drop_alias_indices, make_fault_settings

REPO = Path(__file__).resolve().parents[2]


def _runtime_dir(tmp_path_factory) -> Path:
    # Elasticsearch refuses root and runs as an unprivileged user, which cannot enter pytest's 0700
    # tmp dirs: as root, use a directory of our own under /var/tmp (the unpacked server is reused).
    if os.geteuid() == 0:
        return Path(os.environ.get("NEAR2_FAULTS_ES_RUNTIME", "/var/tmp/near2-faults-es"))
    return tmp_path_factory.mktemp("faults-es-runtime")


@pytest.fixture(scope="session")
def _dedicated_es_session(tmp_path_factory):
    # a port of its own per session: two sessions at once (a developer and CI) must not stop each other's
    port = int(os.environ.get("NEAR2_FAULTS_ES_PORT") or free_elasticsearch_port())
    es = DedicatedElasticsearch(
        port=port,
        runtime_dir=_runtime_dir(tmp_path_factory),
        cache_dir=ES_DOWNLOAD_CACHE,
        home=tmp_path_factory.mktemp("faults-es-home"),
    )
    try:
        es.start_fresh()
    except Exception as exc:  # noqa: BLE001 - the reason goes into the failure
        pytest.fail(f"the dedicated Elasticsearch for fault tests could not start: {exc}", pytrace=False)
    yield es
    es.stop()
    es.wipe()


@pytest.fixture
def dedicated_es(_dedicated_es_session) -> DedicatedElasticsearch:
    """The dedicated Elasticsearch, running and at least yellow when the test starts."""
    _dedicated_es_session.ensure_running()
    return _dedicated_es_session


@pytest.fixture
def fault_es_client(dedicated_es):
    """A client straight to the dedicated server (no proxy), for setting up and counting."""
    from elasticsearch import Elasticsearch

    client = Elasticsearch(dedicated_es.url, request_timeout=30)
    yield client
    client.close()


@pytest.fixture
def fault_alias(dedicated_es) -> str:
    """A fresh alias on the dedicated server; its indices are deleted after the test."""
    alias = f"faults-{uuid.uuid4().hex[:8]}"
    yield alias
    drop_alias_indices(dedicated_es, alias)


@pytest.fixture
def faulty_proxy(dedicated_es):
    proxy = FaultyProxy(dedicated_es.url)
    yield proxy
    proxy.close()


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """A real tracking server; MLflow's own HTTP retry loop is kept short so our retries are what counts."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    server = MlflowServer(tmp_path / "mlflow-server")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fault_settings(tmp_path, dedicated_es, fault_alias, tiny_model_dir):
    """Tiny, fast-failing settings against the dedicated Elasticsearch and a private MLflow store."""
    return make_fault_settings(tmp_path / "home", dedicated_es.url, fault_alias, tiny_model_dir)


@pytest.fixture(scope="session")
def validation(tmp_path_factory) -> dict:
    """The validate step's result (accepted catalog + judgments on disk) for a 200-product catalog."""
    from near2_tasks.run import StepContext
    from near2_tasks.data import step as data_step
    from near2_tasks.config import load_settings

    settings = load_settings(home=str(tmp_path_factory.mktemp("faults-validation")),
                             dataset={"synthetic_products": 200, "synthetic_queries": 40})
    return data_step.validate(StepContext(settings=settings, run_id="faults-validation"))


@pytest.fixture(scope="session")
def examples(validation, tmp_path_factory) -> dict:
    """The mine_examples step's result for ``validation`` (judged negatives only: no model mining)."""
    from near2_tasks.run import StepContext
    from near2_tasks.train import step as train_step
    from near2_tasks.config import load_settings

    settings = load_settings(home=str(tmp_path_factory.mktemp("faults-examples")),
                             examples={"mined_negatives_per_query": 0})
    return train_step.mine_examples(StepContext(settings=settings, run_id="faults-examples"), validation)


@pytest.fixture
def fault_record(request) -> dict:
    """Fill with what the test observed (counts before/after, what the fault did)."""
    record: dict = {}
    yield record
    line = json.dumps({"test": request.node.nodeid, **record}, default=str, sort_keys=False)
    print(line)
    report = os.environ.get("NEAR2_FAULTS_REPORT")
    if report:
        with open(report, "a") as out:
            out.write(line + "\n")
