"""The storefront's own search path on a served index: kNN against the default funnel, NDCG@10 and latency.

    NEAR2_HOME=.near2/hd-pipeline NEAR2_CONFIG=.near2/hd-pipeline/config.yaml \\
        .venv/bin/python bench/funnel_check.py --out bench/results/funnel_check_homedepot.json

Reads the index behind the configured alias (``elasticsearch.alias``) exactly as the search service does
(``near2_tasks.serving.search.Searcher``: the model named in the index's ``_meta``, the configured inference
backend, the default mapping with bbq_hnsw/hnsw fields and the ``embedding_<d>_bits`` codes), encodes the
Home Depot **test-split** queries once, then runs ``Searcher.retrieve`` for every query in every mode,
interleaved query by query: kNN at each served dimension, and the funnel (``serving.funnel_shortlist_size``
candidates from the default shortlist field, rescored at the service's rescore dimension, by default the
full one). Where the compact-vectors
benchmark rescores on a ``flat`` float field, this is the production mapping. The data is read in place.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main() -> None:
    from near2_tasks.models.backends import resolved_backend
    from near2_tasks.config import load_settings
    from near2_tasks.models.embeddings import encode
    from near2_tasks.evaluate.evaluation import prepare_data
    from near2_tasks.train.examples import configured_splits
    from near2_tasks.serving.request import pick_dims
    from near2_tasks.serving.search import Searcher

    from bench_retrieval import score

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "homedepot")
    parser.add_argument("--queries", type=int, default=0, help="first N test queries only (0: all)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    settings = load_settings()
    searcher = Searcher(settings)
    served = searcher.serving_index(refresh=True)
    products = pd.read_csv(args.data_dir / "products.csv", dtype={"product_id": str})
    judgments = pd.read_csv(args.data_dir / "judgments.csv", dtype={"product_id": str, "query_id": str})
    test = configured_splits(settings, judgments).test
    if args.queries:  # a smoke run: the first N test queries (by id)
        test = test[test["query_id"].isin(sorted(set(test["query_id"]))[:args.queries])]
    data = prepare_data(products.assign(text=products["title"].astype(str)), test, settings.dataset.text_template)
    queries = encode(searcher.encoder(served), data.query_texts)

    full, shortlist_dim = pick_dims(settings, served, None, "funnel")  # exactly the service's choice
    modes = {f"knn {d}": (d, None) for d in served.dims}
    modes[f"funnel {settings.serving.funnel_shortlist_size} @ {shortlist_dim}"
          f"{' bits' if shortlist_dim in served.binary_centres else ''} -> {full}"] = (full, shortlist_dim)
    ids: dict[str, list[list[str]]] = {name: [] for name in modes}
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    for i, vector in enumerate(queries):
        names = list(modes)
        for name in names[i % len(names):] + names[:i % len(names)]:  # rotate who goes first
            dim, short = modes[name]
            began = time.perf_counter()
            hits = searcher.retrieve(served, vector, 10, dim, short).hits
            seconds[name].append(time.perf_counter() - began)
            ids[name].append([h.product_id for h in hits])
    results = {"index": served.name, "model_uri": served.model_uri, "backend": resolved_backend(settings.model),
               "queries": len(queries), "products": len(products), "rows": []}
    for name in modes:  # the answers in query order, scored by the evaluation entry point
        scores = score(data, settings, ids=ids[name], seconds=seconds[name], name=name)
        latency = scores.latency_ms[0]
        results["rows"].append({"mode": name, "ndcg@10": round(scores.dims[0]["ndcg@10"], 4),
                                "p50_ms": round(latency["p50"], 2), "p99_ms": round(latency["p99"], 2),
                                "qps": round(len(seconds[name]) / sum(seconds[name]), 1)})
    print(f"index {served.name} ({served.model_uri}), {len(queries)} test queries, backend {results['backend']}")
    print("| mode | NDCG@10 | p50 ms | p99 ms | QPS |\n|---|---:|---:|---:|---:|")
    for row in results["rows"]:
        print(f"| {row['mode']} | {row['ndcg@10']} | {row['p50_ms']} | {row['p99_ms']} | {row['qps']} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
