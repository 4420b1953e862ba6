"""Training-recipe benchmark on Home Depot: one row per recipe, scored per dimension on the test split.

    # the reference row: the plain one-loss Matryoshka script (no near2 code in the training)
    .venv/bin/python bench/recipe_benchmark.py plain --plain
    # near2 rows: `near2 train`'s own code path with settings overrides (dotted keys, YAML values)
    .venv/bin/python bench/recipe_benchmark.py plain_settings \
        --set examples.strong_positive_min=2.5 --set examples.hard_negative_max=1.67 \
        --set training.batch_size=64 --set training.learning_rate=5e-5 --set training.ranking_weight=0
    .venv/bin/python bench/recipe_benchmark.py --table   # Markdown table of every row so far

Every row (one at a time: each uses both cores) does what a user's ``near2 train --catalog products.csv
--judgments judgments.csv`` does: ``validate_dataset`` on the files read in place (never copied),
``configured_splits`` (80/10/10 by query, seeded), ``mine_examples`` on the *train* split with the base
model, ``train_model`` (its own MLflow store under ``--home``), then ``evaluate_model``: exact cosine over
the whole 54,667-product catalog on the *test* split's queries, graded NDCG@10 (gain = relevance - 1),
MRR@10 and Recall@100 at relevance >= 2, per dimension, overall and per query slice.

The plain row is the 20-line script of issue 18, on the same train split: all-MiniLM-L6-v2,
``MatryoshkaLoss(MultipleNegativesRankingLoss)`` over 384/256/128/64/32, one epoch of (query, positive,
negative) triplets — positive: relevance >= 2.5; negative: a judged product <= 1.67, else a random
unjudged one — batch 64, lr 5e-5, ``NO_DUPLICATES``, every other argument at its library default.

One JSON line per row goes to ``bench/results/recipe_rows.jsonl``: the overrides, wall time of training,
peak RSS, the load average before and after, steps, and the metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from train_benchmark import PeakRSS  # noqa: E402

DIMS = [384, 256, 128, 64, 32]
METRICS = ("ndcg@10", "mrr@10", "recall@100")
SLICES = ("short", "long", "alphanumeric")
RESULTS = REPO / "bench" / "results" / "recipe_rows.jsonl"


def parse_overrides(pairs: list[str]) -> dict[str, dict]:
    """``["training.batch_size=64", ...]`` -> ``{"training": {"batch_size": 64}}`` (values parsed as YAML)."""
    sections: dict[str, dict] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--set takes section.key=value, got {pair!r}")
        sections.setdefault(section, {})[name] = yaml.safe_load(value)
    return sections


def plain_recipe(products, train_judgments, output: Path, seed: int = 42) -> dict:
    """The issue's 20-line script, verbatim in spirit: nothing of near2 in the training."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, \
        SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    from near2_tasks.models.settings import PACKAGED_MINILM
    from near2_tasks.models.embeddings import load_encoder

    rng = random.Random(seed)
    text = dict(zip(products["product_id"].astype(str), products["text"]))
    ids = list(text)
    rows = []
    for _, group in train_judgments.groupby("query_id", sort=True):
        judged = dict(zip(group["product_id"].astype(str), group["relevance"]))
        negatives = [p for p, r in judged.items() if r <= 1.67 and p in text]
        for pid, rel in judged.items():
            if rel >= 2.5 and pid in text:
                neg = rng.choice(negatives) if negatives else next(
                    p for p in iter(lambda: rng.choice(ids), None) if p not in judged)
                rows.append({"anchor": group["query"].iloc[0], "positive": text[pid], "negative": text[neg]})
    model = load_encoder(PACKAGED_MINILM, device="cpu")
    loss = MatryoshkaLoss(model, MultipleNegativesRankingLoss(model), DIMS)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output / "checkpoints"), num_train_epochs=1, per_device_train_batch_size=64,
        learning_rate=5e-5, batch_sampler=BatchSamplers.NO_DUPLICATES, save_strategy="no", report_to="none",
        seed=seed, use_cpu=True, logging_steps=50)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), loss=loss)
    trainer.train()
    model.save(str(output))
    return {"train_triplets": len(rows), "steps": trainer.state.global_step}


def near2_recipe(settings, accepted, splits, output: Path) -> dict:
    """What `near2 train` runs (cli/train.py), with the row's settings."""
    from near2_tasks.models.refs import resolve_model
    from near2_tasks.train.examples import ir_eval_data, mine_examples
    from near2_tasks.train.trainer import train_model

    base = resolve_model(settings, settings.model.base_model)
    examples = mine_examples(accepted.products, splits.train, settings, model=base.load_ref,
                             model_key=base.cache_key)
    validation = ir_eval_data(accepted.products, splits.validation, settings.dataset.relevant_threshold)
    result = train_model(settings, examples, validation, accepted.dataset_version, output)
    from near2_tasks.models import registry

    run = registry.client(settings).get_run(result.run_id)
    return {"train_triplets": len(examples.triplets), "train_pairs": len(examples.pairs),
            "steps": int(run.data.metrics.get("best_step", 0)) or None,
            "total_steps": run.data.params.get("max_steps"), "val_metrics": result.val_metrics,
            "examples_counts": examples.counts}


def metrics_of(report) -> dict:
    out = {"all": {str(d): {m: report.dims[d][m] for m in METRICS} for d in DIMS}}
    for name in SLICES:
        out[name] = {str(d): {m: report.slices[name][d][m] for m in METRICS} for d in DIMS
                     if d in report.slices[name]}
    out["slice_sizes"] = dict(report.slice_sizes)
    out["n_queries"] = report.n_queries
    return out


def run_row(args) -> None:
    from near2_tasks.config import load_settings
    from near2_tasks.evaluate.evaluation import evaluate_model
    from near2_tasks.train.examples import configured_splits
    from near2_tasks.data.validate import validate_dataset

    overrides = parse_overrides(args.set)
    home = args.home / args.name
    base_settings = {
        "home": str(home),
        "model": {"dims": DIMS, "device": "cpu", "backend": args.eval_backend},
        "dataset": {"name": "homedepot"},
        "validation": {"max_row_count_drift": None, "data_docs": False},
        "examples": {"embedding_cache_dir": str(args.cache)},
        "evaluation": {"cache_dir": str(args.cache)},
        "training": {"logging_steps": 20},
    }
    for section, values in overrides.items():
        base_settings[section] = {**base_settings.get(section, {}), **values}
    settings = load_settings(**base_settings)
    accepted = validate_dataset(settings, args.data / "products.csv", args.data / "judgments.csv")
    splits = configured_splits(settings, accepted.judgments)
    output = home / "model"
    load_before = os.getloadavg()
    began = time.monotonic()
    with PeakRSS() as memory:
        detail = plain_recipe(accepted.products, splits.train, output) if args.plain else \
            near2_recipe(settings, accepted, splits, output)
    train_s = time.monotonic() - began
    load_after = os.getloadavg()
    report = evaluate_model(settings, str(output), accepted.products, splits.test, dims=DIMS)
    base = evaluate_model(settings, settings.model.base_model, accepted.products, splits.test, dims=DIMS)
    row = {
        "name": args.name, "plain": args.plain, "overrides": overrides, "note": args.note,
        "git_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                     text=True).stdout.strip(),
        "train_wall_s": round(train_s, 1), "peak_rss_mib": memory.peak_mib,
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
        "eval_backend": args.eval_backend, **detail,
        "test": metrics_of(report), "base": metrics_of(base),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as fh:
        fh.write(json.dumps(row, default=str) + "\n")
    print(table([row]))


def table(rows: list[dict]) -> str:
    """NDCG@10 per dimension (overall) for each row, then MRR@10 / Recall@100 at 384 and 64, slices at 64."""
    head = ("| row | " + " | ".join(f"NDCG@10 {d}" for d in DIMS)
            + " | MRR@10 384 | R@100 384 | R@100 64 | short 64 | long 64 | alnum 64 | train min | peak RSS GiB | load |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        t = row["test"]
        cells = [f"{t['all'][str(d)]['ndcg@10']:.4f}" for d in DIMS]
        get = lambda part, d, m: t[part].get(str(d), {}).get(m)  # noqa: E731
        extra = [get("all", 384, "mrr@10"), get("all", 384, "recall@100"), get("all", 64, "recall@100"),
                 get("short", 64, "ndcg@10"), get("long", 64, "ndcg@10"), get("alphanumeric", 64, "ndcg@10")]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " | "
                     + " | ".join(f"{v:.4f}" if v is not None else "–" for v in extra)
                     + f" | {row['train_wall_s'] / 60:.1f} | {row['peak_rss_mib'] / 1024:.2f} | "
                       f"{row['loadavg_before'][0]:.1f}→{row['loadavg_after'][0]:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?")
    parser.add_argument("--plain", action="store_true", help="the plain one-loss script instead of near2 train")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--note", default="")
    parser.add_argument("--eval-backend", default="torch", help="model.backend for the evaluation (torch = fp32)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "homedepot")
    parser.add_argument("--home", type=Path, default=REPO / ".near2" / "bench" / "recipes")
    parser.add_argument("--cache", type=Path, default=REPO / ".near2" / "cache" / "embeddings")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--table", action="store_true", help="print the Markdown table of --results and exit")
    args = parser.parse_args()
    if args.table:
        print(table([json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]))
        return
    if not args.name:
        parser.error("give a row name (or --table)")
    import logging

    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s", level=logging.WARNING)
    logging.getLogger("near2_tasks").setLevel(logging.INFO)
    run_row(args)


if __name__ == "__main__":
    main()
