"""near2_retrain and near2_reindex run end to end with ``dag.test()``: the real Airflow (SQLite), MLflow
(SQLite), the real Elasticsearch, the tiny encoder and a tiny synthetic catalog.

One successful retrain is shared by the module (it takes most of the time); the other tests start from
the state it left: a champion serving behind the alias.
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.tiny_model import TINY_DIMS

pytestmark = pytest.mark.slow

RETRAIN_TASKS = ["validate", "mine_examples", "train", "evaluate", "gate", "wait_for_approval", "promote",
                 "create_index", "encode_shard", "finalize_index", "verify_index", "swap_alias", "smoke_search"]


class Pipeline:
    """The settings of this module's runs, written to a YAML file that each DAG run is pointed at."""

    def __init__(self, settings, directory: Path) -> None:
        self.settings = settings
        self.directory = directory

    def config_file(self, name: str = "base", **section_overrides: dict[str, Any]) -> str:
        data = self.settings.model_dump(mode="json")
        for section, values in section_overrides.items():
            data[section] = {**data[section], **values}
        path = self.directory / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)

    def run(self, dag_id: str, conf: dict[str, Any]):
        from airflow.dag_processing.dagbag import DagBag

        from tests.conftest import REPO

        bag = DagBag(dag_folder=str(REPO / "dags" / f"{dag_id}.py"))
        assert bag.import_errors == {}
        return bag.dags[dag_id].test(run_conf=conf)


@pytest.fixture(scope="module")
def pipeline(airflow_db, es_url, es_client, tiny_model_dir, tmp_path_factory):
    from near2_tasks.config import load_settings

    directory = tmp_path_factory.mktemp("retrain-dag")
    alias = f"test-dag-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as env:
        # only this module's config file decides (a NEAR2_HOME exported by `make test` must not leak in) ...
        for name in [n for n in os.environ if n.startswith("NEAR2_") and n != "NEAR2_ES_URL"]:
            env.delenv(name)
        # ... and a failing task fails the test at once instead of waiting for retries
        env.setenv("NEAR2_AIRFLOW__RETRIES", "0")
        settings = load_settings(
            home=str(directory / "home"),
            model={"base_model": str(tiny_model_dir), "dims": TINY_DIMS},
            dataset={"synthetic_products": 300, "synthetic_queries": 60},
            elasticsearch={"url": es_url, "alias": alias},
            training={"max_steps": 4, "learning_rate": 1e-3, "eval_steps": 4},
            # a few steps of a random tiny encoder move NDCG by noise at some dimension: the passing runs
            # use a lenient gate (the rules themselves are the gates module's tests); the strict run below fails it
            gates={"overall": {"metrics": {"ndcg@10": {"max_drop": 0.5}}}},
        )
        yield Pipeline(settings, directory)
    es_client.indices.delete(index=f"{alias}-*", ignore_unavailable=True, allow_no_indices=True)


@pytest.fixture(scope="module")
def first_run(pipeline):
    """A passing retrain with auto-approval on a fresh home: the first champion and the first index."""
    dagrun = pipeline.run("near2_retrain", {"config_file": pipeline.config_file(), "auto_approve": True})
    return dagrun


def _states(dagrun) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dagrun.get_task_instances()}


def _serving(settings) -> tuple[str | None, dict[str, Any]]:
    from near2_tasks.serving.es_client import make_client
    from near2_tasks.serving.alias import current_target, meta_of

    client = make_client(settings)
    target = current_target(client, settings.elasticsearch.alias)
    return target, (meta_of(client, target) if target else {})


def _champion(settings) -> str | None:
    from near2_tasks.promote.gates import current_champion

    champion = current_champion(settings)
    return None if champion is None else str(champion.version)


def _versions(settings) -> list:
    from near2_tasks.models.registry import client as mlflow_client

    return mlflow_client(settings).search_model_versions(f"name='{settings.mlflow.registered_model}'")


def _run_dir(settings, dagrun) -> Path:
    from near2_tasks.run import run_directory

    return run_directory(settings, dagrun.dag_id, dagrun.run_id)


def test_retrain_serves_the_new_champion(pipeline, first_run):
    from near2_tasks.run import read_step
    from near2_tasks.serving.search import search

    settings = pipeline.settings
    states = _states(first_run)
    assert str(first_run.state) == "success", states
    assert set(states) == set(RETRAIN_TASKS)
    # auto-approval: the wait is skipped, everything else ran
    assert states.pop("wait_for_approval") == "skipped"
    assert set(states.values()) == {"success"}, states

    trained = read_step(_run_dir(settings, first_run), "train")
    assert _champion(settings) == trained["model_version"]
    target, meta = _serving(settings)
    assert target == read_step(_run_dir(settings, first_run), "swap_alias")["index"]
    assert target.startswith(f"{settings.elasticsearch.alias}-v{trained['model_version']}-")
    assert meta["model_uri"] == f"models:/{settings.mlflow.registered_model}/{trained['model_version']}"
    assert meta["dims"] == TINY_DIMS and "verified_at" in meta

    for dim in TINY_DIMS:
        response = search(settings, "deck stain", k=5, dim=dim)
        assert response.index == target and response.model_version == trained["model_version"]
        assert len(response.hits) == 5


def test_near2_gate_decides_as_the_dags_gate_on_the_same_version(pipeline, first_run, tmp_path):
    """`near2 gate` runs the DAG's validate, evaluate and gate steps: on the version the DAG gated, with the
    same data, it evaluates the same test queries and reaches the same decision, number for number."""
    import json

    from click.testing import CliRunner

    from near2_tasks.cli import cli
    from near2_tasks.run import read_step

    settings = pipeline.settings
    run_dir = _run_dir(settings, first_run)
    dag_gate, trained = read_step(run_dir, "gate"), read_step(run_dir, "train")
    assert dag_gate["reference_role"] == "base"  # the first run: no champion before it
    result = CliRunner().invoke(cli, ["--config", pipeline.config_file(), "gate", "--version",
                                      trained["model_version"], "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    # now the version is the champion itself, so the CLI's reference is the base model again
    cli_decision = json.loads((tmp_path / "gate.json").read_text())
    dag_decision = json.loads(Path(dag_gate["decision"]).read_text())
    assert cli_decision == dag_decision
    assert cli_decision["checks"] and cli_decision["status"] == dag_gate["status"] == "pass"
    cli_report = json.loads((tmp_path / "report.json").read_text())
    dag_report = json.loads(Path(read_step(run_dir, "evaluate")["report"]).read_text())
    assert cli_report["dims"] == dag_report["dims"] and cli_report["n_queries"] == dag_report["n_queries"]


def test_task_links_open_mlflow_and_the_index(pipeline, first_run):
    """What the API server shows as extra links: the plugin's links, filled from each task's XComs."""
    from airflow.models.serialized_dag import SerializedDagModel
    from airflow.utils.session import create_session

    from near2_tasks.airflow_support import LINK_INDEX, LINK_MLFLOW_MODEL_VERSION, LINK_MLFLOW_RUN
    from near2_tasks.run import read_step

    run_dir = _run_dir(pipeline.settings, first_run)
    trained, built = read_step(run_dir, "train"), read_step(run_dir, "finalize_index")
    with create_session() as session:
        dag = SerializedDagModel.get_dag("near2_retrain", session=session)
        tis = {ti.task_id: ti for ti in first_run.get_task_instances(session=session)}

        def links(task_id: str) -> dict[str, str | None]:
            task = dag.get_task(task_id)
            return {name: task.get_extra_links(tis[task_id], name) or None for name in task.extra_links}

        for task_id in ("train", "evaluate", "gate", "promote"):
            found = links(task_id)
            assert found[LINK_MLFLOW_RUN].endswith(f"/runs/{trained['run_id']}"), task_id
            assert found[LINK_MLFLOW_MODEL_VERSION].endswith(
                f"/models/{pipeline.settings.mlflow.registered_model}/versions/{trained['model_version']}"), task_id
        for task_id in ("create_index", "encode_shard", "finalize_index"):
            assert links(task_id)[LINK_INDEX].endswith(f"/{built['index']}"), task_id
        assert links("validate") == {name: None for name in links("validate")}  # nothing to open


def test_steps_rerun_after_a_failure_converge(pipeline, first_run):
    """Re-running steps of a finished run registers no second version and duplicates no document."""
    from near2_tasks.run import read_step
    from near2_tasks.promote import step as promote_step
    from near2_tasks.serving import step as serving_step
    from near2_tasks.train import step as train_step
    from near2_tasks.airflow_support import build_context
    from near2_tasks.serving.es_client import make_client

    settings = pipeline.settings
    ctx = build_context({"config_file": pipeline.config_file(), "auto_approve": True}, first_run.run_id,
                        "near2_retrain")
    run_dir = ctx.run_dir
    validation, examples = read_step(run_dir, "validate"), read_step(run_dir, "mine_examples")
    first = read_step(run_dir, "train")
    versions_before = len(_versions(settings))

    again = train_step.train(ctx, validation, examples)
    assert again["model_version"] == first["model_version"]
    promoted = promote_step.promote(ctx, again)
    assert promoted["moved"] is False
    built = serving_step.build_index(ctx, validation, promoted)
    assert built["index"] == read_step(run_dir, "swap_alias")["index"]  # the same index, finished again
    serving_step.verify_index(ctx, validation, built)
    serving_step.swap_alias(ctx, built)

    assert len(_versions(settings)) == versions_before
    assert make_client(settings).count(index=built["index"])["count"] == validation["products"]
    assert _serving(settings)[0] == built["index"]


def test_reindex_only_rebuilds_when_needed(pipeline, first_run):
    from near2_tasks.run import read_step

    settings = pipeline.settings
    target_before, _ = _serving(settings)
    config = pipeline.config_file()

    unneeded = pipeline.run("near2_reindex", {"config_file": config})
    states = _states(unneeded)
    assert str(unneeded.state) == "success", states
    assert states["reindex_needed"] == "success" and states["create_index"] == states["encode_shard"] == "skipped", states
    assert _serving(settings)[0] == target_before

    forced = pipeline.run("near2_reindex", {"config_file": config, "force": True})
    assert str(forced.state) == "success", _states(forced)
    target, meta = _serving(settings)
    assert target != target_before == read_step(_run_dir(settings, forced), "swap_alias")["previous"]
    assert meta["model_version"] == _champion(settings)


def _approve_when_gated(settings, newer_than: int, stop: threading.Event) -> None:
    """A reviewer: approve the first version after ``newer_than`` as soon as its gate passed."""
    from near2_tasks.conventions import TAG_GATE
    from near2_tasks.promote.promotion import set_approval

    while not stop.wait(0.5):
        for version in _versions(settings):
            if int(version.version) > newer_than and version.tags.get(TAG_GATE) == "pass":
                set_approval(settings, version.version, approved=True)
                return


def test_run_waits_for_a_reviewer_then_serves(pipeline, first_run, monkeypatch):
    """Without auto-approval the run waits (reschedule-mode sensor) until the MLflow tag says approved."""
    from near2_tasks.run import read_step

    settings = pipeline.settings
    champion_before = _champion(settings)
    # read when the DAG file is parsed: poke every second, and give up (fail) after two minutes
    monkeypatch.setenv("NEAR2_AIRFLOW__APPROVAL_POKE_INTERVAL_S", "1")
    monkeypatch.setenv("NEAR2_AIRFLOW__APPROVAL_TIMEOUT_S", "120")
    newest = max(int(v.version) for v in _versions(settings))
    stop = threading.Event()
    reviewer = threading.Thread(target=_approve_when_gated, args=(settings, newest, stop), daemon=True)
    reviewer.start()
    try:
        dagrun = pipeline.run("near2_retrain", {"config_file": pipeline.config_file(), "auto_approve": False})
    finally:
        stop.set()
        reviewer.join(timeout=10)
    states = _states(dagrun)
    assert str(dagrun.state) == "success", states
    assert set(states.values()) == {"success"}, states  # the wait itself succeeded, nothing was skipped
    run_dir = _run_dir(settings, dagrun)
    assert read_step(run_dir, "approval")["state"] == "approved"
    version = read_step(run_dir, "train")["model_version"]
    assert version != champion_before and _champion(settings) == version
    assert read_step(run_dir, "promote")["previous_champion"] == champion_before
    assert _serving(settings)[1]["model_version"] == version


def test_failed_gate_changes_neither_champion_nor_alias(pipeline, first_run):
    from near2_tasks.conventions import TAG_GATE
    from near2_tasks.run import read_step
    from near2_tasks.models.registry import client as mlflow_client

    settings = pipeline.settings
    champion_before, serving_before = _champion(settings), _serving(settings)
    # an NDCG@10 floor no model reaches: the new challenger must fail its gate
    config = pipeline.config_file("strict", gates={"overall": {"metrics": {"ndcg@10": {"floor": 1.01}}}})
    dagrun = pipeline.run("near2_retrain", {"config_file": config, "auto_approve": True})

    states = _states(dagrun)
    assert str(dagrun.state) == "success", states  # "not promoted" is an outcome, not an error
    ran = RETRAIN_TASKS[:RETRAIN_TASKS.index("gate") + 1]
    assert all(states[t] == "success" for t in ran), states
    assert all(states[t] == "skipped" for t in RETRAIN_TASKS if t not in ran), states

    assert _champion(settings) == champion_before
    assert _serving(settings) == serving_before
    gate = read_step(_run_dir(settings, dagrun), "gate")
    assert gate["passed"] is False and any("1.01" in reason for reason in gate["reasons"])
    version = mlflow_client(settings).get_model_version(settings.mlflow.registered_model, gate["model_version"])
    assert version.tags[TAG_GATE] == "fail"
    assert "FAILED" in version.description


def _drop_handlers_on_closed_streams() -> None:
    """Logging handlers left by earlier tests on streams that are closed now (``near2`` CLI runs under
    click's CliRunner configure logging on its temporary stderr): the forked task would inherit them and
    print '--- Logging error ---' to stderr, which is not what a worker's task process has."""
    import logging

    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in list(getattr(logger, "handlers", [])):
            stream = getattr(handler, "stream", None)
            if stream is not None and getattr(stream, "closed", False):
                logger.removeHandler(handler)


def _supervised_log(dagrun, task_id: str, log_path: Path) -> list[dict[str, Any]]:
    """Run ``task_id`` of ``dagrun`` again the way a real worker does (``supervise_task``: a forked task
    process whose stdout/stderr and logs the supervisor records, stderr lines at ERROR), against the
    in-process Execution API on this session's metadata DB; returns the task log's records."""
    import json

    from airflow.executors.workloads import BundleInfo
    from airflow.sdk.api.datamodels._generated import TaskInstance as TaskInstanceSDK
    from airflow.sdk.execution_time.supervisor import InProcessTestSupervisor, supervise_task
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState

    with create_session() as session:
        ti = dagrun.get_task_instance(task_id, session=session)
        ti.try_number += 1
        ti.state = TaskInstanceState.QUEUED
        session.merge(ti)
        session.commit()
        sdk_ti = TaskInstanceSDK(id=ti.id, task_id=ti.task_id, dag_id=ti.dag_id, run_id=ti.run_id,
                                 try_number=ti.try_number, map_index=ti.map_index, dag_version_id=ti.dag_version_id)
    _drop_handlers_on_closed_streams()  # earlier tests' CliRunner streams, inherited by the forked task
    client = InProcessTestSupervisor._api_client(dag=True)
    exit_code = supervise_task(ti=sdk_ti, bundle_info=BundleInfo(name="dags-folder"),
                               dag_rel_path=f"{dagrun.dag_id}.py", token="", client=client, log_path=str(log_path))
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    assert exit_code == 0, [r for r in records if r.get("level") in ("error", "critical")]
    return records


@pytest.mark.parametrize("task_id", ["train", "evaluate"])
def test_a_task_log_has_no_error_line_when_nothing_failed(pipeline, first_run, task_id, tmp_path):
    """Under a real worker, a library's progress bar on stderr became one ERROR line per update."""
    records = _supervised_log(first_run, task_id, tmp_path / f"{task_id}.log")
    errors = [r for r in records if r.get("level") in ("error", "critical")]
    assert errors == [], errors[:5]
    assert any(str(r.get("logger")).startswith("near2_tasks.") and r.get("level") == "info" for r in records), \
        sorted({str(r.get("logger")) for r in records})  # near2's own lines stay, at INFO
