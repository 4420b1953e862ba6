"""The JSON schema of the storefront search HTTP API (:mod:`near2_tasks.serving.service`): what ``/search``,
``/served`` and ``/health`` answer, and the one-line error body, as pydantic models (FastAPI validates the
responses against them and publishes them in the OpenAPI schema at ``/docs``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class HitOut(BaseModel):
    product_id: str
    title: str
    score: float = Field(description="Elasticsearch kNN score (dot_product: (1 + cosine) / 2); in hybrid mode "
                                     "the fused score (RRF, or the linear combination of normalised scores).")
    category: str | None = None
    brand: str | None = None
    price: float | None = None


class HybridOut(BaseModel):
    fusion: Literal["rrf", "linear"]
    candidates: int = Field(description="Top-N taken from each side before fusion.")
    requests: int = Field(description="Elasticsearch round trips (1: one _msearch; 2 with a funnel dense side).")
    dense_hits: int
    lexical_hits: int
    dense_ranks: list[int | None] = Field(description="Each result's rank on the dense side (null: absent).")
    lexical_ranks: list[int | None] = Field(description="Each result's rank on the BM25 side (null: absent).")
    rrf_k: float | None = None
    weight: float | None = Field(None, description="Linear weight of the dense side at this dim.")
    weight_source: Literal["index", "settings"] | None = Field(
        None, description="index: tuned on the validation split, stored in _meta.hybrid_weights; settings: the default.")


class SearchOut(BaseModel):
    query: str
    k: int
    dim: int = Field(description="Dimension of the final scores (the rescore dimension in funnel mode).")
    mode: Literal["knn", "funnel", "hybrid"]
    index: str = Field(description="The concrete index behind the alias that answered.")
    model_name: str | None
    model_version: str | None = Field(description="The model that encoded the query and the documents.")
    hits: list[HitOut]
    timings_ms: dict[str, float] = Field(description="model_load, encode, search (wall), es_took, total.")
    filters: dict[str, Any]
    shortlist_dim: int | None = None
    shortlist_size: int | None = None
    rescore: Literal["local", "elasticsearch"] | None = Field(
        None, description="Funnel only: where the shortlist was scored, from the index's float16 store on the "
                          "serving host or by a second Elasticsearch request.")
    shortlist: Literal["local", "elasticsearch"] | None = Field(
        None, description="mode=funnel only: where the shortlist came from, the bit codes in the index's store on "
                          "the serving host (no Elasticsearch request: serving.funnel_shortlist) or a kNN in "
                          "Elasticsearch (always with filters).")
    hybrid: HybridOut | None = None


class ServedFieldOut(BaseModel):
    dim: int
    index_type: str = Field(description="index_options.type of embedding_<dim> (hnsw, bbq_hnsw, ...).")
    bytes_per_product: float = Field(description="Vector bytes a search reads per product (ES sizing formula, "
                                                 "HNSW graph not counted).")
    bit_code_bytes: float | None = Field(None, description="d/8 when the index also holds 1-bit codes of dim.")
    hybrid_weight: float = Field(description="Linear-fusion weight of the dense side at dim (hybrid mode).")
    hybrid_weight_source: Literal["index", "settings"]


class ServedOut(BaseModel):
    alias: str
    index: str
    model_name: str | None
    model_version: str | None
    dims: list[int]
    fields: list[ServedFieldOut]
    modes: list[str] = Field(description="Search modes the service accepts.")
    default_mode: str
    fusions: list[str] = Field(description="Fusions of mode=hybrid.")
    default_fusion: str
    lexical_fields: list[str] = Field(description="Text fields of the index's BM25 side.")
    default_dim: int = Field(description="The dim a knn search uses when none is given.")


class ErrorOut(BaseModel):
    error: str
    hint: str | None = None


class HealthOut(BaseModel):
    status: Literal["ok", "unavailable"]
    alias: str
    index: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    dims: list[int] = []
    error: str | None = None
