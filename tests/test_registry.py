"""The MLflow side of training: experiment set-up, model logging, versions, aliases, idempotency.

Real MLflow everywhere: a SQLite store in tmp for most tests, and a real ``mlflow server`` process for
the tracking-server path (the compose stack's set-up).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from near2_tasks.conventions import CHALLENGER, CHAMPION
from near2_tasks.errors import Near2Error, ServiceUnavailable

TEXTS = ["cordless drill 20v", "Moen pull-down kitchen faucet", "DCD771C2"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def settings_for(home: Path, **mlflow):
    from near2_tasks.config import load_settings

    return load_settings(home=str(home), mlflow=mlflow)


def log_tiny_model(settings, model_dir: Path) -> tuple[str, object]:
    """Log the tiny encoder in a fresh run of the configured experiment; return (run_id, ModelInfo)."""
    import mlflow
    from sentence_transformers import SentenceTransformer

    from near2_tasks.models import registry

    experiment_id = registry.configure_mlflow(settings)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        info = registry.log_model(SentenceTransformer(str(model_dir), device="cpu"), 64)
    return run.info.run_id, info


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    """A SQLite store with one logged (not yet registered) tiny model."""
    settings = settings_for(tmp_path_factory.mktemp("registry-home"))
    run_id, info = log_tiny_model(settings, tiny_model_dir)
    return settings, run_id, info


def test_configure_mlflow_uses_the_configured_locations_and_is_repeatable(tmp_path):
    import mlflow

    from near2_tasks.models import registry

    settings = settings_for(tmp_path / "home", experiment="near2-test")
    first = registry.configure_mlflow(settings)
    assert registry.configure_mlflow(settings) == first
    experiment = mlflow.get_experiment(first)
    assert experiment.name == "near2-test"
    assert experiment.artifact_location == settings.artifact_location == (tmp_path / "home" / "mlartifacts").as_uri()
    assert (tmp_path / "home" / "mlflow.db").is_file()
    assert mlflow.get_tracking_uri() == settings.tracking_uri


def test_register_tags_the_version_and_moves_only_challenger(store):
    from near2_tasks.models import registry

    settings, run_id, info = store
    client = registry.client(settings)
    name = settings.mlflow.registered_model
    first = registry.register_model(settings, info.model_uri, run_id, "ds-1", [64, 32, 16], run_key="k-first",
                                    git_commit="abc1234", model_id=info.model_id)
    assert first.tags == {"dataset_version": "ds-1", "dims": "64,32,16", "git_commit": "abc1234",
                          "run_key_started": "k-first", "run_key": "k-first"}
    assert str(registry.get_version(settings, CHALLENGER).version) == str(first.version)
    # promotion (another module) makes it champion; a newer registration must leave that alone
    client.set_registered_model_alias(name, CHAMPION, first.version)
    second = registry.register_model(settings, info.model_uri, run_id, "ds-2", [64, 32, 16], run_key="k-second")
    assert int(second.version) == int(first.version) + 1
    assert str(registry.get_version(settings, CHALLENGER).version) == str(second.version)
    assert str(registry.get_version(settings, CHAMPION).version) == str(first.version)
    assert str(registry.get_version(settings, second.version).version) == str(second.version)
    assert registry.model_uri(settings, second.version) == f"models:/{name}/{second.version}"


def test_registering_the_same_run_key_twice_returns_the_first_version(store):
    from near2_tasks.models import registry

    settings, run_id, info = store
    name = settings.mlflow.registered_model
    once = registry.register_model(settings, info.model_uri, run_id, "ds-3", [64], run_key="dag-run-42")
    count = len(registry.client(settings).search_model_versions(f"name = '{name}'"))
    twice = registry.register_model(settings, info.model_uri, run_id, "ds-3", [64], run_key="dag-run-42")
    assert twice.version == once.version
    assert len(registry.client(settings).search_model_versions(f"name = '{name}'")) == count
    assert registry.find_version_by_run_key(settings, "dag-run-never") is None


def test_unknown_version_or_alias_is_a_clear_error(store):
    from near2_tasks.models import registry

    settings, _, _ = store
    with pytest.raises(Near2Error, match="has no version '999'"):
        registry.get_version(settings, 999)
    with pytest.raises(Near2Error, match="has no version 'nope'"):
        registry.get_version(settings, "nope")
    with pytest.raises(Near2Error, match="cannot load models:/near2-encoder/999"):
        registry.load_model_from_mlflow("models:/near2-encoder/999", settings=settings)


def test_every_form_of_model_uri_parses_and_resolves_to_the_version_the_registry_holds(store):
    from near2_tasks.models import registry
    from near2_tasks.conventions import ModelUri, parse_model_uri

    assert parse_model_uri("models:/m-1a2b") == ModelUri("m-1a2b")  # a logged model: nothing to resolve
    assert parse_model_uri("/srv/models/encoder") is None and parse_model_uri("runs:/abc/model") is None
    with pytest.raises(Near2Error, match="cannot read the model URI 'models:/a/b/c'"):
        parse_model_uri("models:/a/b/c")
    settings, run_id, info = store
    name = settings.mlflow.registered_model
    newest = registry.register_model(settings, info.model_uri, run_id, "ds-uri", [64], run_key="k-uri")
    registry.client(settings).set_registered_model_alias(name, "reviewed", newest.version)
    for text in (f"models:/{name}/{newest.version}", f"models:/{name}@reviewed", f"models:/{name}/latest"):
        parsed = parse_model_uri(text)
        assert str(parsed) == text and parsed.pinned == text.endswith(f"/{newest.version}")
        assert str(registry.resolve_model_uri(settings, text).version) == str(newest.version), text
    with pytest.raises(Near2Error, match=f"unknown model URI 'models:/{name}@nobody'"):
        registry.resolve_model_uri(settings, f"models:/{name}@nobody")
    with pytest.raises(Near2Error, match="names no registered version"):
        registry.resolve_model_uri(settings, "models:/m-1a2b")


def test_logged_model_reloads_identically_from_run_and_registry(store, tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    from near2_tasks.models import registry
    from near2_tasks.models.embeddings import encode, load_encoder

    settings, run_id, info = store
    version = registry.register_model(settings, info.model_uri, run_id, "ds-4", [64], run_key="reload")
    expected = encode(SentenceTransformer(str(tiny_model_dir), device="cpu"), TEXTS)
    for uri in (f"runs:/{run_id}/model", info.model_uri, registry.model_uri(settings, version.version)):
        model = registry.load_model_from_mlflow(uri, device="cpu", settings=settings)
        np.testing.assert_allclose(encode(model, TEXTS), expected, atol=1e-6, err_msg=uri)
    # load_encoder (embeddings.py) goes through the same path for MLflow URIs
    np.testing.assert_allclose(encode(load_encoder(f"models:/near2-encoder@{CHALLENGER}", device="cpu"), TEXTS),
                               expected, atol=1e-6)


def test_logged_model_carries_signature_example_and_pinned_requirements(store):
    from mlflow.models import Model
    from mlflow.artifacts import download_artifacts

    settings, _, info = store
    signature = info.signature
    assert signature.inputs.input_types()[0].name == "string"
    assert {p.name: p.default for p in signature.params.params} == {"truncate_dim": 64, "normalize_embeddings": True}
    local = Path(download_artifacts(info.model_uri))
    assert "sentence_transformers" in Model.load(local / "MLmodel").flavors
    requirements = (local / "requirements.txt").read_text().split()
    assert any(r.startswith("sentence-transformers==") for r in requirements)
    assert any(r.startswith("torch==") for r in requirements)
    assert (local / "input_example.json").exists() or (local / "serving_input_example.json").exists()


def test_unreachable_tracking_server_retries_with_backoff(tmp_path, caplog):
    from near2_tasks.models import registry

    port = free_port()
    settings = settings_for(tmp_path, tracking_uri=f"http://127.0.0.1:{port}", connect_retries=3, retry_backoff_s=0.02)
    with caplog.at_level("WARNING", logger="near2_tasks.models.registry"):
        with pytest.raises(ServiceUnavailable, match="unreachable after 4 attempts") as err:
            registry.configure_mlflow(settings)
    assert "NEAR2_MLFLOW__TRACKING_URI" in err.value.hint
    delays = [r.getMessage().rsplit("retrying in ", 1)[1] for r in caplog.records
              if r.name == "near2_tasks.models.registry"]  # not a straggler of another test's MLflow client
    assert delays == ["0.02s", "0.04s", "0.08s"]  # doubling


@pytest.mark.slow
def test_tracking_server_that_comes_up_late_is_waited_for(tmp_path, tiny_model_dir, caplog):
    """The compose set-up: a real ``mlflow server``; configure_mlflow retries until it answers."""
    from near2_tasks.models import registry
    from near2_tasks.models.embeddings import encode

    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"),
    )
    try:
        settings = settings_for(tmp_path / "client-home", tracking_uri=f"http://127.0.0.1:{port}",
                                connect_retries=9, retry_backoff_s=0.5)
        with caplog.at_level("WARNING", logger="near2_tasks.models.registry"):
            run_id, info = log_tiny_model(settings, tiny_model_dir)  # configure_mlflow waits for the server
        assert any("retrying in" in r.getMessage() for r in caplog.records), "the server was not up at once"
        version = registry.register_model(settings, info.model_uri, run_id, "ds-srv", [64], run_key="srv")
        reloaded = registry.load_model_from_mlflow(f"models:/near2-encoder@{CHALLENGER}", settings=settings)
        assert reloaded.get_embedding_dimension() == 64
        assert encode(reloaded, TEXTS).shape == (3, 64)
        assert str(version.version) == "1"
        assert not (tmp_path / "client-home" / "mlartifacts").exists()  # artifacts went through the server
        assert any((tmp_path / "server-artifacts").rglob("MLmodel"))
    finally:
        server.terminate()
        server.wait(timeout=30)
