"""What every pipeline step shares: run parameters, the step context, step records, and where each step lives.

The steps themselves live with their stage (``data/step.py``, ``train/step.py``, ``evaluate/step.py``,
``promote/step.py``, ``serving/step.py``); :data:`STEPS` maps an Airflow task name to its step, and the
CLI commands call the same functions.

``near2_retrain``::

    validate -> mine_examples -> train -> evaluate -> gate -> wait_for_approval -> promote
             -> create_index -> encode_shard x N -> finalize_index -> verify_index -> swap_alias -> smoke_search

``near2_reindex``::

    validate -> reindex_needed -> create_index -> encode_shard x N -> finalize_index -> verify_index
             -> swap_alias -> smoke_search

(``encode_shard`` is one mapped task per shard, ``airflow.encode_shards`` of them; :func:`build_index`
runs the three index steps in one process.)

Every step takes a :class:`StepContext` (settings, run params, run id) and the small dicts earlier
steps returned, and returns a small dict of paths, URIs and ids: large objects stay on disk under the
run's directory (``<home>/runs/<dag_id>/<run_id>/``), never in XCom. Each result is also written to
``steps/<step>.json`` there, which is what ``near2 demo`` summarises.

Every step is idempotent — re-running it after a failure converges to the state of a clean run
(ARCHITECTURE.md invariant 5): outputs are rewritten in place, training is keyed by the run (``run_key``:
a second attempt returns the version the first one registered), the index name is chosen once per
run and reused (documents are keyed by ``product_id``), and promotion and the alias swap are no-ops
when already done.

Nothing here imports Airflow; :mod:`near2_tasks.airflow_support` maps outcomes onto Airflow. A run can
end early without an error: a failed gate returns ``passed: False`` (the DAG's short-circuit skips the
rest), and a step that must not go on (a rejected challenger, a model that is no longer the champion)
calls :func:`skip_rest`, which becomes a skipped task and skipped downstream tasks.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from near2_tasks.errors import Near2Error

if TYPE_CHECKING:
    from near2_tasks.config import Settings

Result = dict[str, Any]

#: Airflow task (step) name -> the stage module whose function of that name runs it.
STEPS: dict[str, str] = {
    "validate": "near2_tasks.data.step",
    "mine_examples": "near2_tasks.train.step",
    "train": "near2_tasks.train.step",
    "evaluate": "near2_tasks.evaluate.step",
    "gate": "near2_tasks.promote.step",
    "approval_status": "near2_tasks.promote.step",
    "promote": "near2_tasks.promote.step",
    "reindex_needed": "near2_tasks.serving.step",
    "create_index": "near2_tasks.serving.step",
    "encode_shard": "near2_tasks.serving.step",
    "finalize_index": "near2_tasks.serving.step",
    "build_index": "near2_tasks.serving.step",
    "verify_index": "near2_tasks.serving.step",
    "swap_alias": "near2_tasks.serving.step",
    "smoke_search": "near2_tasks.serving.step",
}


def step_function(name: str) -> Callable[..., Result]:
    """The step called ``name`` (imported on first use, so parsing a DAG stays light)."""
    if name not in STEPS:
        raise Near2Error(f"unknown pipeline step {name!r}", hint=f"known steps: {sorted(STEPS)}")
    return getattr(importlib.import_module(STEPS[name]), name)


# ----- what every step gets -------------------------------------------------------------------------
@dataclass(frozen=True)
class RunParams:
    """The run-level parameters a user may override when triggering a DAG (None: from settings)."""

    config_file: str | None = None
    catalog_path: str | None = None
    judgments_path: str | None = None
    dataset_format: str | None = None
    dims: list[int] | None = None
    epochs: float | None = None
    max_steps: int | None = None
    auto_approve: bool | None = None
    force: bool = False  # near2_reindex: rebuild even when the alias already serves the champion
    serve_non_champion: bool = False  # swap_alias: serve a model that is not the champion (`near2 index --force`)

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any] | None) -> RunParams:
        params = dict(params or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise Near2Error(f"unknown run parameter(s) {unknown}", hint=f"known parameters: {sorted(known)}")
        values = {k: v for k, v in params.items() if v is not None and v != ""}
        if "dims" in values:
            values["dims"] = [int(d) for d in values["dims"]]
        return cls(**values)


@dataclass(frozen=True)
class StepContext:
    """What a step needs to know about its run."""

    settings: Settings
    params: RunParams = field(default_factory=RunParams)
    run_id: str = "manual"
    dag_id: str = "near2_retrain"

    @property
    def run_dir(self) -> Path:
        return run_directory(self.settings, self.dag_id, self.run_id)

    @property
    def run_key(self) -> str:
        """Idempotency key of this run's registrations (the MLflow version tag ``run_key``)."""
        return f"{self.dag_id}/{self.run_id}"


class SkipRest(Near2Error):
    """Not an error: the run ends here, deliberately, and the steps after this one do not run."""

    exit_code = 0


def skip_rest(reason: str) -> None:
    raise SkipRest(reason)


def run_directory(settings: Settings, dag_id: str, run_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id).strip("_") or "run"
    return settings.home / "runs" / dag_id / safe


def with_section(settings: Settings, name: str, values: Mapping[str, Any]) -> Settings:
    """``settings`` with some keys of one section replaced, validated like the section itself."""
    from pydantic import ValidationError

    section = getattr(settings, name)
    try:
        updated = type(section).model_validate({**section.model_dump(), **values})
    except ValidationError as exc:
        problems = "; ".join(f"{name}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise Near2Error(f"invalid run settings: {problems}") from exc
    return settings.model_copy(update={name: updated})


def settings_for_run(params: RunParams, connections: Mapping[str, Mapping[str, Any]] | None = None) -> Settings:
    """Settings of one run: the config file (``params.config_file``, else ``NEAR2_CONFIG``) and ``NEAR2_*``
    variables, then the Airflow connections, then the run params, which win over everything."""
    from near2_tasks.config import load_settings

    settings = load_settings(params.config_file)
    for section, values in (connections or {}).items():
        settings = with_section(settings, section, values)
    dataset: dict[str, Any] = {}
    if params.catalog_path:
        dataset["catalog_path"] = params.catalog_path
    if params.judgments_path:
        dataset["judgments_path"] = params.judgments_path
    if params.dataset_format:
        dataset["format"] = params.dataset_format
    if dataset:
        settings = with_section(settings, "dataset", dataset)
    if params.dims:
        settings = with_section(settings, "model", {"dims": params.dims})
    training = {k: v for k, v in (("epochs", params.epochs), ("max_steps", params.max_steps)) if v is not None}
    if training:
        settings = with_section(settings, "training", training)
    if params.auto_approve is not None:
        settings = with_section(settings, "gates", {"auto_approve": params.auto_approve})
    return settings



# ----- step records ----------------------------------------------------------------------------------
def record(ctx: StepContext, step: str, result: Result) -> Result:
    path = ctx.run_dir / "steps" / f"{step}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def read_step(run_dir: Path, step: str) -> Result | None:
    """A step's recorded result, or None when that step did not finish in this run."""
    path = Path(run_dir) / "steps" / f"{step}.json"
    return json.loads(path.read_text()) if path.exists() else None

