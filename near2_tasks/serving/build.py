"""A whole index build in one process: encode the catalog (or take precomputed vectors), the bit codes'
centres from the centre sample, then :mod:`near2_tasks.serving.index`'s ``create_index`` -> ``load_shard``
x N -> ``finalize_index``, one shard after another.

What ``publish.build_verify_swap`` (``near2 index``), the benchmarks and the tests use; the DAGs run the
same pieces as separate tasks (``serving/step.py``: ``encode_shard`` as mapped tasks). The alias is not
touched here.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, TypedDict, Unpack

import numpy as np

from near2_tasks.errors import Near2Error
from near2_tasks.serving.bulk import Progress
from near2_tasks.serving.es_client import make_client
from near2_tasks.serving.index import (BuiltIndex, binary_centres, centre_sample_positions, checked_dims, coded_dims,
                                       create_index, finalize_index, load_meta_model, load_shard, prepare_products,
                                       shard_positions)

if TYPE_CHECKING:
    import pandas as pd
    from elasticsearch import Elasticsearch
    from sentence_transformers import SentenceTransformer

    from near2_tasks.config import Settings

log = logging.getLogger(__name__)


class BuildOptions(TypedDict, total=False):
    """The optional keyword arguments of :func:`build_index` (and of ``publish.build_verify_swap``)."""

    run_id: str | None  # the MLflow run that produced the model, for _meta
    catalog_version: str | None  # default: a content hash of the rows
    dims: list[int] | None  # default: model.dims
    vectors: np.ndarray | None  # precomputed full-dimension embeddings aligned with the products
    model_name: str | None
    index_name: str | None  # finish this index instead of creating a new one
    client: Elasticsearch | None
    progress: Progress | None
    shards: int  # encode and load in that many slices, one after another (default 1)


def build_index(settings: Settings, model_ref: str, products: pd.DataFrame, model_version: str | int,
                **options: Unpack[BuildOptions]) -> BuiltIndex:
    """Create a new index (or finish ``index_name``) and bulk-load every product at every dimension.

    ``vectors``: optional precomputed full-dimension embeddings aligned with ``products`` (they must
    come from ``model_ref``: verification re-encodes a sample with it). ``shards``: the catalog is
    encoded and loaded in that many slices, one after another (what the DAG's mapped tasks do in
    parallel); the index is the same. The alias is not touched.
    """
    return build_with_encoder(settings, model_ref, products, model_version, options)[0]


def build_with_encoder(settings: Settings, model_ref: str, products: pd.DataFrame, model_version: str | int,
                       options: BuildOptions) -> tuple[BuiltIndex, SentenceTransformer | None]:
    """:func:`build_index`, also returning the encoder it loaded (None when ``vectors`` were given), so
    that verification re-encodes with the same one."""
    from near2_tasks.models.embeddings import encode

    unknown = sorted(set(options) - set(BuildOptions.__annotations__))
    if unknown:
        raise TypeError(f"build_index() got unexpected keyword arguments {unknown}")
    progress, shards = options.get("progress"), int(options.get("shards", 1))
    products = prepare_products(products, settings.dataset.text_template)
    dims = checked_dims(settings, list(options.get("dims") or settings.model.dims))
    if shards < 1:
        raise Near2Error(f"shards must be >= 1, got {shards}")
    model, vectors = _encoder_or_vectors(settings, model_ref, products, dims, options.get("vectors"))

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
    client = options.get("client") or make_client(settings)
    created = create_index(settings, model_ref, products, model_version, options.get("run_id"),
                           options.get("catalog_version"), dims, centres=centres, model_name=options.get("model_name"),
                           index_name=options.get("index_name"), client=client)
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


def _encoder_or_vectors(settings: Settings, model_ref: str, products: pd.DataFrame, dims: list[int],
                        vectors: np.ndarray | None) -> tuple[SentenceTransformer | None, np.ndarray | None]:
    """The encoder of ``model_ref`` when no ``vectors`` are given, else the vectors as float32, one per
    product; either way the dims must fit their dimension."""
    from near2_tasks.models.embeddings import check_dims, model_dimension

    if vectors is None:
        model = load_meta_model(settings, model_ref)
        check_dims(dims, model_dimension(model))
        return model, None
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(products):
        raise Near2Error(f"vectors have shape {vectors.shape}, expected ({len(products)}, <dim>)",
                         hint="pass one full-dimension vector per product, in catalog order")
    check_dims(dims, vectors.shape[1])
    return None, vectors
