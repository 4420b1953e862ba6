"""Training ablation on Home Depot: which parts of the hybrid objective help, at a small step budget.

    .venv/bin/python bench/train_ablation.py hybrid_w1      --ranking-weight 1    --weak-positives
    .venv/bin/python bench/train_ablation.py mnrl_only      --ranking-weight 0    --weak-positives
    .venv/bin/python bench/train_ablation.py hybrid_w005    --ranking-weight 0.05 --weak-positives
    .venv/bin/python bench/train_ablation.py mnrl_no_weak   --ranking-weight 0

Each run validates the data (read in place, never copied), mines the examples on the train split with the
base model's hard negatives (cached base vectors, key ``minilm-base``), trains ``--steps`` optimizer steps
with ``train_model`` (the project's trainer, its own MLflow store under ``--home``), then scores base and
trained NDCG@10 per dimension (``evaluate.retrieval.evaluate_retriever``, exact search) on the 943
test-split queries over a *sub-catalog*: every product judged for a test query plus ``--distractors``
random others (13.6k products with the defaults), so one run costs minutes instead of the whole-catalog
evaluation's. Absolute numbers are therefore higher than the
whole-catalog table of ``train_benchmark.py``; compare rows with each other. One JSON line per run is
appended to ``bench/results/train_ablation.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIMS = [384, 256, 128, 64, 32]


def main() -> None:
    from near2_tasks.config import load_settings
    from near2_tasks.models.settings import PACKAGED_MINILM
    from near2_tasks.models.embeddings import encode, encode_cached, load_encoder
    from near2_tasks.evaluate.evaluation import prepare_data
    from near2_tasks.evaluate.retrieval import ExactRetriever, evaluate_retriever, scale_of
    from near2_tasks.train.examples import configured_splits, ir_eval_data, mine_examples
    from near2_tasks.train.trainer import train_model
    from near2_tasks.data.validate import validate_dataset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--weak-positives", action="store_true", help="weak positives also anchor MNRL triplets")
    parser.add_argument("--retrieval-weight", type=float, default=1.0)
    parser.add_argument("--ranking-weight", type=float, default=0.05)
    parser.add_argument("--distractors", type=int, default=8000)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "homedepot")
    parser.add_argument("--cache", type=Path, default=REPO / ".near2" / "cache" / "embeddings")
    parser.add_argument("--home", type=Path, default=REPO / ".near2" / "bench" / "ablation")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "train_ablation.jsonl")
    args = parser.parse_args()

    home = args.home / args.name
    settings = load_settings(
        home=str(home), model={"dims": DIMS, "device": "cpu", "backend": "torch"}, dataset={"name": "homedepot"},
        validation={"max_row_count_drift": None, "data_docs": False},
        examples={"embedding_cache_dir": str(args.cache), "weak_positives_in_triplets": args.weak_positives},
        evaluation={"cache_dir": str(args.cache)},
        training={"max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr,
                  "eval_steps": args.steps, "max_seq_length": 40, "logging_steps": 10,
                  "retrieval_weight": args.retrieval_weight, "ranking_weight": args.ranking_weight,
                  "val_max_queries": 50, "val_corpus_size": 300})
    accepted = validate_dataset(settings, args.data)
    catalog = pd.read_csv(args.data / "products.csv", dtype={"product_id": str})
    catalog["text"] = catalog["title"].astype(str)  # the texts of the cached base vectors
    splits = configured_splits(settings, accepted.judgments)
    examples = mine_examples(catalog, splits.train, settings, model=PACKAGED_MINILM, model_key="minilm-base")
    validation = ir_eval_data(catalog, splits.validation, settings.dataset.relevant_threshold)
    began = time.monotonic()
    train_model(settings, examples, validation, accepted.dataset_version, home / "model")
    train_s = time.monotonic() - began

    judged = catalog["product_id"].isin(set(splits.test["product_id"].astype(str))).to_numpy()
    rng = np.random.default_rng(0)
    rows = np.sort(np.concatenate([np.flatnonzero(judged),
                                   rng.choice(np.flatnonzero(~judged), args.distractors, replace=False)]))
    sub = catalog.iloc[rows].reset_index(drop=True)
    data = prepare_data(sub, splits.test, settings.dataset.text_template)

    def ndcg(catalog_vectors: np.ndarray, query_vectors: np.ndarray) -> dict[int, float]:
        scores = evaluate_retriever(ExactRetriever(catalog_vectors), data, DIMS, query_vectors=query_vectors,
                                    metrics=["ndcg@10"], **scale_of(settings))
        return {d: round(scores.dims[d]["ndcg@10"], 4) for d in DIMS}

    base = load_encoder(PACKAGED_MINILM, device="cpu")
    base_catalog = encode_cached(base, "minilm-base", catalog["text"].tolist(), args.cache)[rows]
    trained = load_encoder(str(home / "model"), device="cpu")
    row = {"name": args.name, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
           "weak_positives_in_triplets": args.weak_positives, "retrieval_weight": args.retrieval_weight,
           "ranking_weight": args.ranking_weight, "triplets": len(examples.triplets), "pairs": len(examples.pairs),
           "train_s": round(train_s), "sub_catalog": len(sub), "test_queries": len(data.query_texts),
           "base": ndcg(base_catalog, encode(base, data.query_texts)),
           "trained": ndcg(encode(trained, data.product_texts), encode(trained, data.query_texts))}
    print(json.dumps(row))
    with open(args.results, "a") as out:
        out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
