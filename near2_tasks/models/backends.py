"""Which inference backend encodes texts, and where its artefact comes from.

:func:`load_inference_encoder` gives catalog encoding and the search service the encoder that
``model.backend`` / ``model.quantize`` in config ask for: the ``SentenceTransformer`` itself (torch), or
an exported ONNX Runtime / OpenVINO encoder (:mod:`near2_tasks.models.backend_runtime`) from the artefact
:func:`export_backend` logged to a registered version's MLflow run under ``backends/<variant>``
(``variant`` = ``onnx``, ``onnx-int8`` or ``openvino``; so serving never exports at request time), or, for
a local or packaged model, from the export cache under ``home``. Exporting itself is
:mod:`near2_tasks.models.backend_export`. Either result works with
:func:`near2_tasks.models.embeddings.encode` and ``encode_cached`` like a ``SentenceTransformer``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from near2_tasks.errors import Near2Error
from near2_tasks.models.backend_export import export_artifact
from near2_tasks.models.backend_runtime import META_FILE, load_artifact
from near2_tasks.models.refs import local_model_key, parse_runs_uri

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from near2_tasks.config import Settings

    from near2_tasks.models.settings import ModelSettings

log = logging.getLogger(__name__)

Backend = Literal["torch", "onnx", "openvino"]
Quantize = Literal["none", "int8"]

#: Where the artefact lives inside the model version's MLflow run.
ARTIFACT_ROOT = "backends"
#: Model-version tag naming each exported variant's artefact URI: ``backend.onnx-int8``.
VERSION_TAG_PREFIX = "backend."


@dataclass(frozen=True)
class BackendSpec:
    """Which runtime runs the encoder and whether its weights are int8."""

    backend: Backend = "torch"
    quantize: Quantize = "none"

    @property
    def variant(self) -> str:
        """``onnx``, ``onnx-int8``, ``openvino``, ...: names the artefact folder in MLflow and the cache."""
        return f"{self.backend}-int8" if self.quantize == "int8" else self.backend

    @classmethod
    def from_settings(cls, settings: Settings) -> BackendSpec:
        return cls(resolved_backend(settings.model), settings.model.quantize)  # type: ignore[arg-type]


def resolved_backend(model: ModelSettings) -> str:
    """``model.backend`` with ``auto`` decided: torch when the model runs on a GPU, else openvino."""
    if model.backend != "auto":
        return model.backend
    from near2_tasks.models.embeddings import pick_device

    return "torch" if pick_device(model.device).startswith("cuda") else "openvino"


# ----- MLflow: export once per registered version, load everywhere --------------------------------


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str


def registered_version(settings: Settings, ref: str | int) -> RegisteredVersion:
    """Resolve ``3``, ``challenger``, ``models:/near2-encoder/3`` or ``models:/near2-encoder@champion``."""
    from near2_tasks.conventions import parse_model_uri
    from near2_tasks.models.registry import get_version, resolve_model_uri

    name, parsed = settings.mlflow.registered_model, parse_model_uri(str(ref))
    if parsed is not None and (parsed.name != name or parsed.selector is None):
        raise Near2Error(f"cannot use {ref!r}: expected models:/{name}/<version> or "
                         f"models:/{name}@<alias>", hint="mlflow.registered_model names the model")
    found = resolve_model_uri(settings, parsed) if parsed else get_version(settings, str(ref))
    if not found.run_id:
        raise Near2Error(f"{name} version {found.version} was registered without a run; the backend "
                         "artefact has nowhere to live", hint="register models from a training run")
    return RegisteredVersion(name, str(found.version), found.run_id)


def export_backend(settings: Settings, model_version: str | int, spec: BackendSpec | None = None) -> str:
    """Export a registered version to ``spec`` (default: config's) and log it next to the model.

    The artefact goes to the version's run under ``backends/<variant>``; the version gets the tag
    ``backend.<variant>`` = that artefact's URI. Returns the URI. Idempotent: exporting again
    replaces the files with an identical export.
    """
    from near2_tasks.models.registry import client as mlflow_client
    from near2_tasks.models.registry import load_model_from_mlflow

    spec = spec or BackendSpec.from_settings(settings)
    version = registered_version(settings, model_version)
    model_uri = f"models:/{version.name}/{version.version}"
    model = load_model_from_mlflow(model_uri, device="cpu", settings=settings)
    client = mlflow_client(settings)
    with tempfile.TemporaryDirectory() as scratch:
        local = export_artifact(model, spec, Path(scratch) / spec.variant, source=model_uri)
        client.log_artifacts(version.run_id, str(local), f"{ARTIFACT_ROOT}/{spec.variant}")
        probe = json.loads((local / META_FILE).read_text())["probe"]
    metric = spec.variant.replace("-", "_")
    client.log_metric(version.run_id, f"backend_{metric}_cosine_mean", probe["cosine_mean"])
    client.log_metric(version.run_id, f"backend_{metric}_cosine_min", probe["cosine_min"])
    uri = f"runs:/{version.run_id}/{ARTIFACT_ROOT}/{spec.variant}"
    client.set_model_version_tag(version.name, version.version, VERSION_TAG_PREFIX + spec.variant, uri)
    return uri


def backend_cache_dir(settings: Settings) -> Path:
    return settings.home / "cache" / "backends"


def _download_logged_artifact(settings: Settings, ref: str, spec: BackendSpec) -> Path | None:
    """The logged artefact of an MLflow model reference, downloaded once; None if none was logged."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    run = parse_runs_uri(ref)
    if run is not None:
        run_id = run[0]
        key = f"run-{run_id}-{spec.variant}"
    else:
        version = registered_version(settings, ref)
        run_id = version.run_id
        key = f"{version.name}-v{version.version}-{spec.variant}"
    target = backend_cache_dir(settings) / key
    if (target / META_FILE).is_file():
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=_mkdir(backend_cache_dir(settings))))
    try:
        downloaded = Path(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=f"{ARTIFACT_ROOT}/{spec.variant}", dst_path=str(staging),
            tracking_uri=settings.tracking_uri,
        ))
    except (MlflowException, OSError):
        shutil.rmtree(staging, ignore_errors=True)
        return None
    if not (downloaded / META_FILE).is_file():
        shutil.rmtree(staging, ignore_errors=True)
        return None
    _publish(downloaded, target)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _publish(source: Path, target: Path) -> None:
    """Move a finished artefact into place atomically; a concurrent writer's copy wins harmlessly."""
    try:
        source.rename(target)
    except OSError:
        if not (target / META_FILE).is_file():
            raise


def load_inference_encoder(settings: Settings, ref: str | None = None, *,
                           missing: Literal["error", "export", "torch"] = "error",
                           threads: int | None = None) -> Any:
    """The encoder that ``model.backend`` / ``model.quantize`` ask for, for ``ref`` (default: base model).

    * ``torch``: the ``SentenceTransformer`` itself (fp16/bf16 when ``model.precision`` says so).
    * ``onnx`` / ``openvino``: an :class:`ExportedEncoder` from the artefact :func:`export_backend`
      logged next to an MLflow model, or, for a local or packaged model, from the export cache under
      ``home``. When there is none, ``missing`` decides: ``"error"`` (Near2Error naming the command that
      exports it), ``"export"`` (export now, and log it for an MLflow model: for pipeline tasks), or
      ``"torch"`` (log a warning and serve the fp32 model: for the search service, which must never
      export at request time and should not go down for a missing artefact).

    Either result works with :func:`near2_tasks.models.embeddings.encode` / ``encode_cached``.
    """
    ref = ref or settings.model.base_model
    spec = BackendSpec.from_settings(settings)
    threads = threads or settings.model.threads
    if spec.backend == "torch":
        return _torch_encoder(_load_torch(settings, ref), settings, threads)
    if ref.startswith(("models:/", "runs:/")):
        directory = _download_logged_artifact(settings, ref, spec)
        if directory is None and missing == "export" and ref.startswith("models:/"):
            export_backend(settings, ref, spec)
            directory = _download_logged_artifact(settings, ref, spec)
        if directory is None:
            return _missing(settings, ref, missing, f"{ref} has no logged {spec.variant} backend artefact",
                            f"run `near2 backend export --model {ref}` after registering it, "
                            "or set model.backend: torch")
        return load_artifact(directory, threads, settings.model.precision)
    target = backend_cache_dir(settings) / f"{local_model_key(ref)}-{spec.variant}"
    if not (target / META_FILE).is_file():
        if missing != "export":
            return _missing(settings, ref, missing,
                            f"no {spec.variant} export of {ref} in {backend_cache_dir(settings)}",
                            f"export it once with `near2 backend export --model {ref}`")
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=_mkdir(backend_cache_dir(settings))))
        export_artifact(_load_torch(settings, ref, device="cpu"), spec, staging / spec.variant, source=ref)
        _publish(staging / spec.variant, target)
        shutil.rmtree(staging, ignore_errors=True)
    return load_artifact(target, threads, settings.model.precision)


def _missing(settings: Settings, ref: str, missing: str, message: str, hint: str) -> Any:
    """What :func:`load_inference_encoder` does without an artefact: fail, or fall back to torch fp32."""
    if missing != "torch":
        raise Near2Error(message, hint=hint)
    log.warning("%s: encoding with torch instead (%s)", message, hint)
    return _load_torch(settings, ref)


def _load_torch(settings: Settings, ref: str, device: str | None = None) -> SentenceTransformer:
    """The fp32 model on ``device`` (default ``model.device``); MLflow references read the configured store
    (not the process-global one)."""
    from near2_tasks.models.embeddings import load_encoder, pick_device

    device = device or settings.model.device
    if ref.startswith(("models:/", "runs:/")):
        from near2_tasks.models.registry import load_model_from_mlflow

        return load_model_from_mlflow(ref, device=pick_device(device), settings=settings)
    return load_encoder(ref, device=device)


def _torch_encoder(model: SentenceTransformer, settings: Settings, threads: int | None) -> SentenceTransformer:
    """Apply ``model.precision`` (fp16/bf16 halve the weights; on CPU only bf16 is sensible)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    precision = settings.model.precision
    if precision == "auto":
        precision = "fp16" if model.device.type == "cuda" else "fp32"
    if precision == "fp16":
        model.half()
    elif precision == "bf16":
        model.to(torch.bfloat16)
    return model
