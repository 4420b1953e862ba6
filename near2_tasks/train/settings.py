"""Settings of the training stage: example mining (MMSE-style graded signals) and the NEAR² recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from near2_tasks.section import Section


class ExamplesSettings(Section):
    """MMSE-style training examples mined from graded judgments."""

    seed: int = 13
    split_fractions: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train / validation / test share of queries (by seeded hash).")
    strong_positive_min: float | None = Field(
        2.5, description="relevance >= this is a strong positive (an MNRL anchor); None: the scale's maximum. "
                         "2.5 on the default 1-3 scale takes Home Depot's 2.67 and 3. On Home Depot 3.0 lowered "
                         "NDCG@10 at every dimension (row T); 2.33 raised it at every dimension (+0.010 at "
                         "64-d, row U) but trains on 47% more triplets: 28.2 min, over the 25-min budget "
                         "(BENCHMARKS.md, Training recipes).")
    hard_negative_max: float | None = Field(
        1.67, description="relevance < this is a judged hard negative; None: dataset.relevant_threshold. 1.67 "
                          "keeps 1.67-2 products (near misses) out of the negatives.")
    weak_positives_in_triplets: bool = Field(
        False, description="Weak positives also anchor MNRL triplets (they always enter the ranking pairs). Off: "
                           "measured on Home Depot and on the demo catalog, they lowered NDCG@10 at 384-d.")
    negatives_per_positive: int = Field(1, ge=1, description="Triplets per positive (distinct negatives).")
    random_negatives_per_query: int = Field(
        1, ge=0, description="UNJUDGED catalog products sampled per query and assumed irrelevant "
                             "(0: never treat unjudged products as negatives).")
    mined_top_k: int = Field(20, ge=1, description="Model-mined negatives: look at the model's top k products.")
    mined_negatives_per_query: int = Field(2, ge=0, description="Model-mined hard negatives kept per query.")
    mined_unjudged_as_negatives: bool = Field(
        True, description="Also take UNJUDGED products the base model ranks high (below the top mined_skip_top and "
                          "the relative margin) as negatives. On Home Depot they raised NDCG@10 by 0.005 at 384-d "
                          "and 0.002 at 64-d (BENCHMARKS.md, Training recipes, row J against I); off: judged and "
                          "random negatives only (no false-negative risk).")
    mined_skip_top: int = Field(
        3, ge=0, description="With mined_unjudged_as_negatives: skip this many top unjudged hits (likely relevant).")
    mined_relative_margin: float | None = Field(
        0.05, ge=0, lt=1, description="With mined_unjudged_as_negatives: an unjudged product is a negative only if "
                                      "its score is <= (1 - margin) x that of the query's best-scored strong positive "
                                      "(sentence-transformers' relative_margin); None: no margin.")
    embedding_cache_dir: Path | None = Field(None, description="Product embeddings cache; None: home/cache/embeddings.")

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum_to_one(cls, fractions: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be non-negative and sum to 1, got {list(fractions)}")
        return fractions



class TrainingSettings(Section):
    """NEAR² fine-tuning: the hybrid objective, its schedule and the validation that picks the checkpoint."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Stop after this many steps (overrides epochs).")
    batch_size: int = Field(
        256, gt=0, description="Training batch on CPU: the in-batch negatives of MNRL. 256, through CachedMNRL "
                               "(mnrl_mini_batch_size) at the memory of 64, beat 64 at 64-d and 32-d on Home Depot "
                               "(BENCHMARKS.md, Training recipes, row G against C).")
    gpu_batch_size: int = Field(128, gt=0, description="Training batch when a GPU is used.")
    eval_batch_size: int = Field(64, gt=0)
    learning_rate: float = Field(
        2e-4, gt=0, description="Peak learning rate (linear warm-up over warmup_ratio, then linear decay). 2e-4 "
                                "at batch 256 raised 64-d NDCG@10 by 0.002 over 1e-4 and cost 0.0015 at 384-d on "
                                "Home Depot (BENCHMARKS.md, Training recipes, row K against J).")
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    seed: int = 42
    retrieval_weight: float = Field(1.0, ge=0, description="Weight of MatryoshkaLoss(MultipleNegativesRankingLoss).")
    ranking_weight: float = Field(
        0.0, ge=0, description="Weight of MatryoshkaLoss(OnlineContrastiveLoss), NEAR²'s second loss; 0 leaves it "
                               "out. OnlineContrastiveLoss SUMS over the hard pairs of a batch; on the shipped "
                               "recipe, weight 0.05 cost 0.012 NDCG@10 at 384-d and 0.002 at 64-d on Home Depot "
                               "(BENCHMARKS.md, Training recipes, row H), so it is off by default.")
    matryoshka_weights: list[float] | dict[int, float] | None = Field(
        default_factory=lambda: {64: 2.0, 32: 2.0},
        description="Per-dimension weights of both Matryoshka losses: a list (one weight per model.dims entry, "
                    "same order) or {dim: weight} (dims left out weigh 1; dims not in model.dims are ignored); "
                    "None: all 1. Default: the prefixes of 64 and 32 dims count double, which raised 64-d and "
                    "32-d NDCG@10 on Home Depot (BENCHMARKS.md, Training recipes, rows E and I).")
    mnrl_scale: float = Field(20.0, gt=0, description="Similarity scale of MultipleNegativesRankingLoss.")
    contrastive_margin: float = Field(0.5, gt=0, description="Margin of OnlineContrastiveLoss.")
    multi_dataset_sampler: Literal["proportional", "round_robin"] = Field(
        "round_robin", description="round_robin: every optimizer step sums one batch of each objective, so the "
                                   "weights are exact even under gradient clipping; proportional: one objective "
                                   "per step, each dataset used in full (weights then barely matter).")
    max_seq_length: int | None = Field(
        32, gt=0, description="Tokens per text in training and in the saved model; None: the base model's own "
                              "limit (256). 32 covers Home Depot titles and queries and trains ~4x faster; raise "
                              "it for catalogs with long product texts.")
    eval_steps: int = Field(200, gt=0, description="Validate and checkpoint every N steps.")
    logging_steps: int = Field(20, gt=0)
    save_total_limit: int = Field(2, ge=1)
    val_max_queries: int = Field(500, gt=0, description="Validation queries used to pick the checkpoint.")
    val_corpus_size: int = Field(
        5000, gt=0, description="Validation corpus: every relevant product plus random others up to this size."
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, else fp16 on GPU; on CPU bf16 where the CPU has "
                            "bf16 instructions (AVX512-BF16/AMX), else fp32. fp16 needs a GPU.")
    mnrl_mini_batch_size: int | None = Field(
        64, gt=0, description="CachedMultipleNegativesRankingLoss (GradCache) with this mini-batch, so batch_size "
                              "can grow (more in-batch negatives) at the memory of the mini-batch; None: plain "
                              "MultipleNegativesRankingLoss (the whole batch at once).")
    mnrl_hardness_mode: Literal["none", "in_batch_negatives", "hard_negatives", "all_negatives"] = Field(
        "none", description="Hardness weighting of the MNRL loss (cached or plain): adds strength x "
                            "stop_grad(cosine) to the chosen negatives' logits (Lan et al. 2025; EmbeddingGemma "
                            "uses hard_negatives at 5); none: plain InfoNCE. Off by "
                            "default: hard_negatives at 5 cost 0.012 NDCG@10 at 384-d and 0.0055 at 64-d on Home "
                            "Depot (BENCHMARKS.md, Training recipes, row R against P).")
    mnrl_hardness_strength: float = Field(0.0, ge=0, description="alpha of mnrl_hardness_mode.")
    prefix_distill_weight: float = Field(
        1.0, ge=0, description="Self-distillation of the prefixes: for every prefix below the full dimension, "
                               "weight x KL(full-dimension in-batch score distribution || the prefix's), on the "
                               "retrieval batches, the full dimension as a fixed teacher; 0: off. Needs "
                               "mnrl_mini_batch_size (CachedMNRL). Default 1: with prefix_init relevance it "
                               "raised NDCG@10 at every dimension on Home Depot (+0.007 at 64-d, +0.006 at 32-d "
                               "against relevance alone; BENCHMARKS.md, Training recipes, row O against N).")
    prefix_init: Literal["none", "pca", "relevance"] = Field(
        "relevance", description="relevance: start from a rotation (a bias-free Dense layer before "
                                 "normalisation; full-dimension cosine unchanged) onto the eigenvectors of the "
                                 "training (query, strong positive) cross-covariance, so the first axes carry "
                                 "the most query-positive agreement (untrained 64-d NDCG@10 0.209 against 0.198 "
                                 "for pca, 0.181 for none; with the prefix distillation, above pca at every "
                                 "dimension: BENCHMARKS.md, Training recipes, rows O and K). pca: onto the "
                                 "catalog's principal axes, so each prefix starts as the best linear prefix of "
                                 "its size (+0.01 to +0.03 over none, row C); none: no rotation.")
    pca_sample_size: int = Field(20000, gt=0, description="Product texts (pca) or (query, positive) pairs "
                                                         "(relevance) encoded to fit the rotation.")

    prefix_refit_epochs: int = Field(
        6, ge=0, description="After training, re-fit an orthogonal rotation of the trained model's frozen "
                             "embeddings for the prefixes (MNRL + the prefix distillation per prefix, on the "
                             "training triplets, train/refit.py) and fold it into the model: the full-dimension "
                             "ranking is exactly unchanged. 0: off. On Home Depot +0.012 NDCG@10 at 64-d, +0.006 at "
                             "128-d and 32-d for 2.2 min (row S against P; 6 epochs is on the validation "
                             "split's plateau of 6-12: BENCHMARKS.md, Training recipes).")
    prefix_refit_learning_rate: float = Field(1e-3, gt=0, description="Adam learning rate of the prefix refit.")
    prefix_refit_batch_size: int = Field(512, gt=1, description="Triplets per prefix-refit step.")
    prefix_refit_random_candidates: int = Field(
        2048, ge=0, description="Random training products added to each refit batch's candidates.")
    prefix_refit_sample_size: int = Field(
        50000, gt=1, description="At most this many training triplets are encoded for the prefix refit.")

    @model_validator(mode="after")
    def _distillation_needs_the_cached_loss(self) -> TrainingSettings:
        if self.prefix_distill_weight > 0 and not self.mnrl_mini_batch_size:
            raise ValueError("prefix_distill_weight > 0 needs mnrl_mini_batch_size (the distillation runs inside "
                             "CachedMultipleNegativesRankingLoss); for plain MNRL set prefix_distill_weight: 0 too")
        return self

