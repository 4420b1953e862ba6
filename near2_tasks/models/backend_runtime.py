"""Running an exported encoder: ONNX Runtime (fp32 or int8) and OpenVINO (fp32 or bf16) on CPU.

An artefact directory written by :func:`near2_tasks.models.backend_export.export_artifact` holds the graph,
the tokenizer and ``near2_backend.json``; :func:`load_artifact` opens it as an :class:`ExportedEncoder`,
which works with :func:`near2_tasks.models.embeddings.encode` and ``encode_cached`` like a
``SentenceTransformer``. Which artefact config asks for, and where it comes from, is
:func:`near2_tasks.models.backends.load_inference_encoder`.

Speed comes from the runtime (fused kernels, int8 matrix products on VNNI CPUs), from sorting texts by
token count so each batch pads little, and from using every core the process may run on.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from near2_tasks.errors import Near2Error

META_FILE = "near2_backend.json"
FORMAT_VERSION = 1


def cpu_threads(requested: int | None = None) -> int:
    """``requested``, or every core this process may run on (respects taskset/cgroup affinity)."""
    if requested:
        return requested
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def require_runtime(module: str, extra: str) -> Any:
    """Import ``module`` (OpenVINO with its telemetry off); Near2Error naming the ``extra`` backend when it is missing."""
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
        ort = require_runtime("onnxruntime", "onnx")
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
        ov = require_runtime("openvino", "openvino")
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
