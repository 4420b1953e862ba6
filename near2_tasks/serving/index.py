"""Versioned serving indices: build, verify, swap the alias, roll back, prune.

One index per model version, ``<alias>-v<version>-<UTC timestamp>``, with one ``dense_vector`` field
per served dimension (``embedding_<d>``; plus ``embedding_<d>_bits`` codes for the dims in
``elasticsearch.binary_dims``, see :mod:`near2_tasks.serving.compact`) and the product fields for display and filters. The
storefront only knows the alias, and the alias only ever points at an index that passed
verification (ARCHITECTURE.md invariant 1):

    build_index -> verify_index (marks ``_meta.verified_at``) -> swap_alias (compare-and-swap) -> prune

``build_index`` is itself ``create_index`` (mapping, ``_meta``) -> ``load_shard`` x N -> ``finalize_index``
(refresh, force-merge, count): the DAGs run the shards as mapped tasks (``airflow.encode_shards``),
``near2 index --shards N`` one after another; a product's shard is a stable hash of its id mod N.

``_meta`` records the model that encoded the documents (``model_uri`` pinned to a concrete version),
so the search side encodes queries with exactly that model (invariant 3).

Re-running a failed build converges: documents are keyed by ``product_id`` (re-sent chunks overwrite,
never duplicate); pass the failed run's ``index_name`` to finish that index, or leave it out to start
a fresh one (the half-built index is never verified, so it is never served, and pruning removes it).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from near2_tasks import conventions

from near2_tasks.serving import compact
from near2_tasks.serving.settings import VectorFieldOptions, default_oversample, is_quantised
from near2_tasks.errors import Near2Error
from near2_tasks.serving.es_client import error_reason, es_errors, make_client, unavailable

if TYPE_CHECKING:
    from elasticsearch import Elasticsearch
    from sentence_transformers import SentenceTransformer

    from near2_tasks.config import Settings

log = logging.getLogger(__name__)

#: ``progress(done, total)`` is called after every bulk chunk.
Progress = Callable[[int, int], None]

#: The key verify_index adds to ``_meta`` once an index passed; swap_alias requires it.
VERIFIED_AT = "verified_at"

VECTOR_DECIMALS = 6  # JSON payload size; the rounding error is far below quantisation error


class IndexVerificationFailed(Near2Error):
    """The new index is not fit to serve; the alias was not touched."""

    exit_code = 1

    def __init__(self, message: str, report: VerificationReport) -> None:
        super().__init__(message, hint="the alias still points at the previous index; fix the cause and re-run")
        self.report = report


class AliasChanged(Near2Error):
    """The alias no longer points where the caller expected: someone else moved it meanwhile."""

    exit_code = 4


@dataclass(frozen=True)
class BuiltIndex:
    name: str
    count: int
    meta: dict[str, Any]


@dataclass
class VerificationReport:
    index: str
    expected_count: int
    actual_count: int
    dims: list[int]
    sample_size: int
    top_k: int
    self_hit_rate: dict[int, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


@dataclass(frozen=True)
class IndexInfo:
    name: str
    docs: int
    size_bytes: int
    serving: bool
    verified: bool
    model_name: str | None
    model_version: str | None
    model_uri: str | None
    dims: list[int]
    catalog_version: str | None
    built_at: str | None


@dataclass(frozen=True)
class IndexStatus:
    alias: str
    target: str | None
    indices: list[IndexInfo]

    def to_dict(self) -> dict[str, Any]:
        return {"alias": self.alias, "target": self.target, "indices": [asdict(i) for i in self.indices]}


@dataclass(frozen=True)
class SwapResult:
    index: BuiltIndex
    report: VerificationReport
    previous: str | None
    deleted: list[str]


# ----- products and mapping ------------------------------------------------------------------

def prepare_products(products: pd.DataFrame, text_template: str | None = None) -> pd.DataFrame:
    """The accepted catalog rows as indexed: string ids, optional fields filled, a ``text`` to embed.

    ``text`` is the caller's column when present, else ``text_template`` filled per product (pass
    ``settings.dataset.text_template``; None: its default). Training and evaluation embed the same
    text; a catalog with titles only embeds its titles. Raises Near2Error for what would make the index disagree with the catalog (missing columns,
    empty or repeated ids, empty titles).
    """
    missing = [c for c in ("product_id", "title") if c not in products.columns]
    if missing:
        raise Near2Error(f"catalog lacks column(s) {missing}", hint="products need product_id and title")
    frame = products.copy()
    if frame.product_id.isna().any():
        raise Near2Error("catalog has rows without product_id", hint="validate the catalog first")
    frame["product_id"] = frame.product_id.astype(str)
    repeated = frame.product_id[frame.product_id.duplicated()].unique().tolist()
    if repeated:
        raise Near2Error(f"catalog repeats product_id {repeated[:5]}", hint="validate the catalog first")
    if frame.title.isna().any() or (frame.title.astype(str).str.strip() == "").any():
        raise Near2Error("catalog has rows with an empty title", hint="validate the catalog first")
    frame["title"] = frame.title.astype(str)
    for column in ("category", "brand", "price"):
        if column not in frame.columns:
            frame[column] = None
    if "text" not in frame.columns:
        from near2_tasks.data.settings import DatasetSettings
        from near2_tasks.data.text import product_texts

        frame["text"] = product_texts(frame, text_template or DatasetSettings().text_template)
    frame["text"] = frame.text.fillna(frame.title).astype(str)
    return frame.reset_index(drop=True)


def catalog_fingerprint(products: pd.DataFrame) -> str:
    """A content hash of the indexed rows, used as ``catalog_version`` when the caller has none."""
    from near2_tasks.data.hashing import frame_hash

    return frame_hash(products, [c for c in (*conventions.PRODUCT_FIELDS, "text") if c in products.columns])


def vector_mapping(settings: Settings, dim: int) -> dict[str, Any]:
    options = settings.elasticsearch.field_options(dim)
    kind = options.index_type
    if kind.startswith("bbq") and dim < 64:
        raise Near2Error(
            f"index type {kind} needs at least 64 dimensions, embedding_{dim} has {dim}",
            hint=f"set elasticsearch.index_options.{dim}.index_type to hnsw or int8_hnsw",
        )
    if kind.startswith("int4") and dim % 2:
        raise Near2Error(f"index type {kind} needs an even dimension, got {dim}")
    if options.oversample and not is_quantised(kind):
        raise Near2Error(f"oversample {options.oversample} of embedding_{dim} needs a quantised index type, "
                         f"not {kind} (its vectors are floats already)",
                         hint=f"set elasticsearch.index_options.{dim}.oversample to 0, or index_type to int8_hnsw "
                              "or bbq_hnsw")
    return {"type": "dense_vector", "dims": dim, "index": True,
            "similarity": options.similarity, "index_options": index_options_mapping(options)}


def index_options_mapping(options: VectorFieldOptions) -> dict[str, Any]:
    """A field's ``index_options`` with every parameter whose default may change set explicitly, so the
    mapping means the same on any server version (bbq rescores 3x by default from 8.19 and 9.1, not before)."""
    kind = options.index_type or "hnsw"
    index_options: dict[str, Any] = {"type": kind}
    if "hnsw" in kind:
        index_options.update(m=options.m, ef_construction=options.ef_construction)
    if kind.startswith(("int8_", "int4_")):
        confidence = 0.0 if options.confidence_interval is None and kind.startswith("int4_") \
            else options.confidence_interval
        if confidence is not None:
            index_options["confidence_interval"] = confidence
    if is_quantised(kind):
        oversample = default_oversample(kind) if options.oversample is None else options.oversample
        index_options["rescore_vector"] = {"oversample": oversample}
    return index_options


def index_body(settings: Settings, dims: list[int], meta: dict[str, Any]) -> dict[str, Any]:
    """Settings (loading mode: no refresh, no replicas) and mappings of a new serving index."""
    properties: dict[str, Any] = {
        "product_id": {"type": "keyword"},
        # lexical fields of hybrid search (conventions.LEXICAL_FIELDS): text with the core analyzer;
        # category and brand stay keywords (exact filters) with a .text subfield for BM25
        "title": {"type": "text", "analyzer": conventions.LEXICAL_ANALYZER,
                  "fields": {"keyword": {"type": "keyword", "ignore_above": 512}}},
        "category": {"type": "keyword",
                     "fields": {"text": {"type": "text", "analyzer": conventions.LEXICAL_ANALYZER}}},
        "brand": {"type": "keyword",
                  "fields": {"text": {"type": "text", "analyzer": conventions.LEXICAL_ANALYZER}}},
        "price": {"type": "float"},
    }
    for dim in dims:
        properties[conventions.vector_field(dim)] = vector_mapping(settings, dim)
    coded = compact.coded_dims(settings.elasticsearch.binary_dims, dims)
    for dim in coded:  # 1-bit codes for the funnel's shortlist (near2_tasks.serving.compact)
        properties[conventions.binary_vector_field(dim)] = compact.bit_field_mapping(dim)
    mappings: dict[str, Any] = {"dynamic": "strict", "_meta": meta, "properties": properties}
    if not settings.elasticsearch.vectors_in_source:
        # kNN reads the vector index, never _source: JSON floats there would double the disk
        mappings["_source"] = {"excludes": [conventions.vector_field(d) for d in dims]
                               + [conventions.binary_vector_field(d) for d in coded]}
    return {
        "settings": {"index": {"number_of_shards": settings.elasticsearch.number_of_shards,
                               "number_of_replicas": 0, "refresh_interval": "-1"}},
        "mappings": mappings,
    }


# ----- the model named in _meta ----------------------------------------------------------------

def pin_model_uri(settings: Settings, model_ref: str, model_version: str) -> str:
    """A reference that loads the same weights tomorrow: registry aliases resolved to a version,
    local directories made absolute. It goes into ``_meta.model_uri``."""
    parsed = conventions.parse_model_uri(model_ref)
    if parsed is not None and parsed.selector is not None and not parsed.pinned:  # an alias, or latest
        from near2_tasks.models.registry import resolve_model_uri

        version = resolve_model_uri(settings, parsed).version
        if str(version) != str(model_version):
            raise Near2Error(f"{model_ref} is version {version}, but model_version={model_version} was given",
                             hint="pass the version the alias points at")
        return f"models:/{parsed.name}/{version}"
    if model_ref.startswith(("models:/", "runs:/")):
        return model_ref
    local = Path(model_ref).expanduser()
    return str(local.resolve()) if local.exists() else model_ref


def load_meta_model(settings: Settings, model_uri: str) -> SentenceTransformer:
    """The encoder an index's ``_meta.model_uri`` names, in the configured inference backend
    (``model.backend``; exported once and logged next to the model when missing); MLflow URIs read the
    configured store."""
    from near2_tasks.models.backends import load_inference_encoder

    return load_inference_encoder(settings, model_uri, missing="export")


def default_model_name(model_ref: str) -> str:
    parsed = conventions.parse_model_uri(model_ref)
    if parsed:
        return parsed.name
    return Path(model_ref).name or model_ref


def safe_version(model_version: str | int) -> str:
    """The version as it may appear in an index name (lowercase, no separators ES rejects)."""
    return re.sub(r"[^a-z0-9_.+]", "-", str(model_version).lower()) or "0"


# ----- build ----------------------------------------------------------------------------------
#
# A build is three steps, so that the middle one can run as N independent shards (the DAG's mapped
# ``encode_shard`` tasks, or ``near2 index --shards N`` one after another):
#
#   create_index (mapping + _meta: model, dims, bit-code centres) -> load_shard x N -> finalize_index
#
# A product belongs to shard ``stable_bucket(product_id, N)``; every shard reads the dims and centres
# from the index's ``_meta`` and writes documents keyed by ``product_id``, so a re-run shard overwrites
# what its failed attempt wrote. With N = 1 the one shard is the whole catalog.

def shard_positions(products: pd.DataFrame, shard: int, shards: int) -> np.ndarray:
    """Row positions (catalog order) of the products in ``shard`` of ``shards``: those whose
    :func:`near2_tasks.data.hashing.stable_bucket` of ``product_id`` is ``shard``."""
    from near2_tasks.data.hashing import stable_bucket

    if shards < 1 or not 0 <= shard < shards:
        raise Near2Error(f"shard {shard} of {shards} does not exist", hint="shards are numbered 0 .. N-1, N >= 1")
    if shards == 1:
        return np.arange(len(products))
    buckets = np.fromiter((stable_bucket(pid, shards) for pid in products.product_id.astype(str)),
                          dtype=np.int64, count=len(products))
    return np.flatnonzero(buckets == shard)


def centre_sample_positions(products: pd.DataFrame, size: int) -> np.ndarray:
    """Row positions (catalog order) of the products whose vectors give the bit codes' centre: all of
    them up to ``size`` (``elasticsearch.binary_centre_sample_size``), else the ``size`` with the smallest
    stable hash of ``product_id``. The same rows whatever the number of shards."""
    from near2_tasks.data.hashing import stable_hash64

    if len(products) <= size:
        return np.arange(len(products))
    hashes = np.fromiter((stable_hash64(pid) for pid in products.product_id.astype(str)), dtype=np.uint64,
                         count=len(products))
    return np.sort(np.argsort(hashes, kind="stable")[:size])


def binary_centres(settings: Settings, dims: list[int], vectors: np.ndarray) -> dict[int, np.ndarray]:
    """The centre of each coded dim (``elasticsearch.binary_dims``) from the vectors of the centre sample
    (:func:`centre_sample_positions`); empty when no dim gets bit codes."""
    return {d: compact.catalog_centre(vectors, d) for d in compact.coded_dims(settings.elasticsearch.binary_dims, dims)}


def coded_dims(settings: Settings, dims: list[int]) -> list[int]:
    return compact.coded_dims(settings.elasticsearch.binary_dims, list(dims))


def index_meta(settings: Settings, index_name: str, client: Elasticsearch | None = None) -> dict[str, Any]:
    """The ``_meta`` of an index: the model that encodes its documents, its dims, its bit-code centres."""
    client = client or make_client(settings)
    with es_errors(settings.elasticsearch.url, f"reading the _meta of {index_name}"):
        if not client.indices.exists(index=index_name):
            raise Near2Error(f"index {index_name} does not exist", hint="create it first (create_index)")
        return _meta_of(client, index_name)


def build_index(
    settings: Settings,
    model_ref: str,
    products: pd.DataFrame,
    model_version: str | int,
    run_id: str | None = None,
    catalog_version: str | None = None,
    dims: list[int] | None = None,
    vectors: np.ndarray | None = None,
    *,
    model_name: str | None = None,
    index_name: str | None = None,
    client: Elasticsearch | None = None,
    progress: Progress | None = None,
    shards: int = 1,
) -> BuiltIndex:
    """Create a new index (or finish ``index_name``) and bulk-load every product at every dimension.

    ``vectors``: optional precomputed full-dimension embeddings aligned with ``products`` (they must
    come from ``model_ref``: verification re-encodes a sample with it). ``shards``: the catalog is
    encoded and loaded in that many slices, one after another (what the DAG's mapped tasks do in
    parallel); the index is the same. The alias is not touched.
    """
    built, _ = _build(settings, model_ref, products, model_version, run_id, catalog_version, dims, vectors,
                      model_name=model_name, index_name=index_name, client=client, progress=progress, shards=shards)
    return built


def _build(settings, model_ref, products, model_version, run_id, catalog_version, dims, vectors, *,
           model_name, index_name, client, progress, shards: int = 1) -> tuple[BuiltIndex, SentenceTransformer | None]:
    from near2_tasks.models.embeddings import check_dims, encode, model_dimension

    products = prepare_products(products, settings.dataset.text_template)
    dims = _checked_dims(settings, list(dims or settings.model.dims))
    if shards < 1:
        raise Near2Error(f"shards must be >= 1, got {shards}")
    model = None
    if vectors is None:
        model = load_meta_model(settings, model_ref)
        check_dims(dims, model_dimension(model))
    else:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(products):
            raise Near2Error(f"vectors have shape {vectors.shape}, expected ({len(products)}, <dim>)",
                             hint="pass one full-dimension vector per product, in catalog order")
        check_dims(dims, vectors.shape[1])

    def encode_rows(positions: np.ndarray) -> np.ndarray:
        if vectors is not None:
            return vectors[positions]
        log.info("encoding %d products with %s", len(positions), model_ref)
        return encode(model, products.text.iloc[positions].tolist(), batch_size=settings.model.encode_batch_size,
                      show_progress=progress is not None)

    coded = coded_dims(settings, dims)
    sample = centre_sample_positions(products, settings.elasticsearch.binary_centre_sample_size) if coded else None
    if vectors is None and (shards == 1 or (sample is not None and len(sample) == len(products))):
        # the whole catalog is needed before the first shard anyway: encode it once, before the index
        # exists (a failed encode leaves nothing behind)
        vectors = encode_rows(np.arange(len(products)))
    centres = binary_centres(settings, dims, encode_rows(sample)) if sample is not None else {}
    client = client or make_client(settings)
    created = create_index(settings, model_ref, products, model_version, run_id, catalog_version, dims,
                           centres=centres, model_name=model_name, index_name=index_name, client=client)
    began = time.monotonic()
    done = 0
    for shard in range(shards):
        positions = shard_positions(products, shard, shards)
        shard_progress = None if progress is None else (lambda n, _total, base=done: progress(base + n, len(products)))
        load_shard(settings, created.name, products.iloc[positions].reset_index(drop=True), encode_rows(positions),
                   client=client, progress=shard_progress, meta=created.meta)  # centres as in _meta
        done += len(positions)
    built = finalize_index(settings, created.name, products, client=client, meta=created.meta)
    log.info("loaded %d documents into %s in %.1fs (%d shard%s)", built.count, built.name, time.monotonic() - began,
             shards, "" if shards == 1 else "s")
    return built, model


def _checked_dims(settings: Settings, dims: list[int]) -> list[int]:
    if dims != sorted(set(dims), reverse=True) or min(dims) <= 0:
        raise Near2Error(f"dims must be distinct, positive and descending, got {dims}")
    for dim in dims:
        vector_mapping(settings, dim)  # refuse impossible index options before any work
    return dims


def create_index(
    settings: Settings,
    model_ref: str,
    products: pd.DataFrame,
    model_version: str | int,
    run_id: str | None = None,
    catalog_version: str | None = None,
    dims: list[int] | None = None,
    *,
    centres: dict[int, np.ndarray] | None = None,
    model_name: str | None = None,
    index_name: str | None = None,
    client: Elasticsearch | None = None,
) -> BuiltIndex:
    """Create the empty versioned index (or take up ``index_name`` again) in loading mode, its ``_meta``
    naming the model (pinned), dims, catalog version and the bit-code ``centres`` every shard codes
    against (:func:`binary_centres`; required when a dim gets bit codes). ``count``: documents it holds."""
    products = prepare_products(products, settings.dataset.text_template)
    dims = _checked_dims(settings, list(dims or settings.model.dims))
    centres = dict(centres or {})
    missing = [d for d in coded_dims(settings, dims) if d not in centres]
    if missing:
        raise Near2Error(f"bit codes of dims {missing} need their centre (elasticsearch.binary_dims)",
                         hint="pass binary_centres(settings, dims, <vectors of the centre sample>)")
    meta = {
        "model_name": model_name or default_model_name(model_ref),
        "model_version": str(model_version),
        "model_uri": pin_model_uri(settings, model_ref, str(model_version)),
        "run_id": run_id,
        "dims": dims,
        "catalog_version": catalog_version or catalog_fingerprint(products),
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        conventions.META_LEXICAL_FIELDS: list(conventions.LEXICAL_FIELDS),
    }
    if centres:  # bit codes are signs of the prefix minus the catalog's mean; queries need the same centre
        meta[compact.META_CENTRES] = {str(d): [round(float(x), 7) for x in np.asarray(centres[d])]
                                      for d in sorted(centres, reverse=True)}
    client = client or make_client(settings)
    with es_errors(settings.elasticsearch.url, "index creation"):
        name = _create_or_reuse(client, settings, dims, meta, index_name, model_version)
        count = client.count(index=name)["count"]
    return BuiltIndex(name=name, count=count, meta=meta)


def _meta_centres(meta: dict[str, Any]) -> dict[int, np.ndarray]:
    return {int(d): np.asarray(c, dtype=np.float32) for d, c in (meta.get(compact.META_CENTRES) or {}).items()}


def load_shard(
    settings: Settings,
    index_name: str,
    products: pd.DataFrame,
    vectors: np.ndarray,
    *,
    client: Elasticsearch | None = None,
    progress: Progress | None = None,
    meta: dict[str, Any] | None = None,
) -> int:
    """Bulk-load ``products`` (one shard, or any subset of the catalog) with their full-dimension
    ``vectors`` (encoded by the model in the index's ``_meta``) into the existing ``index_name``, at the
    dims and with the bit-code centres its ``_meta`` records (``meta``: the caller read it already).
    Documents are keyed by ``product_id``: re-loading a shard overwrites, never duplicates.
    Returns the number of documents sent."""
    from near2_tasks.models.embeddings import check_dims

    products = prepare_products(products, settings.dataset.text_template)
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(products):
        raise Near2Error(f"vectors have shape {vectors.shape}, expected ({len(products)}, <dim>)")
    client = client or make_client(settings)
    meta = meta if meta is not None else index_meta(settings, index_name, client)
    dims = [int(d) for d in meta.get("dims") or []]
    if not dims:
        raise Near2Error(f"index {index_name} has no dims in its _meta", hint="was it created by near2?")
    if len(products):
        check_dims(dims, vectors.shape[1])
    centres = _meta_centres(meta)
    with es_errors(settings.elasticsearch.url, f"bulk load of {index_name}"):
        _bulk_load(client, settings, index_name, products, vectors, dims, progress, centres)
    return len(products)


def finalize_index(settings: Settings, index_name: str, products: pd.DataFrame, *,
                   client: Elasticsearch | None = None, meta: dict[str, Any] | None = None) -> BuiltIndex:
    """After every shard: serving settings back (refresh interval, replicas), refresh, force-merge
    (``elasticsearch.force_merge``), documents not in ``products`` removed; the count must then be the
    catalog's (a shard that did not load fails here, before verification)."""
    products = prepare_products(products, settings.dataset.text_template)
    client = client or make_client(settings)
    meta = meta if meta is not None else index_meta(settings, index_name, client)
    with es_errors(settings.elasticsearch.url, f"finishing the load of {index_name}"):
        _finish_load(client, settings, index_name)
        count = _remove_strays(client, index_name, set(products.product_id))
    if count != len(products):
        raise Near2Error(f"index {index_name} holds {count} documents after the load, the catalog has "
                         f"{len(products)}: a shard did not load all its products",
                         hint="re-run the shards of this build (their documents are keyed by product_id)")
    return BuiltIndex(name=index_name, count=count, meta=meta)


def _create_or_reuse(client, settings, dims, meta, index_name, model_version) -> str:
    from elasticsearch import BadRequestError

    alias = settings.elasticsearch.alias
    if index_name:
        if not index_name.startswith(f"{alias}-"):
            raise Near2Error(f"index name {index_name!r} does not belong to alias {alias!r}",
                             hint=f"names look like {conventions.index_name(alias, model_version)}")
        if client.indices.exists(index=index_name):
            old = _meta_of(client, index_name)
            if old.get("model_uri") != meta["model_uri"] or old.get("dims") != dims:
                raise Near2Error(f"index {index_name} exists with another model or dims "
                                 f"({old.get('model_uri')}, {old.get('dims')})",
                                 hint="give a new index name, or none for a fresh one")
            client.indices.put_settings(index=index_name, settings={"index": {"refresh_interval": "-1"}})
            client.indices.put_mapping(index=index_name, meta=meta)  # a re-build is unverified again
            log.info("resuming the load of %s", index_name)
            return index_name
        client.indices.create(index=index_name, **index_body(settings, dims, meta))
        return index_name
    for _ in range(5):  # two builds within the same second: take the next second
        name = conventions.index_name(alias, safe_version(model_version))
        try:
            client.indices.create(index=name, **index_body(settings, dims, meta))
            return name
        except BadRequestError as exc:
            if "resource_already_exists_exception" not in str(exc):
                raise Near2Error(f"Elasticsearch refused index {name}: {error_reason(exc)}") from exc
            time.sleep(1.05 - datetime.now(timezone.utc).microsecond / 1e6)
    raise Near2Error(f"could not find a free index name for alias {alias}")


def _documents(products: pd.DataFrame, vectors: np.ndarray, dims: list[int], start: int,
               stop: int, centres: dict[int, np.ndarray] | None = None) -> list[dict[str, Any]]:
    block = vectors[start:stop]
    per_dim = {d: np.round(conventions.truncate(block, d).astype(np.float64), VECTOR_DECIMALS) for d in dims}
    codes = {d: compact.binary_codes(block, d, centre) for d, centre in (centres or {}).items()}
    docs = []
    for offset, row in enumerate(products.iloc[start:stop].itertuples(index=False)):
        price = None if row.price is None or pd.isna(row.price) else float(row.price)
        source = {
            "product_id": row.product_id,
            "title": row.title,
            "category": None if row.category is None or pd.isna(row.category) else str(row.category),
            "brand": None if row.brand is None or pd.isna(row.brand) else str(row.brand),
            "price": price,
        }
        for d in dims:
            source[conventions.vector_field(d)] = per_dim[d][offset].tolist()
        for d, code in codes.items():
            source[conventions.binary_vector_field(d)] = compact.to_hex(code[offset])
        docs.append({"_id": row.product_id, "_source": source})
    return docs


def _bulk_load(client, settings, name, products, vectors, dims, progress: Progress | None,
               centres: dict[int, np.ndarray] | None = None) -> None:
    es = settings.elasticsearch
    total = len(products)
    next_log = 0.1
    for start in range(0, total, es.bulk_chunk_size):
        stop = min(total, start + es.bulk_chunk_size)
        actions = [{"_index": name, **doc} for doc in _documents(products, vectors, dims, start, stop, centres)]
        _send_chunk(client, settings, name, actions)
        if progress:
            progress(stop, total)
        if stop / total >= next_log:
            log.info("%s: %d/%d documents", name, stop, total)
            next_log += 0.1


def _send_chunk(client, settings, name: str, actions: list[dict[str, Any]]) -> None:
    """One bulk chunk, with backoff: 429s per document (streaming_bulk), transient failures per chunk.

    Re-sending a chunk is harmless: the ``_id`` is the product id.
    """
    from elasticsearch import ApiError, ConnectionError as ESConnectionError, ConnectionTimeout, helpers

    es = settings.elasticsearch
    attempt = 0
    while True:
        try:
            failures = [item for ok, item in helpers.streaming_bulk(
                client, actions, chunk_size=len(actions), max_chunk_bytes=es.bulk_max_chunk_bytes,
                raise_on_error=False, max_retries=es.bulk_max_retries,
                initial_backoff=es.bulk_initial_backoff_s, max_backoff=es.bulk_max_backoff_s,
                yield_ok=False) if not ok]
            break
        except (ESConnectionError, ConnectionTimeout, ApiError) as exc:
            status = getattr(getattr(exc, "meta", None), "status", None)
            transient = not isinstance(exc, ApiError) or status in (502, 503, 504)
            if not transient or attempt >= es.bulk_max_retries:
                if status == 429:
                    raise Near2Error(
                        f"Elasticsearch kept rejecting writes to {name} (429) after {es.bulk_max_retries} retries",
                        hint="the cluster is overloaded: retry later or lower elasticsearch.bulk_chunk_size",
                    ) from exc
                if transient:
                    raise unavailable(es.url, f"bulk load of {name} failed after {attempt} retries") from exc
                raise
            delay = min(es.bulk_max_backoff_s, es.bulk_initial_backoff_s * 2 ** attempt)
            attempt += 1
            log.warning("bulk chunk into %s failed (%s); retry %d in %.1fs", name, error_reason(exc), attempt, delay)
            time.sleep(delay)
    if failures:
        reason = _item_reason(next(iter(failures[0].values())).get("error"))
        statuses = sorted({next(iter(f.values())).get("status") for f in failures})
        hint = "fix the documents or the mapping and re-run"
        if "cluster_block_exception" in reason:  # checked first: a read-only block also answers 429
            hint = ("the index or cluster is read-only (disk watermark?): free disk space, clear "
                    "index.blocks.* and re-run")
        elif statuses == [429]:
            hint = "the cluster is overloaded: retry later or lower elasticsearch.bulk_chunk_size"
        raise Near2Error(f"Elasticsearch rejected {len(failures)} of {len(actions)} documents in {name} "
                         f"(HTTP {statuses}): {reason}", hint=hint)


def _item_reason(error: Any) -> str:
    """``type: reason`` of one failed bulk item (its ``error`` is a dict, or a string for exceptions)."""
    if isinstance(error, dict):
        return f"{error.get('type', 'error')}: {error.get('reason', '')}"
    return str(error)


def _finish_load(client, settings, name: str) -> None:
    """Back to serving settings (refresh, replicas), make everything searchable, optionally merge."""
    es = settings.elasticsearch
    client.indices.put_settings(index=name, settings={"index": {
        "refresh_interval": es.refresh_interval, "number_of_replicas": es.number_of_replicas}})
    client.indices.refresh(index=name)
    if es.force_merge:
        began = time.monotonic()
        client.options(request_timeout=max(600.0, es.request_timeout)).indices.forcemerge(
            index=name, max_num_segments=1, wait_for_completion=True)
        log.info("force-merged %s in %.1fs", name, time.monotonic() - began)


def _remove_strays(client, name: str, product_ids: set[str]) -> int:
    """Delete documents not in the catalog (left by an earlier load of a reused index); the count."""
    from elasticsearch import helpers

    count = client.count(index=name)["count"]
    if count <= len(product_ids):
        return count
    strays = [hit["_id"] for hit in helpers.scan(client, index=name, query={"query": {"match_all": {}}},
                                                 _source=False) if hit["_id"] not in product_ids]
    if strays:
        helpers.bulk(client, ({"_op_type": "delete", "_index": name, "_id": i} for i in strays))
        client.indices.refresh(index=name)
        log.info("removed %d documents of %s that are not in the catalog", len(strays), name)
    return client.count(index=name)["count"]


# ----- verify ---------------------------------------------------------------------------------

def verify_index(settings: Settings, index_name: str, products: pd.DataFrame,
                 model: SentenceTransformer | None = None, *, client: Elasticsearch | None = None
                 ) -> VerificationReport:
    """Check an index is fit to serve, then mark it verified in ``_meta``.

    Checks: the ``_meta`` keys; document count == accepted catalog rows; every dimension answers a
    kNN query; a sample of products find themselves in the top k by their own text, encoded by the
    model named in ``_meta`` (or ``model``, the same weights already loaded). Raises
    IndexVerificationFailed (alias untouched) with the report when a check fails.
    """
    from near2_tasks.models.embeddings import encode

    es = settings.elasticsearch
    products = prepare_products(products, settings.dataset.text_template)
    client = client or make_client(settings)
    with es_errors(es.url, f"verification of {index_name}"):
        if not client.indices.exists(index=index_name):
            raise Near2Error(f"index {index_name} does not exist", hint="`near2 index status` lists the indices")
        meta = _meta_of(client, index_name)
        dims = [int(d) for d in meta.get("dims") or []]
        client.indices.refresh(index=index_name)
        actual = client.count(index=index_name)["count"]
        top_k = es.verify_top_k
        report = VerificationReport(index=index_name, expected_count=len(products), actual_count=actual,
                                    dims=dims, sample_size=min(es.verify_sample_size, len(products)),
                                    top_k=top_k)
        missing = [key for key in conventions.INDEX_META_KEYS if key not in meta]
        if missing:
            report.problems.append(f"_meta lacks {missing}")
        if actual != len(products):
            report.problems.append(f"index holds {actual} documents, the catalog has {len(products)} accepted rows")
        mapped = _mapping_of(client, index_name)["properties"]
        unmapped = [d for d in dims if conventions.vector_field(d) not in mapped]
        if unmapped or not dims:
            report.problems.append(f"dims {unmapped or dims} have no vector field")
        if not report.problems:
            model = model or load_meta_model(settings, meta["model_uri"])
            rng = np.random.default_rng(0)
            sample = products.iloc[np.sort(rng.choice(len(products), report.sample_size, replace=False))]
            queries = encode(model, sample.text.tolist(), batch_size=settings.model.encode_batch_size)
            for dim in dims:
                hits = _knn_batch(client, index_name, dim, conventions.truncate(queries, dim), top_k,
                                  max(top_k, es.num_candidates))
                if not any(hits):
                    report.problems.append(f"embedding_{dim} answered no kNN query")
                    continue
                found = sum(pid in ids for pid, ids in zip(sample.product_id, hits))
                rate = found / len(sample)
                report.self_hit_rate[dim] = round(rate, 4)
                if rate < es.verify_min_self_hit_rate:
                    report.problems.append(
                        f"at dim {dim} only {found}/{len(sample)} sampled products retrieve themselves in the "
                        f"top {top_k} (need {es.verify_min_self_hit_rate:.0%}): was the index built with "
                        f"{meta.get('model_uri')}?")
        if report.problems:
            raise IndexVerificationFailed(f"index {index_name} failed verification: "
                                          + "; ".join(report.problems), report)
        client.indices.put_mapping(index=index_name, meta={
            **meta, VERIFIED_AT: datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return report


def _knn_batch(client, index: str, dim: int, vectors: np.ndarray, k: int, num_candidates: int) -> list[list[str]]:
    """Product ids of the kNN top k for each query vector, in one msearch round trip."""
    searches: list[dict[str, Any]] = []
    for vector in vectors:
        searches.append({"index": index})
        searches.append({"knn": {"field": conventions.vector_field(dim), "query_vector": vector.tolist(), "k": k,
                                 "num_candidates": num_candidates}, "size": k, "_source": False})
    responses = client.msearch(searches=searches)["responses"]
    results = []
    for response in responses:
        if "error" in response:
            raise Near2Error(f"kNN on embedding_{dim} of {index} failed: {_item_reason(response['error'])}")
        results.append([hit["_id"] for hit in response["hits"]["hits"]])
    return results


# ----- alias ----------------------------------------------------------------------------------

def alias_targets(client: Elasticsearch, alias: str) -> list[str]:
    """The indices the alias points at (normally one; none before the first swap)."""
    from elasticsearch import NotFoundError

    try:
        return sorted(client.indices.get_alias(name=alias).keys())
    except NotFoundError:
        return []


def current_target(client: Elasticsearch, alias: str) -> str | None:
    targets = alias_targets(client, alias)
    if len(targets) > 1:
        raise Near2Error(f"alias {alias} points at several indices {targets}",
                         hint="`near2 index rollback` or an _aliases call must leave exactly one")
    return targets[0] if targets else None


def swap_alias(client: Elasticsearch | Settings, alias: str, new_index: str, expected_current: str | None,
               *, require_verified: bool = True) -> str | None:
    """Move ``alias`` to ``new_index`` in one atomic ``_aliases`` call, only if it still points at
    ``expected_current`` (None: only if it does not exist yet). Returns the previous target.

    Compare-and-swap: the removal of ``expected_current`` carries ``must_exist``, so if another run
    moved the alias after the caller read it, Elasticsearch rejects the whole call and AliasChanged
    is raised; the alias is then exactly where the other run left it. The first swap (no alias yet)
    has no server-side precondition: it adds, re-reads, and withdraws its own addition if a
    concurrent first swap also added one (then both fail and the alias stays absent, as before).
    """
    from elasticsearch import NotFoundError

    if not isinstance(client, _es_client_type()):
        client = make_client(client)
    url = _client_url(client)
    with es_errors(url, f"swap of alias {alias}"):
        if not client.indices.exists(index=new_index):
            raise Near2Error(f"index {new_index} does not exist; the alias {alias} was not moved")
        if require_verified and VERIFIED_AT not in _meta_of(client, new_index):
            raise Near2Error(f"index {new_index} has not passed verification; the alias {alias} was not moved",
                             hint="run verify_index first")
        current = alias_targets(client, alias)
        expected = [expected_current] if expected_current else []
        if current != expected:
            raise AliasChanged(f"alias {alias} points at {current or 'nothing'}, expected "
                               f"{expected_current or 'nothing'}: another run moved it; not swapped")
        if current == [new_index]:
            return expected_current
        actions: list[dict[str, Any]] = []
        if expected_current:
            actions.append({"remove": {"index": expected_current, "alias": alias, "must_exist": True}})
        actions.append({"add": {"index": new_index, "alias": alias}})
        try:
            client.indices.update_aliases(actions=actions)
        except NotFoundError as exc:
            raise AliasChanged(f"alias {alias} moved away from {expected_current} during the swap; not swapped"
                               ) from exc
        if expected_current is None and alias_targets(client, alias) != [new_index]:
            client.indices.update_aliases(actions=[{"remove": {"index": new_index, "alias": alias}}])
            raise AliasChanged(f"alias {alias} was created concurrently by another run; not swapped")
    log.info("alias %s: %s -> %s", alias, expected_current, new_index)
    return expected_current


def swap_to_champion_index(client: Elasticsearch, alias: str, new_index: str, expected_current: str | None,
                           model_version: str | int, champion: str | None) -> str | None:
    """:func:`swap_alias`, with the one retry both the DAG and ``near2 index`` apply. Returns the previous target.

    If the alias already points at ``new_index`` (a re-run after a swap), nothing moves. If another run
    moved the alias after ``expected_current`` was read (AliasChanged) to an index whose model is not
    the champion, while ``new_index``'s model is, the swap is retried against that new target; in any
    other case the alias stays where the other run put it and AliasChanged propagates. Whether this
    model may serve at all is :func:`near2_tasks.promote.promotion.not_served_reason`'s question, asked before.
    """
    url = _client_url(client)
    with es_errors(url, "reading the alias"):
        current = current_target(client, alias)
    if current == new_index:
        log.info("alias %s already points at %s", alias, new_index)
        return expected_current
    try:
        return swap_alias(client, alias, new_index, expected_current)
    except AliasChanged:
        with es_errors(url, "reading the alias"):
            current = current_target(client, alias)
            serving = str(_meta_of(client, current).get("model_version")) if current else None
        if champion is None or champion != str(model_version) or serving == champion:
            raise  # nothing says the other run's index is stale: leave it
        log.warning("alias %s moved to %s (v%s, not the champion) meanwhile; swapping from there",
                    alias, current, serving)
        return swap_alias(client, alias, new_index, current)


def _es_client_type():
    from elasticsearch import Elasticsearch

    return Elasticsearch


def _client_url(client: Elasticsearch) -> str:
    try:
        node = client.transport.node_pool.all()[0]
        return node.base_url
    except Exception:  # noqa: BLE001 - only used in messages
        return "the configured Elasticsearch"


# ----- inventory, pruning, rollback -------------------------------------------------------------

def _meta_of(client, index: str) -> dict[str, Any]:
    return _mapping_of(client, index).get("_meta") or {}


def _mapping_of(client, index: str) -> dict[str, Any]:
    response = client.indices.get_mapping(index=index)
    return next(iter(response.values()))["mappings"]


def _alias_indices(client, alias: str) -> list[dict[str, Any]]:
    """This alias's indices (by the naming convention), oldest first, with docs, size and ``_meta``."""
    pattern = re.compile(rf"{re.escape(alias)}-v[a-z0-9_.+-]+-\d{{8}}t\d{{6}}")
    rows = client.cat.indices(index=f"{alias}-v*", format="json", bytes="b",
                              h="index,docs.count,store.size,creation.date", expand_wildcards="open")
    rows = [r for r in rows if pattern.fullmatch(r["index"])]
    if not rows:
        return []
    mappings = client.indices.get_mapping(index=",".join(r["index"] for r in rows))
    for row in rows:
        row["meta"] = mappings.get(row["index"], {}).get("mappings", {}).get("_meta") or {}
    return sorted(rows, key=lambda r: (int(r["creation.date"]), r["index"]))


def prune_indices(settings: Settings, client: Elasticsearch | None = None) -> list[str]:
    """Delete old indices: keep the alias target, ``keep_indices`` newest others, and anything
    newer than the target (another run may still be building it). Returns the deleted names."""
    es = settings.elasticsearch
    client = client or make_client(settings)
    with es_errors(es.url, "pruning old indices"):
        targets = set(alias_targets(client, es.alias))
        rows = _alias_indices(client, es.alias)
        if not targets:
            return []
        newest_target = max(int(r["creation.date"]) for r in rows if r["index"] in targets) if any(
            r["index"] in targets for r in rows) else 0
        others = [r for r in reversed(rows) if r["index"] not in targets]
        doomed = [r["index"] for r in others[es.keep_indices:] if int(r["creation.date"]) <= newest_target]
        if doomed:
            client.indices.delete(index=",".join(doomed))
            log.info("deleted old indices %s", doomed)
    return doomed


def rollback(settings: Settings, client: Elasticsearch | None = None) -> tuple[str, str]:
    """Move the alias back to the newest verified index older than its current target.

    Returns (from, to). Raises Near2Error when there is nothing to roll back to.
    """
    es = settings.elasticsearch
    client = client or make_client(settings)
    with es_errors(es.url, "rollback"):
        current = current_target(client, es.alias)
        if current is None:
            raise Near2Error(f"alias {es.alias} does not exist; nothing to roll back",
                             hint="build an index first with `near2 index --model ... --catalog ...`")
        rows = _alias_indices(client, es.alias)
        position = next((i for i, r in enumerate(rows) if r["index"] == current), len(rows))
        earlier = [r["index"] for r in rows[:position] if VERIFIED_AT in r["meta"]]
        if not earlier:
            raise Near2Error(f"no verified index older than {current} to roll back to",
                             hint="`near2 index status` lists the indices that are kept")
    swap_alias(client, es.alias, earlier[-1], current)
    return current, earlier[-1]


def index_status(settings: Settings, client: Elasticsearch | None = None) -> IndexStatus:
    """The alias target and every kept index with its model, dims, documents and size."""
    es = settings.elasticsearch
    client = client or make_client(settings)
    with es_errors(es.url, "index status"):
        targets = alias_targets(client, es.alias)
        infos = []
        for row in reversed(_alias_indices(client, es.alias)):
            meta = row["meta"]
            infos.append(IndexInfo(
                name=row["index"], docs=int(row["docs.count"] or 0), size_bytes=int(row["store.size"] or 0),
                serving=row["index"] in targets, verified=VERIFIED_AT in meta,
                model_name=meta.get("model_name"), model_version=meta.get("model_version"),
                model_uri=meta.get("model_uri"), dims=list(meta.get("dims") or []),
                catalog_version=meta.get("catalog_version"), built_at=meta.get("built_at")))
    return IndexStatus(alias=es.alias, target=targets[0] if len(targets) == 1 else None, indices=infos)


# ----- the whole step ---------------------------------------------------------------------------

def build_verify_swap(
    settings: Settings,
    model_ref: str,
    products: pd.DataFrame,
    model_version: str | int,
    run_id: str | None = None,
    catalog_version: str | None = None,
    dims: list[int] | None = None,
    vectors: np.ndarray | None = None,
    *,
    model_name: str | None = None,
    index_name: str | None = None,
    expected_current: str | None | type[Ellipsis] = ...,
    progress: Progress | None = None,
    champion: str | None = None,
    before_verify: Callable[[BuiltIndex, SentenceTransformer | None], BuiltIndex] | None = None,
    shards: int = 1,
) -> SwapResult:
    """Build, verify, swap (compare-and-swap against the target read before the build), prune.

    ``before_verify(built, model)``: runs on the loaded index before verification and swap and returns it
    with whatever ``_meta`` it added, e.g. :func:`near2_tasks.serving.hybrid_tuning.weight_tuning` (the hybrid
    weights measured on the validation split).

    ``expected_current``: the alias target the caller based its decision on (default: the target
    when this call starts). If the alias moved meanwhile, AliasChanged is raised after the build
    and the alias stays where the other run put it, unless :func:`swap_to_champion_index` retries
    (``champion``: the champion's version as the caller read it; this model is that version).
    ``shards``: see :func:`build_index`.
    """
    es = settings.elasticsearch
    client = make_client(settings)
    if expected_current is ...:
        with es_errors(es.url, "reading the alias"):
            expected_current = current_target(client, es.alias)
    built, model = _build(settings, model_ref, products, model_version, run_id, catalog_version, dims, vectors,
                          model_name=model_name, index_name=index_name, client=client, progress=progress,
                          shards=shards)
    if before_verify is not None:
        built = before_verify(built, model)
    report = verify_index(settings, built.name, products, model=model, client=client)
    previous = swap_to_champion_index(client, es.alias, built.name, expected_current,  # type: ignore[arg-type]
                                      model_version, champion)
    deleted = prune_indices(settings, client)
    return SwapResult(index=built, report=report, previous=previous, deleted=deleted)

