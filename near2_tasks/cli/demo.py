"""``near2 demo``: run the ``near2_retrain`` Airflow DAG end to end on the synthetic catalog and summarise.

Everything lives under ``NEAR2_HOME``: an Airflow home with a SQLite metadata DB (``<home>/airflow``), the
MLflow SQLite store, the run directories. The DAG runs with ``dag.test()`` in a child process (its
Airflow logs go to ``<home>/demo/logs/``, the terminal only shows progress) with auto-approval on, on a
catalog and a number of training steps small enough for a few minutes on 2 CPU cores
(``demo.products``, ``demo.queries``, ``demo.max_steps``). The summary comes from what each task recorded
in its run directory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from near2_tasks.cli import settings_from
from near2_tasks.errors import Near2Error

DAG_ID = "near2_retrain"

#: What the child process runs: migrate Airflow's DB, parse the DAG, ``dag.test()``, report the outcome.
CHILD = """
import json, sys
from airflow.utils import db
db.upgradedb()
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
if bag.import_errors:
    print(json.dumps({"import_errors": {str(k): v for k, v in bag.import_errors.items()}}), file=sys.stderr)
    sys.exit(3)
run = bag.dags[sys.argv[2]].test(run_conf=json.loads(sys.argv[3]))
states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
with open(sys.argv[4], "w") as out:
    json.dump({"run_id": run.run_id, "state": str(run.state), "tasks": states}, out)
"""


def dags_folder(settings) -> Path:
    """``airflow.dags_folder``, else the ``dags/`` folder of this checkout."""
    import near2_tasks

    folder = settings.airflow.dags_folder or Path(near2_tasks.__file__).resolve().parents[1] / "dags"
    if not (Path(folder) / f"{DAG_ID}.py").is_file():
        raise Near2Error(f"{DAG_ID}.py not found in {folder}",
                         hint="run from a checkout of near2, or set airflow.dags_folder (NEAR2_AIRFLOW__DAGS_FOLDER)")
    return Path(folder)


def airflow_env(settings, demo_config: Path) -> dict[str, str]:
    """The environment for Airflow commands on the demo's Airflow home (also written to ``env.sh``)."""
    folder = dags_folder(settings)
    return {
        "AIRFLOW_HOME": str(settings.home / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(folder),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(folder.parent / "plugins"),
        "AIRFLOW__CORE__PARALLELISM": "4",
        "NEAR2_HOME": str(settings.home),
        "NEAR2_CONFIG": str(demo_config),
    }


def demo_settings(settings):
    """The user's settings with the demo's sizes and choices (``demo`` section): the synthetic catalog
    (unless a catalog is configured), ``demo.max_steps`` training steps on a ``demo.val_corpus_size``
    validation corpus, ``demo.weak_positives_in_triplets``, auto-approval, and a gate that tolerates an
    NDCG@10 drop of ``demo.gate_max_drop`` (the default gate allows none)."""
    from near2_tasks.run import with_section

    demo = settings.demo
    if settings.dataset.catalog_path is None:
        settings = with_section(settings, "dataset", {"synthetic_products": demo.products,
                                                      "synthetic_queries": demo.queries})
    settings = with_section(settings, "training", {
        "max_steps": demo.max_steps, "val_corpus_size": min(settings.training.val_corpus_size, demo.val_corpus_size)})
    settings = with_section(settings, "examples", {"weak_positives_in_triplets": demo.weak_positives_in_triplets})
    overall = settings.gates.overall.model_dump()
    rule = overall["metrics"].setdefault("ndcg@10", {})
    rule["max_drop"] = max(rule.get("max_drop") or 0.0, demo.gate_max_drop)
    return with_section(settings, "gates", {"auto_approve": True, "overall": overall})


def check_elasticsearch(settings) -> None:
    from near2_tasks.serving.es_client import es_errors, make_client

    with es_errors(settings.elasticsearch.url, "the demo's health check"):
        make_client(settings).cluster.health()


def run_dag(settings, demo_config: Path, log_path: Path, echo=click.echo) -> dict[str, Any]:
    """Run near2_retrain with ``dag.test()`` in a child process; print each task as it starts."""
    env = {**os.environ, **airflow_env(settings, demo_config), "NEAR2_AIRFLOW__RETRIES": "0"}
    result_path = log_path.with_suffix(".result.json")
    result_path.unlink(missing_ok=True)
    conf = json.dumps({"config_file": str(demo_config), "auto_approve": True})
    began = time.monotonic()
    started = re.compile(r"\[DAG TEST\] starting task_id=(\w+)")
    with open(log_path, "w") as log, open(log_path) as follow:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(dags_folder(settings) / f"{DAG_ID}.py"), DAG_ID, conf, str(result_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        while True:
            finished = child.poll() is not None
            for line in follow.readlines():
                if match := started.search(line):
                    echo(f"  [{time.monotonic() - began:6.1f}s] {match.group(1)}")
            if finished:
                break
            time.sleep(0.5)
    if child.returncode != 0 or not result_path.exists():
        raise Near2Error(f"the Airflow run did not complete (exit {child.returncode})", hint=f"log: {log_path}")
    outcome = json.loads(result_path.read_text())
    outcome["wall_s"] = time.monotonic() - began
    return outcome


# ----- the summary ---------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    return "   –  " if value is None else f"{value:.4f}"


def summary_lines(settings, run_dir: Path, outcome: dict[str, Any]) -> list[str]:
    from near2_tasks.evaluate.report import EvaluationReport
    from near2_tasks.run import read_step

    lines: list[str] = []
    validation = read_step(run_dir, "validate")
    if validation:
        lines.append(f"Data: {validation['products']} products, {validation['judgments']} judgments accepted "
                     f"(dataset version {validation['dataset_version']}); report {validation['report_path']}")
    trained = read_step(run_dir, "train")
    if trained:
        lines.append(f"Trained: {trained['model_uri']} (MLflow run {trained['run_id']})")
    evaluation = read_step(run_dir, "evaluate")
    if evaluation:
        report = EvaluationReport.read_json(Path(evaluation["report"]))
        references = report.references
        columns = [("base", references.get("base"))]
        if "champion" in references:
            columns.append((references["champion"].label or "champion", references["champion"]))
        header = "  dim  " + "".join(f"{label:>14}" for label, _ in columns) + f"{'trained':>14}{'Δ vs ' + evaluation['reference']:>16}"
        lines += ["", f"NDCG@10 on {report.n_queries} held-out queries, per dimension:", header]
        reference = references[evaluation["reference"]]
        for dim in sorted(report.dims, reverse=True):
            ours = report.dims[dim].get("ndcg@10")
            theirs = reference.dims.get(dim, {}).get("ndcg@10")
            delta = "" if ours is None or theirs is None else f"{ours - theirs:+.4f}"
            cells = "".join(f"{_fmt(ref.dims.get(dim, {}).get('ndcg@10') if ref else None):>14}" for _, ref in columns)
            lines.append(f"  {dim:>4} {cells}{_fmt(ours):>14}{delta:>16}")
        lines.append(f"  (report {evaluation['report']}, plot {evaluation['plot']})")
    gate = read_step(run_dir, "gate")
    if gate:
        verdict = "PASSED" if gate["passed"] else "FAILED: not promoted"
        lines += ["", f"Gate against the {gate['reference_role']} ({gate['reference']}): {verdict}"]
        lines += [f"  - {reason}" for reason in gate["reasons"]]
    promoted = read_step(run_dir, "promote")
    if promoted:
        previous = f"v{promoted['previous_champion']}" if promoted["previous_champion"] else "none"
        lines.append(f"Champion: v{promoted['model_version']} (previous: {previous})")
    swapped, built = read_step(run_dir, "swap_alias"), read_step(run_dir, "finalize_index")
    if swapped and built:
        lines.append(f"Index: {swapped['index']} ({built['documents']} products, dims {built['dims']}); "
                     f"alias {swapped['alias']} -> it (before: {swapped['previous'] or 'nothing'})")
    smoke = read_step(run_dir, "smoke_search")
    if smoke:
        lines += ["", "Storefront queries through the alias (top 3):"]
        for answer in smoke["answers"]:
            took = f" ({answer['took_ms']:.0f} ms)" if answer.get("took_ms") is not None else ""
            lines.append(f"  {answer['query']!r} @ {answer['dim']}d{took}: " + " | ".join(answer["titles"]))
    failed = sorted(task for task, state in outcome["tasks"].items() if state in ("failed", "upstream_failed"))
    if failed:
        lines += ["", f"Failed tasks: {', '.join(failed)}"]
    return lines


def ui_lines(settings, env_file: Path) -> list[str]:
    from near2_tasks.serving.es_client import redact_url

    artifacts = settings.artifact_location
    return [
        "Open the UIs locally:",
        f"  Airflow:  source {env_file} && airflow standalone",
        "            -> http://localhost:8080 (user admin; password in "
        "$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated)",
        f"  MLflow:   {Path(sys.executable).parent / 'mlflow'} server --backend-store-uri {settings.tracking_uri} "
        f"--default-artifact-root {artifacts} --workers 1 --port 5000",
        "            -> http://127.0.0.1:5000 (the task links in Airflow point there)",
        f"  Search:   source {env_file} && near2 search 'cordless drill' --dim 64   "
        f"(Elasticsearch {redact_url(settings.elasticsearch.url)}, alias {settings.elasticsearch.alias})",
        "  Production-like stack (Postgres, Airflow, MLflow, secured Elasticsearch): docker compose up (see README).",
    ]


@click.command("demo")
@click.option("--products", type=int, default=None, help="Synthetic catalog size (default: demo.products).")
@click.option("--queries", type=int, default=None, help="Synthetic queries (default: demo.queries).")
@click.option("--max-steps", type=int, default=None, help="Training steps (default: demo.max_steps).")
@click.pass_context
def demo(ctx: click.Context, products: int | None, queries: int | None, max_steps: int | None) -> None:
    """Run the near2_retrain DAG end to end on the synthetic catalog (auto-approval) and summarise it."""
    began = time.monotonic()
    overrides = {k: v for k, v in (("products", products), ("queries", queries), ("max_steps", max_steps))
                 if v is not None}
    settings = settings_from(ctx, **({"demo": overrides} if overrides else {}))
    settings = demo_settings(settings)
    check_elasticsearch(settings)

    demo_dir = settings.home / "demo"
    (demo_dir / "logs").mkdir(parents=True, exist_ok=True)
    demo_config = demo_dir / "config.yaml"
    import yaml

    demo_config.write_text(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
    env_file = settings.home / "airflow" / "env.sh"
    env_file.parent.mkdir(parents=True, exist_ok=True)
    exports = {**airflow_env(settings, demo_config), "PATH": f"{Path(sys.executable).parent}:$PATH"}
    env_file.write_text("".join(f'export {k}="{v}"\n' for k, v in exports.items()))

    catalog = ("the synthetic catalog" if settings.dataset.catalog_path is None
               else str(settings.dataset.catalog_path))
    click.echo(f"near2 demo: {DAG_ID} on {catalog}"
               + (f" ({settings.dataset.synthetic_products} products, {settings.dataset.synthetic_queries} queries)"
                  if settings.dataset.catalog_path is None else "")
               + f", dims {settings.model.dims}, {settings.training.max_steps} training steps, auto-approval on")
    click.echo(f"  gate: NDCG@10 may drop at most {settings.gates.overall.metrics['ndcg@10'].max_drop:g} at any "
               "dimension against the champion or base model (demo.gate_max_drop; the default gate allows 0); "
               f"weak positives in triplets: {settings.examples.weak_positives_in_triplets}")
    click.echo(f"  Airflow home {settings.home / 'airflow'} (SQLite), MLflow {settings.tracking_uri}, "
               f"Elasticsearch alias {settings.elasticsearch.alias}")
    log_path = demo_dir / "logs" / f"{time.strftime('%Y%m%dT%H%M%S')}.log"
    click.echo(f"  Airflow log: {log_path}")
    outcome = run_dag(settings, demo_config, log_path)

    from near2_tasks.run import run_directory

    run_dir = run_directory(settings, DAG_ID, outcome["run_id"])
    click.echo("")
    click.echo(f"DAG run {outcome['run_id']}: {outcome['state']} in {outcome['wall_s']:.0f}s "
               f"(run directory {run_dir})")
    for line in summary_lines(settings, run_dir, outcome):
        click.echo(line)
    click.echo("")
    for line in ui_lines(settings, env_file):
        click.echo(line)
    click.echo(f"\nnear2 demo finished in {time.monotonic() - began:.0f}s")
    if outcome["state"] != "success":
        raise Near2Error(f"the DAG run ended {outcome['state']}", hint=f"see the Airflow log {log_path}")


COMMANDS = [demo]
