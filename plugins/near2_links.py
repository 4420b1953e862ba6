"""near2_links: buttons on the near2 tasks that open the MLflow run, the model version and the index.

A reviewer goes from the Airflow grid to the MLflow UI in one click: the train, evaluate, gate and promote
tasks link to the MLflow run and the registered model version they worked on; create_index, each
encode_shard, finalize_index, verify_index and swap_alias link to the Elasticsearch index they built.

How: each near2 task pushes the URL of each of its links as an XCom (key ``near2_link:<link name>``,
see ``near2_tasks.airflow_support.publish_links``). The links below are *global* links (TaskFlow
``@task`` tasks all share one operator class, so links cannot be attached per task): the API server
asks every link for every task instance, and a link answers with the URL its task pushed, or ``""``
when there is none, which the UI does not show.
"""

from __future__ import annotations

import json
from typing import Any

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink

from near2_tasks.airflow_support import LINK_INDEX, LINK_MLFLOW_MODEL_VERSION, LINK_MLFLOW_RUN, link_xcom_key


def _pushed_value(ti_key: Any, key: str) -> Any:
    """The XCom ``key`` of the task instance ``ti_key``, read from the metadata DB (API server side)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.execute(
            XComModel.get_many(
                key=key, run_id=ti_key.run_id, dag_ids=ti_key.dag_id, task_ids=ti_key.task_id,
                map_indexes=ti_key.map_index,
            ).with_only_columns(XComModel.value)
        ).first()
    if row is None:
        return None
    value = row.value
    if isinstance(value, str):  # stored as JSON; older rows may hold the JSON text itself
        try:
            value = json.loads(value)
        except ValueError:
            pass
    return value


class Near2Link(BaseOperatorLink):
    """A link whose URL the task pushed under ``near2_link:<name>``."""

    name = ""

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        value = _pushed_value(ti_key, link_xcom_key(self.name))
        return value if isinstance(value, str) and value.startswith(("http://", "https://")) else ""


class MLflowRunLink(Near2Link):
    name = LINK_MLFLOW_RUN


class MLflowModelVersionLink(Near2Link):
    name = LINK_MLFLOW_MODEL_VERSION


class ElasticsearchIndexLink(Near2Link):
    name = LINK_INDEX


class Near2LinksPlugin(AirflowPlugin):
    name = "near2_links"
    global_operator_extra_links = [MLflowRunLink(), MLflowModelVersionLink(), ElasticsearchIndexLink()]
