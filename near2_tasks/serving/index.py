"""Versioned serving indices, created and loaded in three steps, so that the middle one can run as N
independent shards (the DAG's mapped ``encode_shard`` tasks, or ``near2 index --shards N`` one after
another, :mod:`near2_tasks.serving.build`):

    create_index (mapping + _meta: model, dims, bit-code centres) -> load_shard x N -> finalize_index

Also here: the catalog rows as indexed (:func:`prepare_products`), the model an index's ``_meta`` names,
which products make a shard and which give the bit codes' centre. The documents and bulk requests are
:mod:`near2_tasks.serving.bulk`; verification, the alias and pruning come after
(:mod:`near2_tasks.serving.verify`, :mod:`near2_tasks.serving.alias`).

One index per model version, ``<alias>-v<version>-<UTC timestamp>``, with one ``dense_vector`` field
per served dimension (``embedding_<d>``; plus ``embedding_<d>_bits`` codes for the dims in
``elasticsearch.binary_dims``, see :mod:`near2_tasks.serving.compact`) and the product fields for display
and filters. ``_meta`` records the model that encoded the documents (``model_uri`` pinned to a concrete
version), so the search side encodes queries with exactly that model (invariant 3).

A product belongs to shard ``stable_bucket(product_id, N)``; every shard reads the dims and centres from
the index's ``_meta`` and writes documents keyed by ``product_id``, so a re-run shard overwrites what its
failed attempt wrote, never duplicates. Pass a failed run's ``index_name`` to finish that index, or leave
it out to start a fresh one (the half-built index is never verified, so it is never served, and pruning
removes it).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from near2_tasks import conventions

from near2_tasks.serving import compact, rescore_store
from near2_tasks.errors import Near2Error
from near2_tasks.serving.alias import meta_of
from near2_tasks.serving.bulk import Progress, bulk_load, finish_load, remove_strays
from near2_tasks.serving.mapping import index_body, vector_mapping
from near2_tasks.serving.es_client import error_reason, es_errors, make_client

if TYPE_CHECKING:
    from elasticsearch import Elasticsearch
    from sentence_transformers import SentenceTransformer

    from near2_tasks.config import Settings

log = logging.getLogger(__name__)


# ----- products --------------------------------------------------------------------------------------

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


# ----- shards and the bit codes' centre ------------------------------------------------------------

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


# ----- create, load, finalize -----------------------------------------------------------------------

@dataclass(frozen=True)
class BuiltIndex:
    """An index as :func:`create_index` and :func:`finalize_index` leave it: its name, the documents it
    holds, its ``_meta``."""
    name: str
    count: int
    meta: dict[str, Any]


def checked_dims(settings: Settings, dims: list[int]) -> list[int]:
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
    dims = checked_dims(settings, list(dims or settings.model.dims))
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
    dims and with the bit-code centres its ``_meta`` records (``meta``: the caller read it already); with
    ``serving.funnel_rescore: local`` also the shard's part of the rescoring store
    (:mod:`near2_tasks.serving.rescore_store`).
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
    centres = compact.meta_centres(meta)
    if rescore_store.wanted(settings) and len(products):  # this shard's part of the funnel's local store
        rescore_store.write_part(settings, index_name, products, vectors, centres)
    with es_errors(settings.elasticsearch.url, f"bulk load of {index_name}"):
        bulk_load(client, settings, index_name, products, vectors, dims, progress, centres)
    return len(products)


def finalize_index(settings: Settings, index_name: str, products: pd.DataFrame, *,
                   client: Elasticsearch | None = None, meta: dict[str, Any] | None = None) -> BuiltIndex:
    """After every shard: serving settings back (refresh interval, replicas), refresh, force-merge
    (``elasticsearch.force_merge``), documents not in ``products`` removed; the count must then be the
    catalog's (a shard that did not load fails here, before verification); with ``serving.funnel_rescore:
    local`` the shards' parts are merged into the index's rescoring store."""
    products = prepare_products(products, settings.dataset.text_template)
    client = client or make_client(settings)
    meta = meta if meta is not None else index_meta(settings, index_name, client)
    with es_errors(settings.elasticsearch.url, f"finishing the load of {index_name}"):
        finish_load(client, settings, index_name)
        count = remove_strays(client, index_name, set(products.product_id))
    if count != len(products):
        raise Near2Error(f"index {index_name} holds {count} documents after the load, the catalog has "
                         f"{len(products)}: a shard did not load all its products",
                         hint="re-run the shards of this build (their documents are keyed by product_id)")
    if rescore_store.wanted(settings):  # the shards' parts merged into one store (serving.funnel_rescore)
        rescore_store.finalize(settings, index_name, products, meta, count)
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
