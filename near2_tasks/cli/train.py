"""``near2 train``: validate → split → mine → NEAR² fine-tuning → MLflow run and registry version."""

from __future__ import annotations

import time

import click


@click.command("train")
@click.option("--catalog", required=True, type=click.Path(exists=True), help="Catalog file (or dataset directory).")
@click.option("--judgments", required=True, type=click.Path(exists=True, dir_okay=False), help="Judgments file.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML settings file (overrides the group's --config / NEAR2_CONFIG).")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Epochs (default: training.epochs).")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop after N optimizer steps (default: training.max_steps).")
@click.option("--output", required=True, type=click.Path(file_okay=False),
              help="Directory the trained model is saved to (loadable by SentenceTransformer(DIR)).")
@click.pass_context
def train(ctx: click.Context, catalog: str, judgments: str, config_file: str | None, epochs: float | None,
          max_steps: int | None, output: str) -> None:
    """Fine-tune the encoder so every configured dimension is a good embedding; register it as challenger."""
    from near2_tasks.config import load_settings
    from near2_tasks.evaluate.evaluation import resolve_model
    from near2_tasks.train.examples import configured_splits, ir_eval_data, mine_examples
    from near2_tasks.train.trainer import train_model
    from near2_tasks.data.validate import validate_dataset

    began = time.monotonic()
    settings = load_settings(config_file or ctx.find_root().obj.get("config_file"))
    accepted = validate_dataset(settings, catalog, judgments)
    splits = configured_splits(settings, accepted.judgments)
    base = resolve_model(settings, settings.model.base_model)
    examples = mine_examples(accepted.products, splits.train, settings, model=base.load_ref,
                             model_key=base.cache_key)
    validation = ir_eval_data(accepted.products, splits.validation, settings.dataset.relevant_threshold)
    click.echo(f"data: {len(accepted.products)} products, dataset_version {accepted.dataset_version}; "
               f"{len(examples.triplets)} triplets, {len(examples.pairs)} pairs, "
               f"{len(validation[0])} validation queries")
    result = train_model(settings, examples, validation, accepted.dataset_version, output, epochs=epochs,
                         max_steps=max_steps, reports={"validation": accepted.report, "examples": examples.counts})
    headline = ", ".join(f"{d}: {result.val_metrics.get(f'val_ndcg_at_10_dim_{d}', float('nan')):.4f}"
                         for d in settings.model.dims)
    click.echo(f"validation NDCG@10 by dimension: {headline}")
    click.echo(f"model saved to {result.output_dir}")
    click.echo(f"run id: {result.run_id}")
    click.echo(f"model version: {result.model_version} ({result.model_uri}, alias challenger) "
               f"[{time.monotonic() - began:.0f}s]")


COMMANDS = [train]
