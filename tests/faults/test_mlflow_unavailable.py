"""Fault 3: the MLflow tracking server is unavailable during training and during registration.

A real ``mlflow server`` (SQLite store, one worker) serves the registry; v1 is the champion. Then one
training task of run ``run-2``:

1. starts while the server is down; the server comes back a moment later: the task's connection
   retries carry it through and it trains;
2. loses the server again right after the registry created its model version, before the version got
   its ``challenger`` alias and ``run_key`` commit tag: the task fails.

After the server is back: the champion is still v1 and its model loads; re-running the task registers
run-2 exactly once (no second version for the same run, no half-made version left behind), and a third
run of the task registers nothing. Every alias points at a version whose model loads.
"""

from __future__ import annotations

import threading
import time

import pytest
from mlflow import MlflowClient

from near2_tasks.promote import promotion

from near2_tasks.models import registry
from near2_tasks.conventions import CHALLENGER, CHAMPION, TAG_GATE
from near2_tasks.errors import ServiceUnavailable
from near2_tasks.train.trainer import train_model
from tests.faults.support import TINY_TRAINING, tiny_training_inputs, with_sections

RUN_KEY = "near2_retrain/run-2"


def _versions(settings) -> list:
    return sorted(registry.client(settings).search_model_versions(f"name = '{settings.mlflow.registered_model}'"),
                  key=lambda v: int(v.version))


def _aliases(settings) -> dict[str, str]:
    model = registry.client(settings).get_registered_model(settings.mlflow.registered_model)
    return {alias: str(version) for alias, version in (model.aliases or {}).items()}


def _model_loads(settings, alias: str) -> bool:
    model = registry.load_model_from_mlflow(f"models:/{settings.mlflow.registered_model}@{alias}", settings=settings)
    return model.get_embedding_dimension() == settings.model.dims[0]


def _summary(settings) -> dict:
    versions = _versions(settings)
    return {"versions": [v.version for v in versions],
            "run_key_tags": {v.version: v.tags.get(registry.TAG_RUN_KEY) for v in versions},
            "aliases": _aliases(settings)}


def test_mlflow_down_during_training_and_registration(
    mlflow_server, fault_settings, validation, tiny_model_dir, register_model_dir, tmp_path, monkeypatch, fault_record,
):
    settings = with_sections(
        fault_settings, training=TINY_TRAINING,
        mlflow={"tracking_uri": mlflow_server.tracking_uri, "artifact_location": (tmp_path / "artifacts").as_uri(),
                "connect_retries": 8, "retry_backoff_s": 0.5})
    examples, validation_data, dataset_version = tiny_training_inputs(validation)

    # v1 serves as champion
    v1 = register_model_dir(settings, tiny_model_dir)
    registry.client(settings).set_model_version_tag(settings.mlflow.registered_model, v1, TAG_GATE, "pass")
    promotion.set_approval(settings, v1)
    promotion.promote(settings, v1)
    before = _summary(settings)
    assert before["aliases"][CHAMPION] == v1

    # the training task starts while the server is down; it comes back a second later ...
    mlflow_server.stop()
    restarted = threading.Thread(target=lambda: (time.sleep(1.0), mlflow_server.start()), daemon=True)
    restarted.start()
    # ... and goes down again just after the registry created the new version
    create_model_version = MlflowClient.create_model_version
    created: list[str] = []

    def create_then_lose_the_server(self, *args, **kwargs):
        version = create_model_version(self, *args, **kwargs)
        created.append(str(version.version))
        mlflow_server.stop()
        return version

    monkeypatch.setattr(MlflowClient, "create_model_version", create_then_lose_the_server)
    with pytest.raises(ServiceUnavailable, match="MLflow at ") as failure:
        train_model(settings, examples, validation_data, dataset_version, tmp_path / "attempt-1", run_key=RUN_KEY)
    restarted.join()
    monkeypatch.undo()
    assert created, "the task got past the unreachable server at its start (retried), trained, and registered"
    first_error = f"{type(failure.value).__name__}: {str(failure.value).splitlines()[0]}"

    # the server is back: the champion never moved and its model loads
    mlflow_server.start()
    after_fault = _summary(settings)
    assert after_fault["aliases"][CHAMPION] == v1 and _model_loads(settings, CHAMPION)

    # re-running the task registers run-2 once; re-running it again registers nothing
    rerun = train_model(settings, examples, validation_data, dataset_version, tmp_path / "attempt-2", run_key=RUN_KEY)
    again = train_model(settings, examples, validation_data, dataset_version, tmp_path / "attempt-3", run_key=RUN_KEY)
    after = _summary(settings)
    assert again.model_version == rerun.model_version
    assert [v for v, key in after["run_key_tags"].items() if key == RUN_KEY] == [rerun.model_version]
    assert after["versions"] == [v1, rerun.model_version], "no second or half-made version for run-2"
    assert after["aliases"] == {CHAMPION: v1, CHALLENGER: rerun.model_version}
    assert all(_model_loads(settings, alias) for alias in after["aliases"])

    fault_record.update(
        fault="mlflow server down when training starts (back after ~1 s), then stopped right after "
              "create_model_version of the same task",
        first_attempt_error=first_error, version_created_by_failed_attempt=created,
        before=before, after_fault=after_fault, after_rerun=after,
    )
