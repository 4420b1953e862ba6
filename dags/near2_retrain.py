"""near2_retrain: validate → mine → train → evaluate → gate → approve → promote → index → verify → swap → smoke.

Thin on purpose: every task calls one step (``near2_tasks.run.STEPS``: each stage package's ``step.py``) through
``near2_tasks.airflow_support.run_step``; heavy libraries are imported inside the steps, never while
the scheduler parses this file.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, PokeReturnValue, dag, task

from near2_tasks.airflow_support import dag_params, default_args, publish_index, run_step, skip
from near2_tasks.config import load_settings

SETTINGS = load_settings()

#: Marked by whoever updates the catalog (an upstream DAG's outlet, the UI, or the REST API).
CATALOG = Asset(name="near2_catalog", uri="near2://catalog")
#: Marked when a new champion serves; near2_reindex listens (and finds nothing to do after this DAG).
CHAMPION = Asset(name="near2_champion", uri="near2://champion")

if SETTINGS.airflow.schedule:
    SCHEDULE = AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(SETTINGS.airflow.schedule, timezone="UTC"), assets=CATALOG)
else:
    SCHEDULE = CATALOG

DOC = """
### near2_retrain

Retrains the near2 encoder on the current catalog and judgments and, if it is at least as good as the
champion at **every** served dimension, serves it.

1. **validate** the catalog and judgments (Great Expectations); bad rows are quarantined, a bad batch stops the run.
2. **mine_examples**: split by query, mine strong/weak positives and hard/random negatives.
3. **train** with the NEAR² objective; MLflow run; the model is registered as `challenger`.
4. **evaluate** challenger, champion and base model per dimension on the held-out queries.
5. **gate**: per-dimension checks against the champion (or the base model). A failed gate ends the
   run as *not promoted* (reason in this task's log and in MLflow tags); nothing after it runs and
   neither the champion nor the alias moves.
6. **wait_for_approval**: polls the version's MLflow tag `approval` (`approved` / `rejected`) in
   reschedule mode; skipped when `auto_approve` is on.
7. **promote** the challenger to `champion`.
8. **create_index** → **encode_shard** (one mapped task per shard, `airflow.encode_shards`; each encodes
   its slice of the catalog and loads it into the new index, a failed shard retries alone) →
   **finalize_index** → **verify_index** → **swap_alias**: a new versioned index, checked, then the alias
   moves atomically, once every shard loaded. **smoke_search** queries it at several dimensions.

Trigger with params to override the config for one run (dims, epochs, max_steps, auto_approve,
dataset paths). Schedule: cron `airflow.schedule` (UTC) **or** an update of the `near2_catalog` asset.
Connections `near2_elasticsearch` / `near2_mlflow` override the `NEAR2_*` settings when defined.
"""


@dag(
    dag_id="near2_retrain",
    schedule=SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["near2", "training", "mlops"],
    default_args=default_args(SETTINGS),
    params=dag_params(),
    doc_md=DOC,
)
def near2_retrain():
    @task
    def validate(**context):
        return run_step("validate", context)

    @task
    def mine_examples(validation: dict, **context):
        return run_step("mine_examples", context, validation=validation)

    @task(queue=SETTINGS.airflow.train_queue)  # 'gpu' in the compose cluster profile (README "Scaling out")
    def train(validation: dict, examples: dict, **context):
        return run_step("train", context, validation=validation, examples=examples)

    @task
    def evaluate(validation: dict, examples: dict, trained: dict, **context):
        return run_step("evaluate", context, validation=validation, examples=examples, trained=trained)

    @task.short_circuit
    def gate(trained: dict, evaluation: dict, **context):
        return run_step("gate", context, trained=trained, evaluation=evaluation)["passed"]

    @task.sensor(
        mode="reschedule",
        poke_interval=SETTINGS.airflow.approval_poke_interval_s,
        timeout=SETTINGS.airflow.approval_timeout_s,
    )
    def wait_for_approval(trained: dict, **context):
        status = run_step("approval_status", context, trained=trained)
        if status["state"] == "auto":
            skip(f"auto-approval is on: v{trained['model_version']} approved without a reviewer")
        return PokeReturnValue(is_done=status["state"] != "pending", xcom_value=status["state"])

    # runs after an approval, or when the approval wait was skipped for auto-approval
    @task(trigger_rule="none_failed")
    def promote(trained: dict, **context):
        return run_step("promote", context, trained=trained)

    validation = validate()
    examples = mine_examples(validation)
    trained = train(validation, examples)
    evaluation = evaluate(validation, examples, trained)
    approval = wait_for_approval(trained)
    gate(trained, evaluation) >> approval
    promoted = promote(trained)
    approval >> promoted
    publish_index(validation, promoted, swap_outlets=[CHAMPION], shards=SETTINGS.airflow.encode_shards)


near2_retrain()
