"""Cost at scale: kNN per index option, the bit-code funnel and native rescoring at 55k, 500k and 2M products.

    # one unit per call, resumable (rows already in the JSON are skipped); each call under the shared lock
    PY=/work/main/.venv/bin/python
    flock /work/logs/heavy.lock $PY bench/scale_benchmark.py --stage es-start
    flock /work/logs/heavy.lock $PY bench/scale_benchmark.py --stage vectors --sizes 54639,500000,2000000
    for unit in 54639:default 54639:int8_hnsw 54639:hnsw 500000:default 500000:int8_hnsw 500000:hnsw; do
        flock /work/logs/heavy.lock $PY bench/scale_benchmark.py --stage build --unit $unit
        flock /work/logs/heavy.lock $PY bench/scale_benchmark.py --stage measure --unit $unit
    done
    $PY bench/scale_benchmark.py --stage report       # table (markdown) + log-log PNG from the JSON
    flock /work/logs/heavy.lock $PY bench/scale_benchmark.py --stage es-stop

Vectors: the shipped recipe model's (``.near2/bench/recipes/C_pca/model``) real title embeddings of the
54,639 accepted Home Depot products and of the 943 test-split queries, read from the evaluation's
embedding cache (checked against a fresh encode of 16 titles and 16 queries: max |diff| 1.8e-7); nothing is
re-encoded. A catalog of N products is the 54,639 real vectors plus N - 54,639 synthetic ones; a synthetic
product is a **mix of two real products**: a random real product i and one of its 10 nearest real
neighbours j, ``normalise((1 - w) x_i + w x_j + e)`` with ``w ~ U(0, 0.5)`` and a small Gaussian
``e ~ N(0, s^2 I / d)``, s = 0.1, and it takes i's title, category, brand and price (``--stage vectors``
also writes the nearest-neighbour statistics that show a synthetic catalog of the real size looks like the
real one to the real queries). Real data is read in place (``../shared/data/homedepot`` and the cache);
synthetic vectors live under ``--work-dir``, never in the repository.

Index options, one index per (catalog, option), built by the project's own code
(``near2_tasks.serving.index.create_index`` -> ``load_shard`` in chunks -> ``finalize_index``: the production
mapping from ``index_body``/``vector_mapping``, vectors out of ``_source``, force-merged to one segment):

* ``default``: the production mapping (bbq_hnsw at 384 with rescore_vector x3, hnsw at 64, the 64-bit
  codes ``embedding_64_bits``): kNN 384 bbq x0 / x3, kNN 64 hnsw, the funnel (``Searcher.retrieve`` with a
  shortlist: 2,000 ids from the codes by ``shortlist_ids``, rescored at 384);
* ``int8_hnsw``: int8_hnsw at 384 and 64: kNN without rescoring and with rescore_vector x3 (one request);
* ``hnsw``: float hnsw at 384 only.

Measured per unit: build time (bulk load; finalize = refresh + force merge + stray check), RAM bytes per
product from Elasticsearch's own off-heap vector statistics (``_stats``: dense_vector.off_heap, per field),
disk (``store.size``, and per field from the disk-usage API), p50/p99 latency of one sequential client over
the 943 real test queries (modes interleaved query by query, rotating order, after a warm-up pass), and
recall@10 against exact search (numpy, same float32 vectors) at 384-d and at the field's own dimension.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

MAIN = Path("/work/main")
CACHE = MAIN / ".near2" / "cache" / "embeddings"
#: the recipe model whose vectors a run uses: its directory, and the evaluation cache's files of the 54,639
#: accepted texts and of the 943 test-split queries. S is the shipped recipe (the defaults since stop 30); C
#: the one of the first 55k / 500k rows (scale_9.2.4.json, kept as measured; its cache is no longer here).
MODELS = {
    "S": ("S_P_refit6", "dir-model-5df01a7388c3"),
    "C": ("C_pca", "dir-model-2a3e4fb33226"),
}
RESULT_FILES = {"C": "scale_9.2.4.json", "S": "scale_S_9.2.4.json"}
PNG_FILES = {"C": "scale_benchmark.png", "S": "scale_benchmark_S.png"}
MODEL = VALIDATION = CATALOG_CACHE = QUERY_CACHE = RESULTS = PNG = Path()  # set by use_model()


def use_model(name: str) -> None:
    global MODEL, VALIDATION, CATALOG_CACHE, QUERY_CACHE, RESULTS, PNG
    recipe, key = MODELS[name]
    MODEL = MAIN / ".near2" / "bench" / "recipes" / recipe / "model"
    VALIDATION = MAIN / ".near2" / "bench" / "recipes" / recipe / "validation" / "homedepot"
    CATALOG_CACHE = CACHE / f"{key}-a0599a2249ee7a93.npy"
    QUERY_CACHE = CACHE / f"{key}-73a6b9d5045759a9.npy"
    RESULTS = REPO / "bench" / "results" / RESULT_FILES[name]
    PNG = REPO / "docs" / "img" / PNG_FILES[name]
ALIAS = "near2-scale"
SEED = 0
MIX_NEIGHBOURS, MIX_MAX_W, NOISE = 10, 0.5, 0.1
K = 10


def settings_for(args, option: str | None = None, serving: dict | None = None):
    from near2_tasks.config import load_settings

    options: dict = {}
    dims = [384, 64]
    if option == "int8_hnsw":
        options = {384: {"index_type": "int8_hnsw"}, 64: {"index_type": "int8_hnsw"}}
    elif option == "hnsw":
        options, dims = {384: {"index_type": "hnsw"}}, [384]
    elif option == "default":
        options = {384: {"index_type": "bbq_hnsw"}, 64: {"index_type": "hnsw"}}  # the defaults, named
    elif option == "funnel128":  # today's funnel defaults: 128-bit codes (16 B/product), 800 candidates
        options = {384: {"index_type": "bbq_hnsw"}, 128: {"index_type": "bbq_flat"}, 64: {"index_type": "hnsw"}}
        dims = [384, 128, 64]
    settings = load_settings(**{
        "home": str(args.work_dir / "home"),
        "model": {"dims": dims} if option else {},
        "elasticsearch": {"url": f"http://127.0.0.1:{args.port}", "alias": ALIAS, "index_options": options,
                          "binary_dims": [128] if option == "funnel128" else [64],
                          "request_timeout": 120.0, "bulk_chunk_size": 1000},
        # the rows in scale_9.2.4.json were built without the funnel's local float16 store (768 B/product on
        # disk): keep new rows comparable; the store's cost is measured by bench/funnel_local_benchmark.py
        "serving": {"funnel_rescore": "elasticsearch", "alias_check_interval_s": 3600, **(serving or {})},
        "local_elasticsearch": {"port": args.port, "heap": args.heap, "runtime_dir": str(args.work_dir / "es"),
                                "cache_dir": str(MAIN / ".near2" / "cache" / "elasticsearch")},
    })
    return settings, dims


# ----- vectors ---------------------------------------------------------------------------------------

def real_data():
    from near2_tasks.data.outputs import load_accepted

    accepted = load_accepted(VALIDATION)
    catalog = np.load(CATALOG_CACHE)
    queries = np.load(QUERY_CACHE)
    assert catalog.shape[0] == len(accepted.products), (catalog.shape, len(accepted.products))
    return accepted.products.reset_index(drop=True), catalog, queries


def test_data(products: pd.DataFrame, queries: np.ndarray):
    """The test split's evaluation data over the real catalog (as the recipe benchmark scores it), for NDCG@10
    at the real size; its queries must be the cached query vectors' texts, in order."""
    from near2_tasks.config import load_settings
    from near2_tasks.data.outputs import load_accepted
    from near2_tasks.evaluate.evaluation import prepare_data
    from near2_tasks.models.embeddings import texts_fingerprint
    from near2_tasks.train.examples import configured_splits

    settings = load_settings(dataset={"name": "homedepot"})
    accepted = load_accepted(VALIDATION)
    data = prepare_data(accepted.products, configured_splits(settings, accepted.judgments).test,
                        settings.dataset.text_template)
    fingerprint = texts_fingerprint(list(data.query_texts))
    assert len(data.query_texts) == len(queries) and fingerprint in QUERY_CACHE.name, (fingerprint, QUERY_CACHE)
    return data, settings


def top_neighbours(catalog: np.ndarray, rows: np.ndarray, k: int, block: int = 2048,
                   exclude_self: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(ids, cosines) of the k nearest catalog rows of catalog[rows] (or of query vectors when rows is 2-d)."""
    ids, sims = [], []
    for start in range(0, len(rows), block):
        chunk = rows[start:start + block]
        vectors = catalog[chunk] if chunk.ndim == 1 else chunk
        scores = vectors @ catalog.T
        if exclude_self and chunk.ndim == 1:
            scores[np.arange(len(chunk)), chunk] = -np.inf
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1)
        top = np.take_along_axis(top, order, 1)
        ids.append(top)
        sims.append(np.take_along_axis(scores, top, 1))
    return np.concatenate(ids), np.concatenate(sims)


def synthetic(catalog: np.ndarray, neighbours: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n synthetic vectors (float32, unit) and their parent rows: mixes of a real product and a near neighbour."""
    rng = np.random.default_rng(seed)
    parents = rng.integers(0, len(catalog), n)
    partners = neighbours[parents, rng.integers(0, MIX_NEIGHBOURS, n)]
    out = np.empty((n, catalog.shape[1]), dtype=np.float32)
    for start in range(0, n, 100_000):
        sl = slice(start, min(n, start + 100_000))
        w = rng.uniform(0, MIX_MAX_W, sl.stop - sl.start).astype(np.float32)[:, None]
        v = (1 - w) * catalog[parents[sl]] + w * catalog[partners[sl]]
        v += rng.standard_normal(v.shape, dtype=np.float32) * (NOISE / np.sqrt(v.shape[1]))
        out[sl] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out, parents


def quantiles(values: np.ndarray) -> dict:
    return {f"p{q}": round(float(np.percentile(values, q)), 4) for q in (5, 25, 50, 75, 95)} | {
        "mean": round(float(values.mean()), 4)}


def stage_vectors(args) -> None:
    products, catalog, queries = real_data()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    nn_path = work / "real_neighbours.npy"
    if nn_path.exists():
        neighbours = np.load(nn_path)
    else:
        began = time.perf_counter()
        neighbours, _ = top_neighbours(catalog, np.arange(len(catalog)), MIX_NEIGHBOURS)
        np.save(nn_path, neighbours)
        print(f"10-NN of the real catalog in {time.perf_counter() - began:.0f} s")
    results = load_results()
    if "nn_check" not in results:
        # a synthetic-only catalog of the real size against the real one, seen by the real queries and by
        # a sample of its own products (nearest neighbour other than itself)
        synth, _ = synthetic(catalog, neighbours, len(catalog), seed=SEED + 99)
        rng = np.random.default_rng(SEED)
        sample = rng.choice(len(catalog), 2000, replace=False)
        check = {"catalog_size": len(catalog), "sample": 2000, "queries": len(queries)}
        for name, cat in (("real", catalog), ("synthetic", synth)):
            _, own = top_neighbours(cat, sample, K)
            _, q = top_neighbours(cat, queries, K, exclude_self=False)
            check[name] = {"product_top1": quantiles(own[:, 0]), "product_top10": quantiles(own[:, -1]),
                           "query_top1": quantiles(q[:, 0]), "query_top10": quantiles(q[:, -1])}
        # cosine of a synthetic product to its parent
        results["nn_check"] = check
        save_results(results)
        print(json.dumps(check, indent=1))
    for size in args.sizes:
        path = work / f"vectors_{size}.npy"
        if path.exists() or size <= len(catalog):
            continue
        began = time.perf_counter()
        extra, parents = synthetic(catalog, neighbours, size - len(catalog), seed=SEED + size)
        full = np.lib.format.open_memmap(path.with_suffix(".tmp.npy"), mode="w+", dtype=np.float32,
                                         shape=(size, catalog.shape[1]))
        full[:len(catalog)] = catalog
        full[len(catalog):] = extra
        full.flush()
        del full
        np.save(work / f"parents_{size}.npy", parents)
        path.with_suffix(".tmp.npy").replace(path)
        print(f"{size}: {size - len(catalog)} synthetic vectors in {time.perf_counter() - began:.0f} s")
        del extra


def catalog_of(args, size: int) -> tuple[pd.DataFrame, np.ndarray]:
    products, catalog, _ = real_data()
    if size <= len(products):
        return products, catalog
    vectors = np.load(args.work_dir / f"vectors_{size}.npy", mmap_mode="r")
    parents = np.load(args.work_dir / f"parents_{size}.npy")
    extra = products.iloc[parents][["title", "category", "brand", "price"]].reset_index(drop=True)
    extra.insert(0, "product_id", [f"syn{i:07d}" for i in range(len(parents))])
    extra["text"] = extra["title"]
    frame = pd.concat([products[["product_id", "title", "category", "brand", "price", "text"]], extra],
                      ignore_index=True)
    return frame, vectors


# ----- results ---------------------------------------------------------------------------------------

def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def save_results(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(RESULTS)


def done_already(section: str, key: str) -> bool:
    """Whether the results hold ``key`` under ``section`` (builds, stores, measures): stages are resumable."""
    if key in load_results().get(section, {}):
        print(f"{key}: in {section} already")
        return True
    return False


def machine() -> dict:
    info = {"loadavg": [round(x, 2) for x in os.getloadavg()]}
    with open("/proc/meminfo") as f:
        mem = {line.split(":")[0]: int(line.split()[1]) for line in f}
    info["mem_available_gib"] = round(mem["MemAvailable"] / 2**20, 1)
    return info


def index_name(size: int, option: str) -> str:
    return f"{ALIAS}-{size}-{option.replace('_', '')}"


# ----- build -------------------------------------------------------------------------------------------

def stage_build(args, size: int, option: str) -> None:
    from near2_tasks.serving import elasticsearch_local
    from near2_tasks.serving.es_client import make_client
    from near2_tasks.serving.index import (binary_centres, centre_sample_positions, create_index, finalize_index,
                                           load_shard, prepare_products)

    key = f"{size}:{option}"
    if done_already("builds", key):
        return
    settings, dims = settings_for(args, option)
    client = make_client(settings)
    products, vectors = catalog_of(args, size)
    products = prepare_products(products, settings.dataset.text_template)
    name = index_name(size, option)
    if client.indices.exists(index=name):
        client.indices.delete(index=name)
    before = machine()
    centre_rows = centre_sample_positions(products, settings.elasticsearch.binary_centre_sample_size)
    centres = binary_centres(settings, dims, np.asarray(vectors[centre_rows]))
    began = time.perf_counter()
    built = create_index(settings, str(MODEL), products.iloc[:0], model_version="scale", dims=dims,
                         centres=centres, index_name=name, client=client,
                         catalog_version=f"scale-{size}")
    meta = built.meta
    chunk = 50_000
    for start in range(0, size, chunk):
        stop = min(size, start + chunk)
        load_shard(settings, name, products.iloc[start:stop], np.asarray(vectors[start:stop]), client=client,
                   meta=meta)
        print(f"  {key}: {stop}/{size} loaded, {time.perf_counter() - began:.0f} s", flush=True)
    loaded = time.perf_counter()
    finalize_index(settings, name, products, client=client, meta=meta)
    done = time.perf_counter()
    segments = client.indices.segments(index=name)["indices"][name]["shards"]["0"][0]["num_committed_segments"]
    row = {"size": size, "option": option, "index": name, "dims": dims,
           "load_s": round(loaded - began, 1), "finalize_s": round(done - loaded, 1),
           "build_s": round(done - began, 1), "segments": segments,
           "server": elasticsearch_local.server_version(settings.elasticsearch.url),
           "heap": args.heap, "machine_before": before, "machine_after": machine()}
    row.update(storage(client, name))
    results = load_results()
    results.setdefault("builds", {})[key] = row
    save_results(results)
    print(json.dumps(row, indent=1))


def stage_store(args, size: int, option: str) -> None:
    """The funnel's local store of a built index (``rescore_store``: float16 vectors, the product fields, the
    bit codes), written by the project's functions as an index build with ``funnel_rescore: local`` does
    (a part per chunk, then the merge): timed and sized apart from the Elasticsearch build."""
    from near2_tasks.serving import rescore_store
    from near2_tasks.serving.compact import meta_centres
    from near2_tasks.serving.index import index_meta, prepare_products

    key = f"{size}:{option}"
    if done_already("stores", key):
        return
    results = load_results()
    settings, _ = settings_for(args, option)
    build = results["builds"][key]
    products, vectors = catalog_of(args, size)
    products = prepare_products(products, settings.dataset.text_template)
    from near2_tasks.serving.es_client import make_client

    meta = index_meta(settings, build["index"], make_client(settings))
    centres = meta_centres(meta)
    rescore_store.delete_stores(settings, [build["index"]])
    before = machine()
    began = time.perf_counter()
    for start in range(0, size, 100_000):
        stop = min(size, start + 100_000)
        rescore_store.write_part(settings, build["index"], products.iloc[start:stop],
                                 np.asarray(vectors[start:stop]), centres)
    parts = time.perf_counter()
    directory = rescore_store.finalize(settings, build["index"], products, meta, build["docs"])
    done = time.perf_counter()
    files = {f.name: f.stat().st_size for f in directory.iterdir()}
    row = {"index": build["index"], "parts_s": round(parts - began, 1), "merge_s": round(done - parts, 1),
           "store_s": round(done - began, 1), "files": files, "machine_before": before, "machine_after": machine()}
    results = load_results()
    results.setdefault("stores", {})[key] = row
    save_results(results)
    print(json.dumps(row, indent=1))


def storage(client, name: str) -> dict:
    """Elasticsearch's own numbers: store size, off-heap vector bytes per field, disk per field."""
    stats = client.indices.stats(index=name).body["indices"][name]["primaries"]
    out = {"store_bytes": stats["store"]["size_in_bytes"], "docs": stats["docs"]["count"],
           "dense_vector": stats.get("dense_vector")}
    try:
        usage = client.perform_request("POST", f"/{name}/_disk_usage", params={"run_expensive_tasks": "true"},
                                       headers={"accept": "application/json"}).body
        fields = usage[name]["fields"]
        out["disk_fields"] = {f: {"total": v["total_in_bytes"], "knn_vectors": v.get("knn_vectors_in_bytes", 0)}
                              for f, v in fields.items() if f.startswith("embedding")}
    except Exception as exc:  # noqa: BLE001 - the table says what is missing
        out["disk_fields_error"] = str(exc)[:300]
    return out


# ----- measure -----------------------------------------------------------------------------------------

def exact_top(args, size: int, vectors, queries: np.ndarray, dim: int) -> np.ndarray:
    """Exact top-10 rows at ``dim`` (truncated, re-normalised) of each query; cached per (size, dim)."""
    from near2_tasks.conventions import truncate

    path = args.work_dir / f"exact_{size}_{dim}.npy"
    if path.exists():
        return np.load(path)
    q = truncate(queries, dim)
    best_s = np.full((len(q), K), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), K), dtype=np.int64)
    for start in range(0, len(vectors), 200_000):
        block = truncate(np.asarray(vectors[start:start + 200_000]), dim)
        scores = q @ block.T
        top = np.argpartition(-scores, K, axis=1)[:, :K]
        s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], axis=1)
        i = np.concatenate([best_i, top + start], axis=1)
        keep = np.argsort(-s, axis=1)[:, :K]
        best_s, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
    np.save(path, best_i)
    return best_i


def stage_measure(args, size: int, option: str) -> None:
    from near2_tasks import conventions
    from near2_tasks.serving.query_bodies import knn_body
    from near2_tasks.serving.search import Searcher

    key = f"{size}:{option}" + (f"#{args.repeat}" if args.repeat else "")
    if done_already("measures", key):
        return
    build = load_results()["builds"][f"{size}:{option}"]
    settings, dims = settings_for(args, option)
    searcher = Searcher(settings)
    served = searcher.serving_index_of(build["index"])
    # the funnel where it runs: stage 2 in Elasticsearch; stage 2 from the local store; both stages local
    placements = {"2 requests": {"funnel_rescore": "elasticsearch"},
                  "1 request": {"funnel_rescore": "local", "funnel_shortlist": "elasticsearch"},
                  "no request": {"funnel_rescore": "local", "funnel_shortlist": "local"}}
    funnels = {where: Searcher(settings_for(args, option, serving)[0]) for where, serving in placements.items()}
    products, vectors = catalog_of(args, size)
    _, _, queries = real_data()
    row_of = {pid: i for i, pid in enumerate(products["product_id"])}
    exact = {d: exact_top(args, size, vectors, queries, d) for d in (384, 64) if d in dims or d == 384}

    def knn(vector, dim, oversample=None):
        body = knn_body(dim, conventions.truncate(vector, dim), K, 100, [], source=False)
        if oversample is not None:
            body["knn"]["rescore_vector"] = {"oversample": oversample}
        hits = searcher.client.search(index=served.name, **body, stored_fields="_none_",
                                      docvalue_fields=["product_id"], filter_path=["hits.hits.fields"])
        return [h["fields"]["product_id"][0] for h in hits["hits"]["hits"]]

    def served_knn(vector, dim):  # the production path: Searcher.retrieve, the mapping's own rescoring
        return [h.product_id for h in searcher.retrieve(served, vector, K, dim, None, [], 100).hits]

    modes: dict = {}
    if option == "default":
        modes["kNN 384 bbq_hnsw, rescore x3 (mapping default, Searcher.retrieve)"] = (384, lambda v: served_knn(v, 384))
        modes["kNN 384 bbq_hnsw, no rescoring (x0)"] = (384, lambda v: knn(v, 384, 0))
        modes["kNN 64 hnsw (Searcher.retrieve)"] = (64, lambda v: served_knn(v, 64))
        modes[f"funnel {settings.serving.funnel_shortlist_size} @ 64-bit codes -> 384 (Searcher.retrieve)"] = (
            384, lambda v: [h.product_id for h in searcher.retrieve(served, v, K, 384, 64).hits])
    elif option == "funnel128":
        modes["kNN 384 bbq_hnsw, rescore x3 (mapping default, Searcher.retrieve)"] = (384, lambda v: served_knn(v, 384))
        modes["kNN 64 hnsw (Searcher.retrieve)"] = (64, lambda v: served_knn(v, 64))
        size_ = settings.serving.funnel_shortlist_size

        def funnel(where):
            def run(vector):
                got = funnels[where].retrieve(served, vector, K, 384, 128)
                want = placements[where]
                assert (got.rescore, got.shortlist) == (want["funnel_rescore"], want.get("funnel_shortlist", "elasticsearch"))
                return [h.product_id for h in got.hits]
            return run

        for where in placements:
            modes[f"funnel {size_} @ 128-bit codes -> 384, {where} (Searcher.retrieve)"] = (384, funnel(where))
        for other in args.funnel_sizes:  # the no-request funnel at other shortlist sizes
            if other != size_:
                funnels[other] = Searcher(settings_for(args, option, {**placements["no request"],
                                                                      "funnel_shortlist_size": other})[0])
                modes[f"funnel {other} @ 128-bit codes -> 384, no request (Searcher.retrieve)"] = (
                    384, lambda v, other=other: [h.product_id for h in funnels[other].retrieve(served, v, K, 384, 128).hits])
    elif option == "int8_hnsw":
        modes["kNN 384 int8_hnsw, no rescoring (mapping default, Searcher.retrieve)"] = (384, lambda v: served_knn(v, 384))
        modes["kNN 384 int8_hnsw, rescore x3"] = (384, lambda v: knn(v, 384, 3))
        modes["kNN 64 int8_hnsw, no rescoring (Searcher.retrieve)"] = (64, lambda v: served_knn(v, 64))
        modes["kNN 64 int8_hnsw, rescore x3"] = (64, lambda v: knn(v, 64, 3))
    else:
        modes["kNN 384 hnsw float (Searcher.retrieve)"] = (384, lambda v: served_knn(v, 384))
    names = [n for n in modes if re.search(args.only, n)] if args.only else list(modes)
    n_queries = min(args.queries, len(queries)) if args.queries else len(queries)
    scoring = None
    if size == len(real_data()[0]) and n_queries == len(queries):
        from bench_retrieval import ndcg

        scoring = test_data(products, queries)
    before = machine()
    for i in range(min(args.warmup, n_queries)):  # warm-up pass: page cache, JIT
        for name in names:
            modes[name][1](queries[i])
    seconds = {n: [] for n in names}
    found = {n: [] for n in names}
    for i in range(n_queries):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            ids = modes[name][1](queries[i])
            seconds[name].append(time.perf_counter() - start)
            found[name].append([row_of[p] for p in ids[:K]])
    rows = []
    for name in names:
        dim = modes[name][0]
        ms = sorted(1000 * s for s in seconds[name])
        r384 = np.mean([len(set(found[name][i]) & set(exact[384][i])) / K for i in range(n_queries)])
        own = np.mean([len(set(found[name][i]) & set(exact[dim][i])) / K for i in range(n_queries)])
        rows.append({"mode": name, "dim": dim, "p50_ms": round(statistics.median(ms), 2),
                     "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 2),
                     "recall@10_vs_exact_384": round(float(r384), 4),
                     f"recall@10_vs_exact_{dim}": round(float(own), 4)})
        if scoring is not None:  # the real catalog: NDCG@10 of the answers, and of exact float search
            ids = [[products.product_id[r] for r in found[name][i]] for i in range(n_queries)]
            rows[-1]["ndcg@10"] = round(ndcg(*scoring, ids=ids), 4)
        print(rows[-1], flush=True)
    if scoring is not None:
        rows.append({"mode": "exact float 384 (numpy)", "dim": 384, "recall@10_vs_exact_384": 1.0,
                     "ndcg@10": round(ndcg(*scoring, rows=exact[384]), 4)})
        print(rows[-1], flush=True)
    results = load_results()
    results.setdefault("measures", {})[key] = {"size": size, "option": option, "queries": n_queries,
                                               "warmup": args.warmup, "machine_before": before,
                                               "machine_after": machine(), "rows": rows}
    save_results(results)


# ----- report ------------------------------------------------------------------------------------------

def off_heap(build: dict, field: str) -> dict:
    fields = ((build.get("dense_vector") or {}).get("off_heap") or {}).get("fielddata") or {}
    return fields.get(field, {})


def ram_per_product(build: dict, row: dict) -> tuple[float | None, float | None]:
    """(hot, all) off-heap bytes per product of the field a mode searches, from ES's own _stats:
    hot = what every candidate touches (the quantised copy veb/veq, else the floats vec, plus the graph vex);
    all = every off-heap vector file of the field (incl. the raw floats that rescoring reads for a few)."""
    n = build["docs"]
    if row["mode"].startswith("funnel"):
        bits = 128 if "128-bit" in row["mode"] else 64
        codes = off_heap(build, f"embedding_{bits}_bits").get("vec_size_bytes")
        return (codes / n if codes else None), None
    f = off_heap(build, f"embedding_{row['dim']}")
    if not f:
        return None, None
    quantised = f.get("veb_size_bytes", 0) + f.get("veq_size_bytes", 0)
    hot = (quantised or f.get("vec_size_bytes", 0)) + f.get("vex_size_bytes", 0)
    return hot / n, sum(v for k, v in f.items() if k.endswith("_size_bytes")) / n


def stage_report(args) -> None:
    results = load_results()
    print("| products | index (force-merged to 1 segment) | build s (load + finalize) | disk B/product (whole index) "
          "| mode | RAM B/product, hot | off-heap B/product, all files of the field | p50 ms | p99 ms "
          "| recall@10 vs exact 384 | recall@10 vs exact at the field's dim | NDCG@10 | load avg (1 min) at start |")
    print("|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, measure in sorted(results.get("measures", {}).items(), key=lambda kv: (kv[1]["size"], kv[1]["option"])):
        build = results["builds"][key.split("#")[0]]
        n = build["docs"]
        for row in measure["rows"]:
            if "p50_ms" not in row:  # exact search in numpy: its NDCG@10 only
                print(f"| {n:,} | – | – | – | {row['mode']} | {build['docs'] and 1536} | – | – | – | 1 | 1 | "
                      f"{row.get('ndcg@10', '–')} | |")
                continue
            hot, every = ram_per_product(build, row)
            row["ram_hot_bytes_per_product"] = hot and round(hot, 1)
            row["off_heap_all_bytes_per_product"] = every and round(every, 1)
            print(f"| {n:,} | {build['option']} | {build['build_s']:.0f} ({build['load_s']:.0f} + "
                  f"{build['finalize_s']:.0f}) | {build['store_bytes'] / n:.0f} | {row['mode']} | "
                  f"{hot:.0f} | {f'{every:.0f}' if every else '–'} | {row['p50_ms']} | {row['p99_ms']} | "
                  f"{row['recall@10_vs_exact_384']} | {row.get('recall@10_vs_exact_' + str(row['dim']))} | "
                  f"{row.get('ndcg@10', '–')} | {measure['machine_before']['loadavg'][0]} |")
    save_results(results)
    plot(results)


def plot(results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict = {}
    latest = {}  # a unit measured again (SIZE:OPTION#N): the plot shows the latest measurement
    for key in sorted(results.get("measures", {})):
        latest[key.split("#")[0]] = results["measures"][key]
    for key, measure in latest.items():
        build = results["builds"][key]
        for row in measure["rows"]:
            if "p50_ms" not in row:
                continue
            hot, _ = ram_per_product(build, row)
            series.setdefault(row["mode"], []).append((build["docs"], row["p50_ms"], row["p99_ms"],
                                                       (hot or 0) * build["docs"]))
    builds: dict = {}
    for build in results.get("builds", {}).values():
        builds.setdefault(build["option"], []).append((build["docs"], build["build_s"], build["store_bytes"]))
    fig, axes = plt.subplots(1, 4, figsize=(22, 5.4))
    for mode, points in sorted(series.items()):
        points.sort()
        xs = [p[0] for p in points]
        axes[0].plot(xs, [p[1] for p in points], marker="o", label=mode)
        axes[3].plot(xs, [p[3] / 2**20 for p in points], marker="o", label=mode)
    axes[0].set(xscale="log", yscale="log", xlabel="products", ylabel="p50 ms (one client)", title="p50 latency")
    axes[3].set(xscale="log", yscale="log", xlabel="products", ylabel="MiB",
                title="hot off-heap RAM of the field searched (ES _stats)")
    for option, points in sorted(builds.items()):
        points.sort()
        xs = [p[0] for p in points]
        axes[1].plot(xs, [p[1] for p in points], marker="o", label=f"{option}: build s")
        axes[2].plot(xs, [p[2] / 2**20 for p in points], marker="o", label=f"{option}: store MiB")
    axes[1].set(xscale="log", yscale="log", xlabel="products", ylabel="seconds", title="build incl. force merge")
    axes[2].set(xscale="log", yscale="log", xlabel="products", ylabel="MiB", title="index on disk")
    axes[0].legend(fontsize=6, loc="upper left")
    axes[1].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("near2 at scale: Elasticsearch 9.2.4, one node, 2 shared cores (bench/scale_benchmark.py)")
    fig.tight_layout()
    PNG.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PNG, dpi=110)
    print(f"wrote {PNG}")


# ----- main ---------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", required=True,
                        choices=["es-start", "es-stop", "vectors", "build", "store", "measure", "report"])
    parser.add_argument("--unit", help="SIZE:OPTION, OPTION one of default, int8_hnsw, hnsw")
    parser.add_argument("--sizes", default="54639,500000,2000000")
    parser.add_argument("--model", choices=sorted(MODELS), default="S",
                        help="whose vectors: S (the shipped recipe) or C (the first rows)")
    parser.add_argument("--work-dir", type=Path, default=None, help="default /var/tmp/near2-scale-<model>")
    parser.add_argument("--port", type=int, default=9257)
    parser.add_argument("--heap", default="3g")
    parser.add_argument("--queries", type=int, default=0, help="0: all 943 test queries")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--funnel-sizes", default="", help="funnel128: the no-request funnel at these shortlist "
                        "sizes too (comma-separated)")
    parser.add_argument("--only", default="", help="measure only the modes whose name matches this regex")
    parser.add_argument("--repeat", type=int, default=0, help="measure a built unit again (stored as SIZE:OPTION#N)")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.funnel_sizes = [int(s) for s in args.funnel_sizes.split(",") if s]
    use_model(args.model)
    args.work_dir = args.work_dir or Path(f"/var/tmp/near2-scale-{args.model}")
    if args.stage in ("es-start", "es-stop"):
        from near2_tasks.serving import elasticsearch_local

        settings, _ = settings_for(args)
        if args.stage == "es-start":
            print(elasticsearch_local.start(settings))
        else:
            print(elasticsearch_local.stop(settings))
        return
    if args.stage == "vectors":
        return stage_vectors(args)
    if args.stage == "report":
        return stage_report(args)
    size, option = args.unit.split(":")
    {"build": stage_build, "store": stage_store, "measure": stage_measure}[args.stage](args, int(size), option)


if __name__ == "__main__":
    main()
