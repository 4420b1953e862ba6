"""Writing a serving index's documents: one document per product (a vector per dim, bit codes, the
product fields), bulk chunks with backoff and one clear error for what Elasticsearch refuses, and what
follows the last chunk (serving settings back, refresh, force-merge, documents not in the catalog removed).

:mod:`near2_tasks.serving.index` calls these from ``load_shard`` and ``finalize_index``. Re-sending a chunk
is harmless: a document's ``_id`` is its ``product_id``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from near2_tasks import conventions
from near2_tasks.errors import Near2Error
from near2_tasks.serving import compact
from near2_tasks.serving.es_client import error_reason, item_reason, unavailable

log = logging.getLogger(__name__)

#: ``progress(done, total)`` is called after every bulk chunk.
Progress = Callable[[int, int], None]

VECTOR_DECIMALS = 6  # JSON payload size; the rounding error is far below quantisation error


def product_source(row) -> dict[str, Any]:
    """The product fields of one catalog row (a prepared row's ``itertuples`` item) as a document holds them."""
    return {
        "product_id": row.product_id,
        "title": row.title,
        "category": None if row.category is None or pd.isna(row.category) else str(row.category),
        "brand": None if row.brand is None or pd.isna(row.brand) else str(row.brand),
        "price": None if row.price is None or pd.isna(row.price) else float(row.price),
    }


def documents(products: pd.DataFrame, vectors: np.ndarray, dims: list[int], start: int,
              stop: int, centres: dict[int, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """The bulk documents of rows ``start:stop``: the product fields, the vector at every dim, the bit codes
    of the dims in ``centres``; ``_id`` is the product id."""
    block = vectors[start:stop]
    per_dim = {d: np.round(conventions.truncate(block, d).astype(np.float64), VECTOR_DECIMALS) for d in dims}
    codes = {d: compact.binary_codes(block, d, centre) for d, centre in (centres or {}).items()}
    docs = []
    for offset, row in enumerate(products.iloc[start:stop].itertuples(index=False)):
        source = product_source(row)
        for d in dims:
            source[conventions.vector_field(d)] = per_dim[d][offset].tolist()
        for d, code in codes.items():
            source[conventions.binary_vector_field(d)] = compact.to_hex(code[offset])
        docs.append({"_id": row.product_id, "_source": source})
    return docs


def bulk_load(client, settings, name, products, vectors, dims, progress: Progress | None,
              centres: dict[int, np.ndarray] | None = None) -> None:
    """Every product into index ``name``, ``elasticsearch.bulk_chunk_size`` documents a chunk."""
    es = settings.elasticsearch
    total = len(products)
    next_log = 0.1
    for start in range(0, total, es.bulk_chunk_size):
        stop = min(total, start + es.bulk_chunk_size)
        actions = [{"_index": name, **doc} for doc in documents(products, vectors, dims, start, stop, centres)]
        send_chunk(client, settings, name, actions)
        if progress:
            progress(stop, total)
        if stop / total >= next_log:
            log.info("%s: %d/%d documents", name, stop, total)
            next_log += 0.1


def send_chunk(client, settings, name: str, actions: list[dict[str, Any]]) -> None:
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



def finish_load(client, settings, name: str) -> None:
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


def remove_strays(client, name: str, product_ids: set[str]) -> int:
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
