"""Serving benchmark: kNN latency, QPS, recall and index size per dimension and index option, and the
funnel against full-dimension kNN, on the Home Depot catalog (54,667 products) in a real Elasticsearch.

    .venv/bin/python bench/serving_benchmark.py --start-local-es            # own ES on port 9252
    .venv/bin/python bench/serving_benchmark.py --es-url http://127.0.0.1:9200 --queries 200

What is measured (single client, sequential requests, after a warm-up):

* per index option (hnsw, int8_hnsw, int4_hnsw, bbq_hnsw for dims >= 128, flat) and dimension:
  p50/p99 latency and QPS of the kNN request (``Searcher.retrieve``, the production code path; k=10,
  num_candidates=100), the same including the query's encoding (that query's own measured encode time
  with the production setting, one torch thread), recall@10 of the approximate kNN against exact search
  (``evaluate.retrieval.rank_whole_catalog``, the same truncated float32 vectors), bytes per vector of
  the field on disk (disk usage API: raw floats, quantized copy and HNSW graph), the bytes per vector
  that must stay in RAM (ES sizing formula) and the index's store size. All configs are timed side by
  side, query by query;
* funnel (shortlist at a small dim, rescored at the full dim) against kNN at one dimension: NDCG@10 on
  the held-out test queries of the team's query split (``examples.configured_splits``; the trained model
  never saw them), with exact search's NDCG@10 at the same dimension for reference, and latency/QPS, on
  an index with the configured per-dimension defaults (``--funnel-index``). Rankings are scored by the
  evaluation entry point (``evaluate.retrieval.evaluate_retriever``; the relevance scale from settings).

Indices are built with ``near2_tasks.serving.build.build_index`` from the team's cached base-model title
embeddings (``<cache>/minilm-base-*.npy``) and force-merged to one segment. With ``--trained-model``
(default: ``.near2/bench/trained-homedepot`` when present) the funnel/NDCG rows are repeated for it.
The Home Depot data is research-only: it is read from ``--data-dir``, never copied.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "bench"))

from bench_retrieval import score  # noqa: E402

from near2_tasks import conventions  # noqa: E402
from near2_tasks.config import load_settings  # noqa: E402
from near2_tasks.models.settings import PACKAGED_MINILM  # noqa: E402
from near2_tasks.evaluate.evaluation import prepare_data  # noqa: E402
from near2_tasks.evaluate.retrieval import (  # noqa: E402
    ExactRetriever, evaluate_retriever, overlap_at, rank_whole_catalog, rows_of, scale_of)
from near2_tasks.models.embeddings import encode, encode_cached, load_encoder  # noqa: E402
from near2_tasks.serving.build import build_index  # noqa: E402
from near2_tasks.serving.query_encoder import torch_threads  # noqa: E402
from near2_tasks.serving.search import Searcher  # noqa: E402
from near2_tasks.serving.served_index import ServingIndex  # noqa: E402

log = logging.getLogger("serving_benchmark")

DIMS = [384, 256, 128, 64, 32]
OPTIONS = ["hnsw", "int8_hnsw", "int4_hnsw", "bbq_hnsw", "flat"]
K = 10
NUM_CANDIDATES = 100


def add_common_arguments(parser: argparse.ArgumentParser, port: int) -> None:
    """The options every Elasticsearch benchmark on Home Depot takes: data, its own ES, the embedding cache."""
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "homedepot")
    parser.add_argument("--es-url", default=f"http://127.0.0.1:{port}")
    parser.add_argument("--start-local-es", action="store_true", help="start (and stop) a local ES at --es-url's port")
    parser.add_argument("--heap", default="1g", help="heap of the ES started with --start-local-es")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".near2" / "cache" / "embeddings")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, port=9252)
    parser.add_argument("--model", default=PACKAGED_MINILM)
    parser.add_argument("--model-key", default="minilm-base", help="encode_cached key of the base model")
    parser.add_argument("--trained-model", type=Path, default=REPO / ".near2" / "bench" / "trained-homedepot")
    parser.add_argument("--dims", default=",".join(map(str, DIMS)))
    parser.add_argument("--options", default=",".join(OPTIONS), help="index options of the kNN table ('' skips it)")
    parser.add_argument("--funnel-index", default="default",
                        help="index option of the funnel/NDCG rows ('default': the configured per-dimension defaults)")
    parser.add_argument("--skip-base-funnel", action="store_true", help="funnel/NDCG rows of the trained model only")
    parser.add_argument("--queries", type=int, default=300, help="queries timed per (option, dim)")
    parser.add_argument("--ndcg-queries", type=int, default=0,
                        help="cap on the test-split queries of the funnel NDCG rows (0: all of them)")
    parser.add_argument("--shortlist", type=int, default=100)
    parser.add_argument("--out", type=Path, default=REPO / ".near2" / "bench" / "serving_benchmark.json")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark indices afterwards")
    parser.add_argument("--limit", type=int, help="first N products only (a quick dry run; use another --cache-dir)")
    return parser.parse_args()


def percentile_ms(seconds: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(seconds) * 1000, q)), 2)


def encode_one_by_one(model, texts: list[str]) -> tuple[np.ndarray, list[float]]:
    """Each query encoded alone, as the service does (one torch thread): vectors and seconds."""
    vectors, seconds = [], []
    with torch_threads(1):
        encode(model, texts[:5])  # warm-up
        for text in texts:
            began = time.perf_counter()
            vectors.append(encode(model, [text], batch_size=1)[0])
            seconds.append(time.perf_counter() - began)
    return np.stack(vectors), seconds


def timed_side_by_side(searcher: Searcher, configs: list[tuple], vectors: np.ndarray, warm_up: int = 30
                       ) -> list[tuple[list[list[str]], list[float]]]:
    """Time every (served index, dim, shortlist dim) config on the same queries, interleaved query by
    query (rotating the order), so background load on this shared host hits every config alike.
    Returns per config: the product ids and the seconds of each request."""
    for served, dim, shortlist_dim in configs:  # load graphs and vectors into the page cache
        for vector in vectors[:warm_up]:
            searcher.retrieve(served, vector, K, dim, shortlist_dim, num_candidates=NUM_CANDIDATES)
    out: list[tuple[list[list[str]], list[float]]] = [([], []) for _ in configs]
    for i, vector in enumerate(vectors):
        for j in range(len(configs)):
            c = (i + j) % len(configs)
            served, dim, shortlist_dim = configs[c]
            began = time.perf_counter()
            result = searcher.retrieve(served, vector, K, dim, shortlist_dim, num_candidates=NUM_CANDIDATES)
            out[c][1].append(time.perf_counter() - began)
            out[c][0].append([hit.product_id for hit in result.hits])
    return out


def ram_estimate(option: str, dim: int, m: int = 16) -> float:
    """Bytes per vector that must stay in memory for fast search (ES docs' sizing formula: the
    quantized copy, or the floats, plus the HNSW graph); raw floats of quantized fields stay on disk."""
    vector = {"int8": dim + 4, "int4": dim / 2 + 4, "bbq": dim / 8 + 14}.get(option.split("_")[0], 4 * dim)
    return vector + (4 * m if "hnsw" in option else 0)


def bytes_per_vector(client, index: str, dims: list[int], docs: int) -> tuple[dict[int, float], int]:
    usage = client.indices.disk_usage(index=index, run_expensive_tasks=True)[index]
    fields = usage["fields"]
    per_dim = {}
    for dim in dims:
        field = fields.get(conventions.vector_field(dim), {})
        per_dim[dim] = round(field.get("knn_vectors_in_bytes", 0) / docs, 1)
    return per_dim, int(usage["store_size_in_bytes"])


def build(settings, model_ref: str, products: pd.DataFrame, vectors: np.ndarray, option: str, dims: list[int],
          version: str) -> tuple[str, float]:
    """Build with ``option`` on every dimension ("default": the configured per-dimension defaults)."""
    index_options = {} if option == "default" else {
        d: settings.elasticsearch.field_options(d).model_copy(update={"index_type": option}) for d in dims}
    opt_settings = settings.model_copy(update={"elasticsearch": settings.elasticsearch.model_copy(update={
        "index_options": index_options, "alias": f"bench-serving-{option.replace('_', '-')}"})})
    began = time.monotonic()
    built = build_index(opt_settings, model_ref, products, version, dims=dims, vectors=vectors,
                        catalog_version="homedepot")
    return built.name, time.monotonic() - began


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("elastic_transport").setLevel(logging.WARNING)
    dims = [int(d) for d in args.dims.split(",")]
    options = [o for o in args.options.split(",") if o]
    server_settings = None
    if args.start_local_es:
        from near2_tasks.serving import elasticsearch_local

        port = int(args.es_url.rsplit(":", 1)[1])
        server_settings = load_settings(local_elasticsearch={"port": port, "heap": args.heap})
        elasticsearch_local.start(server_settings)
    settings = load_settings(
        home=str(REPO / ".near2" / "bench" / "serving-home"),
        elasticsearch={"url": args.es_url, "force_merge": True, "bulk_chunk_size": 500, "request_timeout": 120,
                       "num_candidates": NUM_CANDIDATES},
        model={"dims": dims}, serving={"funnel_shortlist_size": args.shortlist, "encode_threads": 1})
    try:
        results = run(args, settings, dims, options)
    finally:
        if server_settings is not None:
            from near2_tasks.serving import elasticsearch_local

            elasticsearch_local.stop(server_settings)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    log.info("results in %s", args.out)


def load_homedepot(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    products = pd.read_csv(data_dir / "products.csv", dtype={"product_id": str})
    judgments = pd.read_csv(data_dir / "judgments.csv", dtype={"product_id": str, "query_id": str})
    return products, judgments


def run(args, settings, dims: list[int], options: list[str]) -> dict:
    from near2_tasks.serving.es_client import make_client

    products, judgments = load_homedepot(args.data_dir)
    if args.limit:
        products = products.head(args.limit)
        judgments = judgments[judgments.product_id.isin(set(products.product_id))]
    titles = products.title.astype(str).tolist()
    products = products.assign(title=titles, text=titles)
    model = load_encoder(args.model, device="cpu")
    began = time.monotonic()
    doc_vectors = encode_cached(model, args.model_key, titles, args.cache_dir, show_progress=True)
    log.info("document vectors %s in %.0fs", doc_vectors.shape, time.monotonic() - began)

    rng = np.random.default_rng(0)
    queries = judgments.drop_duplicates("query_id")[["query_id", "query"]].reset_index(drop=True)
    timed = queries.iloc[np.sort(rng.choice(len(queries), min(args.queries, len(queries)), replace=False))]
    timed_data = prepare_data(products, judgments[judgments.query_id.isin(set(timed.query_id))],
                              settings.dataset.text_template)  # the timed queries, by id
    query_vectors, encode_seconds = encode_one_by_one(model, timed_data.query_texts)

    client = make_client(settings)
    searcher = Searcher(settings, client=client)
    results: dict = {"machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores (shared)",
                     "es_url": args.es_url, "products": len(products), "timed_queries": len(timed),
                     "encode_ms": {"p50": percentile_ms(encode_seconds, 50), "p99": percentile_ms(encode_seconds, 99)},
                     "knn": [], "funnel": []}
    built_indices = []
    try:
        exact = {d: rank_whole_catalog(query_vectors, doc_vectors, d, K) for d in dims}
        configs, meta, served_by_option = [], [], {}
        for option in options:
            option_dims = [d for d in dims if not option.startswith("bbq") or d > 64]
            name, build_s = build(settings, args.model, products, doc_vectors, option, option_dims, "base")
            built_indices.append(name)
            size_per_vector, store = bytes_per_vector(client, name, option_dims, len(products))
            served = ServingIndex(alias=name, name=name, dims=option_dims, model_uri=args.model,
                                  model_name="all-MiniLM-L6-v2", model_version="base")
            for dim in option_dims:
                configs.append((served, dim, None))
                meta.append({"option": option, "dim": dim, "bytes_per_vector": size_per_vector[dim],
                             "ram_bytes_per_vector": ram_estimate(option, dim),
                             "index_store_mib": round(store / 2**20, 1), "build_s": round(build_s, 1)})
            served_by_option[option] = served
        log.info("timing %d configs side by side on %d queries", len(configs), len(query_vectors))
        for info, (ids, seconds) in zip(meta, timed_side_by_side(searcher, configs, query_vectors)):
            recall = overlap_at(rows_of(timed_data, ids, K), exact[info["dim"]], K)
            with_encoding = [s + e for s, e in zip(seconds, encode_seconds)]
            row = {"option": info["option"], "dim": info["dim"], "p50_ms": percentile_ms(seconds, 50),
                   "p99_ms": percentile_ms(seconds, 99), "qps": round(len(seconds) / sum(seconds), 1),
                   "p50_ms_with_encoding": percentile_ms(with_encoding, 50),
                   "p99_ms_with_encoding": percentile_ms(with_encoding, 99),
                   "qps_with_encoding": round(len(with_encoding) / sum(with_encoding), 1),
                   f"recall@{K}": round(float(recall), 4), **{k: v for k, v in info.items() if k not in ("option", "dim")}}
            log.info("%s", row)
            results["knn"].append(row)
        test_queries = test_split(settings, judgments, args.ndcg_queries)
        if not args.skip_base_funnel:
            served = served_by_option.get(args.funnel_index)
            if served is None:
                name, _ = build(settings, args.model, products, doc_vectors, args.funnel_index, dims, "base")
                built_indices.append(name)
                served = ServingIndex(alias=name, name=name, dims=dims, model_uri=args.model,
                                      model_name="all-MiniLM-L6-v2", model_version="base")
            results["funnel"] += funnel_rows(searcher, served, model, doc_vectors, judgments, test_queries, products,
                                             args, dims, "all-MiniLM-L6-v2 (base)")
        trained = args.trained_model
        if trained and trained.exists():
            log.info("trained model found at %s: encoding the catalog with it", trained)
            trained_model = load_encoder(str(trained), device="cpu")
            from near2_tasks.models.refs import resolve_model

            key = resolve_model(settings, str(trained)).cache_key  # the evaluation's key: reuse its vectors
            trained_vectors = encode_cached(trained_model, key, titles, args.cache_dir, show_progress=True)
            name, _ = build(settings, str(trained), products, trained_vectors, args.funnel_index, dims, "trained")
            built_indices.append(name)
            served = ServingIndex(alias=name, name=name, dims=dims, model_uri=str(trained),
                                  model_name="trained-homedepot", model_version="trained")
            results["funnel"] += funnel_rows(searcher, served, trained_model, trained_vectors, judgments, test_queries,
                                             products, args, dims, "NEAR² trained (trained-homedepot)")
    finally:
        if not args.keep and built_indices:
            client.indices.delete(index=",".join(built_indices), ignore_unavailable=True)
    return results


def test_split(settings, judgments: pd.DataFrame, cap: int) -> pd.DataFrame:
    """The held-out test queries of the team's query split (the trained model never saw them)."""
    from near2_tasks.train.examples import configured_splits

    test = configured_splits(settings, judgments).test
    queries = test.drop_duplicates("query_id")[["query_id", "query"]].reset_index(drop=True)
    if cap and cap < len(queries):
        queries = queries.sample(cap, random_state=1).sort_index().reset_index(drop=True)
    return queries


def funnel_rows(searcher, served, model, doc_vectors, judgments, sample, products, args, dims,
                label) -> list[dict]:
    """NDCG@10 and QPS of kNN at each dimension and of funnels rescored at the full dimension, with the
    NDCG@10 of exact search at the same (final) dimension for reference, all scored by the evaluation
    entry point (the relevance scale from the settings)."""
    settings = searcher.settings
    data = prepare_data(products, judgments[judgments.query_id.isin(set(sample.query_id))],
                        settings.dataset.text_template)
    with torch_threads(None):
        vectors = encode(model, data.query_texts, batch_size=64)
    full = max(dims)
    configs = [(d, None) for d in dims] + [(full, s) for s in dims if s < full and s <= 128]
    rows = []
    metric = f"ndcg@{K}"
    exact = evaluate_retriever(ExactRetriever(doc_vectors), data, dims, query_vectors=vectors, k=K, metrics=[metric],
                               **scale_of(settings)).dims
    timed = timed_side_by_side(searcher, [(served, dim, shortlist) for dim, shortlist in configs], vectors)
    for (dim, shortlist_dim), (ids, seconds) in zip(configs, timed):
        ndcg = score(data, settings, ids=ids, metrics=[metric], k=K).dims[0][metric]
        row = {"model": label, "mode": "knn" if shortlist_dim is None else "funnel", "dim": dim,
               "shortlist_dim": shortlist_dim, "shortlist": args.shortlist if shortlist_dim else None,
               f"ndcg@{K}": round(ndcg, 4), f"exact_ndcg@{K}": round(exact[dim][metric], 4), "index": args.funnel_index,
               "p50_ms": percentile_ms(seconds, 50),
               "p99_ms": percentile_ms(seconds, 99), "qps": round(len(seconds) / sum(seconds), 1),
               "queries": len(data.query_texts)}
        log.info("%s", row)
        rows.append(row)
    return rows


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}; ES at {results['es_url']}; {results['products']} products; "
             f"{results['timed_queries']} timed queries; query encoding alone p50 {results['encode_ms']['p50']} ms, "
             f"p99 {results['encode_ms']['p99']} ms.", "",
             "| index option | dim | p50 ms | p99 ms | QPS | p50 ms incl. encode | p99 ms incl. encode | "
             "QPS incl. encode | recall@10 | disk B/vector | RAM B/vector (est.) | index MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["knn"]:
        lines.append(f"| {r['option']} | {r['dim']} | {r['p50_ms']} | {r['p99_ms']} | {r['qps']} | "
                     f"{r['p50_ms_with_encoding']} | {r['p99_ms_with_encoding']} | {r['qps_with_encoding']} | "
                     f"{r['recall@10']} | {r['bytes_per_vector']} | {r['ram_bytes_per_vector']:g} | "
                     f"{r['index_store_mib']} |")
    lines += ["", "| model | mode | dim | shortlist | NDCG@10 | exact NDCG@10 at dim | p50 ms | p99 ms | QPS |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in results["funnel"]:
        shortlist = f"{r['shortlist']} @ {r['shortlist_dim']}" if r["shortlist_dim"] else "-"
        lines.append(f"| {r['model']} | {r['mode']} | {r['dim']} | {shortlist} | {r['ndcg@10']} | "
                     f"{r['exact_ndcg@10']} | {r['p50_ms']} | {r['p99_ms']} | {r['qps']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
