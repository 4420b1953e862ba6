"""Exporting an encoder to a backend artefact: one ONNX graph (optionally int8) or OpenVINO IR.

Why our own export instead of sentence-transformers' ``backend="onnx"`` / ``"openvino"``: those need
``optimum-onnx`` (every release caps ``transformers<4.58``) or ``optimum-intel`` (2.0 caps
``transformers<5.1``, later releases cap ``huggingface-hub<1.22`` while transformers 5.23 needs
``>=1.31``); neither installs with the pinned stack. Plain ``onnxruntime`` and ``openvino`` do, so
:func:`export_artifact` traces the *whole* sentence-transformers pipeline (transformer, pooling,
normalisation, any dense layer) into one ONNX graph with ``torch.onnx.export``, optionally quantises
its weight matrices to int8 (dynamic quantisation), and refuses the result unless its embeddings
match the fp32 model's (mean cosine >= :data:`MIN_MEAN_COSINE`). The artefact is read back by
:mod:`near2_tasks.models.backend_runtime`; logging it next to a registered version is
:func:`near2_tasks.models.backends.export_backend`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from near2_tasks.errors import Near2Error
from near2_tasks.models.backend_runtime import FORMAT_VERSION, META_FILE, load_artifact, require_runtime

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from near2_tasks.models.backends import BackendSpec

#: An exported backend is accepted only if its embeddings keep this mean cosine to the fp32 model's.
MIN_MEAN_COSINE = 0.99
#: ... and no single probe text falls below this.
MIN_COSINE = 0.97
ONNX_FILE = "model.onnx"
OPENVINO_FILE = "model.xml"
GRAPH_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def export_onnx(model: SentenceTransformer, path: Path) -> Path:
    """Trace the full sentence-transformers pipeline into one ONNX graph.

    Inputs are the tokenizer's ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the
    tokenizer makes them), dynamic in batch and sequence length; the output ``sentence_embedding`` is
    what ``model.encode`` returns before the final normalisation (which the runtime wrapper applies).
    """
    import torch

    require_runtime("onnx", "onnx")
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
    require_runtime("onnxruntime", "onnx")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Only MatMuls with a constant weight are quantised; activations are quantised per batch at run time.
    # Per-channel scales matter: per-tensor int8 dropped the mean cosine to ~0.96 (BENCHMARKS.md).
    quantize_dynamic(str(onnx_path), str(out_path), weight_type=QuantType.QInt8, per_channel=True)
    return out_path


def convert_openvino(onnx_path: Path, xml_path: Path) -> Path:
    """OpenVINO IR (``.xml`` + ``.bin``) from an ONNX file, so loading skips the ONNX front end."""
    ov = require_runtime("openvino", "openvino")
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
    versions[module] = getattr(require_runtime(module, backend), "__version__", "?")
    return versions
