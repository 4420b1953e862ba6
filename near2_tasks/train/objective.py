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
        hardness = {} if cfg.mnrl_hardness_mode == "none" else {
            "hardness_mode": cfg.mnrl_hardness_mode, "hardness_strength": cfg.mnrl_hardness_strength}
        mnrl = (CachedMultipleNegativesRankingLoss(model, scale=cfg.mnrl_scale,
                                                   mini_batch_size=cfg.mnrl_mini_batch_size, **hardness)
                if cfg.mnrl_mini_batch_size else MultipleNegativesRankingLoss(model, scale=cfg.mnrl_scale, **hardness))
        losses[RETRIEVAL] = MatryoshkaLoss(
            model, mnrl, dims,
            matryoshka_weights=[cfg.retrieval_weight * w for w in per_dim])
        if cfg.prefix_distill_weight > 0:
            # after MatryoshkaLoss, which decorated calculate_loss: the wrapper sees the full-dim embeddings
            mnrl.calculate_loss = PrefixDistillation(mnrl.calculate_loss, dims,
                                                     cfg.retrieval_weight * cfg.prefix_distill_weight, cfg.mnrl_scale)
    if cfg.ranking_weight > 0:
        losses[RANKING] = MatryoshkaLoss(
            model, OnlineContrastiveLoss(model, margin=cfg.contrastive_margin), dims,
            matryoshka_weights=[cfg.ranking_weight * w for w in per_dim])
    return losses


class PrefixDistillation:
    """A CachedMNRL ``calculate_loss`` plus self-distillation of the prefixes (``training.prefix_distill_weight``).

    For every configured prefix d below the full dimension: KL(p_full || p_d), where p is the softmax over
    the batch's candidates (every positive and negative) of ``scale`` x cosine, per anchor; p_full is a fixed
    teacher (no gradient), so the small prefixes learn the full embedding's ranking of in-batch candidates,
    not only which candidate is the positive. The batch's score matrix is small (batch x 2·batch), so the term
    is computed at once; its gradients reach the cached embeddings like the MNRL term's (GradCache).
    """

    def __init__(self, calculate_loss, dims: list[int], weight: float, scale: float) -> None:
        self.calculate_loss, self.dims, self.weight, self.scale = calculate_loss, list(dims), weight, scale

    def __call__(self, reps, labels=None, *, with_backward: bool = False):
        loss = self.calculate_loss(reps, labels, with_backward=with_backward)
        distill = self.term(reps)
        if with_backward:
            distill.backward()
            distill = distill.detach()
        return loss + distill

    def term(self, reps):
        import torch
        import torch.nn.functional as F

        queries = torch.cat(reps[0])
        docs = torch.cat([torch.cat(column) for column in reps[1:]])

        def log_probs(dim: int, detach: bool):
            q, d = (queries.detach(), docs.detach()) if detach else (queries, docs)
            scores = F.normalize(q[:, :dim], dim=-1) @ F.normalize(d[:, :dim], dim=-1).T
            return F.log_softmax(self.scale * scores, dim=-1)

        teacher = log_probs(self.dims[0], detach=True)
        total = queries.new_zeros(())
        for dim in self.dims[1:]:
            total = total + F.kl_div(log_probs(dim, detach=False), teacher, log_target=True, reduction="batchmean")
        return self.weight * total


def retrieval_loss_name(cfg: TrainingSettings) -> str:
    return "CachedMultipleNegativesRankingLoss" if cfg.mnrl_mini_batch_size else "MultipleNegativesRankingLoss"

