"""NEAR² training on Home Depot: base vs trained MiniLM, per dimension, on the held-out test queries.

    nohup .venv/bin/python bench/train_benchmark.py > .near2/logs/train_benchmark.log 2>&1 &

    # options: --data ../shared/data/homedepot  --max-steps 100  --batch-size 16  --lr 5e-5
    #          --output .near2/bench/trained-homedepot  --home .near2/bench/train-home  --device auto

What it does, with the project's own code end to end:

1. ``validate_dataset`` on the Home Depot files (read in place, never copied) for the dataset version and
   the accepted judgments, ``configured_splits`` (80/10/10 by query, seeded), ``mine_examples`` on the train
   split with the base model's hard negatives. The catalog side (mining, evaluation) is the whole
   ``products.csv`` with ``text = title``: exactly the texts of the team's cached base embeddings (key
   ``minilm-base``), so the base model never re-encodes the 54,667 titles;
2. ``train_model``: MatryoshkaLoss(MNRL) + MatryoshkaLoss(OnlineContrastiveLoss) over 384/256/128/64/32,
   a fixed step budget (the CPU here is 2 shared cores: ``--max-steps`` is chosen to fit ~15-20 min),
   tracked in its own MLflow store under ``--home`` and registered as ``challenger`` there;
3. ``evaluate_model`` (exact cosine over the whole 54,667-product catalog, graded NDCG@10, MRR@10,
   Recall@100) for the base model and the trained one on the *test* split, at every dimension.

Reports training wall time (whole ``train_model`` call and the trainer's own loop), peak resident memory
during training (sampled every 0.2 s), and writes ``bench/results/train_homedepot[_<device>].json`` plus
a Markdown table for BENCHMARKS.md. The trained model stays in ``--output`` for the serving benchmarks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIMS = [384, 256, 128, 64, 32]
METRICS = ["ndcg@10", "mrr@10", "recall@100"]


class PeakRSS:
    """Peak resident set size of this process while the block runs (sampled; MiB)."""

    def __init__(self, interval_s: float = 0.2) -> None:
        import psutil

        self.process, self.interval_s, self.peak = psutil.Process(), interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return round(self.peak / 2**20, 1)


def stamp(message: str, began: float) -> None:
    print(f"[{time.monotonic() - began:7.1f}s] {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "homedepot")
    parser.add_argument("--home", type=Path, default=REPO / ".near2" / "bench" / "train-home")
    parser.add_argument("--output", type=Path, default=REPO / ".near2" / "bench" / "trained-homedepot")
    parser.add_argument("--cache", type=Path, default=REPO / ".near2" / "cache" / "embeddings")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16, help="per step; on a GPU also the GPU batch")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--max-seq-length", type=int, default=48, help="99.9%% of the titles fit in 48 tokens")
    parser.add_argument("--eval-steps", type=int, default=None, help="default: --max-steps (validate at start and end)")
    parser.add_argument("--sampler", choices=["proportional", "round_robin"], default="round_robin",
                        help="round_robin (the default of training.multi_dataset_sampler): one batch of each "
                             "objective per optimizer step; proportional: one objective per step")
    parser.add_argument("--val-queries", type=int, default=50, help="validation queries (checkpoint choice)")
    parser.add_argument("--val-corpus", type=int, default=300, help="validation corpus size")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    began = time.monotonic()
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s", level=logging.WARNING)
    logging.getLogger("near2_tasks").setLevel(logging.INFO)  # training progress lines with the ETA

    from near2_tasks.config import load_settings
    from near2_tasks.evaluate.evaluation import evaluate_model
    from near2_tasks.models.refs import resolve_model
    from near2_tasks.train.examples import configured_splits, ir_eval_data, mine_examples
    from near2_tasks.train.trainer import train_model
    from near2_tasks.data.validate import validate_dataset

    settings = load_settings(
        home=str(args.home),
        model={"dims": DIMS, "device": args.device, "backend": "torch"},  # fp32 evaluation, the team cache
        dataset={"name": "homedepot"},
        validation={"max_row_count_drift": None, "data_docs": False},
        examples={"embedding_cache_dir": str(args.cache)},
        evaluation={"cache_dir": str(args.cache)},
        training={"max_steps": args.max_steps, "batch_size": args.batch_size, "gpu_batch_size": args.batch_size,
                  "learning_rate": args.lr, "eval_steps": args.eval_steps or args.max_steps,
                  "max_seq_length": args.max_seq_length, "logging_steps": 10,
                  "multi_dataset_sampler": args.sampler,
                  "val_max_queries": args.val_queries, "val_corpus_size": args.val_corpus},
    )
    import pandas as pd

    accepted = validate_dataset(settings, args.data)
    catalog = pd.read_csv(args.data / "products.csv", dtype={"product_id": str})
    catalog["text"] = catalog["title"].astype(str)
    splits = configured_splits(settings, accepted.judgments)
    stamp(f"validated: {len(accepted.products)} products, {len(accepted.judgments)} judgments; splits "
          f"{ {k: v['queries'] for k, v in splits.sizes.items()} }", began)
    base = resolve_model(settings, settings.model.base_model)
    examples = mine_examples(catalog, splits.train, settings, model=base.load_ref, model_key=base.cache_key)
    validation = ir_eval_data(catalog, splits.validation, settings.dataset.relevant_threshold)
    stamp(f"mined: {len(examples.triplets)} triplets, {len(examples.pairs)} pairs; {examples.counts}", began)

    train_began = time.monotonic()
    with PeakRSS() as memory:
        result = train_model(settings, examples, validation, accepted.dataset_version, args.output,
                             reports={"examples": examples.counts})
    train_wall = time.monotonic() - train_began
    from near2_tasks.models import registry

    run = registry.client(settings).get_run(result.run_id)
    trainer_loop_s = run.data.metrics.get("train_runtime")
    stamp(f"trained in {train_wall:.0f}s (trainer loop {trainer_loop_s}s), peak RSS {memory.peak_mib} MiB; "
          f"run {result.run_id}, version {result.model_version}", began)

    reports = {}
    for label, ref in (("base", settings.model.base_model), ("trained", str(args.output))):
        eval_began = time.monotonic()
        report = evaluate_model(settings, ref, catalog, splits.test, dims=DIMS)
        reports[label] = {d: {m: report.dims[d][m] for m in METRICS} for d in DIMS}
        stamp(f"evaluated {label} on {report.n_queries} test queries in {time.monotonic() - eval_began:.0f}s", began)

    import torch

    device = run.data.params.get("device", "cpu")
    results = {
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "max_steps": args.max_steps, "batch_size": args.batch_size, "learning_rate": args.lr,
        "gradient_accumulation_steps": int(run.data.params.get("gradient_accumulation_steps", 1)),
        "max_seq_length": args.max_seq_length, "multi_dataset_sampler": args.sampler,
        "catalog_products": len(catalog),
        "precision": run.data.params.get("precision"),
        "train_triplets": len(examples.triplets), "train_pairs": len(examples.pairs),
        "examples_counts": examples.counts,
        "test_queries": splits.sizes["test"]["queries"],
        "train_model_wall_s": round(train_wall, 1), "trainer_loop_s": trainer_loop_s,
        "peak_rss_mib": memory.peak_mib,
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.startswith("cuda") else None,
        "run_id": result.run_id, "model_version": result.model_version, "model_dir": str(args.output),
        "val_metrics": result.val_metrics, "test": reports,
    }
    suffix = "" if device == "cpu" else f"_{device.split(':')[0]}"
    path = args.results or REPO / "bench" / "results" / f"train_homedepot{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))
    print(markdown(results))
    stamp(f"results in {path}", began)


def markdown(results: dict) -> str:
    base, trained = results["test"]["base"], results["test"]["trained"]
    lines = ["| dim | base NDCG@10 | trained NDCG@10 | base MRR@10 | trained MRR@10 | base Recall@100 | trained Recall@100 |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for d in DIMS:
        lines.append(f"| {d} | " + " | ".join(f"{table[d][m]:.4f}" for m in METRICS for table in (base, trained)) + " |")
    lines.append(
        f"\nTraining: {results['max_steps']} optimizer steps × {results['gradient_accumulation_steps']} batch(es) of "
        f"{results['batch_size']}, lr {results['learning_rate']:g}, {results['multi_dataset_sampler']} sampling, "
        f"on {results['device']}"
        f"{' (' + results['gpu'] + ')' if results['gpu'] else ''}, {results['precision']}; "
        f"train_model {results['train_model_wall_s']} s (trainer loop {results['trainer_loop_s']} s), "
        f"peak RSS {results['peak_rss_mib']} MiB"
        f"{', peak GPU ' + str(results['peak_gpu_mib']) + ' MiB' if results['peak_gpu_mib'] else ''}; "
        f"{results['train_triplets']} triplets / {results['train_pairs']} pairs mined; "
        f"{results['test_queries']} test queries over the whole catalog.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
