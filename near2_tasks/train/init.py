"""The starting point of training: the base model, optionally with a ``Dense`` rotation in front of the
normalisation so the embedding's prefixes are already ordered: by the catalog's variance (``pca``) or by how
much of the query-positive agreement each axis carries (``relevance``)."""

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


def relevance_pairs(examples: Any) -> list[tuple[str, str]]:
    """The distinct (query, strong positive) text pairs of the training triplets, sorted; without triplets
    (a ranking-only objective) the positive (label 1) ranking pairs."""
    frame = getattr(examples, "triplets", None)
    if frame is not None and len(frame) and {"anchor", "positive"} <= set(frame.columns):
        return sorted(set(zip(frame["anchor"].astype(str), frame["positive"].astype(str))))
    frame = getattr(examples, "pairs", None)
    if frame is not None and len(frame) and {"sentence1", "sentence2", "label"} <= set(frame.columns):
        positive = frame[frame["label"].astype(int) == 1]
        return sorted(set(zip(positive["sentence1"].astype(str), positive["sentence2"].astype(str))))
    return []


def encode_normalised(model: SentenceTransformer, texts: list[str], batch_size: int):
    """The texts' normalised embeddings as a float32 CPU tensor (what the rotations are fitted on)."""
    return model.encode(texts, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                        show_progress_bar=False).float().cpu()


def _before_normalize(modules: list) -> int:
    """The position just before the model's ``Normalize`` (the end when there is none): where a rotation sits."""
    from sentence_transformers.sentence_transformer.modules import Normalize

    return next((i for i, m in enumerate(modules) if isinstance(m, Normalize)), len(modules))


def _insert_rotation(model: SentenceTransformer, weight) -> None:
    """Insert ``Dense(weight)`` (bias-free, identity activation) before the model's ``Normalize``."""
    import torch
    from sentence_transformers.sentence_transformer.modules import Dense

    dim = weight.shape[1]
    rotation = Dense(dim, dim, bias=False, activation_function=torch.nn.Identity(), init_weight=weight.contiguous())
    modules = list(model._modules.values())
    modules.insert(_before_normalize(modules), rotation.to(model.device))
    model._modules.clear()
    for i, module in enumerate(modules):
        model._modules[str(i)] = module


def fold_rotation(model: SentenceTransformer, rotation) -> None:
    """Apply the orthogonal ``rotation`` (rows: new axes) to the model's output: compose it with the rotation
    ``Dense`` before ``Normalize`` (``W_new = rotation @ W``), or insert one where there is none."""
    import torch
    from sentence_transformers.sentence_transformer.modules import Dense

    modules = list(model._modules.values())
    at = _before_normalize(modules)
    previous = modules[at - 1] if at > 0 else None
    if isinstance(previous, Dense) and previous.linear.bias is None \
            and isinstance(previous.activation_function, torch.nn.Identity):
        with torch.no_grad():
            weight = previous.linear.weight
            weight.copy_(rotation.to(weight.device, weight.dtype) @ weight)
    else:
        _insert_rotation(model, rotation)


def add_principal_axes(model: SentenceTransformer, texts: list[str], sample_size: int, seed: int,
                       batch_size: int = 128) -> None:
    """Insert a bias-free linear layer that rotates the pooled embedding onto the catalog's principal axes.

    The rotation is orthogonal, so full-dimension cosine similarities are unchanged; but the first
    dimensions now carry the most variance, so every Matryoshka prefix starts as the best linear prefix of
    that size (PCA) instead of an arbitrary slice. It sits after pooling and before normalisation, and is
    trained with the rest of the model.
    """
    import torch

    rng = random.Random(seed)
    sample = texts if len(texts) <= sample_size else rng.sample(texts, sample_size)
    if len(sample) < 2:
        raise Near2Error(f"training.prefix_init=pca needs at least 2 product texts, got {len(sample)}",
                         hint="use prefix_init 'none' for such a small catalog")
    embeddings = encode_normalised(model, sample, batch_size)
    # full_matrices: a complete orthogonal dim x dim rotation even when there are fewer texts than dims
    # (the axes beyond the sample's rank are an arbitrary orthonormal completion)
    _, _, vt = torch.linalg.svd(embeddings - embeddings.mean(dim=0), full_matrices=True)
    _insert_rotation(model, vt)


def relevance_axes(queries, positives):
    """Rows: the eigenvectors of the symmetrised query-positive cross-covariance ``(QᵀP + PᵀQ) / 2n``, by
    eigenvalue, largest first, and the eigenvalues. The cosine of a query and its positive is the sum of
    the eigenvalue-weighted agreements along these axes, so the first axes carry most of what makes a
    positive score high: the best orthogonal basis for short prefixes to keep."""
    return eigen_axes(queries.T @ positives / len(queries))


def eigen_axes(matrix):
    """Rows: the eigenvectors of the symmetrised square ``matrix`` by eigenvalue, largest first, and the
    eigenvalues (a tensor)."""
    import torch

    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    order = torch.argsort(values, descending=True)
    return vectors[:, order].T, values[order]


def add_relevance_axes(model: SentenceTransformer, pairs: list[tuple[str, str]], sample_size: int, seed: int,
                       batch_size: int = 128) -> None:
    """Insert a bias-free rotation onto :func:`relevance_axes` of the (query, positive) ``pairs``.

    Like :func:`add_principal_axes` the rotation is orthogonal (full-dimension cosine unchanged), but the
    axes are ordered by the query-positive agreement they carry rather than by the catalog's variance: on
    Home Depot the untrained 64-d prefix scores 0.209 NDCG@10 this way against 0.198 with PCA and 0.181
    plain (BENCHMARKS.md, Training recipes)."""
    rng = random.Random(seed)
    sample = pairs if len(pairs) <= sample_size else rng.sample(pairs, sample_size)
    if len(sample) < 2:
        raise Near2Error(f"training.prefix_init=relevance needs at least 2 (query, positive) pairs, got {len(sample)}",
                         hint="use prefix_init 'pca' or 'none' for so few training examples")
    texts = sorted({text for pair in sample for text in pair})
    row = {text: i for i, text in enumerate(texts)}
    embeddings = encode_normalised(model, texts, batch_size)
    queries = embeddings[[row[q] for q, _ in sample]]
    positives = embeddings[[row[p] for _, p in sample]]
    _insert_rotation(model, relevance_axes(queries, positives)[0])


def load_base_model(settings: Settings, device: str, catalog_texts: list[str] | None = None,
                    pairs: list[tuple[str, str]] | None = None) -> SentenceTransformer:
    """The base encoder with the training's max_seq_length; with ``catalog_texts`` (and, for ``relevance``,
    the (query, positive) ``pairs``), also rotated as ``training.prefix_init`` says."""
    from near2_tasks.models.embeddings import load_encoder, model_dimension

    cfg = settings.training
    model = load_encoder(settings.model.base_model, device=device)
    if cfg.max_seq_length:
        model.max_seq_length = cfg.max_seq_length
    check_nested_dims(settings.model.dims, model_dimension(model))
    if catalog_texts is not None:
        init_prefixes(model, cfg, catalog_texts, pairs or [])
    return model


def init_prefixes(model: SentenceTransformer, cfg: TrainingSettings, catalog_texts: list[str],
                  pairs: list[tuple[str, str]]) -> None:
    """``training.prefix_init``: rotate the model onto the catalog's principal axes (``pca``) or onto the
    axes of the query-positive agreement of the training ``pairs`` (``relevance``)."""
    if cfg.prefix_init == "pca":
        add_principal_axes(model, catalog_texts, cfg.pca_sample_size, cfg.seed, cfg.eval_batch_size)
    elif cfg.prefix_init == "relevance":
        add_relevance_axes(model, pairs, cfg.pca_sample_size, cfg.seed, cfg.eval_batch_size)
