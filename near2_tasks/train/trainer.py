"""NEAR² fine-tuning: one encoder whose every configured prefix (384 → 256 → … → 32) is a good embedding.

The hybrid objective (NEAR², arXiv 2506.19743), trained together with the multi-dataset support of
``SentenceTransformerTrainer`` — each batch comes from one dataset and is scored by that dataset's loss:

* ``retrieval``: (anchor, positive, negative) triplets →
  ``MatryoshkaLoss(MultipleNegativesRankingLoss)``: in-batch negatives plus the mined hard negative
  (global comparison). Batches are drawn with ``BatchSamplers.NO_DUPLICATES`` so that no in-batch
  "negative" is a copy of the positive.
* ``ranking``: (sentence1, sentence2, label 0/1) pairs → ``MatryoshkaLoss(OnlineContrastiveLoss)``:
  pulls labelled positives together and pushes the hard negatives apart (local comparison).

The objective weights (``training.retrieval_weight`` / ``ranking_weight``) multiply each Matryoshka
loss's per-dimension weights; a weight of 0 drops that objective. With the default round-robin sampling
every optimizer step accumulates one batch of each objective, so the step follows
``w_r·∇L_retrieval + w_k·∇L_ranking`` and the weights stay exact under gradient-norm clipping. The checkpoint kept is the one with the best mean validation NDCG@10 over all
dimensions (one ``InformationRetrievalEvaluator`` per dimension, with ``truncate_dim``).

Everything goes into one MLflow run: parameters, per-step losses (total and per objective), per-dimension
validation metrics (``val_ndcg_at_10_dim_64`` …; binary relevance at ``dataset.relevant_threshold``,
on a sample of the validation split — the graded full-catalog evaluation is the evaluate stage's job),
system metrics, the data reports, and the model, registered as the new ``challenger``. Only a run that
trained and logged completely registers a version. What is logged, and how, is in
:mod:`near2_tasks.train.tracking`; this module holds the training arguments (precision included), the trainer
and its fit loop.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from near2_tasks.errors import Near2Error
from near2_tasks.models import registry
from near2_tasks.train import tracking
from near2_tasks.train.evaluator import (
    BEST_METRIC, ValidationData, check_validation, nested_evaluator, val_metrics_from, validation_sample,
)
from near2_tasks.train.init import (
    check_nested_dims, init_prefixes, load_base_model, product_texts, relevance_pairs,
)
from near2_tasks.train.objective import check_examples, hybrid_losses, matryoshka_weights, training_datasets
from near2_tasks.train.refit import refit_prefixes

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformerTrainingArguments

    from near2_tasks.config import Settings


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    model_version: str
    model_uri: str
    output_dir: Path
    val_metrics: dict[str, float]  # val_<metric>_dim_<d> of the registered checkpoint


# ----- the pieces, in the order they are built: model → data → loss → evaluator → trainer ----------
def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bf16 autocast is fast."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: stay on fp32
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def pick_precision(precision: str, device: str, native_cpu_bf16: bool | None = None) -> dict[str, bool]:
    """``bf16``/``fp16`` flags for the trainer.

    auto: bf16 on GPUs that support it (else fp16); on CPU bf16 where the CPU has bf16 instructions (measured
    about 4x faster per step than fp32 on 2 AVX512-BF16 cores, BENCHMARKS.md "Training recipes"), else fp32.
    fp16 needs a GPU; bf16 runs anywhere (slowly without native support).
    """
    import torch

    on_gpu = device.startswith("cuda")
    if precision == "auto":
        if on_gpu:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            native = cpu_has_native_bf16() if native_cpu_bf16 is None else native_cpu_bf16
            precision = "bf16" if native else "fp32"
    if precision == "fp16" and not on_gpu:
        raise Near2Error("training.precision=fp16 needs a GPU", hint="use precision 'auto', 'bf16' or 'fp32' on CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def training_arguments(settings: Settings, checkpoints: Path, device: str, epochs: float | None,
                       max_steps: int | None) -> SentenceTransformerTrainingArguments:
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers, MultiDatasetBatchSamplers

    cfg = settings.training
    objectives = sum(weight > 0 for weight in (cfg.retrieval_weight, cfg.ranking_weight))
    # round-robin alternates the datasets batch by batch; accumulating one batch of each per optimizer step
    # makes the update w_r·∇L_retrieval + w_k·∇L_ranking, so the weights survive gradient-norm clipping
    # (with one objective per step, clipping would rescale each step and cancel its weight)
    accumulate = objectives if cfg.multi_dataset_sampler == "round_robin" else 1
    steps = max_steps or cfg.max_steps or -1
    # evaluate (and checkpoint) at least once when the run is shorter than eval_steps
    eval_steps = min(cfg.eval_steps, steps) if steps > 0 else cfg.eval_steps
    on_gpu = device.startswith("cuda")
    return SentenceTransformerTrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=epochs or cfg.epochs,
        max_steps=steps,
        per_device_train_batch_size=cfg.gpu_batch_size if on_gpu else cfg.batch_size,
        gradient_accumulation_steps=accumulate,
        per_device_eval_batch_size=cfg.eval_batch_size,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a ratio of the total steps (transformers 5)
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        data_seed=cfg.seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        multi_dataset_batch_sampler=MultiDatasetBatchSamplers(cfg.multi_dataset_sampler),
        eval_strategy="steps",
        eval_steps=eval_steps,
        eval_on_start=True,  # the base model's validation scores become step 0 of every chart
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model=BEST_METRIC,
        greater_is_better=True,
        logging_steps=cfg.logging_steps,
        report_to="none",  # MLflow logging is ours (MLflowStepLogger), with the project's metric names
        use_cpu=not on_gpu,
        **pick_precision(cfg.precision, device),
    )


def _hybrid_trainer_class():
    """SentenceTransformerTrainer that also reports each objective's mean loss at every logging step."""
    from sentence_transformers import SentenceTransformerTrainer

    class HybridObjectiveTrainer(SentenceTransformerTrainer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._objective_losses: dict[str, list[float]] = defaultdict(list)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            dataset_name = inputs.get("dataset_name")
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training and isinstance(dataset_name, str):
                loss = result[0] if return_outputs else result
                self._objective_losses[dataset_name].append(float(loss.detach()))
            return result

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs:
                for name, values in self._objective_losses.items():
                    if values:
                        logs[f"loss_{name}"] = sum(values) / len(values)
                self._objective_losses.clear()
            super().log(logs, start_time)

    return HybridObjectiveTrainer


def _progress_logger():
    """One log line per logging step with the ETA: readable in Airflow task logs, where bars are not."""
    from transformers import TrainerCallback

    class ProgressLogger(TrainerCallback):
        began: float | None = None

        def on_step_begin(self, args, state, control, **kwargs) -> None:
            if self.began is None:  # after the step-0 validation, so it does not skew the rate
                self.began = time.monotonic()

        def on_log(self, args, state, control, logs=None, **kwargs) -> None:
            if not logs or "loss" not in logs or not state.max_steps or self.began is None:
                return
            elapsed = time.monotonic() - self.began
            eta = elapsed / max(state.global_step, 1) * (state.max_steps - state.global_step)
            log.info("step %d/%d (%.0f%%) loss %.4f, %s elapsed, ETA %s", state.global_step, state.max_steps,
                     100 * state.global_step / state.max_steps, logs["loss"], _minutes(elapsed), _minutes(eta))

    return ProgressLogger()


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _train(trainer) -> None:
    """``trainer.train()`` with out-of-memory turned into a one-line error that names the fix."""
    import torch

    try:
        trainer.train()
    except torch.OutOfMemoryError as exc:
        raise Near2Error(
            f"out of GPU memory at batch size {trainer.args.per_device_train_batch_size}",
            hint="lower training.gpu_batch_size (NEAR2_TRAINING__GPU_BATCH_SIZE) or training.max_seq_length",
        ) from exc
    except RuntimeError as exc:
        if "can't allocate memory" not in str(exc):
            raise
        raise Near2Error(f"out of memory at batch size {trainer.args.per_device_train_batch_size}",
                         hint="lower training.batch_size or training.max_seq_length") from exc


def _kept_checkpoint_metrics(state, dims: list[int]) -> dict[str, float]:
    """Validation metrics logged at the step of the checkpoint the trainer kept (empty if none)."""
    if not state.best_model_checkpoint:
        return {}
    step = int(state.best_model_checkpoint.rsplit("-", 1)[-1])
    for entry in state.log_history:
        if entry.get("step") == step and BEST_METRIC in entry:
            return val_metrics_from(entry, dims)
    return {}


def _already_registered(settings: Settings, run_key: str, output_dir: Path) -> TrainResult | None:
    """The result of an earlier, completed run with this run_key (its model copied to output_dir)."""
    version = registry.find_version_by_run_key(settings, run_key)
    if version is None:
        return None
    uri = registry.model_uri(settings, version.version)
    log.info("run_key %r already trained and registered as version %s (run %s)", run_key, version.version,
             version.run_id)
    if not (output_dir / "modules.json").exists():
        registry.load_model_from_mlflow(uri, device="cpu", settings=settings).save(str(output_dir))
    run = registry.client(settings).get_run(version.run_id)
    metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("val_") and "_dim_" in k}
    return TrainResult(version.run_id, str(version.version), uri, output_dir, metrics)


def _check_inputs(settings: Settings, examples: Any, validation_data: Any, output_dir: Path) -> ValidationData:
    """Everything checkable before the model loads; the checked validation data."""
    check_nested_dims(settings.model.dims)
    matryoshka_weights(settings)
    check_examples(examples, settings.training)
    validation = check_validation(validation_data)
    if output_dir.is_file():
        raise Near2Error(f"output directory {output_dir} is an existing file", hint="give a directory path")
    return validation


def _fit(trainer, model, evaluator, dims: list[int]) -> dict[str, float]:
    """Train; log the best step (and the final validation when no checkpoint was kept); its val metrics."""
    import mlflow

    _train(trainer)
    val_metrics = _kept_checkpoint_metrics(trainer.state, dims)
    if not val_metrics:
        val_metrics = val_metrics_from(evaluator(model), dims, prefix="")
        mlflow.log_metrics(val_metrics, step=trainer.state.global_step)
    mlflow.log_metric("best_step", int(trainer.state.best_model_checkpoint.rsplit("-", 1)[-1])
                      if trainer.state.best_model_checkpoint else trainer.state.global_step)
    return val_metrics


def train_model(
    settings: Settings,
    examples: Any,
    validation_data: Any,
    dataset_version: str,
    output_dir: str | Path,
    epochs: float | None = None,
    max_steps: int | None = None,
    run_key: str | None = None,
    reports: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Fine-tune ``settings.model.base_model`` with the NEAR² objective, log, register as challenger.

    ``examples`` has ``triplets`` (anchor, positive, negative) and ``pairs`` (sentence1, sentence2,
    label) frames and optionally ``counts``; ``validation_data`` is ``(queries, corpus, relevant_docs)``.
    ``reports`` (e.g. the validation report) are stored as JSON artifacts of the run. With a ``run_key``
    that already produced a registered version, nothing is retrained: that version is returned.
    """
    import transformers

    from near2_tasks.models.embeddings import pick_device

    cfg, dims = settings.training, settings.model.dims
    output_dir = Path(output_dir).expanduser().resolve()
    validation = _check_inputs(settings, examples, validation_data, output_dir)

    transformers.set_seed(cfg.seed)
    device = pick_device(settings.model.device)
    model = load_base_model(settings, device)  # checks the dims against the model's dimension
    experiment_id = registry.configure_mlflow(settings)  # fail fast, before any training time is spent
    if run_key and (done := _already_registered(settings, run_key, output_dir)) is not None:
        return done

    datasets = training_datasets(examples, cfg)
    losses = hybrid_losses(model, settings)
    validation = validation_sample(validation, cfg.val_max_queries, cfg.val_corpus_size, cfg.seed)
    evaluator = nested_evaluator(validation, dims, cfg.eval_batch_size)

    git_commit = registry.current_git_commit()
    with tracking.training_run(settings, experiment_id, dataset_version, run_key, git_commit) as run:
        checkpoints = settings.home / "checkpoints" / run.info.run_id
        try:
            # inside the run: a re-run of a registered run key skips it, a failure is logged
            init_prefixes(model, cfg, product_texts(examples), relevance_pairs(examples))
            args = training_arguments(settings, checkpoints, device, epochs, max_steps)
            tracking.log_run_inputs(settings, examples, validation, dataset_version, device, args, git_commit, reports)
            trainer = _hybrid_trainer_class()(
                model=model, args=args, train_dataset=datasets, loss=losses, evaluator=evaluator,
                callbacks=[tracking.mlflow_step_logger(dims), _progress_logger()],
            )
            val_metrics = _fit(trainer, model, evaluator, dims)
            refit = refit_prefixes(model, examples, settings)
            if refit is not None:
                val_metrics = tracking.log_prefix_refit(refit, evaluator(model), dims, trainer.state.global_step)
            model.save(str(output_dir))
            version = tracking.register_trained_model(model, settings, run.info.run_id, dataset_version, run_key,
                                                      git_commit)
        finally:
            shutil.rmtree(checkpoints, ignore_errors=True)
    uri = registry.model_uri(settings, version.version)
    log.info("trained run %s, registered %s as %s", run.info.run_id, uri, "challenger")
    return TrainResult(run.info.run_id, str(version.version), uri, output_dir, val_metrics)
