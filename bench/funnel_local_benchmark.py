"""The funnel's second stage in Elasticsearch (a second request) or from a float16 store memory-mapped on the
serving host (``serving.funnel_rescore: local``, ``near2_tasks.serving.rescore_store``: one request).

    # three stages, each under the shared lock and under 10 minutes; --model picks the encoder (default: the
    # shipped recipe's model, row S, if it exists, else row I's, else any recipe row's, else the base model)
    flock /work/logs/heavy.lock .venv/bin/python bench/funnel_local_benchmark.py --stage vectors
    flock /work/logs/heavy.lock .venv/bin/python bench/funnel_local_benchmark.py --stage build,measure \\
        --out bench/results/funnel_local_9.2.4.json      # or --stage build, then --stage measure

``vectors`` encodes the Home Depot catalog titles and the 943 test-split queries once (``--work``; through the
evaluation's embedding cache, so seconds where the recipe benchmark encoded them with the same model);
``build`` starts near2's local Elasticsearch 9.2.4 (port 9254, 1 GB heap), indexes the whole catalog with
``build_verify_swap`` (default mapping plus 128-bit codes beside the 64-bit ones, force-merged, the rescoring
store written) and stops it; ``measure`` starts it again and runs, interleaved query by query, one client,
through ``Searcher.retrieve`` (the storefront's code): the funnel at 2,000 @ 64 bits and 400 / 800 @ 128 bits
with stage 2 in Elasticsearch, from the store, and both stages from the store (its bit codes: no request),
each first stage alone (in Elasticsearch, and over the store's codes), kNN 384 bbq_hnsw (rescore_vector x3,
one request) for reference; then exact float 384 in numpy. NDCG@10 through the evaluation entry point,
recall@10 against exact, p50 / p99, where the time goes (median stage-1 wall, Elasticsearch ``took``, local
scoring), the store's resident pages, and the local stage 2 with the store evicted from the page cache
before each query (``--cold-queries``). The Home Depot data is read in place, never copied.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

ALIAS = "near2-bench-funnel-local"
FUNNELS = ((64, 2000), (128, 400), (128, 800))


def default_model() -> str:
    """The shipped recipe's trained model (row S), else row I's, else any recipe row's, else the base model."""
    from near2_tasks.models.settings import PACKAGED_MINILM

    root = REPO / ".near2" / "bench" / "recipes"
    for row in ("S_P_refit6", "I_cached256_weights"):
        if (root / row / "model").is_dir():
            return str(root / row / "model")
    rows = sorted(p for p in root.glob("*/model") if p.is_dir()) if root.is_dir() else []
    return str(rows[0]) if rows else PACKAGED_MINILM


def settings_for(args, **serving):
    from near2_tasks.config import load_settings

    return load_settings(**{
        "home": str(args.work / "home"),
        "elasticsearch": {"url": args.es_url, "alias": ALIAS, "binary_dims": [128, 64], "request_timeout": 120},
        "serving": {"funnel_rescore": "local", "alias_check_interval_s": 3600, **serving},
        "dataset": {"name": "homedepot"}, "validation": {"max_row_count_drift": None, "data_docs": False},
        "local_elasticsearch": {"port": int(args.es_url.rsplit(":", 1)[1]), "heap": "1g",
                                "cache_dir": str(REPO / ".near2" / "cache" / "elasticsearch")},
    })


def load_data(args, settings):
    """(the catalog, the test split's evaluation data): the accepted Home Depot tables of a validation (as the
    recipe benchmark evaluates, so that its embedding cache serves the vectors), validated here when absent."""
    from near2_tasks.data.outputs import load_accepted
    from near2_tasks.data.validate import validate_dataset
    from near2_tasks.evaluate.evaluation import prepare_data
    from near2_tasks.train.examples import configured_splits

    if (args.accepted / "accepted").is_dir():
        accepted = load_accepted(args.accepted)
    else:
        accepted = validate_dataset(settings, args.data_dir / "products.csv", args.data_dir / "judgments.csv")
    test = configured_splits(settings, accepted.judgments).test
    return accepted.products, prepare_data(accepted.products, test, settings.dataset.text_template)


def stage_vectors(args) -> None:
    from near2_tasks.models.embeddings import encode_cached, load_encoder
    from near2_tasks.models.refs import resolve_model

    settings = settings_for(args)
    products, data = load_data(args, settings)
    model = args.model or default_model()
    resolved = resolve_model(settings, model)
    encoder = load_encoder(resolved.load_ref, device="cpu")
    began = time.perf_counter()  # the evaluation's cache: seconds when the recipe benchmark encoded them
    catalog, queries = (encode_cached(encoder, resolved.cache_key, list(texts), args.cache, batch_size=128)
                        for texts in (data.product_texts, data.query_texts))
    args.work.mkdir(parents=True, exist_ok=True)
    np.savez(args.work / "vectors.npz", catalog=catalog, queries=queries, model=np.array(model))
    print(f"encoded {len(catalog)} products and {len(queries)} queries with {model} in "
          f"{time.perf_counter() - began:.0f} s")


def stage_build(args) -> None:
    from near2_tasks.serving import elasticsearch_local
    from near2_tasks.serving.publish import build_verify_swap

    settings = settings_for(args)
    products, _ = load_data(args, settings)
    saved = np.load(args.work / "vectors.npz")
    elasticsearch_local.start(settings)
    began = time.perf_counter()
    result = build_verify_swap(settings, str(saved["model"]), products, model_version="bench",
                               vectors=saved["catalog"])
    info = {"index": result.index.name, "build_verify_swap_s": round(time.perf_counter() - began, 1),
            "deleted": result.deleted}
    (args.work / "build.json").write_text(json.dumps(info, indent=2))
    print(info, flush=True)


def resident_bytes(path: Path) -> int:
    """Resident bytes of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isalnum() and "-" in line.split()[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def evict(path: Path) -> None:
    with open(path, "rb") as fh:
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def stage_measure(args) -> None:
    from near2_tasks import conventions
    from near2_tasks.evaluate.retrieval import overlap_at, rank_whole_catalog, rows_of
    from near2_tasks.serving import compact, elasticsearch_local, rescore_store
    from rescore_vector_benchmark import interleaved
    from near2_tasks.serving.query_bodies import knn_body, shortlist_body, shortlist_ids
    from near2_tasks.serving.search import Searcher

    from bench_retrieval import score

    settings = settings_for(args)
    products, data = load_data(args, settings)
    saved = np.load(args.work / "vectors.npz")
    catalog, queries = saved["catalog"], saved["queries"]
    if args.queries:
        queries = queries[:args.queries]
    elasticsearch_local.start(settings)
    load_before = os.getloadavg()
    version = elasticsearch_local.server_version(args.es_url)
    # where the funnel runs: stage 2 in Elasticsearch (two requests); stage 2 from the store (one request);
    # both stages from the store (the codes and the float16 vectors: no request, the default)
    placements = {"elasticsearch": {"funnel_rescore": "elasticsearch"},
                  "local": {"funnel_rescore": "local", "funnel_shortlist": "elasticsearch"},
                  "none": {"funnel_rescore": "local", "funnel_shortlist": "local"}}
    searchers = {(n, where): Searcher(settings_for(args, funnel_shortlist_size=n, **placements[where]))
                 for _, n in FUNNELS for where in placements}
    any_searcher = next(iter(searchers.values()))
    served = any_searcher.serving_index(refresh=True)
    client = any_searcher.client
    full, k = served.full_dim, 10
    modes, breakdown = {}, {}

    def funnel(searcher, code_dim):
        def run(vector, name):
            got = searcher.retrieve(served, vector, k, full, code_dim)
            serving = searcher.settings.serving
            assert (got.rescore, got.shortlist) == (serving.funnel_rescore, serving.funnel_shortlist
                                                    if serving.funnel_rescore == "local" else "elasticsearch")
            breakdown.setdefault(name, []).append(got.timings_ms)
            return [h.product_id for h in got.hits]
        return run

    def stage1(searcher, code_dim):
        def run(vector, name):
            body, _ = shortlist_body(searcher.settings.serving, served, vector, k, code_dim, [], 100)
            began = time.perf_counter()
            ids, took = shortlist_ids(client, served.name, body)
            breakdown.setdefault(name, []).append({"search": (time.perf_counter() - began) * 1000, "es_took": took})
            return ids[:k]
        return run

    def stage1_local(searcher, code_dim, n):
        def run(vector, name):
            store = searcher.local_store(served)
            began = time.perf_counter()
            code = compact.binary_codes(vector[None, :], code_dim, served.binary_centres[code_dim])[0]
            rows = store.shortlist(code, code_dim, n)
            breakdown.setdefault(name, []).append({"search": (time.perf_counter() - began) * 1000})
            return [store.ids[r].decode() for r in rows[:k]]
        return run

    def knn(vector, name):
        body = knn_body(full, conventions.truncate(vector, full), k, 100, [])
        body["knn"]["rescore_vector"] = {"oversample": 3.0}
        return [h["_source"]["product_id"] for h in client.search(index=served.name, **body)["hits"]["hits"]]

    for code_dim, n in FUNNELS:
        for where in ("elasticsearch", "local"):
            modes[f"funnel {n} @ {code_dim} bits -> {full}, stage 2 {where}"] = funnel(searchers[(n, where)], code_dim)
        modes[f"funnel {n} @ {code_dim} bits -> {full}, both stages local (no request)"] = funnel(
            searchers[(n, "none")], code_dim)
        modes[f"stage 1 alone: {n} @ {code_dim} bits"] = stage1(searchers[(n, "local")], code_dim)
        modes[f"stage 1 alone, local: {n} @ {code_dim} bits"] = stage1_local(searchers[(n, "none")], code_dim, n)
    modes[f"kNN {full} {served.index_types[full]}, rescore_vector x3 (one request)"] = knn
    for name in modes:  # warm-up: a few queries each (opens the stores, touches the caches)
        for vector in queries[:5]:
            modes[name](vector, "warm-up")
    breakdown.clear()
    ids, seconds = interleaved(modes, queries, arg=lambda i, name: name)
    load_after = os.getloadavg()
    store = searchers[(800, "local")].stores.get(served.name, served.model_uri, served.dims, lambda: len(products))
    vectors_file, store_info = store.directory / "vectors.npy", {
        "dir": str(store.directory), "bytes": sum(f.stat().st_size for f in store.directory.iterdir()),
        "vectors_bytes_per_product": store.vectors.shape[1] * 2}
    resident = resident_bytes(vectors_file)
    for searcher in searchers.values():  # unmap every store: the page cache only drops pages nobody maps
        searcher.stores = rescore_store.StoreCache(searcher.settings)
    del store
    gc.collect()

    cold = []  # local stage 2 with the store's pages evicted before each query (a fresh mapping each time)
    for vector in queries[:args.cold_queries]:
        shortlist, _ = shortlist_ids(client, served.name, shortlist_body(
            searchers[(800, "local")].settings.serving, served, vector, k, 128, [], 100)[0])
        evict(vectors_file)
        began = time.perf_counter()
        fresh = rescore_store.RescoreStore.open(settings, served.name, served.model_uri, served.dims, len(products))
        fresh.hits(*fresh.top(shortlist, vector, full, k))
        cold.append((time.perf_counter() - began) * 1000)
        del fresh

    exact = rank_whole_catalog(queries, catalog, full, k)
    build = json.loads((args.work / "build.json").read_text())
    results = {"server": version, "index": served.name, "model": str(saved["model"]), "queries": len(queries),
               "products": len(products), **build, "load_average_before": load_before,
               "load_average_after": load_after, "rows": [],
               "store": {**store_info, "resident_vectors_bytes_after_run": resident},
               "cold_store_800_at_128": {"queries": len(cold), "p50_ms": round(float(np.percentile(cold, 50)), 2),
                                         "p99_ms": round(float(np.percentile(cold, 99)), 2)} if cold else None}
    answers = {name: {"ids": got, "seconds": seconds[name]} for name, got in ids.items()}
    answers[f"exact float {full} (numpy)"] = {"rows": exact}
    subset = len(queries) < len(data.query_texts)  # --queries N: NDCG@10 needs every test query, so none
    for name, answer in answers.items():
        if subset:
            ranked = answer["rows"] if "rows" in answer else rows_of(data, answer["ids"], k)
            row = {"mode": name, "ndcg@10": None, "recall@10_vs_exact": round(overlap_at(ranked, exact, k), 4)}
            if "seconds" in answer:
                ms = 1000 * np.asarray(answer["seconds"])
                row.update(p50_ms=round(float(np.percentile(ms, 50)), 2), p99_ms=round(float(np.percentile(ms, 99)), 2),
                           max_ms=round(float(ms.max()), 2))
        else:
            scores = score(data, settings, k=k, name=name, **answer)
            row = {"mode": name, "ndcg@10": round(scores.dims[0]["ndcg@10"], 4),
                   "recall@10_vs_exact": round(overlap_at(scores.rankings[0], exact, k), 4)}
            if 0 in scores.latency_ms:
                row.update(p50_ms=round(scores.latency_ms[0]["p50"], 2),
                           p99_ms=round(scores.latency_ms[0]["p99"], 2), max_ms=round(max(answer["seconds"]) * 1000, 2))
        if name in breakdown:
            parts = pd.DataFrame(breakdown[name])
            if "shortlist" in parts:
                parts["stage 2"] = parts["search"] - parts["shortlist"]
            row["median_ms"] = {c: round(float(parts[c].median()), 2) for c in parts.columns}
        results["rows"].append(row)
    print(f"Elasticsearch {version}, {results['model']}, {len(queries)} queries, load {load_before} -> {load_after}")
    for row in results["rows"]:
        print(row)
    print(results["store"], results["cold_store_800_at_128"])
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if not args.keep_index:  # the node's data directory is shared by everything on this port
        client.indices.delete(index=served.name)
        rescore_store.delete_stores(settings, [served.name])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", required=True, help="vectors, build, measure, or several: build,measure")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "homedepot")
    parser.add_argument("--model", default=None, help="an encoder directory or hub id (stage vectors)")
    parser.add_argument("--accepted", type=Path,
                        default=REPO / ".near2" / "bench" / "recipes" / "S_P_refit6" / "validation" / "homedepot",
                        help="a validation's output directory (accepted tables); validated afresh when absent")
    parser.add_argument("--cache", type=Path, default=REPO / ".near2" / "cache" / "embeddings",
                        help="the evaluation's embedding cache")
    parser.add_argument("--work", type=Path, default=REPO / ".near2" / "bench" / "funnel-local")
    parser.add_argument("--es-url", default="http://127.0.0.1:9254")
    parser.add_argument("--queries", type=int, default=0, help="first N test queries only (0: all)")
    parser.add_argument("--cold-queries", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep-index", action="store_true", help="keep the index and its store after measure")
    args = parser.parse_args()
    from near2_tasks.serving import elasticsearch_local

    stages = {"vectors": stage_vectors, "build": stage_build, "measure": stage_measure}
    try:
        for stage in args.stage.split(","):
            stages[stage](args)
    finally:
        if args.stage != "vectors":
            elasticsearch_local.stop(settings_for(args))


if __name__ == "__main__":
    main()
