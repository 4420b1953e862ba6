"""What the DAG files need from Airflow, kept out of them so they stay thin.

* :func:`run_step` is the body of every DAG task: it builds the run's settings (config file, Airflow
  connections, run params), calls the step of :mod:`near2_tasks.run`, publishes the step's links
  for the ``near2_links`` plugin, and turns expected failures into the right Airflow outcome: bad input
  fails at once (retrying cannot fix it), an unreachable service is retried.
* :func:`library_progress_bars_off`: inside a task, third-party progress bars are off (Airflow records a
  task's stderr at ERROR, so every tqdm update read as an error); near2's own progress lines are log
  records at INFO and stay.
* :func:`connection_overrides` reads the Airflow connections ``near2_elasticsearch`` and ``near2_mlflow``
  (from the metadata DB or ``AIRFLOW_CONN_NEAR2_ELASTICSEARCH`` / ``AIRFLOW_CONN_NEAR2_MLFLOW``); without
  them the ``NEAR2_*`` settings apply. Nothing is hard-coded.

Airflow is imported inside the functions: :mod:`near2_tasks.run` and the CLI use this module's
constants without paying for Airflow.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from near2_tasks.errors import Near2Error, ServiceUnavailable

log = logging.getLogger(__name__)

ES_CONNECTION_ID = "near2_elasticsearch"
MLFLOW_CONNECTION_ID = "near2_mlflow"

#: XCom keys under which a task publishes the URLs its extra links open (one key per link name).
LINK_XCOM_PREFIX = "near2_link:"
LINK_MLFLOW_RUN = "MLflow run"
LINK_MLFLOW_MODEL_VERSION = "MLflow model version"
LINK_INDEX = "Elasticsearch index"
LINK_NAMES = (LINK_MLFLOW_RUN, LINK_MLFLOW_MODEL_VERSION, LINK_INDEX)


def link_xcom_key(name: str) -> str:
    return f"{LINK_XCOM_PREFIX}{name}"


# ----- connections ---------------------------------------------------------------------------------
def _get_connection(conn_id: str) -> Any | None:
    """The Airflow connection, or None when it is not defined (or Airflow is not there)."""
    try:
        from airflow.sdk import Connection
        from airflow.sdk.exceptions import AirflowNotFoundException
    except ImportError:  # pragma: no cover - near2 without Airflow
        return None
    try:
        return Connection.get(conn_id)
    except AirflowNotFoundException:
        return None


def _base_url(conn: Any, default_scheme: str, default_port: int | None) -> str:
    """``scheme://host:port``; the scheme is taken from the extra ``scheme``, the schema field or the
    connection type (``AIRFLOW_CONN_X='https://host:443'`` has type https), whichever says http(s)."""
    host = conn.host or ""
    if "://" in host:  # the host field already holds a URL
        return host.rstrip("/")
    candidates = ((conn.extra_dejson or {}).get("scheme"), conn.schema, conn.conn_type)
    scheme = next((c for c in candidates if c in ("http", "https")), default_scheme)
    port = conn.port or default_port
    return f"{scheme}://{host}:{port}" if port else f"{scheme}://{host}"


def elasticsearch_overrides(conn: Any) -> dict[str, Any]:
    """Settings of the ``elasticsearch`` section from a connection.

    host/port and the scheme (see :func:`_base_url`; default http, port 9200) give the URL, or the extra
    ``url``; login/password basic auth; extras ``api_key``, ``ca_certs``, ``alias`` override the matching settings.
    """
    extra = conn.extra_dejson or {}
    values: dict[str, Any] = {"url": extra.get("url") or _base_url(conn, "http", 9200)}
    if conn.login:
        values["username"] = conn.login
        values["password"] = conn.password
    for key in ("api_key", "ca_certs", "alias"):
        if extra.get(key):
            values[key] = extra[key]
    return values


def mlflow_overrides(conn: Any) -> dict[str, Any]:
    """Settings of the ``mlflow`` section from a connection: extra ``tracking_uri`` (any URI MLflow
    takes, e.g. ``sqlite:////data/mlflow.db``) or host/port/schema of a tracking server; extras
    ``artifact_location``, ``experiment``, ``registered_model``. Login/password: see
    :func:`export_mlflow_credentials`."""
    extra = conn.extra_dejson or {}
    values: dict[str, Any] = {"tracking_uri": extra.get("tracking_uri") or _base_url(conn, "http", 5000)}
    for key in ("artifact_location", "experiment", "registered_model"):
        if extra.get(key):
            values[key] = extra[key]
    return values


def export_mlflow_credentials(conn: Any) -> None:
    """The MLflow client reads its user from ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``: set them from the
    connection's login for this task's process, unless the environment already has them."""
    if conn.login and not os.environ.get("MLFLOW_TRACKING_USERNAME"):
        os.environ["MLFLOW_TRACKING_USERNAME"] = conn.login
        os.environ["MLFLOW_TRACKING_PASSWORD"] = conn.password or ""


def connection_overrides() -> dict[str, dict[str, Any]]:
    """Settings overrides from the near2 Airflow connections that exist (none: empty dict)."""
    overrides: dict[str, dict[str, Any]] = {}
    if (conn := _get_connection(ES_CONNECTION_ID)) is not None:
        overrides["elasticsearch"] = elasticsearch_overrides(conn)
    if (conn := _get_connection(MLFLOW_CONNECTION_ID)) is not None:
        overrides["mlflow"] = mlflow_overrides(conn)
        export_mlflow_credentials(conn)
    return overrides


# ----- the body of every DAG task ------------------------------------------------------------------
def build_context(params: Mapping[str, Any], run_id: str, dag_id: str):
    """The pipeline's :class:`~near2_tasks.run.StepContext` for this task: settings from the run's
    config file, then the Airflow connections, then the run params."""
    from near2_tasks.run import RunParams, StepContext, settings_for_run

    run_params = RunParams.from_mapping(params)
    settings = settings_for_run(run_params, connection_overrides())
    return StepContext(settings=settings, params=run_params, run_id=run_id, dag_id=dag_id)


def run_step(step: str, context: Mapping[str, Any], **inputs: Any) -> Any:
    """Run the step ``step`` (:data:`near2_tasks.run.STEPS`) for the task whose Airflow ``context`` is
    given; return its result.

    ``Near2Error`` (bad data, bad config, a failed check) fails the task without retries;
    ``ServiceUnavailable`` (Elasticsearch or MLflow down) is raised as is, so Airflow retries it;
    ``SkipRest`` (a deliberate end, e.g. a rejected challenger) skips this task and what follows.
    """
    from airflow.sdk.exceptions import AirflowFailException

    from near2_tasks.run import SkipRest, step_function

    ctx = build_context(context["params"], context["run_id"], context["dag"].dag_id)
    try:
        with library_progress_bars_off():
            result = step_function(step)(ctx, **inputs)
    except ServiceUnavailable:
        raise
    except SkipRest as exc:
        skip(str(exc))
    except Near2Error as exc:
        log.error("%s failed: %s", step, exc)
        raise AirflowFailException(f"{step}: {exc}") from exc
    if isinstance(result, Mapping):
        publish_links(context, result.get("links") or {})
    return result


@contextmanager
def library_progress_bars_off() -> Iterator[None]:
    """While a task step runs: every tqdm bar is created disabled, and Python warnings become log records
    (WARNING) instead of stderr text.

    Airflow's task supervisor logs each line a task writes to stderr at ERROR: the bars of
    transformers ("Loading weights", "Writing model shards"), sentence-transformers ("Batches"), the
    trainer, MLflow ("Downloading artifacts") and Great Expectations each became a red ERROR line, and a
    reviewer scanning a healthy run for errors found dozens. The libraries' own switches are read when
    they are imported (``TQDM_DISABLE``, ``HF_HUB_DISABLE_PROGRESS_BARS``), too late in a task process that
    imported them already, so the one class they all build on, ``tqdm.std.tqdm``, is told ``disable=True``
    for the duration. near2's own progress (training steps with ETA, encoding, bulk load) goes through
    ``logging`` at INFO and is unaffected."""
    import tqdm.std

    cls = tqdm.std.tqdm
    original = cls.__dict__["__init__"]
    bound_init = cls.__init__

    @functools.wraps(bound_init)
    def disabled_init(self, *args, **kwargs):
        kwargs["disable"] = True
        bound_init(self, *args, **kwargs)

    def log_warning(message, category, filename, lineno, file=None, line=None) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        logging.getLogger("py.warnings").warning("%s", text)

    # swapped and restored by hand: logging.captureWarnings(True) is a no-op when capture is already on
    # (Airflow turns it on), and captureWarnings(False) would then switch the caller's capture off
    previous_showwarning = warnings.showwarning
    cls.__init__ = disabled_init
    warnings.showwarning = log_warning
    try:
        yield
    finally:
        cls.__init__ = original
        warnings.showwarning = previous_showwarning


def publish_links(context: Mapping[str, Any], links: Mapping[str, str]) -> None:
    """Push each link URL as its own XCom (key ``near2_link:<name>``) for the ``near2_links`` plugin."""
    ti = context["ti"]
    for name, url in links.items():
        if url:
            ti.xcom_push(key=link_xcom_key(name), value=str(url))


def skip(reason: str) -> None:
    """End this task as skipped, with the reason in its log (downstream tasks skip too)."""
    from airflow.sdk.exceptions import AirflowSkipException

    log.warning(reason)
    raise AirflowSkipException(reason)


# ----- what both DAG files declare ----------------------------------------------------------------
def dag_params(reindex: bool = False) -> dict[str, Any]:
    """Run-level params shown in the trigger form; ``None`` means "from settings" (see RunParams)."""
    from airflow.sdk import Param

    params: dict[str, Any] = {
        "config_file": Param(None, type=["null", "string"],
                             description="YAML settings file for this run (default: NEAR2_CONFIG)."),
        "catalog_path": Param(None, type=["null", "string"],
                              description="Catalog file; empty: dataset.catalog_path, else the synthetic catalog."),
        "judgments_path": Param(None, type=["null", "string"], description="Graded judgments file."),
        "dataset_format": Param(None, type=["null", "string"],
                                description="csv, parquet, jsonl, homedepot, wands, esci, ... (default: config)."),
        "dims": Param(None, type=["null", "array"], items={"type": "integer"},
                      description="Nested dimensions, descending, the model's full dimension first."),
    }
    if reindex:
        params["force"] = Param(False, type="boolean",
                                description="Rebuild even when the alias already serves the champion.")
    else:
        params.update({
            "epochs": Param(None, type=["null", "number"], description="Training epochs (default: config)."),
            "max_steps": Param(None, type=["null", "integer"], description="Stop training after N steps."),
            "auto_approve": Param(None, type=["null", "boolean"],
                                  description="Promote on a passed gate without a reviewer (default: "
                                              "gates.auto_approve)."),
        })
    return params


def publish_index(validation: Any, model: Any, swap_outlets: list | None = None, shards: int = 1) -> Any:
    """The serving half both DAGs end with, declared inside the calling DAG: ``create_index`` (the new
    versioned index, empty, ``model`` in its ``_meta``) → ``encode_shard`` mapped over the shards
    ``0 .. shards-1`` (each encodes its slice of the catalog and bulk-loads it into that index; a failed
    shard retries alone) → ``finalize_index`` (waits for every shard) → ``verify_index`` → ``swap_alias``
    (``swap_outlets``: the assets it updates) → ``smoke_search``. ``shards``: ``airflow.encode_shards``
    as read when the DAG file is parsed. Returns the ``smoke_search`` task's output."""
    from airflow.sdk import task

    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")

    @task
    def create_index(validation: dict, model: dict, **context):
        return run_step("create_index", context, validation=validation, model=model, shards=shards)

    @task(map_index_template="shard {{ near2_shard }}")
    def encode_shard(validation: dict, created: dict, shard: int, **context):
        from airflow.sdk import get_current_context

        get_current_context()["near2_shard"] = f"{shard} of {created['shards']}"  # its name in the grid
        return run_step("encode_shard", context, validation=validation, created=created, shard=shard)

    @task
    def finalize_index(validation: dict, created: dict, loaded: Any, **context):
        # by position up to its length: iterating the lazy sequence asks for one more item and logs its 404
        results = [loaded[i] for i in range(len(loaded))]
        return run_step("finalize_index", context, validation=validation, created=created, loaded=results)

    @task
    def verify_index(validation: dict, built: dict, **context):
        run_step("verify_index", context, validation=validation, built=built)
        return built

    @task(outlets=list(swap_outlets or []))
    def swap_alias(built: dict, **context):
        return run_step("swap_alias", context, built=built)

    @task
    def smoke_search(validation: dict, swapped: dict, **context):
        return run_step("smoke_search", context, validation=validation, swapped=swapped)

    created = create_index(validation, model)
    loaded = encode_shard.partial(validation=validation, created=created).expand(shard=list(range(shards)))
    verified = verify_index(validation, finalize_index(validation, created, loaded))
    return smoke_search(validation, swap_alias(verified))


def default_args(settings: Any) -> dict[str, Any]:
    """Owner, retries, retry delay and execution timeout of every task, from ``settings.airflow``."""
    from datetime import timedelta

    cfg = settings.airflow
    return {
        "owner": cfg.owner,
        "retries": cfg.retries,
        "retry_delay": timedelta(seconds=cfg.retry_delay_s),
        "retry_exponential_backoff": 2.0,  # each retry waits about twice as long as the one before
        "execution_timeout": timedelta(seconds=cfg.task_timeout_s),
    }
