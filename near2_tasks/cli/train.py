"""``near2 train``: the DAG's first three steps in one process (validate → mine_examples → train), so the
command line trains exactly as the ``near2_retrain`` DAG does: data validated and quarantined the same way,
the same split and examples, an MLflow run and a registry version (alias ``challenger``)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from near2_tasks.cli import cli_run


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
    """Fine-tune the encoder so every configured dimension is a good embedding; register it as challenger.

    Runs the DAG's steps validate, mine_examples and train; their records go to
    <home>/runs/near2_train/<run id>/steps/.
    """
    from near2_tasks.data import step as data_step
    from near2_tasks.run import RunParams, settings_for_run
    from near2_tasks.train import step as train_step

    began = time.monotonic()
    params = RunParams(config_file=config_file or ctx.find_root().obj.get("config_file"), catalog_path=catalog,
                       judgments_path=judgments, epochs=epochs, max_steps=max_steps)
    run = cli_run(settings_for_run(params), params, "near2_train")
    validation = data_step.validate(run)
    examples = train_step.mine_examples(run, validation)
    sizes = examples["splits"]
    click.echo(f"data: {validation['products']} products, dataset_version {validation['dataset_version']}; "
               f"{examples['triplets']} triplets, {examples['pairs']} pairs, "
               f"{sizes['validation']['queries']} validation queries")
    trained = train_step.train(run, validation, examples, output_dir=Path(output))
    metrics = trained["val_metrics"]
    headline = ", ".join(f"{d}: {metrics.get(f'val_ndcg_at_10_dim_{d}', float('nan')):.4f}"
                         for d in run.settings.model.dims)
    click.echo(f"validation NDCG@10 by dimension: {headline}")
    click.echo(f"model saved to {trained['model_dir']}")
    click.echo(f"run id: {trained['run_id']}")
    click.echo(f"steps recorded in {run.run_dir / 'steps'}")
    click.echo(f"model version: {trained['model_version']} ({trained['model_uri']}, alias challenger) "
               f"[{time.monotonic() - began:.0f}s]")


COMMANDS = [train]
