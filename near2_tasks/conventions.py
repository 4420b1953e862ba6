"""The names every stage shares (see ARCHITECTURE.md, "Conventions"). Change them here or nowhere."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

#: Document fields besides the vectors.
PRODUCT_FIELDS = ("product_id", "title", "category", "brand", "price")

#: Metrics as named in reports; MLflow names replace "@" with "_at_".
REPORT_METRICS = ("ndcg@10", "mrr@10", "precision@10", "recall@10", "recall@100", "map@100")

# MLflow registry aliases and tags
CHALLENGER = "challenger"
CHAMPION = "champion"
TAG_DATASET_VERSION = "dataset_version"
TAG_DIMS = "dims"
TAG_GIT_COMMIT = "git_commit"
TAG_GATE = "gate"
TAG_APPROVAL = "approval"
TAG_PREVIOUS_CHAMPION = "previous_champion"
APPROVED, REJECTED, PENDING = "approved", "rejected", "pending"

#: Keys of an index's ``_meta``.
INDEX_META_KEYS = ("model_name", "model_version", "model_uri", "run_id", "dims", "catalog_version", "built_at")

#: Text fields of the BM25 side of hybrid search (``title`` is text, ``brand``/``category`` keyword with a
#: ``.text`` subfield, so filters keep their exact ``term`` match), all with the core ``standard`` analyzer.
LEXICAL_FIELDS = ("title", "brand.text", "category.text")
#: The analyzer of the lexical fields: the local server has no analysis-common (no ``english`` analyzer).
LEXICAL_ANALYZER = "standard"
#: ``_meta`` keys of hybrid search: the lexical fields an index holds, and the tuned linear weight per dim.
META_LEXICAL_FIELDS = "lexical_fields"
META_HYBRID_WEIGHTS = "hybrid_weights"
META_HYBRID_TUNING = "hybrid_tuning"
#: The ``_meta`` key verification adds once an index passed; the alias only moves to an index that has it.
META_VERIFIED_AT = "verified_at"


def vector_field(dim: int) -> str:
    """``embedding_<d>``: the dense_vector field that holds the d-dimensional prefix."""
    return f"embedding_{dim}"


def binary_vector_field(dim: int) -> str:
    """``embedding_<d>_bits``: the d-prefix as 1-bit codes (``near2_tasks.serving.compact``), a funnel's shortlist."""
    return f"embedding_{dim}_bits"


def dim_of_field(field: str) -> int:
    match = re.fullmatch(r"embedding_(\d+)", field)
    if not match:
        raise ValueError(f"{field!r} is not a vector field name")
    return int(match.group(1))


def mlflow_name(metric: str) -> str:
    """``ndcg@10`` -> ``ndcg_at_10`` (MLflow rejects '@' in names)."""
    return metric.replace("@", "_at_")


def metric_key(prefix: str, metric: str, dim: int) -> str:
    """``metric_key('eval', 'ndcg@10', 64)`` -> ``eval_ndcg_at_10_dim_64``."""
    return f"{prefix}_{mlflow_name(metric)}_dim_{dim}"


def gate_tag(dim: int, metric: str) -> str:
    """``gate.dim_64.ndcg_at_10``."""
    return f"gate.dim_{dim}.{mlflow_name(metric)}"


def utc_timestamp(now: datetime | None = None) -> str:
    """Compact UTC timestamp used in index names, e.g. ``20261121t120301``."""
    now = now or datetime.now(timezone.utc)
    return now.astimezone(timezone.utc).strftime("%Y%m%dt%H%M%S")


def index_name(alias: str, model_version: str | int, now: datetime | None = None) -> str:
    """``<alias>-v<model version>-<UTC timestamp>``, e.g. ``products-v7-20261121t120301``."""
    return f"{alias}-v{model_version}-{utc_timestamp(now)}"


# ----- MLflow model references ------------------------------------------------------------------
_MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+|latest)|@(?P<alias>[^/@]+))?")


@dataclass(frozen=True)
class ModelUri:
    """A parsed ``models:/`` reference: ``models:/<name>/<version>``, ``models:/<name>/latest``,
    ``models:/<name>@<alias>``, or ``models:/<id>`` (an MLflow 3 logged model: no version, no alias)."""

    name: str
    version: str | None = None  #: a number, or "latest"
    alias: str | None = None

    @property
    def selector(self) -> str | None:
        """What picks the version: its number, ``latest`` or the alias; None for a logged model."""
        return self.version or self.alias

    def __str__(self) -> str:
        return f"models:/{self.name}" + (f"@{self.alias}" if self.alias else f"/{self.version}" if self.version else "")

    @property
    def pinned(self) -> bool:
        """Names one version for good (a number), not one that can move (an alias, ``latest``)."""
        return bool(self.version and self.version.isdigit())


def parse_model_uri(ref: str) -> ModelUri | None:
    """The one parser of ``models:/`` references (index, evaluation, backends and the CLI use it).
    None for anything else (a directory, a hub id, ``runs:/``); a malformed ``models:/`` is an error."""
    from near2_tasks.errors import Near2Error

    if not ref.startswith("models:/"):
        return None
    match = _MODEL_URI.fullmatch(ref)
    if match is None:
        raise Near2Error(f"cannot read the model URI {ref!r}",
                         hint="URIs look like models:/<name>/<version>, models:/<name>@<alias> or models:/<name>/latest")
    return ModelUri(match["name"], match["version"], match["alias"])


def truncate(vectors: np.ndarray, dim: int) -> np.ndarray:
    """The first ``dim`` components of each row, L2-normalised again (float32).

    A zero row stays zero instead of becoming NaN.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        return truncate(vectors[None, :], dim)[0]
    if dim > vectors.shape[1]:
        raise ValueError(f"cannot truncate {vectors.shape[1]}-d vectors to {dim} dimensions")
    prefix = vectors[:, :dim]
    norms = np.linalg.norm(prefix, axis=1, keepdims=True)
    return (prefix / np.where(norms == 0, 1.0, norms)).astype(np.float32)
