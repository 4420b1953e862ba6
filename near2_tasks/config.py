"""Typed settings for every stage of near2: :class:`Settings`, assembled from the sections each stage
package defines in its ``settings.py`` (``data``, ``models``, ``train``, ``evaluate``, ``promote``,
``serving``), plus the orchestration's own (``airflow``, ``demo``).

Settings come, in increasing priority, from: the defaults below, a YAML file (``NEAR2_CONFIG`` or
``--config``), and environment variables prefixed ``NEAR2_`` with ``__`` between nested keys
(``NEAR2_ELASTICSEARCH__URL``, ``NEAR2_MODEL__DIMS='[384,128]'``).

Paths never depend on the current directory: everything a run writes lives under ``home``
(``NEAR2_HOME``, default ``~/.near2``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from near2_tasks.errors import Near2Error
from near2_tasks.data.settings import DatasetSettings, ValidationSettings
from near2_tasks.evaluate.settings import EvaluationSettings
from near2_tasks.models.settings import MLflowSettings, ModelSettings
from near2_tasks.promote.settings import GateSettings
from near2_tasks.section import Section
from near2_tasks.serving.settings import ElasticsearchSettings, LocalElasticsearchSettings, ServingSettings
from near2_tasks.train.settings import ExamplesSettings, TrainingSettings


class AirflowSettings(Section):
    """The ``near2_retrain`` / ``near2_reindex`` DAGs: schedule, task policy, approval wait, run defaults.

    Read when the DAG files are parsed (schedule, retries) and when a task runs (the rest). A DAG run's
    ``params`` override settings for that run only (auto-approval defaults to ``gates.auto_approve``).
    """

    schedule: str | None = Field("0 3 * * 1", description="Cron (UTC) of near2_retrain; None: asset-triggered only.")
    owner: str = "near2"
    retries: int = Field(2, ge=0)
    retry_delay_s: float = Field(120.0, ge=0)
    task_timeout_s: float = Field(6 * 3600.0, gt=0, description="execution_timeout of every task.")
    approval_timeout_s: float = Field(7 * 24 * 3600.0, gt=0, description="How long to wait for a reviewer.")
    approval_poke_interval_s: float = Field(300.0, gt=0, description="How often the approval tag is read.")
    smoke_queries: list[str] = Field(
        default_factory=list, description="Queries the smoke search sends; empty: a few from the judgments."
    )
    mlflow_ui_url: str | None = Field(
        None, description="Base URL of the MLflow UI for task links; None: the tracking URI if it is http(s), "
                          "else http://127.0.0.1:5000 (`mlflow server` default).")
    elasticsearch_ui_url: str | None = Field(
        None, description="Base URL for the index link (e.g. Kibana); None: the Elasticsearch URL itself.")
    dags_folder: Path | None = Field(None, description="None: the dags/ folder next to the near2_tasks package.")
    train_queue: str = Field(
        "default", description="Airflow queue of near2_retrain's train task: 'default' (every worker) or, in the "
                               "compose cluster profile, 'gpu' (the worker that consumes it). Read at parse time.")
    encode_shards: int = Field(
        1, ge=1, description="Slices the catalog is encoded and bulk-loaded in, one mapped encode_shard task "
        "each (product_id's stable hash mod N), all into the same new index; verify and swap wait for every "
        "shard, and a failed shard retries alone. Read when the DAG files are parsed (the number of mapped "
        "tasks). 1: one task encodes and loads the whole catalog.")


class DemoSettings(Section):
    """``near2 demo``: sizes that let the whole pipeline run in a few minutes on 2 CPU cores."""

    products: int = Field(1000, gt=0, description="Synthetic catalog size.")
    queries: int = Field(600, gt=0, description="Synthetic queries (about 10% are held out for the gate).")
    max_steps: int = Field(40, gt=0, description="Training steps (the real MiniLM, CPU).")
    val_corpus_size: int = Field(
        300, gt=0, description="Validation corpus while training (each validation encodes it once per dim).")
    gate_max_drop: float = Field(
        0.01, ge=0, description="NDCG@10 drop the demo's gate tolerates at any dimension (default gate: 0), so "
                                "that re-running the demo against its own earlier champion cannot fail on noise.")
    weak_positives_in_triplets: bool = Field(
        False, description="examples.weak_positives_in_triplets for the demo. Measured on the demo catalog (49 "
                           "held-out queries, 40 steps): True lowered graded NDCG@10 by 0.02-0.05 at every "
                           "dimension, False raised it by 0.007-0.03.")


class Settings(BaseSettings):
    """All of near2's configuration."""

    model_config = SettingsConfigDict(
        env_prefix="NEAR2_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    home: Path = Field(default_factory=lambda: Path("~/.near2"))
    # data/: what is read, and how it is checked
    dataset: DatasetSettings = Field(default_factory=DatasetSettings)
    validation: ValidationSettings = Field(default_factory=ValidationSettings)

    # models/ and train/: the encoder, its registry, the examples it learns from and how
    model: ModelSettings = Field(default_factory=ModelSettings)
    mlflow: MLflowSettings = Field(default_factory=MLflowSettings)
    examples: ExamplesSettings = Field(default_factory=ExamplesSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)

    # evaluate/ and promote/: measured per dimension, gated against the champion
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    gates: GateSettings = Field(default_factory=GateSettings)

    # serving/: the index, the search service, the local server of tests and the demo
    elasticsearch: ElasticsearchSettings = Field(default_factory=ElasticsearchSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    local_elasticsearch: LocalElasticsearchSettings = Field(default_factory=LocalElasticsearchSettings)

    # orchestration (this module)
    airflow: AirflowSettings = Field(default_factory=AirflowSettings)
    demo: DemoSettings = Field(default_factory=DemoSettings)

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        return home.expanduser().resolve()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # environment beats explicit arguments (which carry the YAML file), which beat defaults
        return env_settings, init_settings

    # ----- derived locations -------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def artifact_location(self) -> str:
        return self.mlflow.artifact_location or (self.home / "mlartifacts").as_uri()


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from an optional YAML file (or ``NEAR2_CONFIG``), env vars and overrides.

    Raises Near2Error with the offending key when the file or a value is invalid.
    """
    from pydantic import ValidationError

    data: dict[str, Any] = {}
    path = config_file or os.environ.get("NEAR2_CONFIG")
    if path:
        path = Path(path)
        if not path.is_file():
            raise Near2Error(f"config file {path} does not exist", hint="pass --config with an existing YAML file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise Near2Error(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise Near2Error(f"config file {path} must hold a mapping at the top level")
        data.update(loaded)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    try:
        return Settings(**data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise Near2Error(f"invalid configuration: {problems}") from exc
