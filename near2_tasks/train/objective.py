"""The NEAR² objective: the training datasets (triplets for retrieval, labelled pairs for ranking) and their
losses, ``MatryoshkaLoss(MultipleNegativesRankingLoss)`` (or its GradCache variant) and
``MatryoshkaLoss(OnlineContrastiveLoss)``, each weighted per dimension and per objective."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from near2_tasks.errors import Near2Error

if TYPE_CHECKING:
    import pandas as pd
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer

    from near2_tasks.config import Settings
    from near2_tasks.train.settings import TrainingSettings

log = logging.getLogger(__name__)


TRIPLET_COLUMNS = ("anchor", "positive", "negative")


PAIR_COLUMNS = ("sentence1", "sentence2", "label")


RETRIEVAL, RANKING = "retrieval", "ranking"


def _check_frame(frame: pd.DataFrame | None, columns: tuple[str, ...], what: str) -> None:
    if frame is None or len(frame) == 0:
        raise Near2Error(f"no training {what}: the training split is empty or mining found nothing to learn from",
                         hint="check the judgments (validation report) and examples settings; "
                              "the train split needs queries with judged positives")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise Near2Error(f"training {what} lack columns {missing}; they have {list(frame.columns)}")


def check_examples(examples: Any, cfg: TrainingSettings) -> None:
    """Each objective with a weight > 0 needs a non-empty frame with its columns."""
    if cfg.retrieval_weight == 0 and cfg.ranking_weight == 0:
        raise Near2Error("training.retrieval_weight and training.ranking_weight are both 0: nothing to train",
                         hint="give at least one objective a positive weight")
    if cfg.retrieval_weight > 0:
        _check_frame(getattr(examples, "triplets", None), TRIPLET_COLUMNS, "triplets")
    if cfg.ranking_weight > 0:
        _check_frame(getattr(examples, "pairs", None), PAIR_COLUMNS, "pairs")
        import pandas as pd

        labels = examples.pairs["label"]
        bad = sorted(set(labels[~pd.to_numeric(labels, errors="coerce").isin([0, 1])].astype(str)))
        if bad:
            raise Near2Error(f"pair labels must be 0 or 1, got {bad[:5]}")


def matryoshka_weights(settings: Settings) -> list[float]:
    weights = settings.training.matryoshka_weights
    if weights is None:
        return [1.0] * len(settings.model.dims)
    if isinstance(weights, dict):
        return [float(weights.get(dim, 1.0)) for dim in settings.model.dims]
    if len(weights) != len(settings.model.dims):
        raise Near2Error(f"training.matryoshka_weights has {len(weights)} entries for {len(settings.model.dims)} "
                         f"dims {settings.model.dims}", hint="give one weight per dimension, in the same order")
    return list(weights)


def training_datasets(examples: Any, cfg: TrainingSettings) -> dict[str, Dataset]:
    """``{"retrieval": triplets, "ranking": pairs}`` (objectives with weight 0 left out)."""
    from datasets import Dataset

    datasets = {}
    if cfg.retrieval_weight > 0:
        triplets = examples.triplets[list(TRIPLET_COLUMNS)].astype(str).reset_index(drop=True)
        datasets[RETRIEVAL] = Dataset.from_pandas(triplets, preserve_index=False)
    if cfg.ranking_weight > 0:
        pairs = examples.pairs[list(PAIR_COLUMNS)].reset_index(drop=True)
        pairs = pairs.astype({"sentence1": str, "sentence2": str, "label": int})
        datasets[RANKING] = Dataset.from_pandas(pairs, preserve_index=False)
    return datasets


def hybrid_losses(model: SentenceTransformer, settings: Settings) -> dict:
    """The NEAR² objective: one Matryoshka-wrapped loss per dataset, scaled by the objective weights."""
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MatryoshkaLoss,
        MultipleNegativesRankingLoss,
        OnlineContrastiveLoss,
    )

    cfg, dims = settings.training, settings.model.dims
    per_dim = matryoshka_weights(settings)
    losses = {}
    if cfg.retrieval_weight > 0:
        # GradCache: a large batch of in-batch negatives at the memory of a mini-batch
        mnrl = (CachedMultipleNegativesRankingLoss(model, scale=cfg.mnrl_scale,
                                                   mini_batch_size=cfg.mnrl_mini_batch_size)
                if cfg.mnrl_mini_batch_size else MultipleNegativesRankingLoss(model, scale=cfg.mnrl_scale))
        losses[RETRIEVAL] = MatryoshkaLoss(
            model, mnrl, dims,
            matryoshka_weights=[cfg.retrieval_weight * w for w in per_dim])
    if cfg.ranking_weight > 0:
        losses[RANKING] = MatryoshkaLoss(
            model, OnlineContrastiveLoss(model, margin=cfg.contrastive_margin), dims,
            matryoshka_weights=[cfg.ranking_weight * w for w in per_dim])
    return losses


def retrieval_loss_name(cfg: TrainingSettings) -> str:
    return "CachedMultipleNegativesRankingLoss" if cfg.mnrl_mini_batch_size else "MultipleNegativesRankingLoss"

