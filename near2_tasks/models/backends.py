"""Fast inference backends for the encoder: ONNX Runtime (fp32 or int8) and OpenVINO (fp32 or bf16).

Why our own export instead of sentence-transformers' ``backend="onnx"`` / ``"openvino"``: those need
``optimum-onnx`` (every release caps ``transformers<4.58``) or ``optimum-intel`` (2.0 caps
``transformers<5.1``, later releases cap ``huggingface-hub<1.22`` while transformers 5.23 needs
``>=1.31``); neither installs with the pinned stack. Plain ``onnxruntime`` and ``openvino`` do, so:

1. :func:`export_artifact` traces the *whole* sentence-transformers pipeline (transformer, pooling,
   normalisation, any dense layer) into one ONNX graph with ``torch.onnx.export``, optionally quantises
   its weight matrices to int8 (dynamic quantisation), and refuses the result unless its embeddings
   match the fp32 model's (mean cosine >= :data:`MIN_MEAN_COSINE`).
2. :func:`export_backend` does that for a registered model version and logs the artefact to the
   version's MLflow run under ``backends/<variant>`` (``variant`` = ``onnx``, ``onnx-int8`` or
   ``openvino``), so serving never exports at request time.
3. :func:`load_inference_encoder` gives catalog encoding and the search service the encoder that
   ``model.backend`` / ``model.quantize`` in config ask for. Its result works with
   :func:`near2_tasks.models.embeddings.encode` and ``encode_cached`` like a ``SentenceTransformer``.

Speed comes from the runtime (fused kernels, int8 matrix products on VNNI CPUs), from sorting texts by
token count so each batch pads little, and from using every core the process may run on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from near2_tasks.errors import Near2Error
from near2_tasks.models.refs import local_model_key, parse_runs_uri

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from near2_tasks.config import Settings

    from near2_tasks.models.settings import ModelSettings

log = logging.getLogger(__name__)

Backend = Literal["torch", "onnx", "openvino"]
Quantize = Literal["none", "int8"]

#: An exported backend is accepted only if its embeddings keep this mean cosine to the fp32 model's.
MIN_MEAN_COSINE = 0.99
#: ... and no single probe text falls below this.
MIN_COSINE = 0.97
#: Where the artefact lives inside the model version's MLflow run.
ARTIFACT_ROOT = "backends"
#: Model-version tag naming each exported variant's artefact URI: ``backend.onnx-int8``.
VERSION_TAG_PREFIX = "backend."
META_FILE = "near2_backend.json"
ONNX_FILE = "model.onnx"
OPENVINO_FILE = "model.xml"
FORMAT_VERSION = 1
GRAPH_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


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


def cpu_threads(requested: int | None = None) -> int:
    """``requested``, or every core this process may run on (respects taskset/cgroup affinity)."""
    if requested:
        return requested
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ----- export ---------------------------------------------------------------------------------


def _require(module: str, extra: str) -> Any:
    import importlib

    if module == "openvino":
        openvino_telemetry_off()
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Near2Error(
            f"the {extra} backend needs the Python package {module!r}, which is not installed",
            hint="install from requirements.lock, or set model.backend: torch",
        ) from exc


def openvino_telemetry_off() -> None:
    """``import openvino`` (it imports its converter, ``openvino.tools.ovc``) and each conversion report to
    Google Analytics unless a consent file under ``~/intel`` says no or ``CI=true``; near2 never reports
    usage. Offline it also hung: the sender is a forked child of the multi-threaded process, which
    deadlocked in ``getaddrinfo`` and kept pytest from exiting. Before OpenVINO is first imported,
    ``openvino_telemetry`` is made unimportable, so the converter takes the no-op ``telemetry_stub`` it
    ships for installs without that package; if it was imported already, its modules are pointed there."""
    import sys

    if "openvino.tools.ovc" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # import raises ImportError
        return
    from openvino.tools.ovc import convert_impl, telemetry_stub, telemetry_utils

    convert_impl.tm = telemetry_stub
    telemetry_utils.tm = telemetry_stub


def export_onnx(model: SentenceTransformer, path: Path) -> Path:
    """Trace the full sentence-transformers pipeline into one ONNX graph.

    Inputs are the tokenizer's ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the
    tokenizer makes them), dynamic in batch and sequence length; the output ``sentence_embedding`` is
    what ``model.encode`` returns before the final normalisation (which the runtime wrapper applies).
    """
    import torch

    _require("onnx", "onnx")
    if not hasattr(model, "tokenizer") or model.tokenizer is None:
        raise Near2Error("only text encoders with a tokenizer can be exported to ONNX")
    probe = model.tokenizer(["a short title", "a somewhat longer product title for tracing"],
                            padding=True, return_tensors="pt")
    input_names = [name for name in GRAPH_INPUTS if name in probe]

    class SentencePipeline(torch.nn.Module):
        def __init__(self, st_model: SentenceTransformer) -> None:
            super().__init__()
            self.st_model = st_model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.st_model(dict(zip(input_names, tensors)))["sentence_embedding"]

    was_device = model.device
    model.to("cpu").eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in input_names}
    dynamic["sentence_embedding"] = {0: "batch"}
    import warnings

    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about shape-dependent Python branches in the attention-mask code; they
        # take the same branch for every padded batch of an encoder (checked by the cosine guard).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            SentencePipeline(model), tuple(probe[name] for name in input_names), str(path),
            input_names=input_names, output_names=["sentence_embedding"], dynamic_axes=dynamic,
            opset_version=17, dynamo=False,
        )
    model.to(was_device)
    return path


def quantize_int8(onnx_path: Path, out_path: Path) -> Path:
    """Dynamic int8 quantisation of the weight matrices, per output channel (ONNX Runtime tooling)."""
    _require("onnxruntime", "onnx")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Only MatMuls with a constant weight are quantised; activations are quantised per batch at run time.
    # Per-channel scales matter: per-tensor int8 dropped the mean cosine to ~0.96 (BENCHMARKS.md).
    quantize_dynamic(str(onnx_path), str(out_path), weight_type=QuantType.QInt8, per_channel=True)
    return out_path


def convert_openvino(onnx_path: Path, xml_path: Path) -> Path:
    """OpenVINO IR (``.xml`` + ``.bin``) from an ONNX file, so loading skips the ONNX front end."""
    ov = _require("openvino", "openvino")
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)
    return xml_path


def export_artifact(model: SentenceTransformer, spec: BackendSpec, out_dir: Path,
                    probe_texts: list[str] | None = None, source: str = "") -> Path:
    """Write a self-contained backend artefact (graph, tokenizer, ``near2_backend.json``) to ``out_dir``.

    Raises Near2Error if the exported encoder's embeddings drift from the fp32 model's on
    ``probe_texts`` (default: titles of the synthetic catalog) beyond :data:`MIN_MEAN_COSINE`.
    """
    from near2_tasks.models.embeddings import encode, model_dimension

    if spec.backend == "torch":
        raise Near2Error("the torch backend has nothing to export", hint="pick backend onnx or openvino")
    if spec.quantize == "int8" and spec.backend != "onnx":
        raise Near2Error(f"int8 is offered with backend onnx only, not {spec.backend}",
                         hint="use backend onnx with quantize int8, or quantize none (BENCHMARKS.md)")
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        fp32 = export_onnx(model, Path(scratch) / ONNX_FILE)
        graph = quantize_int8(fp32, Path(scratch) / "model-int8.onnx") if spec.quantize == "int8" else fp32
        if spec.backend == "onnx":
            shutil.copy(graph, out_dir / ONNX_FILE)
            graph_file = ONNX_FILE
        else:
            convert_openvino(graph, out_dir / OPENVINO_FILE)
            graph_file = OPENVINO_FILE
    model.tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    meta = {
        "format_version": FORMAT_VERSION,
        "backend": spec.backend,
        "quantize": spec.quantize,
        "variant": spec.variant,
        "graph_file": graph_file,
        "dimension": model_dimension(model),
        "max_seq_length": int(model.max_seq_length or 512),
        "source": source,
        "runtime_versions": _runtime_versions(spec.backend),
        "export_seconds": round(time.perf_counter() - started, 2),
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    texts = probe_texts or default_probe_texts()
    reference = encode(model, texts)
    candidate = load_artifact(out_dir).encode_normalized(texts)
    cosines = np.sum(reference * candidate, axis=1)
    meta["probe"] = {"texts": len(texts), "cosine_mean": float(cosines.mean()),
                     "cosine_min": float(cosines.min())}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    if cosines.mean() < MIN_MEAN_COSINE or cosines.min() < MIN_COSINE:
        raise Near2Error(
            f"the {spec.variant} export drifts from the fp32 model: mean cosine {cosines.mean():.4f} "
            f"(min {cosines.min():.4f}) on {len(texts)} probe texts, need >= {MIN_MEAN_COSINE} "
            f"(min >= {MIN_COSINE})",
            hint="use model.quantize: none for this model",
        )
    return out_dir


def default_probe_texts(n: int = 256) -> list[str]:
    """Product titles and queries from the synthetic catalog: deterministic, offline, catalog-like."""
    from near2_tasks.data.synthetic import generate_catalog

    catalog = generate_catalog(n_products=n, n_queries=max(8, n // 8), seed=11)
    return list(catalog.products["title"]) + list(catalog.judgments["query"].drop_duplicates())


def _runtime_versions(backend: str) -> dict[str, str]:
    import torch

    versions = {"torch": torch.__version__}
    module = {"onnx": "onnxruntime", "openvino": "openvino"}[backend]
    versions[module] = getattr(_require(module, backend), "__version__", "?")
    return versions


# ----- runtime ----------------------------------------------------------------------------------


class ExportedEncoder:
    """Encodes texts with an exported graph: tokenise, sort by length, pad per batch, run, normalise.

    Implements the two methods :mod:`near2_tasks.models.embeddings` needs (``encode_normalized``,
    ``get_embedding_dimension``); ``variant`` keeps ``encode_cached`` from mixing its vectors with
    the fp32 model's.
    """

    def __init__(self, directory: Path, threads: int | None = None) -> None:
        from transformers import AutoTokenizer

        self.directory = Path(directory)
        self.meta: dict[str, Any] = json.loads((self.directory / META_FILE).read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise Near2Error(f"backend artefact {directory} has format {self.meta.get('format_version')}, "
                             f"this code reads {FORMAT_VERSION}", hint="export it again")
        self.variant: str = self.meta["variant"]
        self.threads = cpu_threads(threads)
        self.max_seq_length: int = self.meta["max_seq_length"]
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.directory / "tokenizer"))
        self.pad_id = self.tokenizer.pad_token_id or 0
        # the search service encodes from several threads at once: a fast tokenizer called with truncation
        # settings is not safe to share between concurrent calls (it may raise "Already borrowed")
        self._tokenizer_lock = threading.Lock()

    def get_embedding_dimension(self) -> int:
        return int(self.meta["dimension"])

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def encode_normalized(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Full-dimension, L2-normalised float32 embeddings, one row per text, in input order."""
        out = np.zeros((len(texts), self.get_embedding_dimension()), dtype=np.float32)
        if not texts:
            return out
        with self._tokenizer_lock:
            ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_seq_length,
                                 return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        order = np.argsort([len(row) for row in ids], kind="stable")
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(ids[i]) for i in rows)
            input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for r, i in enumerate(rows):
                input_ids[r, :len(ids[i])] = ids[i]
                mask[r, :len(ids[i])] = 1
            feeds = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(mask)}
            out[rows] = self._run(feeds)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1.0, norms)


class OnnxRuntimeEncoder(ExportedEncoder):
    def __init__(self, directory: Path, threads: int | None = None) -> None:
        super().__init__(directory, threads)
        ort = _require("onnxruntime", "onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.directory / self.meta["graph_file"]), options,
                                            providers=["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {k: v for k, v in feeds.items() if k in self.input_names})[0]


class OpenVinoEncoder(ExportedEncoder):
    """OpenVINO on CPU. ``precision`` ``auto`` lets OpenVINO pick: bf16 on CPUs with native bf16
    (AVX512-BF16 / AMX), else fp32; ``variant`` then ends in ``-bf16`` so cached vectors stay apart."""

    def __init__(self, directory: Path, threads: int | None = None, precision: str = "auto") -> None:
        super().__init__(directory, threads)
        ov = _require("openvino", "openvino")
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY"}
        if precision != "auto":
            config["INFERENCE_PRECISION_HINT"] = {"fp32": "f32", "bf16": "bf16"}[precision]
        compiled = ov.Core().compile_model(str(self.directory / self.meta["graph_file"]), "CPU", config)
        self.precision = "bf16" if compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16 else "fp32"
        if self.precision == "bf16":
            self.variant += "-bf16"
        self.compiled = compiled
        self._requests = threading.local()
        self.output = compiled.outputs[0]
        self.input_names = {name for port in compiled.inputs for name in port.get_names()}

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        # one infer request per thread: a request is not safe to share between concurrent infer() calls (the
        # search service's threadpool did, and one in ~2,400 queries at 8 clients failed with "array is too
        # big"), and its output buffer is overwritten by the next call on it, so the result is copied out
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self.compiled.create_infer_request()
        result = request.infer({k: v for k, v in feeds.items() if k in self.input_names})
        return np.array(result[self.output], copy=True)


def load_artifact(directory: Path, threads: int | None = None, precision: str = "auto") -> ExportedEncoder:
    """The runtime encoder for an exported artefact directory (see :func:`export_artifact`)."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise Near2Error(f"{directory} is not a backend artefact (no {META_FILE})",
                         hint="export one with `near2 backend export`")
    backend = json.loads(meta_path.read_text()).get("backend")
    if backend == "onnx":
        return OnnxRuntimeEncoder(directory, threads)
    if backend == "openvino":
        return OpenVinoEncoder(directory, threads, precision)
    raise Near2Error(f"backend artefact {directory} names an unknown backend {backend!r}")


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
