"""MLflow tracking and Model Registry: where trained encoders are logged, versioned and found again.

* :func:`configure_mlflow` points MLflow at the configured store (explicit tracking URI and experiment
  artifact location: nothing depends on the current directory) and fails with a clear
  :class:`~near2_tasks.errors.ServiceUnavailable` when a tracking server does not answer after retries.
* :func:`log_model` logs an encoder with the ``sentence_transformers`` flavour: it reloads as the same
  ``SentenceTransformer``; as a pyfunc it takes ``truncate_dim`` as a parameter, so any nested
  dimension can be served from one logged model.
* :func:`register_model` adds a registry version with the tags ``dataset_version``, ``dims``
  (comma-separated, descending, e.g. ``"384,256,128,64,32"``) and ``git_commit``, and points the
  ``challenger`` alias at it. It never touches ``champion`` (that is promotion's job).

Idempotency: a ``run_key`` (e.g. the Airflow dag_run id) is stored as the version tag ``run_key``, set
*last*, after the alias, as a commit marker. Registering again with the same key returns that version
instead of creating a duplicate. If registration fails part-way, the half-made version is deleted; if
even that fails (the tracking server went away), the next registration under the same key deletes it,
found by the tag ``run_key_started`` that every version gets when it is created.
"""

from __future__ import annotations

import logging
import subprocess
import time
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from near2_tasks.conventions import (CHALLENGER, TAG_DATASET_VERSION, TAG_DIMS, TAG_GIT_COMMIT, ModelUri,
                                    parse_model_uri)
from near2_tasks.errors import Near2Error, ServiceUnavailable

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models.model import ModelInfo
    from sentence_transformers import SentenceTransformer

    from near2_tasks.config import Settings

log = logging.getLogger(__name__)

#: Version tag holding the idempotency key of the registration (e.g. the Airflow dag_run id).
TAG_RUN_KEY = "run_key"
#: Version tag set at creation, before the alias and ``run_key``: finds versions a failed registration left.
TAG_RUN_KEY_STARTED = "run_key_started"
#: Name of the logged model inside its run.
MODEL_NAME_IN_RUN = "model"
#: Distributions a served model needs; pinned to the versions it was trained with.
MODEL_REQUIREMENTS = ("sentence-transformers", "transformers", "torch", "numpy", "pandas")
#: A few queries stored with the model as its input example.
INPUT_EXAMPLE = ["cordless drill 20v", "led light bulb 60 watt", "kitchen faucet pull down"]


# ----- tracking -------------------------------------------------------------------------------
def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def wait_for_tracking_server(uri: str, retries: int, backoff_s: float) -> None:
    """Return once ``<uri>/health`` answers; retry with doubling delays, then raise ServiceUnavailable."""
    import httpx

    delay = backoff_s
    problem = ""
    for attempt in range(retries + 1):
        try:
            response = httpx.get(f"{uri.rstrip('/')}/health", timeout=5.0)
            if response.status_code < 500:
                return
            problem = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if attempt < retries:
            log.warning("MLflow tracking server %s not reachable (%s); retrying in %.2fs", uri, problem, delay)
            time.sleep(delay)
            delay *= 2
    raise ServiceUnavailable(
        f"MLflow tracking server {uri} is unreachable after {retries + 1} attempts ({problem})",
        hint="start it (mlflow server ...) or point mlflow.tracking_uri / NEAR2_MLFLOW__TRACKING_URI at a running one",
    )


def configure_mlflow(settings: Settings) -> str:
    """Point MLflow (tracking and registry) at the configured store; return the experiment id.

    The experiment is created on first use with ``settings.artifact_location`` as artifact root; with
    a tracking server and no ``mlflow.artifact_location`` configured, the server's own artifact store.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = settings.tracking_uri
    if _is_http(uri):
        wait_for_tracking_server(uri, settings.mlflow.connect_retries, settings.mlflow.retry_backoff_s)
    elif uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    name = settings.mlflow.experiment
    try:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            location = settings.mlflow.artifact_location if _is_http(uri) else settings.artifact_location
            experiment_id = mlflow.create_experiment(name, artifact_location=location)
        mlflow.set_experiment(experiment_id=experiment_id)
    except MlflowException as exc:
        raise ServiceUnavailable(
            f"MLflow at {uri} refused experiment {name!r}: {str(exc).splitlines()[0]}",
            hint="check mlflow.tracking_uri and that the store is writable",
        ) from exc
    return experiment_id


def client(settings: Settings) -> MlflowClient:
    """A client bound to the configured store (not to whatever the global MLflow state is)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


def current_git_commit(repo: Path | None = None) -> str:
    """The commit of the code that runs, or ``"unknown"`` outside a git checkout."""
    repo = repo or Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----- logging the model ----------------------------------------------------------------------
def pip_requirements() -> list[str]:
    """Exact pins of what the logged model needs (skips MLflow's slow requirement inference)."""
    return [f"{name}=={importlib_metadata.version(name)}" for name in MODEL_REQUIREMENTS]


def model_signature(full_dim: int):
    """Texts in, float32 vectors out; ``truncate_dim`` picks the nested dimension (default: full)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, -1))]),
        params=ParamSchema([
            ParamSpec("truncate_dim", "long", full_dim),
            ParamSpec("normalize_embeddings", "boolean", True),
        ]),
    )


def log_model(model: SentenceTransformer, full_dim: int, metadata: dict[str, Any] | None = None) -> ModelInfo:
    """Log ``model`` into the active MLflow run (``sentence_transformers`` flavour)."""
    import mlflow

    return mlflow.sentence_transformers.log_model(
        model,
        name=MODEL_NAME_IN_RUN,
        signature=model_signature(full_dim),
        input_example=INPUT_EXAMPLE,
        pip_requirements=pip_requirements(),
        metadata=metadata,
    )


# ----- the registry ---------------------------------------------------------------------------
def model_uri(settings: Settings, version: str | int) -> str:
    """``models:/near2-encoder/<version>``."""
    return f"models:/{settings.mlflow.registered_model}/{version}"


def find_version_by_run_key(settings: Settings, run_key: str) -> ModelVersion | None:
    """The version registered under ``run_key`` (completely: the tag is set last), if any."""
    from mlflow.exceptions import MlflowException

    name = settings.mlflow.registered_model
    escaped = run_key.replace("'", "\\'")
    try:
        found = client(settings).search_model_versions(f"name = '{name}' and tags.{TAG_RUN_KEY} = '{escaped}'")
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
            return None
        raise
    return min(found, key=lambda v: int(v.version)) if found else None


def register_model(
    settings: Settings,
    source_uri: str,
    run_id: str,
    dataset_version: str,
    dims: list[int],
    run_key: str | None = None,
    git_commit: str | None = None,
    model_id: str | None = None,
) -> ModelVersion:
    """Register ``source_uri`` as a new version, tag it and make it the ``challenger``.

    With a ``run_key`` already registered, return that version and change nothing.
    """
    from mlflow.exceptions import MlflowException

    if run_key and (existing := find_version_by_run_key(settings, run_key)) is not None:
        log.info("run_key %r is already registered as version %s; not registering again", run_key,
                 existing.version)
        return existing
    mlflow_client = client(settings)
    name = settings.mlflow.registered_model
    try:
        mlflow_client.create_registered_model(name)
    except MlflowException as exc:
        if "ALREADY_EXISTS" not in str(exc.error_code):
            raise
    if model_id is None and source_uri.startswith("models:/m-"):  # a logged model (MLflow 3): name it,
        model_id = source_uri.removeprefix("models:/")  # a tracking server checks source against model_id
    tags = {
        TAG_DATASET_VERSION: dataset_version,
        TAG_DIMS: ",".join(str(d) for d in dims),
        TAG_GIT_COMMIT: git_commit or current_git_commit(),
    }
    if run_key:
        _delete_unfinished(settings, run_key)
        tags[TAG_RUN_KEY_STARTED] = run_key
    version = mlflow_client.create_model_version(name, source=source_uri, run_id=run_id, tags=tags,
                                                 model_id=model_id)
    try:
        mlflow_client.set_registered_model_alias(name, CHALLENGER, version.version)
        if run_key:
            mlflow_client.set_model_version_tag(name, version.version, TAG_RUN_KEY, run_key)
    except BaseException:
        mlflow_client.delete_model_version(name, version.version)
        raise
    return mlflow_client.get_model_version(name, version.version)


def _delete_unfinished(settings: Settings, run_key: str) -> None:
    """Delete versions an earlier registration under ``run_key`` created but never finished (no commit tag
    ``run_key``), so that a re-run leaves exactly one version for the run."""
    mlflow_client = client(settings)
    name = settings.mlflow.registered_model
    escaped = run_key.replace("'", "\\'")
    query = f"name = '{name}' and tags.{TAG_RUN_KEY_STARTED} = '{escaped}'"
    for version in mlflow_client.search_model_versions(query):
        if version.tags.get(TAG_RUN_KEY) != run_key:
            log.warning("deleting version %s: an earlier registration under run_key %r did not finish",
                        version.version, run_key)
            mlflow_client.delete_model_version(name, version.version)


def get_version(settings: Settings, alias_or_version: str | int) -> ModelVersion:
    """A version of the registered model by number (``3``, ``"3"``) or alias (``"challenger"``)."""
    from mlflow.exceptions import MlflowException

    name = settings.mlflow.registered_model
    ref = str(alias_or_version)
    try:
        if ref.isdigit():
            return client(settings).get_model_version(name, ref)
        return client(settings).get_model_version_by_alias(name, ref)
    except MlflowException as exc:
        raise Near2Error(
            f"registered model {name!r} has no version {ref!r}",
            hint="train one with `near2 train`, or list versions in the MLflow UI",
        ) from exc


def resolve_model_uri(settings: Settings, uri: str | ModelUri) -> ModelVersion:
    """The registered version a ``models:/`` URI names now: its number, or where its alias or ``latest``
    points. Any registry failure is a Near2Error that names the URI."""
    from mlflow.exceptions import MlflowException

    parsed = parse_model_uri(uri) if isinstance(uri, str) else uri
    text = str(parsed or uri)
    if parsed is None or parsed.selector is None:
        raise Near2Error(f"{text!r} names no registered version",
                         hint="URIs look like models:/<name>/<version>, models:/<name>@<alias> or models:/<name>/latest")
    registry = client(settings)
    try:
        if parsed.alias:
            return registry.get_model_version_by_alias(parsed.name, parsed.alias)
        if parsed.version == "latest":
            versions = registry.search_model_versions(f"name='{parsed.name}'")
            if not versions:
                raise MlflowException(f"registered model {parsed.name!r} has no versions")
            return max(versions, key=lambda v: int(v.version))
        return registry.get_model_version(parsed.name, parsed.version)
    except MlflowException as exc:
        raise Near2Error(
            f"unknown model URI {text!r}: {str(exc).splitlines()[0]}",
            hint=f"list versions in the MLflow UI ({settings.tracking_uri}); URIs look like "
                 f"models:/{settings.mlflow.registered_model}@champion or models:/{settings.mlflow.registered_model}/3",
        ) from exc


# ----- links for people (Airflow extra links, the version description) ---------------------------------
def mlflow_ui_base(settings: Settings) -> str:
    """Where a person opens the MLflow UI: airflow.mlflow_ui_url, else an http(s) tracking URI, else the local default."""
    if settings.airflow.mlflow_ui_url:
        return settings.airflow.mlflow_ui_url.rstrip("/")
    uri = settings.tracking_uri
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return "http://127.0.0.1:5000"


def mlflow_run_url(settings: Settings, run_id: str) -> str:
    experiment_id = client(settings).get_run(run_id).info.experiment_id
    return f"{mlflow_ui_base(settings)}/#/experiments/{experiment_id}/runs/{run_id}"


def mlflow_version_url(settings: Settings, version: str | int) -> str:
    return f"{mlflow_ui_base(settings)}/#/models/{settings.mlflow.registered_model}/versions/{version}"


def load_model_from_mlflow(uri: str, device: str = "cpu", settings: Settings | None = None) -> SentenceTransformer:
    """Load a ``models:/...`` or ``runs:/...`` URI back into a ``SentenceTransformer`` on ``device``.

    Uses ``settings`` when given; otherwise the MLflow URI already set in this process, else the one the
    environment's near2 settings name (so ``load_encoder('models:/near2-encoder@champion')`` just works).
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import is_tracking_uri_set

    if settings is not None:
        configure_mlflow(settings)
    elif not is_tracking_uri_set():
        from near2_tasks.config import load_settings

        configure_mlflow(load_settings())
    try:
        model = mlflow.sentence_transformers.load_model(uri)
    except MlflowException as exc:
        raise Near2Error(f"cannot load {uri} from MLflow: {str(exc).splitlines()[0]}",
                         hint="check the model name, version or alias, and mlflow.tracking_uri") from exc
    return model.to(device)
