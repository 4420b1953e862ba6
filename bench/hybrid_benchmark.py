"""Hybrid retrieval on Home Depot: BM25, dense, hybrid-RRF and hybrid-linear per dimension and query slice.

    flock /work/logs/heavy.lock .venv/bin/python bench/hybrid_benchmark.py --start-local-es \\
        --out bench/results/hybrid_9.2.4.json

Builds one index of the whole catalog with the production mapping and the serving code
(``near2_tasks.serving.publish.build_verify_swap``: the lexical text fields next to one ``dense_vector`` per dim),
tunes the linear-fusion weight per dim on the **validation** split (``near2_tasks.serving.hybrid_tuning.tune_weights``:
grid ``evaluation.hybrid_weight_grid``, the best stored in ``_meta.hybrid_weights``), then evaluates on
the **test** split (``near2_tasks.train.examples.configured_splits``) through Elasticsearch with
``near2_tasks.serving.hybrid_tuning.evaluate_index``: NDCG@10 overall and on the short / long / alphanumeric slices, and
p50/p99 of the Elasticsearch part of each method (requests + fusion; query encoding, the same for dense
and hybrid and absent from BM25, is excluded). Hybrid-RRF and hybrid-linear are fused from the same
``_msearch`` (one per query and dim), each timed as that request plus its own fusion.

The model defaults to the shipped recipe's trained model (``/work/main/.near2/bench/recipes/C_pca/model``);
the Home Depot data is read in place (``../shared/data/homedepot``), never copied. Its own Elasticsearch
runs on port 9255 (``--start-local-es``); the catalog embeddings are cached under ``--home``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ALIAS = "near2-bench-hybrid"
DEFAULT_MODEL = "/work/main/.near2/bench/recipes/C_pca/model"


def main() -> None:
    from near2_tasks.serving import elasticsearch_local
    from near2_tasks.config import load_settings
    from near2_tasks.models.embeddings import encode_cached
    from near2_tasks.serving.es_client import make_client
    from near2_tasks.train.examples import configured_splits
    from near2_tasks.serving.hybrid_tuning import evaluate_index, weight_tuning
    from near2_tasks.serving.index import load_meta_model, prepare_products
    from near2_tasks.serving.publish import build_verify_swap

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "homedepot")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--es-url", default="http://127.0.0.1:9255")
    parser.add_argument("--start-local-es", action="store_true", help="start near2's local server on --es-url's port")
    parser.add_argument("--home", type=Path, default=REPO / ".near2" / "bench-hybrid",
                        help="settings home: ES data, the embedding and export caches")
    parser.add_argument("--es-cache", type=Path, default=Path("/work/main/.near2/cache/elasticsearch"),
                        help="where the Elasticsearch zip is (read only)")
    parser.add_argument("--queries", type=int, default=0, help="first N test and validation queries only (0: all)")
    parser.add_argument("--products", type=int, default=0, help="first N products only, for a smoke run (0: all)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "hybrid_9.2.4.json")
    args = parser.parse_args()

    port = int(args.es_url.rsplit(":", 1)[1])
    settings = load_settings(
        home=str(args.home), elasticsearch={"url": args.es_url, "alias": ALIAS, "request_timeout": 120},
        local_elasticsearch={"port": port, "heap": "1g", "cache_dir": str(args.es_cache)})
    if args.start_local_es:
        elasticsearch_local.start(settings)
    try:
        client = make_client(settings)
        version = next(iter(client.nodes.info()["nodes"].values()))["version"]  # GET / answers 405 here
        load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

        products = pd.read_csv(args.data_dir / "products.csv", dtype={"product_id": str})
        judgments = pd.read_csv(args.data_dir / "judgments.csv", dtype={"product_id": str, "query_id": str})
        if args.products:
            products = products.head(args.products)
        splits = configured_splits(settings, judgments)
        validation, test = splits.validation, splits.test
        if args.queries:
            keep = lambda frame: frame[frame["query_id"].isin(frame["query_id"].drop_duplicates()[:args.queries])]  # noqa: E731
            validation, test = keep(validation), keep(test)
        products = prepare_products(products, settings.dataset.text_template)
        print(f"Elasticsearch {version}; {len(products)} products; validation {validation.query_id.nunique()} "
              f"and test {test.query_id.nunique()} queries; load: {load}", flush=True)

        began = time.perf_counter()
        encoder = load_meta_model(settings, args.model)  # model.backend (openvino on CPU), as the index step
        vectors = encode_cached(encoder, f"hybrid-bench-{Path(args.model).name}", products.text.tolist(),
                                settings.home / "cache" / "embeddings", batch_size=settings.model.encode_batch_size)
        encode_s = time.perf_counter() - began
        began = time.perf_counter()
        swapped = build_verify_swap(settings, args.model, products, model_version="bench", vectors=vectors,
                                    before_verify=weight_tuning(settings, products, validation))
        build_s = time.perf_counter() - began
        name = swapped.index.name
        weights = swapped.index.meta.get("hybrid_weights")
        print(f"encoded in {encode_s:.0f} s; built, tuned (weights {weights}) and verified {name} in "
              f"{build_s:.0f} s", flush=True)
        client.indices.forcemerge(index=name, max_num_segments=1, request_timeout=1800)

        began = time.perf_counter()
        report = evaluate_index(settings, products, test, index_name=name, model=encoder)
        eval_s = time.perf_counter() - began
        mapping = client.indices.get_mapping(index=name)[name]["mappings"]
        table = report.markdown()
        print(table)
        results = {
            "server": version, "machine_load": load, "index": name, "model": args.model,
            "products": len(products), "test_queries": report.n_queries,
            "validation_queries": int(validation.query_id.nunique()),
            "encode_s": round(encode_s, 1), "build_tune_verify_s": round(build_s, 1), "evaluate_s": round(eval_s, 1),
            "hybrid_weights": mapping["_meta"].get("hybrid_weights"),
            "hybrid_tuning": mapping["_meta"].get("hybrid_tuning"),
            "lexical_fields": settings.serving.lexical_fields, "lexical_type": settings.serving.lexical_type,
            "test": report.to_dict(), "markdown": table,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}; load at the end: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
        client.indices.delete(index=name)
    finally:
        if args.start_local_es:
            elasticsearch_local.stop(settings)


if __name__ == "__main__":
    main()
