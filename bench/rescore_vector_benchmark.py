"""One request or two: Elasticsearch's ``rescore_vector`` on a quantised field against near2's funnel.

    .venv/bin/python bench/rescore_vector_benchmark.py --start-local-es \\
        --model .near2/bench/recipes/C_pca/model --out bench/results/rescore_vector_9.2.4.json

From Elasticsearch 9.1 a kNN query on a quantised field (``bbq_hnsw``, ``int8_hnsw``, ...) can rescore its
``k × oversample`` best candidates with the float vectors in the same request (``rescore_vector``). That is
a single-request alternative to the funnel (``mode=funnel``: a shortlist from the 64-bit codes, then a
second request that scores the shortlist at 384-d). This script builds one index with the production
mapping (``near2_tasks.serving.publish.build_verify_swap``: bbq_hnsw at 384/256/128, hnsw at 64/32, the 64-bit codes,
force-merged), encodes the Home Depot **test-split** queries once, and runs, interleaved query by query:

* kNN at 384-d with the query-time ``rescore_vector.oversample`` of the grid (0: no rescoring, the
  bbq scores alone; the mapping's own default is 3),
* kNN at the smallest served dimension (32-d ``hnsw``: floats, nothing to rescore),
* the funnel through ``Searcher.retrieve`` (the storefront's code),

and scores each with NDCG@10 and recall@10 against exact float search at 384-d (numpy, same vectors),
all through the evaluation entry point (``evaluate.retrieval``: the relevance scale from settings). RAM per product
is ES's sizing rule (the quantised copy plus 4·m bytes of HNSW graph); the raw floats that rescoring reads
stay on disk. The Home Depot data is read in place, never copied.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

ALIAS = "near2-bench-rescore"


def interleaved(modes: dict, queries, arg=lambda i, name: i) -> tuple[dict[str, list], dict[str, list[float]]]:
    """Every mode on every query, query by query, the first mode rotating (so no mode always runs on a cold
    or a warm cache): (each mode's answers, its seconds per query). A mode is called as
    ``modes[name](vector, arg(query number, name))``."""
    ids: dict[str, list] = {name: [] for name in modes}
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    for i, vector in enumerate(queries):
        names = list(modes)
        for name in names[i % len(names):] + names[:i % len(names)]:  # rotate who goes first
            start = time.perf_counter()
            got = modes[name](vector, arg(i, name))
            seconds[name].append(time.perf_counter() - start)
            ids[name].append(got)
    return ids, seconds


def main() -> None:
    from near2_tasks import conventions
    from near2_tasks.serving import compact
    from near2_tasks.serving import elasticsearch_local
    from near2_tasks.config import load_settings
    from near2_tasks.models.embeddings import encode, encode_cached, load_encoder
    from near2_tasks.evaluate.evaluation import prepare_data
    from near2_tasks.models.refs import resolve_model
    from near2_tasks.evaluate.retrieval import overlap_at, rank_whole_catalog
    from near2_tasks.train.examples import configured_splits
    from near2_tasks.serving.publish import build_verify_swap
    from near2_tasks.serving.query_bodies import knn_body, rescore_body
    from near2_tasks.serving.search import Searcher
    from near2_tasks.serving.served_index import vector_bytes

    from bench_retrieval import score

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "homedepot")
    parser.add_argument("--model", default=str(REPO / ".near2" / "bench" / "recipes" / "C_pca" / "model"))
    parser.add_argument("--es-url", default="http://127.0.0.1:9254")
    parser.add_argument("--start-local-es", action="store_true", help="start near2's local server on --es-url's port")
    parser.add_argument("--oversample", default="0,1,2,3,5,10")
    parser.add_argument("--num-candidates", type=int, default=100)
    parser.add_argument("--queries", type=int, default=0, help="first N test queries only (0: all)")
    parser.add_argument("--extra-code-dims", default="128", help="more bit-code dims to index and funnel from")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".near2" / "cache" / "embeddings",
                        help="the team's embedding cache (catalog vectors under evaluation's key)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.extra_code_dims = [int(d) for d in args.extra_code_dims.split(",") if d]

    port = int(args.es_url.rsplit(":", 1)[1])
    home = Path(tempfile.mkdtemp(prefix="near2-rescore-"))
    settings = load_settings(**{
        "home": str(home),
        "elasticsearch": {"url": args.es_url, "alias": ALIAS,
                          "binary_dims": sorted({64, *args.extra_code_dims}, reverse=True)},
        "local_elasticsearch": {"port": port, "heap": "1g",
                                "cache_dir": str(REPO / ".near2" / "cache" / "elasticsearch")},
    })
    if args.start_local_es:
        elasticsearch_local.start(settings)
    version = elasticsearch_local.server_version(args.es_url)  # GET / answers 405 on this distribution

    products = pd.read_csv(args.data_dir / "products.csv", dtype={"product_id": str})
    judgments = pd.read_csv(args.data_dir / "judgments.csv", dtype={"product_id": str, "query_id": str})
    test = configured_splits(settings, judgments).test
    if args.queries:  # the first N test queries (by id) only
        test = test[test["query_id"].isin(sorted(set(test["query_id"]))[:args.queries])]
    data = prepare_data(products.assign(text=products["title"].astype(str)), test, settings.dataset.text_template)

    model = load_encoder(args.model)
    key = resolve_model(settings, args.model).cache_key  # evaluation's key: the team's cached vectors
    catalog = encode_cached(model, key, list(data.product_texts), args.cache_dir)  # indexed, and the exact reference
    began = time.perf_counter()
    build_verify_swap(settings, args.model, products, model_version="bench", vectors=catalog)
    build_s = time.perf_counter() - began
    searcher = Searcher(settings)
    served = searcher.serving_index(refresh=True)
    queries = encode(searcher.encoder(served), data.query_texts)
    full = served.full_dim
    k = 10

    def knn(vector, dim: int, oversample: float | None):
        body = knn_body(dim, conventions.truncate(vector, dim), k, args.num_candidates, [])
        if oversample is not None:
            body["knn"]["rescore_vector"] = {"oversample": oversample}
        return [hit["_source"]["product_id"] for hit in searcher.client.search(index=served.name, **body)["hits"]["hits"]]

    shortlist_dim = min(settings.elasticsearch.binary_dims)  # the production funnel: the default 64-bit codes
    modes = {f"kNN {full} ({served.index_types[full]}) rescore_vector x{o}": (lambda v, i, o=float(o): knn(v, full, o))
             for o in args.oversample.split(",")}
    small = min(served.dims)
    modes[f"kNN {small} ({served.index_types[small]})"] = lambda v, i: knn(v, small, None)
    funnel = (f"funnel {settings.serving.funnel_shortlist_size} @ {shortlist_dim}"
              f"{' bits' if shortlist_dim in served.binary_centres else ''} -> {full} (2 requests)")
    modes[funnel] = lambda v, i: [h.product_id for h in searcher.retrieve(served, v, k, full, shortlist_dim).hits]
    assert shortlist_dim in served.binary_centres, served.binary_centres.keys()

    # where the funnel's time goes: its two requests timed apart, then trimmed first stages, and the
    # funnel from the 128-bit codes (16 B per product) with shorter shortlists
    def shortlist(vector, trim: str, code_dim: int = shortlist_dim, size: int = settings.serving.funnel_shortlist_size):
        body = knn_body(code_dim, None, size, size, [], source=False,
                        code=compact.query_code(vector, code_dim, served.binary_centres[code_dim]))
        if trim == "none":
            return [h["_id"] for h in searcher.client.search(index=served.name, **body)["hits"]["hits"]]
        if trim == "filter_path":
            hits = searcher.client.search(index=served.name, **body, track_total_hits=False,
                                          filter_path=["hits.hits._id"])["hits"]["hits"]
            return [h["_id"] for h in hits]
        hits = searcher.client.search(index=served.name, **body, track_total_hits=False, stored_fields="_none_",
                                      docvalue_fields=["product_id"],
                                      filter_path=["hits.hits.fields.product_id"])["hits"]["hits"]
        return [h["fields"]["product_id"][0] for h in hits]

    def rescore(vector, ids):
        body = rescore_body(full, vector, k, ids)
        return [h["_source"]["product_id"] for h in searcher.client.search(index=served.name, **body)["hits"]["hits"]]

    for trim in ("none", "filter_path", "docvalues"):
        modes[f"funnel stage 1 only, 2,000 @ {shortlist_dim} bits ({trim})"] = (
            lambda v, i, t=trim: shortlist(v, t)[:k])
    shortlists = [shortlist(v, "filter_path") for v in queries]  # stage 2 alone is timed on these
    modes["funnel stage 2 only (the 2,000 ids, rescored at 384)"] = lambda v, i: rescore(v, shortlists[i])
    for code_dim, size in ((shortlist_dim, 2000), *((d, n) for d in args.extra_code_dims for n in (400, 800))):
        modes[f"funnel {size} @ {code_dim} bits -> {full}, trimmed stage 1"] = (
            lambda v, i, d=code_dim, n=size: rescore(v, shortlist(v, "docvalues", d, n)))
    for name in modes:  # one warm-up query each
        modes[name](queries[0], 0)
    ids, seconds = interleaved(modes, queries)

    exact = rank_whole_catalog(queries, catalog, full, k)
    results = {"server": version, "index": served.name, "model": args.model, "queries": len(queries),
               "products": len(products), "build_verify_swap_s": round(build_s, 1),
               "num_candidates": args.num_candidates, "rows": []}
    answers = {name: {"ids": got, "seconds": seconds[name]} for name, got in ids.items()}
    answers["exact float 384 (numpy)"] = {"rows": exact}
    for name, answer in answers.items():  # scored by the evaluation entry point
        scores = score(data, settings, k=k, name=name, **answer)
        row = {"mode": name, "ndcg@10": round(scores.dims[0]["ndcg@10"], 4),
               "recall@10_vs_exact": round(overlap_at(scores.rankings[0], exact, k), 4)}
        if 0 in scores.latency_ms:
            row.update(p50_ms=round(scores.latency_ms[0]["p50"], 2), p99_ms=round(scores.latency_ms[0]["p99"], 2))
        results["rows"].append(row)
    results["ram_bytes_per_product"] = {
        f"{dim} {served.index_types[dim]}": vector_bytes(served.index_types[dim], dim) for dim in served.dims}
    print(f"Elasticsearch {version}, index {served.name}, {len(queries)} test queries, build {build_s:.0f} s")
    print("| mode | NDCG@10 | recall@10 vs exact | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|")
    for row in results["rows"]:
        print(f"| {row['mode']} | {row['ndcg@10']} | {row['recall@10_vs_exact']} | "
              f"{row.get('p50_ms', '–')} | {row.get('p99_ms', '–')} |")
    print(json.dumps(results["ram_bytes_per_product"]))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    searcher.client.indices.delete(index=served.name)
    if args.start_local_es:
        elasticsearch_local.stop(settings)


if __name__ == "__main__":
    main()
