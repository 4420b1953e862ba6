"""The DAG files parse cleanly, declare the task policy, stay light at parse time; the plugin loads;
connections and run params reach the settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest

from tests.conftest import REPO

DAG_IDS = ("near2_retrain", "near2_reindex")
HEAVY_MODULES = ("torch", "sentence_transformers", "transformers", "mlflow", "great_expectations",
                 "elasticsearch", "sklearn", "datasets")


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_dag_files_import_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert set(DAG_IDS) <= set(dagbag.dag_ids)


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_every_dag_declares_tags_owner_retries_timeouts_and_docs(dagbag, dag_id):
    from near2_tasks.config import load_settings

    policy = load_settings().airflow
    dag = dagbag.dags[dag_id]
    assert "near2" in dag.tags
    assert dag.doc_md and dag_id in dag.doc_md
    assert not dag.catchup
    for task in dag.tasks:
        assert task.owner == policy.owner, task.task_id
        assert task.retries == policy.retries >= 1, task.task_id
        assert task.retry_delay == timedelta(seconds=policy.retry_delay_s), task.task_id
        assert task.execution_timeout == timedelta(seconds=policy.task_timeout_s), task.task_id


def test_retrain_wiring_gate_approval_and_swap(dagbag):
    from airflow.sdk import AssetOrTimeSchedule

    dag = dagbag.dags["near2_retrain"]
    chain = ["validate", "mine_examples", "train", "evaluate", "gate", "wait_for_approval", "promote",
             "create_index", "encode_shard", "finalize_index", "verify_index", "swap_alias", "smoke_search"]
    for before, after in zip(chain, chain[1:]):
        assert before in dag.get_task(after).upstream_task_ids, f"{before} -> {after}"
    # a failed gate skips everything after it, whatever their trigger rules
    gate = dag.get_task("gate")
    assert gate.ignore_downstream_trigger_rules
    # promotion runs after an approval, or after the approval wait was skipped (auto-approval) ...
    assert dag.get_task("promote").trigger_rule == "none_failed"
    # ... and the wait does not hold a worker slot between pokes
    sensor = dag.get_task("wait_for_approval")
    assert sensor.mode == "reschedule" and sensor.timeout > sensor.poke_interval > 0
    # the swap marks the champion asset, which near2_reindex listens to
    assert [o.name for o in dag.get_task("swap_alias").outlets] == ["near2_champion"]
    assert isinstance(dag.timetable, AssetOrTimeSchedule)
    assert set(dag.params) >= {"dims", "epochs", "max_steps", "auto_approve", "catalog_path", "judgments_path"}


def test_reindex_wiring(dagbag):
    dag = dagbag.dags["near2_reindex"]
    assert dag.get_task("reindex_needed").ignore_downstream_trigger_rules
    assert "verify_index" in dag.get_task("swap_alias").upstream_task_ids
    assert "force" in dag.params and "epochs" not in dag.params


PARSE_PROBE = """
import json, runpy, sys
schedules = [repr(runpy.run_path(path).get("SCHEDULE")) for path in sys.argv[1:]]
print(json.dumps({"modules": sorted({name.split(".")[0] for name in sys.modules}), "schedules": schedules}))
"""


@pytest.fixture(scope="module")
def parsed_in_subprocess() -> dict:
    """Parse both DAG files in a fresh interpreter, with the cron set through a NEAR2_ variable."""
    env = {**os.environ, "NEAR2_AIRFLOW__SCHEDULE": "15 4 * * *"}
    paths = [str(REPO / "dags" / f"{dag_id}.py") for dag_id in DAG_IDS]
    out = subprocess.run([sys.executable, "-c", PARSE_PROBE, *paths], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_parsing_the_dag_files_imports_no_heavy_library(parsed_in_subprocess):
    loaded = set(parsed_in_subprocess["modules"])
    assert "near2_tasks" in loaded and "airflow" in loaded
    assert not loaded & set(HEAVY_MODULES), sorted(loaded & set(HEAVY_MODULES))


def test_schedule_comes_from_settings(parsed_in_subprocess):
    retrain_schedule = parsed_in_subprocess["schedules"][0]
    assert "15 4 * * *" in retrain_schedule and "near2_catalog" in retrain_schedule


def test_plugin_registers_the_links():
    from airflow import plugins_manager

    from near2_tasks.airflow_support import LINK_NAMES

    names = {link.name for link in plugins_manager.get_global_operator_extra_links()}
    assert set(LINK_NAMES) <= names


# ----- connections and run params -----------------------------------------------------------------
def test_connections_from_environment_override_settings(monkeypatch, tmp_path):
    from near2_tasks.airflow_support import build_context

    monkeypatch.setenv("NEAR2_HOME", str(tmp_path))
    monkeypatch.setenv("NEAR2_ELASTICSEARCH__URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AIRFLOW_CONN_NEAR2_ELASTICSEARCH", json.dumps({
        "conn_type": "elasticsearch", "host": "search.example", "port": 9243, "schema": "https",
        "login": "near2", "password": "s3cret-pass", "extra": {"alias": "shop"}}))
    monkeypatch.setenv("AIRFLOW_CONN_NEAR2_MLFLOW", json.dumps({
        "conn_type": "http", "host": "mlflow.example", "port": 8443, "schema": "https", "login": "near2-pipeline",
        "password": "mlflow-secret"}))
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    ctx = build_context({}, "manual__1", "near2_retrain")
    es = ctx.settings.elasticsearch
    assert (es.url, es.username, es.password, es.alias) == ("https://search.example:9243", "near2", "s3cret-pass",
                                                            "shop")
    assert ctx.settings.tracking_uri == "https://mlflow.example:8443"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == (
        "near2-pipeline", "mlflow-secret")


def test_uri_connections_keep_their_scheme(monkeypatch, tmp_path):
    from near2_tasks.airflow_support import build_context

    monkeypatch.setenv("NEAR2_HOME", str(tmp_path))
    monkeypatch.setenv("AIRFLOW_CONN_NEAR2_ELASTICSEARCH", "https://search.example:9243")
    monkeypatch.setenv("AIRFLOW_CONN_NEAR2_MLFLOW", json.dumps({
        "conn_type": "http", "extra": {"tracking_uri": f"sqlite:///{tmp_path / 'shared.db'}"}}))
    ctx = build_context({}, "manual__1", "near2_retrain")
    assert ctx.settings.elasticsearch.url == "https://search.example:9243"
    assert ctx.settings.tracking_uri == f"sqlite:///{tmp_path / 'shared.db'}"


def test_without_connections_the_near2_settings_apply(monkeypatch, tmp_path):
    from near2_tasks.airflow_support import build_context

    monkeypatch.delenv("AIRFLOW_CONN_NEAR2_ELASTICSEARCH", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_NEAR2_MLFLOW", raising=False)
    monkeypatch.setenv("NEAR2_HOME", str(tmp_path))
    monkeypatch.setenv("NEAR2_ELASTICSEARCH__URL", "http://127.0.0.1:9333")
    ctx = build_context({}, "manual__1", "near2_retrain")
    assert ctx.settings.elasticsearch.url == "http://127.0.0.1:9333"
    assert ctx.settings.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_run_params_override_config_and_environment(monkeypatch, tmp_path):
    from near2_tasks.airflow_support import build_context

    monkeypatch.setenv("NEAR2_HOME", str(tmp_path))
    monkeypatch.setenv("NEAR2_TRAINING__MAX_STEPS", "500")
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  dims: [384, 128, 32]\ngates:\n  auto_approve: false\n")
    ctx = build_context({"config_file": str(config), "dims": [384, 64], "max_steps": 7, "auto_approve": True,
                         "epochs": None}, "scheduled__2026", "near2_retrain")
    assert ctx.settings.model.dims == [384, 64]
    assert ctx.settings.training.max_steps == 7
    assert ctx.settings.gates.auto_approve is True
    assert ctx.run_dir == tmp_path / "runs" / "near2_retrain" / "scheduled__2026"


@pytest.mark.parametrize("params, problem", [
    ({"dims": [32, 64]}, "descending"),
    ({"max_step": 3}, "unknown run parameter"),
    ({"epochs": -1}, "epochs"),
])
def test_bad_run_params_fail_with_one_line(monkeypatch, tmp_path, params, problem):
    from near2_tasks.airflow_support import build_context
    from near2_tasks.errors import Near2Error

    monkeypatch.setenv("NEAR2_HOME", str(tmp_path))
    with pytest.raises(Near2Error, match=problem) as info:
        build_context(params, "manual__1", "near2_retrain")
    assert "\n" not in str(info.value)


def test_library_progress_bars_are_off_inside_a_step_and_back_after(capsys, caplog):
    import logging
    import warnings

    from tqdm.auto import tqdm

    from near2_tasks.airflow_support import library_progress_bars_off

    # Airflow's logging config (loaded by earlier tests) may stop "py.warnings" from propagating to the
    # root logger that caplog listens on: listen on it directly
    py_warnings = logging.getLogger("py.warnings")
    py_warnings.addHandler(caplog.handler)
    py_warnings.disabled, level = False, py_warnings.level
    py_warnings.setLevel(logging.WARNING)
    with library_progress_bars_off(), warnings.catch_warnings():
        warnings.simplefilter("always")  # earlier tests may have shown a warning from this line already
        for _ in tqdm(range(3), desc="Batches", file=None):
            pass
        warnings.warn("a library's warning", FutureWarning)
        logging.getLogger("near2_tasks.train.trainer").info("step 1/4 ETA 0:00:03")
    py_warnings.removeHandler(caplog.handler)
    py_warnings.setLevel(level)
    assert capsys.readouterr().err == ""
    assert "a library's warning" in caplog.text and "step 1/4 ETA" in caplog.text
    for _ in tqdm(range(3), desc="Batches"):
        pass
    assert "Batches" in capsys.readouterr().err  # restored: outside tasks (a terminal) bars still show
