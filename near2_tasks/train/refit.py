"""The last step of training: re-fit the prefix rotation on the trained model's frozen embeddings.

Fine-tuning moves the whole encoder for a few hundred steps; the prefixes it leaves are good but not the best
*rotation* of that encoder's space. This step freezes the encoder, encodes the training triplets once, and
fits an orthogonal matrix W (starting at the identity) with the training objective restricted to the
prefixes: for every configured prefix d, MultipleNegativesRankingLoss over the batch's positives, its
negatives and random training products, plus the prefix distillation toward the full dimension. W is then
folded into the model's ``Dense`` rotation (or inserted as one).

Being orthogonal, W leaves the full-dimension cosine, hence the full-dimension ranking, exactly as trained,
so the step can only move the prefixes, and the full-dimension teacher is fixed. It costs one encode of the
training texts plus a few hundred small matrix products (``training.prefix_refit_epochs``; 0 turns it off).
On Home Depot it raised the trained model's 64-d NDCG@10 from 0.275 to 0.287 (BENCHMARKS.md, Training recipes,
row S against P).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from near2_tasks.errors import Near2Error

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer

    from near2_tasks.config import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefitResult:
    rotation: Any  # torch.Tensor, dim x dim, orthogonal
    epoch_losses: list[float]
    triplets: int
    seconds: float


def fit_prefix_rotation(queries: torch.Tensor, pool: torch.Tensor, anchor_ids: torch.Tensor,
                        positive_ids: torch.Tensor, negative_ids: torch.Tensor,
                        known_positives: set[tuple[int, int]], dims: list[int], weights: list[float], *,
                        epochs: int, learning_rate: float, batch_size: int, random_candidates: int, scale: float,
                        distill_weight: float, seed: int) -> RefitResult:
    """An orthogonal ``dim x dim`` W (rows: the new axes) for the embeddings ``x -> W x``.

    ``queries`` and ``pool`` hold the normalised query and product embeddings; triplet i is (``anchor_ids[i]``,
    ``positive_ids[i]``, ``negative_ids[i]``) into them. Each batch scores its anchors against the batch's
    positives and negatives plus ``random_candidates`` pool products; a candidate that is a known positive of
    the anchor (``known_positives``: (anchor id, product id)) other than the triplet's own is masked out, so it
    is never pushed away.
    """
    import torch
    import torch.nn.functional as F

    began = time.monotonic()
    dim = queries.shape[1]
    n = len(anchor_ids)
    if n < 2:
        raise Near2Error(f"training.prefix_refit_epochs needs at least 2 training triplets, got {n}",
                         hint="set training.prefix_refit_epochs: 0 for so few examples")
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(dim, dim, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(dim))
    torch.nn.utils.parametrizations.orthogonal(linear)
    optimizer = torch.optim.Adam(linear.parameters(), lr=learning_rate)
    known = torch.tensor(sorted(a * len(pool) + p for a, p in known_positives), dtype=torch.long)
    batch = min(batch_size, n)
    epoch_losses = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        total, steps = 0.0, 0
        for start in range(0, n - batch + 1, batch):
            rows = order[start:start + batch]
            extra = torch.randint(0, len(pool), (random_candidates,), generator=generator)
            candidate_ids = torch.cat([positive_ids[rows], negative_ids[rows], extra])
            codes = anchor_ids[rows, None] * len(pool) + candidate_ids[None, :]
            masked = torch.isin(codes, known)
            masked[torch.arange(len(rows)), torch.arange(len(rows))] = False  # the triplet's own positive
            w = linear.weight
            anchors = queries[anchor_ids[rows]] @ w.T
            candidates = pool[candidate_ids] @ w.T
            loss, teacher = anchors.new_zeros(()), None
            for d, weight in zip(dims, weights):
                scores = scale * F.normalize(anchors[:, :d], dim=-1) @ F.normalize(candidates[:, :d], dim=-1).T
                # a large finite negative: the masked candidates' probabilities are exactly 0 and the KL stays finite
                scores = scores.masked_fill(masked, -1e4)
                loss = loss + weight * F.cross_entropy(scores, torch.arange(len(rows)))
                log_probs = F.log_softmax(scores, dim=-1)
                if teacher is None:
                    teacher = log_probs.detach()  # the full dimension: unchanged by any rotation
                elif distill_weight > 0:
                    loss = loss + distill_weight * F.kl_div(log_probs, teacher, log_target=True,
                                                            reduction="batchmean")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, steps = total + float(loss.detach()), steps + 1
        epoch_losses.append(total / max(steps, 1))
    with torch.no_grad():
        rotation = linear.weight.detach().clone()
    return RefitResult(rotation, epoch_losses, n, time.monotonic() - began)


def refit_prefixes(model: SentenceTransformer, examples: Any, settings: Settings) -> RefitResult | None:
    """Encode the training triplets with ``model``, fit :func:`fit_prefix_rotation` and fold it into the
    model (``training.prefix_refit_*``); None when off or when there are no triplets."""
    import torch

    from near2_tasks.train.init import encode_normalised, fold_rotation
    from near2_tasks.train.objective import matryoshka_weights

    cfg, dims = settings.training, settings.model.dims
    triplets = getattr(examples, "triplets", None)
    # off, nothing to fit on, or one dimension (nothing to re-order)
    if cfg.prefix_refit_epochs == 0 or triplets is None or len(triplets) == 0 or len(dims) < 2:
        return None
    frame = triplets
    if len(frame) > cfg.prefix_refit_sample_size:
        frame = frame.sample(cfg.prefix_refit_sample_size, random_state=cfg.seed)
    anchors_text = frame["anchor"].astype(str).tolist()
    positives_text = frame["positive"].astype(str).tolist()
    negatives_text = frame["negative"].astype(str).tolist()
    queries = sorted(set(anchors_text))
    products = sorted(set(positives_text) | set(negatives_text))
    began = time.monotonic()
    query_vectors = encode_normalised(model, queries, cfg.eval_batch_size)
    pool = encode_normalised(model, products, cfg.eval_batch_size)
    encode_s = time.monotonic() - began
    query_row = {text: i for i, text in enumerate(queries)}
    product_row = {text: i for i, text in enumerate(products)}
    anchor_ids = torch.tensor([query_row[t] for t in anchors_text])
    positive_ids = torch.tensor([product_row[t] for t in positives_text])
    negative_ids = torch.tensor([product_row[t] for t in negatives_text])
    weights = matryoshka_weights(settings)
    result = fit_prefix_rotation(
        query_vectors, pool, anchor_ids, positive_ids, negative_ids,
        set(zip(anchor_ids.tolist(), positive_ids.tolist())), dims, weights,
        epochs=cfg.prefix_refit_epochs, learning_rate=cfg.prefix_refit_learning_rate,
        batch_size=cfg.prefix_refit_batch_size, random_candidates=cfg.prefix_refit_random_candidates,
        scale=cfg.mnrl_scale, distill_weight=cfg.prefix_distill_weight, seed=cfg.seed)
    fold_rotation(model, result.rotation)
    log.info("prefix refit: %d triplets, %d queries, %d products encoded in %.0fs; loss %.3f -> %.3f over %d "
             "epochs in %.0fs", len(frame), len(queries), len(products), encode_s, result.epoch_losses[0],
             result.epoch_losses[-1], len(result.epoch_losses), result.seconds)
    return result
