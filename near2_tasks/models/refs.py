"""The one model-reference resolver: which model a reference names, and the key of its cached vectors.

A reference (a local directory, ``models:/...`` / ``runs:/...`` URI, the packaged base model or a hub id;
see :mod:`near2_tasks.models.embeddings`) is pinned down by :func:`resolve_model` into a
:class:`ResolvedModel`: what to load, and a cache key that changes when the weights do. Evaluation,
indexing, mining and the benchmarks all key their embedding cache (:func:`embedding_cache_dir`) with it,
so they share each other's vectors. :func:`local_model_key` is the key of a non-MLflow model's exported
backend (:mod:`near2_tasks.models.backends`); both fingerprint a model directory with
:func:`directory_fingerprint`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from near2_tasks.errors import Near2Error
from near2_tasks.models.embeddings import MINILM_ALIASES, resolve_model_path

if TYPE_CHECKING:
    from near2_tasks.config import Settings

#: Cache key of the packaged base model's embeddings, shared by every stage (and every developer).
BASE_MODEL_CACHE_KEY = "minilm-base"


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference pinned down: what to load, and a cache key that changes when the weights do."""

    ref: str
    load_ref: str
    cache_key: str
    registered_model: str | None = None
    version: str | None = None
    run_id: str | None = None


def directory_fingerprint(directory: Path) -> str:
    """12 hex digits of the directory's absolute path and each file's name, size and mtime."""
    digest = hashlib.sha256(str(directory.resolve()).encode())
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(directory)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def parse_runs_uri(ref: str) -> tuple[str, str] | None:
    """``runs:/<run id>/<artifact path>`` -> (run id, artifact path, "" when none); None for anything else."""
    if not ref.startswith("runs:/"):
        return None
    run_id, _, artifact = ref.removeprefix("runs:/").partition("/")
    return run_id, artifact


def _resolve_models_uri(settings: Settings, uri: str) -> ResolvedModel:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` -> that exact registered version;
    ``models:/m-<id>`` (an MLflow 3 logged model) is taken as is."""
    from near2_tasks.conventions import parse_model_uri
    from near2_tasks.models.registry import configure_mlflow, resolve_model_uri

    parsed = parse_model_uri(uri)
    if parsed.selector is None:  # a logged model id: immutable, so the id is its own cache key
        return ResolvedModel(ref=uri, load_ref=uri, cache_key=f"logged-{parsed.name}")
    configure_mlflow(settings)
    version = resolve_model_uri(settings, parsed)
    return ResolvedModel(
        ref=uri, load_ref=f"models:/{version.name}/{version.version}",
        cache_key=f"{version.name}-v{version.version}", registered_model=version.name,
        version=str(version.version), run_id=version.run_id,
    )


def resolve_model(settings: Settings, model_ref: str) -> ResolvedModel:
    """Pin ``model_ref`` down: an alias is resolved to its version now, so a moving alias cannot race us."""
    if model_ref.startswith("models:/"):
        return _resolve_models_uri(settings, model_ref)
    run = parse_runs_uri(model_ref)
    if run is not None:
        run_id, artifact = run
        return ResolvedModel(ref=model_ref, load_ref=model_ref, cache_key=f"run-{run_id}-{artifact or 'model'}",
                             run_id=run_id)
    if model_ref in MINILM_ALIASES:
        return ResolvedModel(ref=model_ref, load_ref=model_ref, cache_key=BASE_MODEL_CACHE_KEY)
    local = Path(model_ref).expanduser()
    if local.is_dir():
        return ResolvedModel(ref=model_ref, load_ref=str(local),
                             cache_key=f"dir-{local.resolve().name}-{directory_fingerprint(local)}")
    if local.exists() or model_ref.startswith(("/", ".", "~")):
        raise Near2Error(f"model {model_ref!r} not found: {local} is not a model directory",
                         hint="give a directory saved by SentenceTransformer.save, a models:/ or runs:/ URI, "
                              "or a hub id")
    return ResolvedModel(ref=model_ref, load_ref=model_ref, cache_key=f"hub-{model_ref}")


def local_model_key(ref: str) -> str:
    """A cache key for a non-MLflow model (a directory, the packaged model, a hub id) that changes when
    its files do: the exported backends of :mod:`near2_tasks.models.backends` are cached under it."""
    path = Path(resolve_model_path(ref)).expanduser()
    if path.is_dir():
        fingerprint = directory_fingerprint(path)
    else:
        fingerprint = hashlib.sha256(str(path.resolve() if path.exists() else ref).encode()).hexdigest()[:12]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in path.name or ref)[-40:]
    return f"{safe}-{fingerprint}"


def embedding_cache_dir(settings: Settings) -> Path:
    """Where :func:`near2_tasks.models.embeddings.encode_cached` keeps vectors by :attr:`ResolvedModel.cache_key`."""
    return settings.evaluation.cache_dir or settings.home / "cache" / "embeddings"
