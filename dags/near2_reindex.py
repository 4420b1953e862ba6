"""near2_reindex: rebuild the serving index with the current champion (no training).

Thin on purpose: every task calls one step (``near2_tasks.run.STEPS``: each stage package's ``step.py``).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Asset, dag, task

from near2_tasks.airflow_support import dag_params, default_args, publish_index, run_step
from near2_tasks.config import load_settings

SETTINGS = load_settings()

#: Marked when a new champion serves (near2_retrain's swap_alias), or by hand after `near2 promote`.
CHAMPION = Asset(name="near2_champion", uri="near2://champion")

DOC = """
### near2_reindex

Rebuilds the serving index with the **current champion**, e.g. after a catalog update without
retraining, or after the champion changed outside `near2_retrain` (rollback, manual promotion).

1. **validate** the catalog (and judgments, if configured).
2. **reindex_needed**: does the alias already serve the champion on this catalog? Then the run ends
   here (trigger with `force: true` to rebuild anyway).
3. **create_index** → **encode_shard** (mapped, `airflow.encode_shards` shards) → **finalize_index** →
   **verify_index** → **swap_alias** → **smoke_search**, as in `near2_retrain`.

Runs when triggered by hand and when the `near2_champion` asset is updated.
"""


@dag(
    dag_id="near2_reindex",
    schedule=CHAMPION,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["near2", "serving", "mlops"],
    default_args=default_args(SETTINGS),
    params=dag_params(reindex=True),
    doc_md=DOC,
)
def near2_reindex():
    @task
    def validate(**context):
        return run_step("validate", context)

    @task.short_circuit
    def reindex_needed(validation: dict, **context):
        champion = run_step("reindex_needed", context, validation=validation)
        return champion if champion["needed"] else False  # False: skip the rest

    validation = validate()
    champion = reindex_needed(validation)
    publish_index(validation, champion, shards=SETTINGS.airflow.encode_shards)


near2_reindex()
