"""Encoding benchmark: titles/s of each inference backend against plain fp32 torch, measured side by side.

    .venv/bin/python bench/encode_benchmark.py                       # 5,000 titles, 5 repetitions
    .venv/bin/python bench/encode_benchmark.py --titles 2000 --repeats 3 --ndcg --out bench/results/encode.json

Baseline: ``SentenceTransformer.encode`` (what ``near2_tasks.models.embeddings.encode`` does with the torch
backend), fp32, batch 64, on the packaged all-MiniLM-L6-v2. Each other configuration is a backend from
``near2_tasks.models.backends`` (exported once, before timing) at a batch size. All configurations run once to warm
up (their vectors give the cosine to the baseline), then ``--repeats`` rounds; each round runs every
configuration once, in a shuffled order, so a neighbour's load hits them all alike. Reported: median
titles/s, and the speed-up as the median of the per-round ratios to the baseline of the same round.

``--ndcg`` adds the quality guard on retrieval: every non-baseline backend variant (at batch 64) encodes
the whole catalog (54,667 titles) and the test-split queries (``examples.configured_splits``, the pipeline's
seed and fractions), and NDCG@10 per dimension of exact whole-catalog search
(``evaluate.retrieval.evaluate_retriever`` with ``ExactRetriever``, the relevance scale from settings) is
compared with the fp32 model's (read from the team's embedding cache under evaluation's key, e.g.
``minilm-base``, when present). Slow: minutes per variant on 2 cores.

The Home Depot data is research-only: read from ``--data-dir``, never copied.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from near2_tasks.models.backend_export import export_artifact  # noqa: E402
from near2_tasks.models.backend_runtime import cpu_threads, load_artifact  # noqa: E402
from near2_tasks.models.backends import BackendSpec  # noqa: E402
from near2_tasks.config import load_settings  # noqa: E402
from near2_tasks.models.settings import PACKAGED_MINILM  # noqa: E402
from near2_tasks.models.embeddings import encode, encode_cached, load_encoder  # noqa: E402

BASELINE = "torch fp32 b64"
SHARED_CACHE = REPO / ".near2" / "cache" / "embeddings"
DIMS = [384, 256, 128, 64, 32]


@dataclass
class Config:
    name: str
    backend: str  # torch | onnx | onnx-int8 | openvino | openvino-int8
    precision: str  # fp32 | bf16
    batch_size: int
    threads: int | None = None  # None: --threads


def default_configs() -> list[Config]:
    configs = [Config(BASELINE, "torch", "fp32", 64), Config("torch fp32 b64 1 thread", "torch", "fp32", 64, 1),
               Config("torch bf16 b64", "torch", "bf16", 64)]
    configs += [Config(f"onnx fp32 b{b}", "onnx", "fp32", b) for b in (32, 64, 128)]
    configs += [Config(f"onnx int8 b{b}", "onnx-int8", "fp32", b) for b in (16, 32, 64, 128)]
    configs += [Config("openvino fp32 b64", "openvino", "fp32", 64)]
    configs += [Config(f"openvino bf16 b{b}", "openvino", "bf16", b) for b in (16, 32, 64, 128, 256)]
    return configs


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "homedepot")
    parser.add_argument("--model", default=PACKAGED_MINILM, help="model to export and time (default: base)")
    parser.add_argument("--titles", type=int, default=5000, help="sampled titles per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="default: every usable core")
    parser.add_argument("--only", nargs="*", help="names of configurations to run (baseline always runs)")
    parser.add_argument("--ndcg", action="store_true", help="also the NDCG@10 guard on the whole catalog")
    parser.add_argument("--query-latency", type=int, default=300,
                        help="judged queries encoded one at a time on one thread (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser.parse_args()


def make_encoders(model, configs: list[Config], export_root: Path, threads: int
                  ) -> tuple[dict[str, Callable[[list[str]], np.ndarray]], dict[str, Path], dict[str, float]]:
    """One ``texts -> vectors`` function per configuration; exports each backend variant once."""
    import copy

    import torch

    torch.set_num_threads(threads)
    artefacts: dict[str, Path] = {}
    export_s: dict[str, float] = {}
    runners: dict[str, Callable[[list[str]], np.ndarray]] = {}
    bf16_model = None
    for config in configs:
        if config.backend == "torch":
            if config.precision == "bf16":
                bf16_model = bf16_model or copy.deepcopy(model).to(torch.bfloat16)
            chosen = bf16_model if config.precision == "bf16" else model
            runners[config.name] = with_torch_threads(
                lambda texts, m=chosen, b=config.batch_size: encode(m, texts, b), config.threads or threads)
            continue
        backend, _, quantize = config.backend.partition("-")
        spec = BackendSpec(backend, "int8" if quantize else "none")  # type: ignore[arg-type]
        if spec.variant not in artefacts:
            started = time.perf_counter()
            artefacts[spec.variant] = export_artifact(model, spec, export_root / spec.variant,
                                                      source=f"benchmark: {model}")
            export_s[spec.variant] = round(time.perf_counter() - started, 1)
        encoder = load_artifact(artefacts[spec.variant], threads=config.threads or threads,
                                precision=config.precision)
        if getattr(encoder, "precision", config.precision) != config.precision:
            print(f"skipping {config.name}: this CPU runs it as {encoder.precision}", file=sys.stderr)
            continue
        runners[config.name] = lambda texts, e=encoder, b=config.batch_size: e.encode_normalized(texts, b)
    return runners, artefacts, export_s


def with_torch_threads(run: Callable[[list[str]], np.ndarray], threads: int) -> Callable[[list[str]], np.ndarray]:
    """``run`` with torch using ``threads`` threads (a process-wide setting), restored afterwards."""
    import torch

    def wrapped(texts: list[str]) -> np.ndarray:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run(texts)
        finally:
            torch.set_num_threads(previous)

    return wrapped


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Re-normalised in float32 (a bf16 model normalises in bf16, off by ~1e-3)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def measure(runners: dict[str, Callable], texts: list[str], repeats: int, seed: int) -> dict[str, Any]:
    """Warm-up (vectors kept for the cosine), then interleaved, shuffled rounds."""
    vectors = {name: unit_rows(run(texts)) for name, run in runners.items()}
    reference = vectors[BASELINE]
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    rng = random.Random(seed)
    for round_no in range(repeats):
        order = list(runners)
        rng.shuffle(order)
        for name in order:
            started = time.perf_counter()
            runners[name](texts)
            seconds[name].append(time.perf_counter() - started)
        print(f"round {round_no + 1}/{repeats}: baseline {len(texts) / seconds[BASELINE][-1]:.0f} titles/s, "
              f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    results = {}
    for name in runners:
        cos = np.sum(vectors[name] * reference, axis=1)
        ratios = [b / s for b, s in zip(seconds[BASELINE], seconds[name])]
        results[name] = {
            "titles_per_s": len(texts) / statistics.median(seconds[name]),
            "speedup": statistics.median(ratios),
            "speedup_min": min(ratios), "speedup_max": max(ratios),
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "cosine_p1": float(np.percentile(cos, 1)),
            "seconds": seconds[name],
        }
    return results


def query_latency(model, artefacts: dict[str, Path], queries: list[str]) -> dict[str, Any]:
    """One query at a time on one thread, as the search service encodes (``serving.encode_threads``):
    p50/p99 ms per backend, interleaved query by query."""
    encoders: dict[str, Callable[[list[str]], np.ndarray]] = {
        "torch fp32": with_torch_threads(lambda texts: encode(model, texts, 1), 1)}
    for variant, directory in artefacts.items():
        encoder = load_artifact(directory, threads=1)
        name = f"{encoder.variant}" if variant.startswith("openvino") else variant
        encoders[name] = lambda texts, e=encoder: e.encode_normalized(texts, 1)
    seconds: dict[str, list[float]] = {name: [] for name in encoders}
    for run in encoders.values():  # warm-up
        run(queries[:5])
    for i, query in enumerate(queries):
        names = list(encoders)
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            started = time.perf_counter()
            encoders[name]([query])
            seconds[name].append(time.perf_counter() - started)
    return {name: {"p50_ms": float(np.percentile(v, 50) * 1000), "p99_ms": float(np.percentile(v, 99) * 1000)}
            for name, v in seconds.items()}


def ndcg_guard(model, model_ref: str, runners: dict[str, Callable], configs: list[Config], data_dir: Path
               ) -> dict[str, Any]:
    """NDCG@10 per dimension on the Home Depot test split: each backend variant vs the fp32 model."""
    from near2_tasks.evaluate.evaluation import prepare_data
    from near2_tasks.evaluate.retrieval import ExactRetriever, evaluate_retriever, scale_of
    from near2_tasks.train.examples import configured_splits

    settings = load_settings()
    products = pd.read_csv(data_dir / "products.csv", dtype={"product_id": str})
    products["text"] = products["title"].astype(str)  # the texts of the team's cached embeddings
    judgments = pd.read_csv(data_dir / "judgments.csv", dtype={"product_id": str, "query_id": str})
    test = configured_splits(settings, judgments).test
    data = prepare_data(products, test, settings.dataset.text_template)

    def ndcg(catalog: np.ndarray, queries: np.ndarray) -> dict[int, float]:
        scores = evaluate_retriever(ExactRetriever(catalog), data, DIMS, query_vectors=queries, metrics=["ndcg@10"],
                                    **scale_of(settings))
        return {dim: scores.dims[dim]["ndcg@10"] for dim in DIMS}

    from near2_tasks.models.refs import resolve_model

    SHARED_CACHE.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    key = resolve_model(settings, model_ref).cache_key  # evaluation's key: the team's cached vectors
    reference = ndcg(encode_cached(model, key, data.product_texts, SHARED_CACHE), encode(model, data.query_texts))
    report: dict[str, Any] = {"queries": len(data.query_texts), "products": len(data.product_texts),
                              "fp32": reference, "fp32_seconds": round(time.perf_counter() - started, 1)}
    print(f"ndcg fp32: {reference}", file=sys.stderr, flush=True)
    seen = set()
    for config in configs:
        key = (config.backend, config.precision)
        if config.backend == "torch" or key in seen or config.name not in runners:  # torch bf16: too slow
            continue
        seen.add(key)
        started = time.perf_counter()
        catalog = runners[config.name](data.product_texts)
        values = ndcg(catalog, runners[config.name](data.query_texts))
        report[config.name] = {"ndcg": values, "max_abs_delta": max(abs(values[d] - reference[d]) for d in DIMS),
                               "seconds": round(time.perf_counter() - started, 1)}
        print(f"ndcg {config.name}: {values}", file=sys.stderr, flush=True)
    return report


def print_tables(results: dict[str, Any], ndcg: dict[str, Any] | None, latency: dict[str, Any] | None) -> None:
    print("| configuration | titles/s (median) | speed-up vs torch fp32 b64 (median of rounds) | range | "
          "cosine mean | cosine min |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        print(f"| {name} | {r['titles_per_s']:.0f} | {r['speedup']:.2f}× | {r['speedup_min']:.2f}–"
              f"{r['speedup_max']:.2f} | {r['cosine_mean']:.5f} | {r['cosine_min']:.5f} |")
    if ndcg:
        print()
        print("| configuration | " + " | ".join(f"NDCG@10 d={d}" for d in DIMS) + " | max abs delta |")
        print("| --- |" + " ---: |" * (len(DIMS) + 1))
        print("| torch fp32 | " + " | ".join(f"{ndcg['fp32'][d]:.4f}" for d in DIMS) + " | — |")
        for name, r in ndcg.items():
            if isinstance(r, dict) and "ndcg" in r:
                print(f"| {name} | " + " | ".join(f"{r['ndcg'][d]:.4f}" for d in DIMS) + f" | {r['max_abs_delta']:.4f} |")
    if latency:
        print()
        print("| one query, one thread | p50 ms | p99 ms |")
        print("| --- | ---: | ---: |")
        for name, r in latency.items():
            print(f"| {name} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")


def main() -> None:
    args = parse_args()
    products = args.data_dir / "products.csv"
    if not products.is_file():
        sys.exit(f"Home Depot data not found at {args.data_dir} (pass --data-dir)")
    threads = cpu_threads(args.threads)
    configs = default_configs()
    if args.only:
        configs = [c for c in configs if c.name == BASELINE or c.name in args.only]
    titles = pd.read_csv(products)["title"].astype(str).sample(args.titles, random_state=args.seed).tolist()
    model = load_encoder(args.model, device="cpu")
    with tempfile.TemporaryDirectory() as scratch:
        runners, artefacts, export_s = make_encoders(model, configs, Path(scratch), threads)
        results = measure(runners, titles, args.repeats, args.seed)
        latency = None
        if args.query_latency:
            judged = pd.read_csv(args.data_dir / "judgments.csv")["query"].astype(str).drop_duplicates()
            latency = query_latency(model, artefacts,
                                    judged.sample(min(args.query_latency, len(judged)), random_state=args.seed).tolist())
        ndcg = ndcg_guard(model, args.model, runners, configs, args.data_dir) if args.ndcg else None
    machine = {"cpu": platform.processor() or platform.machine(), "usable_cores": threads,
               "load_average_end": os.getloadavg(), "python": platform.python_version()}
    print_tables(results, ndcg, latency)
    print(f"\nexport seconds per variant: {export_s}; machine: {machine}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine,
                                        "export_seconds": export_s, "results": results, "ndcg": ndcg,
                                        "query_latency": latency},
                                       indent=2, default=str))


if __name__ == "__main__":
    main()
