"""The starting point of training: the base model, optionally with a ``Dense`` layer initialised with the
catalog's principal axes so the embedding's prefixes are already ordered by variance."""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any

from near2_tasks.errors import Near2Error

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from near2_tasks.config import Settings
    from near2_tasks.train.settings import TrainingSettings

log = logging.getLogger(__name__)


def check_nested_dims(dims: list[int], model_dim: int | None = None) -> None:
    """Dims must be positive, distinct, descending, and start at the model's full dimension."""
    if not dims or any(d <= 0 for d in dims):
        raise Near2Error(f"model.dims must be positive dimensions, got {dims}", hint="e.g. [384, 256, 128, 64, 32]")
    if len(set(dims)) != len(dims):
        raise Near2Error(f"model.dims {dims} repeat a dimension", hint="list each dimension once")
    if dims != sorted(dims, reverse=True):
        raise Near2Error(f"model.dims {dims} are not in descending order",
                         hint=f"use {sorted(set(dims), reverse=True)} (full dimension first)")
    if model_dim is not None:
        too_big = [d for d in dims if d > model_dim]
        if too_big:
            raise Near2Error(f"model.dims {too_big} exceed the model's embedding dimension {model_dim}",
                             hint=f"use dimensions <= {model_dim}")
        if dims[0] != model_dim:
            raise Near2Error(f"model.dims must start at the model's full dimension {model_dim}, got {dims}",
                             hint=f"put {model_dim} first: the full dimension is always trained and served")


def product_texts(examples: Any) -> list[str]:
    """The distinct product texts of the training examples (positives and negatives), sorted."""
    texts: set[str] = set()
    for frame, columns in ((getattr(examples, "triplets", None), ("positive", "negative")),
                           (getattr(examples, "pairs", None), ("sentence2",))):
        if frame is not None:
            for column in columns:
                if column in frame.columns:
                    texts.update(frame[column].astype(str))
    return sorted(texts)


def add_principal_axes(model: SentenceTransformer, texts: list[str], sample_size: int, seed: int,
                       batch_size: int = 128) -> None:
    """Insert a bias-free linear layer that rotates the pooled embedding onto the catalog's principal axes.

    The rotation is orthogonal, so full-dimension cosine similarities are unchanged; but the first
    dimensions now carry the most variance, so every Matryoshka prefix starts as the best linear prefix of
    that size (PCA) instead of an arbitrary slice. It sits after pooling and before normalisation, and is
    trained with the rest of the model.
    """
    import torch
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize

    rng = random.Random(seed)
    sample = texts if len(texts) <= sample_size else rng.sample(texts, sample_size)
    if len(sample) < 2:
        raise Near2Error(f"training.prefix_init=pca needs at least 2 product texts, got {len(sample)}",
                         hint="use prefix_init 'none' for such a small catalog")
    embeddings = model.encode(sample, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                              show_progress_bar=False).float().cpu()
    dim = embeddings.shape[1]
    # full_matrices: a complete orthogonal dim x dim rotation even when there are fewer texts than dims
    # (the axes beyond the sample's rank are an arbitrary orthonormal completion)
    _, _, vt = torch.linalg.svd(embeddings - embeddings.mean(dim=0), full_matrices=True)
    rotation = Dense(dim, dim, bias=False, activation_function=torch.nn.Identity(), init_weight=vt.contiguous())
    modules = list(model._modules.values())
    at = next((i for i, m in enumerate(modules) if isinstance(m, Normalize)), len(modules))
    modules.insert(at, rotation.to(model.device))
    model._modules.clear()
    for i, module in enumerate(modules):
        model._modules[str(i)] = module


def load_base_model(settings: Settings, device: str, catalog_texts: list[str] | None = None) -> SentenceTransformer:
    """The base encoder with the training's max_seq_length; with ``catalog_texts`` and
    ``training.prefix_init=pca``, also rotated onto those texts' principal axes."""
    from near2_tasks.models.embeddings import load_encoder, model_dimension

    cfg = settings.training
    model = load_encoder(settings.model.base_model, device=device)
    if cfg.max_seq_length:
        model.max_seq_length = cfg.max_seq_length
    check_nested_dims(settings.model.dims, model_dimension(model))
    if catalog_texts is not None:
        init_prefixes(model, cfg, catalog_texts)
    return model


def init_prefixes(model: SentenceTransformer, cfg: TrainingSettings, catalog_texts: list[str]) -> None:
    """``training.prefix_init``: with ``pca``, rotate the model onto ``catalog_texts``' principal axes."""
    if cfg.prefix_init == "pca":
        add_principal_axes(model, catalog_texts, cfg.pca_sample_size, cfg.seed, cfg.eval_batch_size)

