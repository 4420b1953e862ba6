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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from near2_tasks import conventions

from near2_tasks.serving import compact
from near2_tasks.errors import Near2Error
from near2_tasks.serving.alias import meta_of
from near2_tasks.serving.mapping import index_body, vector_mapping
from near2_tasks.serving.es_client import error_reason, es_errors, make_client, unavailable

if TYPE_CHECKING:
    from elasticsearch import Elasticsearch
    from sentence_transformers import SentenceTransformer

    from near2_tasks.config import Settings

log = logging.getLogger(__name__)

#: ``progress(done, total)`` is called after every bulk chunk.
Progress = Callable[[int, int], None]


VECTOR_DECIMALS = 6  # JSON payload size; the rounding error is far below quantisation error


@dataclass(frozen=True)
class BuiltIndex:
    name: str
    count: int
    meta: dict[str, Any]


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
        return meta_of(client, index_name)


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
            old = meta_of(client, index_name)
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
        reason = item_reason(next(iter(failures[0].values())).get("error"))
        statuses = sorted({next(iter(f.values())).get("status") for f in failures})
        hint = "fix the documents or the mapping and re-run"
        if "cluster_block_exception" in reason:  # checked first: a read-only block also answers 429
            hint = ("the index or cluster is read-only (disk watermark?): free disk space, clear "
                    "index.blocks.* and re-run")
        elif statuses == [429]:
            hint = "the cluster is overloaded: retry later or lower elasticsearch.bulk_chunk_size"
        raise Near2Error(f"Elasticsearch rejected {len(failures)} of {len(actions)} documents in {name} "
                         f"(HTTP {statuses}): {reason}", hint=hint)


def item_reason(error: Any) -> str:
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


# ----- alias ----------------------------------------------------------------------------------


# ----- inventory, pruning, rollback -------------------------------------------------------------


# ----- the whole step ---------------------------------------------------------------------------


