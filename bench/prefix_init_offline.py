"""Which starting rotation gives the best *untrained* prefixes? (Home Depot, base model, no training)

    .venv/bin/python bench/prefix_init_offline.py [--out bench/results/prefix_init_offline.json]

Every candidate is an orthogonal rotation of the base model's (normalised) embeddings, so the full 384-d
cosine is unchanged and only the prefixes differ: it is the starting point ``training.prefix_init`` gives
the fine-tune. Scored like the recipe benchmark: the test split's queries, exact cosine over the whole
catalog, graded NDCG@10 per dimension. The rotations are fitted on the *train* split only:

* ``none``: the base model's own coordinates;
* ``pca catalog``: the catalog's principal axes (``prefix_init: pca`` fits them on the training examples'
  product texts);
* ``pca queries`` / ``pca catalog+queries``: the principal axes of the train queries, or of both;
* ``relevance``: the eigenvectors of the symmetrised cross-covariance of train queries and their strong
  positives (relevance >= 2.5), largest first (``prefix_init: relevance``, :func:`near2_tasks.train.init.
  relevance_axes`); ``relevance - random``: the same with the cross-covariance of queries and random
  products subtracted; ``relevance - judged negatives``: with that of judged negatives (< 1.67) subtracted.

The vectors come from the recipe benchmark's embedding cache (``.near2/cache/embeddings``), so after a
recipe row only the train queries may need encoding (a few minutes on 2 cores, once).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DIMS = [384, 256, 128, 64, 32]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "homedepot")
    parser.add_argument("--cache", type=Path, default=REPO / ".near2" / "cache" / "embeddings")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "prefix_init_offline.json")
    parser.add_argument("--model", default=None,
                        help="a trained model directory instead of the base model: the same rotations, fitted "
                             "on that model's vectors (a rotation after training; --out then names its own file)")
    args = parser.parse_args()

    import torch

    from near2_tasks.config import load_settings
    from near2_tasks.data.validate import validate_dataset
    from near2_tasks.evaluate.evaluation import prepare_data
    from near2_tasks.evaluate.retrieval import ExactRetriever, evaluate_retriever, scale_of
    from near2_tasks.models.embeddings import encode_cached, load_encoder
    from near2_tasks.models.refs import resolve_model
    from near2_tasks.train.examples import configured_splits
    from near2_tasks.train.init import eigen_axes, relevance_axes

    settings = load_settings(home=str(REPO / ".near2" / "bench" / "prefix_init"), model={"dims": DIMS, "device": "cpu"},
                             dataset={"name": "homedepot"}, evaluation={"cache_dir": str(args.cache)},
                             validation={"max_row_count_drift": None, "data_docs": False})
    accepted = validate_dataset(settings, args.data / "products.csv", args.data / "judgments.csv")
    splits = configured_splits(settings, accepted.judgments)
    test = prepare_data(accepted.products, splits.test, settings.dataset.text_template)
    train = prepare_data(accepted.products, splits.train, settings.dataset.text_template)
    resolved = resolve_model(settings, args.model or settings.model.base_model)  # the base: "minilm-base"
    model = load_encoder(resolved.load_ref, device="cpu")
    catalog, test_queries, train_queries = (encode_cached(model, resolved.cache_key, texts, args.cache)
                                            for texts in (test.product_texts, test.query_texts, train.query_texts))

    def eigen_rotation(matrix: np.ndarray) -> np.ndarray:
        return eigen_axes(torch.from_numpy(np.asarray(matrix, dtype=np.float64)))[0].numpy().astype(np.float32)

    def cross(rows: np.ndarray, products: np.ndarray) -> np.ndarray:
        return train_queries[rows].T @ catalog[products] / max(len(rows), 1)

    qrels = train.qrels
    strong, negative = qrels.relevance >= 2.5, qrels.relevance < 1.67
    random_products = np.random.default_rng(0).integers(0, len(catalog), int(strong.sum()))
    centred_catalog = catalog - catalog.mean(0)
    centred_queries = train_queries - train_queries.mean(0)
    positives = torch.from_numpy(catalog[qrels.product[strong]])
    rotations = {
        "none": np.eye(catalog.shape[1], dtype=np.float32),
        "pca catalog": eigen_rotation(centred_catalog.T @ centred_catalog),
        "pca queries": eigen_rotation(centred_queries.T @ centred_queries),
        "pca catalog+queries": eigen_rotation(centred_catalog.T @ centred_catalog / len(catalog)
                                              + centred_queries.T @ centred_queries / len(train_queries)),
        "relevance": relevance_axes(torch.from_numpy(train_queries[qrels.query[strong]]), positives)[0].numpy(),
        "relevance - random": eigen_rotation(cross(qrels.query[strong], qrels.product[strong])
                                             - cross(qrels.query[strong], random_products)),
        "relevance - judged negatives": eigen_rotation(cross(qrels.query[strong], qrels.product[strong])
                                                       - cross(qrels.query[negative], qrels.product[negative])),
    }
    results = {}
    print("| rotation | " + " | ".join(f"NDCG@10 {d}" for d in DIMS) + " |")
    print("|---|" + "---:|" * len(DIMS))
    for name, rotation in rotations.items():
        scores = evaluate_retriever(ExactRetriever(catalog @ rotation.T), test, DIMS,
                                    query_vectors=test_queries @ rotation.T, k=10, **scale_of(settings))
        results[name] = {str(d): scores.dims[d]["ndcg@10"] for d in DIMS}
        print(f"| {name} | " + " | ".join(f"{results[name][str(d)]:.4f}" for d in DIMS) + " |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": resolved.ref, "n_test_queries": len(test.query_texts),
                                    "ndcg@10": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
