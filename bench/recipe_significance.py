"""Is a recipe row's difference real? Paired bootstrap over the test queries (Home Depot).

    .venv/bin/python bench/recipe_significance.py J_cached256_weights_mined@64 base@384 \
        J_cached256_weights_mined@64 C_pca@64 --out bench/results/recipe_significance.json

Each argument pair is ``A@dim B@dim``; a name is a row of ``bench/recipe_benchmark.py`` (its model in
``<home>/<name>/model``) or ``base`` (the untrained model). Both sides are scored per query exactly as the
recipe benchmark scores them (the same test split, exact cosine over the whole catalog, graded NDCG@10;
the vectors come from the benchmark's embedding cache, so nothing is re-encoded for a row it scored), then
the mean difference A - B with a 95% interval from 10,000 paired resamples of the queries and the share of
resamples where A < B.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def per_query_ndcg(settings, data, ref: str, dim: int) -> np.ndarray:
    from near2_tasks.evaluate.metrics import per_query_metrics
    from near2_tasks.evaluate.retrieval import ExactRetriever
    from near2_tasks.models.backends import load_inference_encoder
    from near2_tasks.models.embeddings import encode_cached
    from near2_tasks.models.refs import embedding_cache_dir, resolve_model

    resolved = resolve_model(settings, ref)
    model = load_inference_encoder(settings, resolved.load_ref, missing="export")
    cache = embedding_cache_dir(settings)
    catalog = encode_cached(model, resolved.cache_key, data.product_texts, cache)
    queries = encode_cached(model, resolved.cache_key, data.query_texts, cache)
    ranked = ExactRetriever(catalog).rank(data, queries, dim, 10)
    floor, threshold = settings.dataset.relevance_floor, settings.dataset.relevant_threshold
    return per_query_metrics(ranked.rows, data.qrels, ["ndcg@10"], floor, threshold)["ndcg@10"]


def paired_bootstrap(a: np.ndarray, b: np.ndarray, rounds: int = 10_000, seed: int = 0) -> dict:
    keep = ~(np.isnan(a) | np.isnan(b))
    diff = a[keep] - b[keep]
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(rounds, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"queries": int(keep.sum()), "a": float(a[keep].mean()), "b": float(b[keep].mean()),
            "diff": float(diff.mean()), "ci95": [float(low), float(high)], "p_a_below_b": float((means < 0).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pairs", nargs="+", metavar="NAME@DIM", help="A@dim B@dim, repeated")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "homedepot")
    parser.add_argument("--home", type=Path, default=REPO / ".near2" / "bench" / "recipes")
    parser.add_argument("--cache", type=Path, default=REPO / ".near2" / "cache" / "embeddings")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if len(args.pairs) % 2:
        raise SystemExit("give NAME@DIM arguments in pairs: A@dim B@dim")

    from near2_tasks.config import load_settings
    from near2_tasks.data.validate import validate_dataset
    from near2_tasks.evaluate.evaluation import prepare_data
    from near2_tasks.train.examples import configured_splits

    settings = load_settings(home=str(args.home / "significance"), dataset={"name": "homedepot"},
                             model={"device": "cpu", "backend": "torch"},
                             validation={"max_row_count_drift": None, "data_docs": False},
                             evaluation={"cache_dir": str(args.cache)})
    accepted = validate_dataset(settings, args.data / "products.csv", args.data / "judgments.csv")
    test = configured_splits(settings, accepted.judgments).test
    data = prepare_data(accepted.products, test, settings.dataset.text_template)

    def side(spec: str) -> np.ndarray:
        name, _, dim = spec.partition("@")
        if not dim.isdigit():
            raise SystemExit(f"expected NAME@DIM, got {spec!r}")
        ref = settings.model.base_model if name == "base" else str(args.home / name / "model")
        return per_query_ndcg(settings, data, ref, int(dim))

    results = []
    for a, b in zip(args.pairs[::2], args.pairs[1::2]):
        result = {"a": a, "b": b, **paired_bootstrap(side(a), side(b))}
        results.append(result)
        low, high = result["ci95"]
        print(f"{a} - {b}: {result['a']:.4f} - {result['b']:.4f} = {result['diff']:+.4f} "
              f"(95% CI {low:+.4f} .. {high:+.4f}; A below B in {result['p_a_below_b']:.1%} of resamples; "
              f"{result['queries']} queries)")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
