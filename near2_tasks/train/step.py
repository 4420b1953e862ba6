"""The training stage's steps: mine the graded examples, then fine-tune and register the challenger."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from near2_tasks.data.step import accepted
from near2_tasks.errors import Near2Error
from near2_tasks.models.registry import mlflow_run_url, mlflow_version_url
from near2_tasks.run import Result, StepContext, record

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


def mine_examples(ctx: StepContext, validation: Result) -> Result:
    """Split the judgments by query (train / validation / test) and mine the graded training examples.

    Hard negatives are also mined with the base model; its catalog embeddings are cached under the same
    key the evaluation uses, so the catalog is encoded by it once per run (once ever for the default model).
    """
    from near2_tasks.train import examples as ex
    from near2_tasks.models.refs import resolve_model

    settings = ctx.settings
    products, judgments = accepted(validation)
    if judgments.empty:
        raise Near2Error("no accepted judgments: training needs graded query-product judgments",
                         hint="set dataset.judgments_path (or the run param judgments_path)")
    splits = ex.configured_splits(settings, judgments)
    base = resolve_model(settings, settings.model.base_model)
    mined = ex.mine_examples(products, splits.train, settings, model=base.load_ref, model_key=base.cache_key)
    out = ctx.run_dir / "examples"
    paths = ex.write_examples(out, splits, mined, extra={"dataset_version": validation["dataset_version"]})
    return record(ctx, "mine_examples", {
        "examples_dir": str(out), "paths": {name: str(path) for name, path in paths.items()},
        "triplets": len(mined.triplets), "pairs": len(mined.pairs), "splits": splits.sizes,
    })


@dataclass(frozen=True)
class _Examples:
    """What ``train_model`` reads from mined examples (the frames ``write_examples`` wrote)."""

    triplets: pd.DataFrame
    pairs: pd.DataFrame
    counts: dict[str, Any]


def read_frame(path: Path) -> pd.DataFrame:
    import pandas as pd

    return pd.read_parquet(path)


def split_frame(examples: Result, name: str) -> pd.DataFrame:
    return read_frame(Path(examples["paths"][f"{name}_judgments"]))


def train(ctx: StepContext, validation: Result, examples: Result, output_dir: Path | None = None) -> Result:
    """Fine-tune (NEAR² objective), log to MLflow and register the ``challenger`` (once per run).

    The model is saved to ``output_dir`` (``near2 train --output``), by default ``<run dir>/model``."""
    from near2_tasks.train import examples as ex
    from near2_tasks.train.trainer import train_model

    settings = ctx.settings
    products, _ = accepted(validation)
    paths = examples["paths"]
    manifest = json.loads(Path(paths["manifest"]).read_text())
    mined = _Examples(triplets=read_frame(Path(paths["triplets"])), pairs=read_frame(Path(paths["pairs"])),
                      counts=manifest.get("counts", {}))
    validation_data = ex.ir_eval_data(products, split_frame(examples, "validation"), settings.dataset.relevant_threshold)
    result = train_model(settings, mined, validation_data, validation["dataset_version"],
                         output_dir=output_dir or ctx.run_dir / "model", epochs=settings.training.epochs,
                         max_steps=settings.training.max_steps, run_key=ctx.run_key,
                         reports={"examples": manifest})
    return record(ctx, "train", {
        "run_id": result.run_id, "model_version": result.model_version, "model_uri": result.model_uri,
        "model_dir": str(result.output_dir), "val_metrics": result.val_metrics,
        "links": {"MLflow run": mlflow_run_url(settings, result.run_id),
                  "MLflow model version": mlflow_version_url(settings, result.model_version)},
    })

