"""The MLflow side of a training run: its name and tags, parameters, reports, per-step metrics, the model.

:func:`training_run` opens the run (named ``train-<dataset_version[:12]>-<UTC ms>Z[-<run_key>]``, with system
metrics) and turns an MLflow failure inside it into one :class:`~near2_tasks.errors.ServiceUnavailable`;
:func:`log_run_inputs` logs the parameters, ``system_info.json`` and the data reports;
:func:`mlflow_step_logger` is the trainer callback that logs losses and per-dimension validation metrics
under the project's names; :func:`register_trained_model` logs the model and registers it as the
``challenger``. The registry itself is :mod:`near2_tasks.models.registry`.
"""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from near2_tasks.conventions import mlflow_name
from near2_tasks.errors import ServiceUnavailable
from near2_tasks.models import registry
from near2_tasks.train.evaluator import BEST_METRIC, ValidationData, val_metrics_from
from near2_tasks.train.objective import matryoshka_weights, retrieval_loss_name

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments

    from near2_tasks.config import Settings


def run_name(dataset_version: str, run_key: str | None = None, now: float | None = None) -> str:
    """``train-<dataset version>-<UTC time, ms>[-<run key>]``: distinct and readable in the experiment list
    (MLflow's own random names repeat, because training seeds the random generators first)."""
    import datetime as dt

    stamp = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.timezone.utc)
    name = f"train-{dataset_version[:12]}-{stamp.strftime('%Y%m%dT%H%M%S')}.{stamp.microsecond // 1000:03d}Z"
    return f"{name}-{run_key}" if run_key else name


def system_info(device: str) -> dict[str, str]:
    import sentence_transformers
    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": str(os.cpu_count()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "device": device,
        "torch_threads": str(torch.get_num_threads()),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_params(settings: Settings, examples: Any, validation: ValidationData, dataset_version: str,
               device: str, args: SentenceTransformerTrainingArguments, git_commit: str) -> dict[str, Any]:
    cfg = settings.training
    return {
        "base_model": settings.model.base_model,
        "dims": ",".join(map(str, settings.model.dims)),
        "matryoshka_weights": ",".join(f"{w:g}" for w in matryoshka_weights(settings)),
        "losses": f"retrieval=MatryoshkaLoss({retrieval_loss_name(cfg)}), "
                  "ranking=MatryoshkaLoss(OnlineContrastiveLoss)",
        "mnrl_mini_batch_size": cfg.mnrl_mini_batch_size,
        "prefix_init": cfg.prefix_init,
        "max_seq_length": cfg.max_seq_length,
        "retrieval_weight": cfg.retrieval_weight,
        "ranking_weight": cfg.ranking_weight,
        "mnrl_scale": cfg.mnrl_scale,
        "mnrl_hardness": f"{cfg.mnrl_hardness_mode}:{cfg.mnrl_hardness_strength:g}",
        "prefix_distill_weight": cfg.prefix_distill_weight,
        "contrastive_margin": cfg.contrastive_margin,
        "batch_size": args.per_device_train_batch_size,
        "batch_sampler": "no_duplicates",
        "multi_dataset_sampler": cfg.multi_dataset_sampler,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "learning_rate": cfg.learning_rate,
        "warmup_ratio": cfg.warmup_ratio,
        "weight_decay": cfg.weight_decay,
        "epochs": args.num_train_epochs,
        "max_steps": args.max_steps,
        "eval_steps": args.eval_steps,
        "seed": cfg.seed,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "device": device,
        "dataset_version": dataset_version,
        "train_triplets": len(examples.triplets) if getattr(examples, "triplets", None) is not None else 0,
        "train_pairs": len(examples.pairs) if getattr(examples, "pairs", None) is not None else 0,
        "val_queries": len(validation.queries),
        "val_corpus": len(validation.corpus),
        "git_commit": git_commit,
    }


def mlflow_step_logger(dims: list[int]):
    """A callback that sends the trainer's logs to the active MLflow run under the project's names."""
    import mlflow
    from transformers import TrainerCallback

    class MLflowStepLogger(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs) -> None:
            logs = logs or {}
            metrics = val_metrics_from(logs, dims)
            if BEST_METRIC in logs:
                metrics["val_mean_ndcg_at_10"] = float(logs[BEST_METRIC])
            for key, value in logs.items():
                # eval_* are mapped above; the end-of-training train_loss is a mean that would add a
                # misleading last point to the per-step train_loss chart
                if key.startswith("eval_") or key == "train_loss" or not isinstance(value, (int, float)):
                    continue
                name = mlflow_name(key)
                metrics[f"train_{name}" if name.startswith("loss") else name] = float(value)
            if metrics:
                mlflow.log_metrics(metrics, step=state.global_step)

    return MLflowStepLogger()


@contextmanager
def _tracking_server_errors(settings: Settings) -> Iterator[None]:
    """An MLflow failure inside the run (the server died mid-training, after MLflow's own HTTP retries)
    becomes one clear :class:`ServiceUnavailable`; the registry has no version of this run by then, or one
    without the ``challenger`` alias and run-key tag, which a re-run replaces."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise ServiceUnavailable(
            f"MLflow at {settings.tracking_uri} failed during training: {str(exc).splitlines()[0][:300]}",
            hint="check that the tracking server is up, then re-run the task (nothing was promoted)",
        ) from exc


@contextmanager
def training_run(settings: Settings, experiment_id: str, dataset_version: str, run_key: str | None,
                 git_commit: str) -> Iterator[Run]:
    """The active MLflow run of one training, tagged with its dataset version, commit and run key."""
    import mlflow

    tags = {"dataset_version": dataset_version, "git_commit": git_commit}
    if run_key:
        tags[registry.TAG_RUN_KEY] = run_key
    with _tracking_server_errors(settings), \
            mlflow.start_run(experiment_id=experiment_id, run_name=run_name(dataset_version, run_key), tags=tags,
                             log_system_metrics=True) as run:
        yield run


def log_run_inputs(settings: Settings, examples: Any, validation: ValidationData, dataset_version: str,
                   device: str, args: SentenceTransformerTrainingArguments, git_commit: str,
                   reports: Mapping[str, Any] | None) -> None:
    """Parameters, ``system_info.json``, the examples' counts and the data ``reports`` of the active run."""
    import mlflow

    mlflow.log_params(run_params(settings, examples, validation, dataset_version, device, args, git_commit))
    mlflow.log_dict(system_info(device), "system_info.json")
    if getattr(examples, "counts", None) is not None:
        mlflow.log_dict(json.loads(json.dumps(examples.counts, default=str)), "reports/training_examples.json")
    for name, report in (reports or {}).items():
        mlflow.log_dict(json.loads(json.dumps(report, default=str)), f"reports/{name}.json")


def register_trained_model(model: SentenceTransformer, settings: Settings, run_id: str, dataset_version: str,
                           run_key: str | None, git_commit: str) -> ModelVersion:
    """Log ``model`` to the active run and register it as the new ``challenger`` version."""
    import mlflow

    info = registry.log_model(model, settings.model.dims[0],
                              metadata={"dims": settings.model.dims, "dataset_version": dataset_version})
    version = registry.register_model(settings, info.model_uri, run_id, dataset_version,
                                      settings.model.dims, run_key=run_key, git_commit=git_commit,
                                      model_id=info.model_id)
    mlflow.set_tag("model_version", version.version)
    return version


def log_prefix_refit(refit: Any, evaluation: Mapping[str, float], dims: list[int], step: int) -> dict[str, float]:
    """The prefix refit's losses (``prefix_refit_loss`` by epoch) and time, and the validation metrics of the
    refitted model, logged one step after training's last (the registered model's); returns those metrics."""
    import mlflow

    from near2_tasks.train.evaluator import val_metrics_from

    for epoch, loss in enumerate(refit.epoch_losses):
        mlflow.log_metric("prefix_refit_loss", loss, step=epoch)
    mlflow.log_metrics({"prefix_refit_seconds": refit.seconds, "prefix_refit_triplets": refit.triplets})
    val_metrics = val_metrics_from(evaluation, dims, prefix="")
    mlflow.log_metrics(val_metrics, step=step + 1)
    return val_metrics
