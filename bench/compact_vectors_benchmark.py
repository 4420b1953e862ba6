"""Compact vectors: memory per vector against NDCG@10, recall@10 and latency, through Elasticsearch.

    .venv/bin/python bench/compact_vectors_benchmark.py --start-local-es       # own ES on port 9253
    .venv/bin/python bench/compact_vectors_benchmark.py --es-url http://127.0.0.1:9200 --model base \
        --types hnsw,int4_flat,bit_flat --no-funnel

On the Home Depot catalog (54,667 products) and its **test-split** queries (``examples.configured_splits`` with
the pipeline's seed, so a trained model never saw them), for the trained model at ``--trained-model``
(default ``.near2/bench/trained-homedepot``; ``--model base`` or a missing directory: the base MiniLM):

* **kNN per (vector type, dimension)**: every Elasticsearch type (``hnsw``, ``int8_hnsw``, ``int4_hnsw``,
  ``bbq_hnsw``, ``flat``, ``int8_flat``, ``int4_flat``, ``bbq_flat``; bbq only where ES accepts the dims)
  built with the production mapping (``near2_tasks.serving.build.build_index``), plus ``bit`` fields holding the
  project's own binary codes (``near2_tasks.serving.compact``: sign bits of the centred nested prefix), ``flat``
  and ``hnsw``. Measured: NDCG@10 of ES's kNN answer (k=10, num_candidates=100), recall@10 against exact
  float search at that dimension (numpy), p50/p99 latency (single client, all configurations interleaved
  query by query), bytes per vector on disk (disk-usage API, ``knn_vectors``) and the bytes per vector
  that must stay in memory (ES sizing: the quantised copy, or the floats, plus ~4·m bytes of HNSW graph;
  the raw floats behind a quantised field stay on disk and are only read to rescore).
* **funnel grid**: shortlist from a compact field (size N) rescored exactly at dimension D on ``flat``
  float fields, as ``near2_tasks.serving.search.Searcher.retrieve`` does (an ids-filtered kNN): NDCG@10 and QPS
  per (shortlist field, N, D).

Memory accounting of a funnel: the shortlist field is what every query scans (RAM); the rescoring floats
are only read for N documents per query, so they count as disk (plus whatever page cache the hot ones
take), not as vector-index memory. The tables list both.

Rankings are scored by the evaluation entry point (``near2_tasks.evaluate.retrieval``: qrels from the
judgments, the relevance floor and threshold from the dataset settings, exact search by ``rank_whole_catalog``).
Indices are force-merged to one segment and deleted afterwards (``--keep`` keeps them). The Home Depot
data is research-only: it is read from ``--data-dir``, never copied.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_retrieval import ndcg  # noqa: E402
from serving_benchmark import (  # noqa: E402
    add_common_arguments, bytes_per_vector, load_homedepot, percentile_ms, ram_estimate)

from near2_tasks import conventions  # noqa: E402
from near2_tasks.serving.compact import binary_codes, catalog_centre, to_hex  # noqa: E402
from near2_tasks.config import load_settings  # noqa: E402
from near2_tasks.models.settings import PACKAGED_MINILM  # noqa: E402
from near2_tasks.models.embeddings import encode, encode_cached, load_encoder  # noqa: E402
from near2_tasks.train.examples import configured_splits  # noqa: E402
from near2_tasks.serving.build import build_index  # noqa: E402
from near2_tasks.evaluate.evaluation import EvaluationData, prepare_data  # noqa: E402
from near2_tasks.evaluate.retrieval import overlap_at, rank_whole_catalog, rows_of  # noqa: E402

log = logging.getLogger("compact_vectors")

DIMS = [384, 256, 128, 64, 32]
ES_TYPES = ["hnsw", "int8_hnsw", "int4_hnsw", "bbq_hnsw", "flat", "int8_flat", "int4_flat", "bbq_flat"]
BIT_DIMS = [384, 256, 128, 64, 32]
BIT_TYPES = ["bit_flat", "bit_hnsw", "bit_flat_uncentred"]  # the last: the centring ablation
K = 10
NUM_CANDIDATES = 100
FLOAT_BYTES_FULL = 4 * 384
SHORTLISTS = [100, 200, 400, 800, 1000, 1600]
RESCORE_DIMS = [128, 256, 384]
SHORTLIST_FIELDS = [("bit_flat", 64), ("bit_flat", 128), ("bit_flat", 32), ("int4_flat", 32), ("int8_flat", 32),
                    ("bbq_flat", 128)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, port=9253)
    parser.add_argument("--model", default="trained", help="'trained' (falls back to base if absent) or 'base'")
    parser.add_argument("--trained-model", type=Path, default=REPO / ".near2" / "bench" / "trained-homedepot")
    parser.add_argument("--types", default=",".join(ES_TYPES + BIT_TYPES))
    parser.add_argument("--no-funnel", action="store_true")
    parser.add_argument("--shortlist-fields", default=",".join(f"{k}:{d}" for k, d in SHORTLIST_FIELDS),
                        help="funnel first stages as type:dim, e.g. bit_flat:64,bit_flat:128 (int4/int8 shortlists "
                             "of 1000+ take minutes per setting)")
    parser.add_argument("--out", type=Path, default=REPO / ".near2" / "bench" / "compact_vectors.json")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark indices")
    parser.add_argument("--limit", type=int, help="first N products only (a dry run; use another --cache-dir)")
    return parser.parse_args()


# ----- data ---------------------------------------------------------------------------------------------
def model_and_vectors(args, titles: list[str]) -> tuple[Any, str, str, np.ndarray]:
    """The model, its reference, a label, and the catalog's vectors (the team's embedding cache)."""
    from near2_tasks.models.refs import resolve_model

    trained = args.trained_model
    if args.model == "trained" and trained.exists():
        ref, label = str(trained), f"NEAR² trained ({trained.name})"
    else:
        if args.model == "trained":
            log.warning("no trained model at %s: using the base model", trained)
        ref, label = PACKAGED_MINILM, "all-MiniLM-L6-v2 (base)"
    model = load_encoder(ref, device="cpu")
    key = resolve_model(load_settings(), ref).cache_key  # the key evaluation uses: shares the team's cache
    vectors = encode_cached(model, key, titles, args.cache_dir, show_progress=True)
    return model, ref, label, vectors


def test_queries(settings, judgments: pd.DataFrame, products: pd.DataFrame) -> EvaluationData:
    """The test-split queries and their judgments on ``products`` (the pipeline's split)."""
    return prepare_data(products, configured_splits(settings, judgments).test, settings.dataset.text_template)


# ----- indices ------------------------------------------------------------------------------------------
def build_es_type(settings, model_ref: str, products: pd.DataFrame, vectors: np.ndarray, kind: str,
                  dims: list[int]) -> str:
    """An index of one ES vector type with a field per dimension, via the production ``build_index``."""
    options = {d: settings.elasticsearch.field_options(d).model_copy(update={"index_type": kind}) for d in dims}
    typed = settings.model_copy(update={"elasticsearch": settings.elasticsearch.model_copy(update={
        "index_options": options, "alias": f"bench-compact-{kind.replace('_', '-')}"})})
    return build_index(typed, model_ref, products, "compact", dims=dims, vectors=vectors,
                       catalog_version="homedepot").name


def build_bit_index(client, products: pd.DataFrame, vectors: np.ndarray, centre: dict | None, kind: str,
                    dims: list[int]) -> str:
    """``bit`` fields (``embedding_<d>``: the centred sign bits of the d-prefix), hnsw or flat."""
    from elasticsearch import helpers

    name = f"bench-compact-{kind.replace('_', '-')}-{int(time.time())}"
    index_type = kind.split("_")[1]
    properties = {conventions.vector_field(d): {"type": "dense_vector", "element_type": "bit", "dims": d,
                                                 "index": True, "similarity": "l2_norm",
                                                 "index_options": {"type": index_type}} for d in dims}
    client.indices.create(index=name, settings={"number_of_shards": 1, "number_of_replicas": 0,
                                                "refresh_interval": "-1"},
                          mappings={"dynamic": "strict", "properties": properties})
    codes = {d: binary_codes(vectors, d, None if centre is None else catalog_centre(vectors, d)) for d in dims}
    ids = products.product_id.tolist()
    actions = ({"_index": name, "_id": ids[i], "_source": {conventions.vector_field(d): to_hex(codes[d][i])
                                                            for d in dims}} for i in range(len(ids)))
    helpers.bulk(client, actions, chunk_size=2000, request_timeout=300)
    client.indices.refresh(index=name)
    client.indices.forcemerge(index=name, max_num_segments=1, request_timeout=1800)
    client.indices.refresh(index=name)
    return name


# ----- queries ------------------------------------------------------------------------------------------
class Config:
    """One way to answer a query: a field of an index, and how to turn the query vector into its input."""

    def __init__(self, kind: str, dim: int, index: str, centre: dict[int, np.ndarray] | None = None) -> None:
        self.kind, self.dim, self.index, self.centre = kind, dim, index, centre

    @property
    def label(self) -> str:
        return f"{self.kind} {self.dim}"

    def query_vector(self, vector: np.ndarray) -> Any:
        if self.kind.startswith("bit"):  # the same codes as the documents (centred unless the ablation)
            return to_hex(binary_codes(vector, self.dim, None if self.centre is None else self.centre[self.dim])[0])
        return [float(x) for x in conventions.truncate(vector, self.dim)]

    def knn(self, client, vector: np.ndarray, k: int, num_candidates: int, ids: list[str] | None = None
            ) -> tuple[list[str], float]:
        knn: dict[str, Any] = {"field": conventions.vector_field(self.dim), "query_vector": self.query_vector(vector),
                               "k": k, "num_candidates": num_candidates}
        if ids is not None:
            knn["filter"] = [{"ids": {"values": ids}}]
        began = time.perf_counter()
        response = client.search(index=self.index, knn=knn, size=k, source=False)
        return [hit["_id"] for hit in response["hits"]["hits"]], time.perf_counter() - began


def run_interleaved(functions: list, vectors: np.ndarray) -> list[tuple[list[list[str]], list[float]]]:
    """Each function on every query, rotating the order query by query (background load hits all alike)."""
    for function in functions:  # warm-up: graphs and vectors into the page cache
        for vector in vectors[:20]:
            function(vector)
    out: list[tuple[list[list[str]], list[float]]] = [([], []) for _ in functions]
    for i, vector in enumerate(vectors):
        for j in range(len(functions)):
            c = (i + j) % len(functions)
            ids, seconds = functions[c](vector)
            out[c][0].append(ids)
            out[c][1].append(seconds)
    return out


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("elastic_transport").setLevel(logging.WARNING)
    server_settings = None
    if args.start_local_es:
        from near2_tasks.serving import elasticsearch_local

        port = int(args.es_url.rsplit(":", 1)[1])
        server_settings = load_settings(local_elasticsearch={"port": port, "heap": args.heap})
        elasticsearch_local.start(server_settings)
    try:
        run(args)
    finally:
        if server_settings is not None:
            from near2_tasks.serving import elasticsearch_local

            elasticsearch_local.stop(server_settings)


def run(args: argparse.Namespace) -> None:
    from near2_tasks.serving.es_client import make_client

    settings = load_settings(
        home=str(REPO / ".near2" / "bench" / "compact-home"),
        elasticsearch={"url": args.es_url, "force_merge": True, "request_timeout": 300,
                       "num_candidates": NUM_CANDIDATES, "verify_sample_size": 5},
        model={"dims": DIMS})
    client = make_client(settings)
    products, judgments = load_homedepot(args.data_dir)
    titles = products.title.astype(str).tolist()
    products = products.assign(title=titles, text=titles)
    if args.limit:  # a quick dry run on the first products (use another --cache-dir)
        products, titles = products.head(args.limit), titles[:args.limit]
        judgments = judgments[judgments.product_id.isin(set(products.product_id))]
    model, model_ref, label, doc_vectors = model_and_vectors(args, titles)
    data = test_queries(settings, judgments, products)
    query_vectors = encode(model, data.query_texts, batch_size=64)
    centre = {d: catalog_centre(doc_vectors, d) for d in BIT_DIMS}  # per dimension, as the index stores it
    types = args.types.split(",")
    log.info("%s: %d products, %d test queries, types %s", label, len(products), len(data.query_texts), types)

    results: dict[str, Any] = {"model": label, "products": len(products), "test_queries": len(data.query_texts),
                               "knn": [], "funnel": []}
    built: list[str] = []
    configs: list[Config] = []
    meta: dict[str, dict[str, Any]] = {}
    try:
        for kind in types:
            began = time.monotonic()
            if kind.startswith("bit"):
                dims = [d for d in BIT_DIMS if d % 8 == 0]
                bit_centre = None if kind.endswith("uncentred") else centre
                name = build_bit_index(client, products, doc_vectors, bit_centre, kind, dims)
            else:
                dims = [d for d in DIMS if not kind.startswith("bbq") or d > 64]
                name = build_es_type(settings, model_ref, products, doc_vectors, kind, dims)
            built.append(name)
            disk, store = bytes_per_vector(client, name, dims, len(products))
            log.info("built %s (%s) in %.0fs", kind, name, time.monotonic() - began)
            for d in dims:
                config = Config(kind, d, name, None if not kind.startswith("bit") or kind.endswith("uncentred")
                                else centre)
                configs.append(config)
                ram = d / 8 + (64 if "hnsw" in kind else 0) if kind.startswith("bit") else ram_estimate(kind, d)
                meta[config.label] = {"type": kind, "dim": d, "disk_bytes_per_vector": disk[d],
                                      "ram_bytes_per_vector": ram, "index_store_mib": round(store / 2**20, 1)}

        exact = {d: rank_whole_catalog(query_vectors, doc_vectors, d, K) for d in DIMS}
        runs = run_interleaved([lambda v, c=c: c.knn(client, v, K, NUM_CANDIDATES) for c in configs], query_vectors)
        for config, (ids, seconds) in zip(configs, runs):
            recall = overlap_at(rows_of(data, ids, K), exact[config.dim], K)
            info = meta[config.label]
            row = {**info, "ndcg@10": round(ndcg(data, settings, ids=ids, k=K), 4), "recall@10": round(recall, 4),
                   "p50_ms": percentile_ms(seconds, 50), "p99_ms": percentile_ms(seconds, 99),
                   "qps": round(len(seconds) / sum(seconds), 1),
                   "ram_reduction": round(FLOAT_BYTES_FULL / info["ram_bytes_per_vector"], 1)}
            log.info("%s", row)
            results["knn"].append(row)
        exact_ndcg = {d: round(ndcg(data, settings, rows=exact[d], k=K), 4) for d in DIMS}
        results["exact_float_ndcg"] = exact_ndcg
        log.info("exact float NDCG@10 per dim: %s", exact_ndcg)

        if not args.no_funnel:
            fields = [(kind, int(dim)) for kind, dim in (f.split(":") for f in args.shortlist_fields.split(","))]
            results["funnel"] = funnel_grid(client, configs, meta, query_vectors, data, settings, fields)
    finally:
        if not args.keep and built:
            client.indices.delete(index=",".join(built), ignore_unavailable=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    log.info("results in %s", args.out)


def funnel_grid(client, configs: list[Config], meta: dict, query_vectors: np.ndarray, data: EvaluationData,
                settings, fields: list[tuple[str, int]] = SHORTLIST_FIELDS) -> list[dict[str, Any]]:
    """NDCG@10 and latency of (shortlist field, size N) rescored exactly on float ``flat`` fields at D."""
    by_label = {c.label: c for c in configs}
    rescorers = {d: by_label.get(f"flat {d}") for d in RESCORE_DIMS}
    rows = []
    for kind, dim in fields:
        shortlist = by_label.get(f"{kind} {dim}")
        if shortlist is None:
            continue
        functions, labels = [], []
        for n in SHORTLISTS:
            for d in RESCORE_DIMS:
                if rescorers[d] is None or d <= dim:
                    continue

                def funnel(v, s=shortlist, r=rescorers[d], n=n):
                    ids, first = s.knn(client, v, n, max(n, NUM_CANDIDATES))
                    if not ids:
                        return [], first
                    top, second = r.knn(client, v, K, len(ids), ids=ids)
                    return top, first + second

                functions.append(funnel)
                labels.append((n, d))
        if not functions:
            continue
        log.info("funnel from %s %d: %d settings", kind, dim, len(functions))
        for (n, d), (ids, seconds) in zip(labels, run_interleaved(functions, query_vectors)):
            info = meta[shortlist.label]
            row = {"shortlist_type": kind, "shortlist_dim": dim, "shortlist": n, "rescore_dim": d,
                   "ndcg@10": round(ndcg(data, settings, ids=ids, k=K), 4), "p50_ms": percentile_ms(seconds, 50),
                   "p99_ms": percentile_ms(seconds, 99), "qps": round(len(seconds) / sum(seconds), 1),
                   "ram_bytes_per_vector": info["ram_bytes_per_vector"],
                   "ram_reduction": round(FLOAT_BYTES_FULL / info["ram_bytes_per_vector"], 1),
                   "disk_bytes_per_vector": round(info["disk_bytes_per_vector"] + 4 * d, 1)}
            log.info("%s", row)
            rows.append(row)
    return rows


def markdown(results: dict[str, Any]) -> str:
    # the reference: float at the full dimension (flat: exact; else hnsw), else the first row
    ref = next((r["ndcg@10"] for kind in ("flat", "hnsw") for r in results["knn"]
                if r["type"] == kind and r["dim"] == 384), results["knn"][0]["ndcg@10"] if results["knn"] else None)
    lines = [f"Model: {results['model']}; {results['products']} products; {results['test_queries']} test queries; "
             f"exact float NDCG@10 per dim: {results.get('exact_float_ndcg')}", "",
             "| type | dim | RAM B/vector | × less than 384-d float | disk B/vector | NDCG@10 | Δ vs float 384 | "
             "recall@10 | p50 ms | p99 ms | QPS |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    def delta(row: dict[str, Any]) -> str:
        return f"{100 * (row['ndcg@10'] - ref) / ref:+.1f}%" if ref else "-"

    for r in results["knn"]:
        lines.append(f"| {r['type']} | {r['dim']} | {r['ram_bytes_per_vector']:g} | {r['ram_reduction']:g} | "
                     f"{r['disk_bytes_per_vector']:g} | {r['ndcg@10']} | {delta(r)} | {r['recall@10']} | {r['p50_ms']} | "
                     f"{r['p99_ms']} | {r['qps']} |")
    if results["funnel"]:
        lines += ["", "| shortlist field | N | rescore dim | RAM B/vector | × less | disk B/vector | NDCG@10 | "
                  "Δ vs float 384 | p50 ms | p99 ms | QPS |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["funnel"]:
            lines.append(f"| {r['shortlist_type']} {r['shortlist_dim']} | {r['shortlist']} | {r['rescore_dim']} | "
                         f"{r['ram_bytes_per_vector']:g} | {r['ram_reduction']:g} | {r['disk_bytes_per_vector']:g} | "
                         f"{r['ndcg@10']} | {delta(r)} | {r['p50_ms']} | {r['p99_ms']} | {r['qps']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
