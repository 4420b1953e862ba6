"""The steps of the near2 DAGs: one function per Airflow task, glued from the stage modules.

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

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from near2_tasks import conventions
from near2_tasks.errors import Near2Error
from near2_tasks.promotion import champion_version, not_served_reason
from near2_tasks.registry import mlflow_run_url, mlflow_version_url

if TYPE_CHECKING:
    import pandas as pd

    from near2_tasks.config import Settings

log = logging.getLogger(__name__)

Result = dict[str, Any]


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


# ----- small helpers ---------------------------------------------------------------------------------
def _record(ctx: StepContext, step: str, result: Result) -> Result:
    path = ctx.run_dir / "steps" / f"{step}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def read_step(run_dir: Path, step: str) -> Result | None:
    """A step's recorded result, or None when that step did not finish in this run."""
    path = Path(run_dir) / "steps" / f"{step}.json"
    return json.loads(path.read_text()) if path.exists() else None


def index_url(settings: Settings, index: str) -> str:
    from near2_tasks.es_client import redact_url

    base = settings.airflow.elasticsearch_ui_url or redact_url(settings.elasticsearch.url)
    return f"{base.rstrip('/')}/{index}"


def _accepted(validation: Result) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The accepted products (with the ``text`` every stage embeds) and judgments of the validate step."""
    from near2_tasks.validate import load_accepted

    accepted = load_accepted(Path(validation["report_dir"]))
    return accepted.products, accepted.judgments


def _read_frame(path: Path) -> pd.DataFrame:
    import pandas as pd

    return pd.read_parquet(path)


# ----- near2_retrain ---------------------------------------------------------------------------------
def validate(ctx: StepContext) -> Result:
    """Validate the catalog and judgments (Great Expectations); stop the run on bad data.

    Without ``dataset.catalog_path`` the embedded synthetic catalog is generated and validated.
    """
    from near2_tasks.validate import validate_dataset

    settings = ctx.settings
    result = validate_dataset(settings, settings.dataset.catalog_path, settings.dataset.judgments_path,
                              report_dir=ctx.run_dir / "validation")
    log.info("validation passed: %d products, %d judgments accepted (dataset %s)", len(result.products),
             len(result.judgments), result.dataset_version)
    return _record(ctx, "validate", {
        "inputs": result.report.get("inputs"), "report_dir": str(ctx.run_dir / "validation"),
        "report_path": str(result.report_path), "dataset_version": result.dataset_version,
        "catalog_version": result.catalog_version, "products": len(result.products),
        "judgments": len(result.judgments),
    })


def mine_examples(ctx: StepContext, validation: Result) -> Result:
    """Split the judgments by query (train / validation / test) and mine the graded training examples.

    Hard negatives are also mined with the base model; its catalog embeddings are cached under the same
    key the evaluation uses, so the catalog is encoded by it once per run (once ever for the default model).
    """
    from near2_tasks import examples as ex
    from near2_tasks.evaluate import resolve_model

    settings = ctx.settings
    products, judgments = _accepted(validation)
    if judgments.empty:
        raise Near2Error("no accepted judgments: training needs graded query-product judgments",
                         hint="set dataset.judgments_path (or the run param judgments_path)")
    splits = ex.configured_splits(settings, judgments)
    base = resolve_model(settings, settings.model.base_model)
    mined = ex.mine_examples(products, splits.train, settings, model=base.load_ref, model_key=base.cache_key)
    out = ctx.run_dir / "examples"
    paths = ex.write_examples(out, splits, mined, extra={"dataset_version": validation["dataset_version"]})
    return _record(ctx, "mine_examples", {
        "examples_dir": str(out), "paths": {name: str(path) for name, path in paths.items()},
        "triplets": len(mined.triplets), "pairs": len(mined.pairs), "splits": splits.sizes,
    })


@dataclass(frozen=True)
class _Examples:
    """What ``train_model`` reads from mined examples (the frames ``write_examples`` wrote)."""

    triplets: pd.DataFrame
    pairs: pd.DataFrame
    counts: dict[str, Any]


def _split(examples: Result, name: str) -> pd.DataFrame:
    return _read_frame(Path(examples["paths"][f"{name}_judgments"]))


def train(ctx: StepContext, validation: Result, examples: Result) -> Result:
    """Fine-tune (NEAR² objective), log to MLflow and register the ``challenger`` (once per run)."""
    from near2_tasks import examples as ex
    from near2_tasks.train import train_model

    settings = ctx.settings
    products, _ = _accepted(validation)
    paths = examples["paths"]
    manifest = json.loads(Path(paths["manifest"]).read_text())
    mined = _Examples(triplets=_read_frame(Path(paths["triplets"])), pairs=_read_frame(Path(paths["pairs"])),
                      counts=manifest.get("counts", {}))
    validation_data = ex.ir_eval_data(products, _split(examples, "validation"), settings.dataset.relevant_threshold)
    result = train_model(settings, mined, validation_data, validation["dataset_version"],
                         output_dir=ctx.run_dir / "model", epochs=settings.training.epochs,
                         max_steps=settings.training.max_steps, run_key=ctx.run_key,
                         reports={"examples": manifest})
    return _record(ctx, "train", {
        "run_id": result.run_id, "model_version": result.model_version, "model_uri": result.model_uri,
        "model_dir": str(result.output_dir), "val_metrics": result.val_metrics,
        "links": {"MLflow run": mlflow_run_url(settings, result.run_id),
                  "MLflow model version": mlflow_version_url(settings, result.model_version)},
    })


def evaluate(ctx: StepContext, validation: Result, examples: Result, trained: Result) -> Result:
    """Evaluate the challenger, the champion (if any) and the base model per dimension on the held-out
    test queries; the challenger's report (with the others as references) goes to its MLflow run."""
    from near2_tasks.evaluate import log_evaluation, write_report
    from near2_tasks.gates import evaluate_with_references, reference_role

    settings = ctx.settings
    products, _ = _accepted(validation)
    test = _split(examples, "test")
    version = str(trained["model_version"])
    out = ctx.run_dir / "evaluation"
    dims = settings.model.dims
    challenger, champion = evaluate_with_references(settings, trained["model_uri"], version, products, test, dims)
    references = challenger.references
    files = write_report(challenger, out / "report.json")
    log_evaluation(settings, challenger, files)
    return _record(ctx, "evaluate", {
        "report": str(files.json), "plot": str(files.plot),
        "reference": reference_role(challenger), "champion_version": champion,
        "ndcg_at_10": {label: {str(d): report.dims[d].get("ndcg@10") for d in dims}
                       for label, report in {"challenger": challenger, **references}.items()},
        "links": {"MLflow run": mlflow_run_url(settings, trained["run_id"]),
                  "MLflow model version": mlflow_version_url(settings, version)},
    })


def gate(ctx: StepContext, trained: Result, evaluation: Result) -> Result:
    """Apply ``settings.gates`` per dimension against the champion (or the base model) and record the
    decision on the version (tags ``gate.dim_<d>.<metric>``, ``gate``; the summary on its page).

    A failed gate ends the run as "not promoted": the reasons go to this log and to MLflow, and the
    DAG skips everything after this step, so neither the champion nor the alias moves.
    """
    from near2_tasks import gates
    from near2_tasks.evaluate import EvaluationReport

    settings = ctx.settings
    version = str(trained["model_version"])
    challenger = EvaluationReport.read_json(Path(evaluation["report"]))
    role = evaluation["reference"]
    reference = challenger.references[role]
    decision = gates.decide(challenger, reference, settings.gates, reference_role=role)
    gates.record_decision(settings, version, decision, challenger)
    (ctx.run_dir / "evaluation" / "gate.md").write_text(decision.markdown())
    if decision.passed:
        log.info("gate passed: challenger v%s against the %s (%s)", version, role, reference.display_name)
    else:
        log.warning("not promoted: challenger v%s failed the gate against the %s:\n  %s", version, role,
                    "\n  ".join(decision.reasons))
    return _record(ctx, "gate", {
        "passed": decision.passed, "status": decision.status, "reference": reference.display_name,
        "reference_role": role, "reasons": decision.reasons, "model_version": version,
        "summary": str(ctx.run_dir / "evaluation" / "gate.md"),
        "links": {"MLflow model version": mlflow_version_url(settings, version),
                  "MLflow run": mlflow_run_url(settings, trained["run_id"])},
    })


def approval_status(ctx: StepContext, trained: Result) -> Result:
    """The challenger's approval: ``auto`` (auto-approval on), ``approved``, ``rejected`` or ``pending``
    (the reviewer sets the version tag ``approval`` in the MLflow UI, or runs ``near2 approve``)."""
    from near2_tasks import promotion

    status = promotion.promotion_status(ctx.settings, trained["model_version"])
    state = "auto" if status.auto_approved else status.approval
    if state == conventions.PENDING:
        log.info("waiting: %s", status.reason)
    return _record(ctx, "approval", {"state": state, "model_version": status.version, "reason": status.reason})


def promote(ctx: StepContext, trained: Result) -> Result:
    """Make the challenger the champion; :func:`near2_tasks.promotion.promote` refuses unless its gate
    passed and it is approved (ARCHITECTURE.md invariant 2). A rejected challenger ends the run here."""
    from near2_tasks import promotion

    settings, version = ctx.settings, str(trained["model_version"])
    status = promotion.promotion_status(settings, version)
    if status.approval == conventions.REJECTED:
        skip_rest(f"not promoted: {status.reason}")
    move = promotion.promote(settings, version)
    if not move.moved:
        log.info("version %s is already the champion", version)
    return _record(ctx, "promote", {
        "model_version": version, "model_uri": trained["model_uri"], "run_id": trained["run_id"],
        "previous_champion": move.previous, "moved": move.moved,
        "links": {"MLflow model version": mlflow_version_url(settings, version),
                  "MLflow run": mlflow_run_url(settings, trained["run_id"])},
    })


def _index_state(ctx: StepContext, model: Result) -> dict[str, Any]:
    """The new index's name and the alias target it replaces, chosen once per run (``index/state.json``):
    a retry finishes the same index instead of starting another."""
    from near2_tasks import index as idx
    from near2_tasks.es_client import es_errors, make_client

    settings = ctx.settings
    state_path = ctx.run_dir / "index" / "state.json"
    if state_path.exists():
        return json.loads(state_path.read_text())
    client = make_client(settings)
    with es_errors(settings.elasticsearch.url, "reading the alias"):
        current = idx.current_target(client, settings.elasticsearch.alias)
    state = {"index": conventions.index_name(settings.elasticsearch.alias, idx.safe_version(model["model_version"])),
             "expected_current": current}
    state_path.parent.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps(state, indent=2) + "\n")
    return state


def create_index(ctx: StepContext, validation: Result, model: Result, shards: int | None = None) -> Result:
    """Create the run's new versioned index, empty: the mapping, and ``_meta`` naming ``model`` (the
    champion), the dims, the catalog version and the bit codes' centre (from the centre sample,
    ``elasticsearch.binary_centre_sample_size``). ``shards`` (default ``airflow.encode_shards``): how many
    :func:`encode_shard` steps load it; the DAG passes the number of its mapped tasks."""
    from near2_tasks import index as idx
    from near2_tasks.embeddings import check_dims, encode_cached, model_dimension
    from near2_tasks.evaluate import embedding_cache_dir, resolve_model

    settings = ctx.settings
    shards = int(shards or settings.airflow.encode_shards)
    if shards < 1:
        raise Near2Error(f"shards must be >= 1, got {shards}", hint="set airflow.encode_shards to 1 or more")
    products = idx.prepare_products(_accepted(validation)[0])
    state = _index_state(ctx, model)
    dims = list(settings.model.dims)
    resolved = resolve_model(settings, model["model_uri"])
    # loaded here once (an inference backend missing next to the model is exported now, not by N shards
    # at once), and the dims are checked before anything is created
    encoder = idx.load_meta_model(settings, resolved.load_ref)
    check_dims(dims, model_dimension(encoder))
    centres = {}
    if idx.coded_dims(settings, dims):
        sample = idx.centre_sample_positions(products, settings.elasticsearch.binary_centre_sample_size)
        # the whole catalog (up to the sample size): the evaluation's cached vectors when it encoded it
        vectors = encode_cached(encoder, resolved.cache_key, products.text.iloc[sample].tolist(),
                                embedding_cache_dir(settings), batch_size=settings.model.encode_batch_size)
        centres = idx.binary_centres(settings, dims, vectors)
    created = idx.create_index(settings, model["model_uri"], products, model["model_version"],
                               run_id=model.get("run_id"), catalog_version=validation["catalog_version"], dims=dims,
                               centres=centres, index_name=state["index"])
    log.info("created %s for %s (dims %s); %d shard%s will load it", created.name, created.meta["model_uri"], dims,
             shards, "" if shards == 1 else "s")
    return _record(ctx, "create_index", {
        "index": created.name, "model_version": str(model["model_version"]), "model_uri": created.meta["model_uri"],
        "dims": created.meta["dims"], "shards": shards, "expected_current": state["expected_current"],
        "links": {"Elasticsearch index": index_url(settings, created.name)},
    })


def encode_shard(ctx: StepContext, validation: Result, created: Result, shard: int) -> Result:
    """Encode one slice of the catalog (products whose stable hash of ``product_id`` mod
    ``created["shards"]`` is ``shard``) with the model named in the new index's ``_meta``, and bulk-load it
    into that index. Documents are keyed by ``product_id``: a retried shard overwrites what its failed
    attempt wrote. Vectors the evaluation cached for this model and catalog are reused."""
    from near2_tasks import index as idx
    from near2_tasks.embeddings import cached_encoding, encode_cached
    from near2_tasks.es_client import make_client
    from near2_tasks.evaluate import embedding_cache_dir, resolve_model

    settings = ctx.settings
    name, shards, shard = created["index"], int(created["shards"]), int(shard)
    products = idx.prepare_products(_accepted(validation)[0])
    positions = idx.shard_positions(products, shard, shards)
    client = make_client(settings)
    meta = idx.index_meta(settings, name, client)
    if meta.get("model_uri") != created["model_uri"]:
        raise Near2Error(f"index {name} names {meta.get('model_uri')} in its _meta, this run created it for "
                         f"{created['model_uri']}", hint="another run replaced the index; re-run create_index")
    resolved = resolve_model(settings, meta["model_uri"])
    encoder = idx.load_meta_model(settings, resolved.load_ref)
    cache = embedding_cache_dir(settings)
    whole = cached_encoding(encoder, resolved.cache_key, products.text.tolist(), cache)
    if whole is not None:
        vectors, source = whole[positions], "the cached catalog vectors"
    else:
        vectors = encode_cached(encoder, resolved.cache_key, products.text.iloc[positions].tolist(), cache,
                                batch_size=settings.model.encode_batch_size)
        source = "encoded"
    sent = idx.load_shard(settings, name, products.iloc[positions].reset_index(drop=True), vectors,
                          client=client, meta=meta)
    log.info("shard %d of %d: %d products (%s) with %s loaded into %s", shard, shards, sent, source,
             meta["model_uri"], name)
    return _record(ctx, f"encode_shard_{shard}", {
        "index": name, "shard": shard, "shards": shards, "documents": sent, "model_uri": meta["model_uri"],
        "reused_cached_vectors": whole is not None,
        "links": {"Elasticsearch index": index_url(settings, name)},
    })


def finalize_index(ctx: StepContext, validation: Result, created: Result, loaded: list[Result]) -> Result:
    """After every shard loaded: serving settings, refresh, force-merge (``elasticsearch.force_merge``),
    documents no longer in the catalog removed, and the count must be the catalog's."""
    from near2_tasks import index as idx

    settings = ctx.settings
    name, shards = created["index"], int(created["shards"])
    done = {int(result["shard"]) for result in loaded if result and result.get("index") == name}
    missing = sorted(set(range(shards)) - done)
    if missing:
        raise Near2Error(f"shards {missing} of {shards} have not loaded {name}", hint="re-run those encode_shard tasks")
    products = idx.prepare_products(_accepted(validation)[0])
    built = idx.finalize_index(settings, name, products)
    weights: dict[str, float] = {}
    judgments = _accepted(validation)[1]
    if settings.evaluation.tune_hybrid and not judgments.empty:
        # the hybrid linear weight per dim, measured on the validation split, into _meta before the swap
        from near2_tasks.examples import configured_splits
        from near2_tasks.hybrid_tuning import tune_weights

        tuned = tune_weights(settings, built.name, products, configured_splits(settings, judgments).validation)
        weights = {str(d): w for d, w in tuned.weights.items()}
    return _record(ctx, "finalize_index", {
        "index": built.name, "documents": built.count, "model_version": created["model_version"],
        "model_uri": built.meta["model_uri"], "dims": built.meta["dims"], "shards": shards,
        "hybrid_weights": weights,
        "expected_current": created["expected_current"],
        "links": {"Elasticsearch index": index_url(settings, built.name)},
    })


def build_index(ctx: StepContext, validation: Result, model: Result) -> Result:
    """:func:`create_index` -> :func:`encode_shard` for each of the ``airflow.encode_shards`` shards, one
    after another -> :func:`finalize_index`: what the DAG's tasks do, in one process. Same result and
    state as the DAG's tasks (a re-run finishes the same index)."""
    created = create_index(ctx, validation, model)
    loaded = [encode_shard(ctx, validation, created, shard) for shard in range(created["shards"])]
    return _record(ctx, "build_index", finalize_index(ctx, validation, created, loaded))


def verify_index(ctx: StepContext, validation: Result, built: Result) -> Result:
    """Check the new index (counts, every dimension answers, products find themselves) and mark it verified."""
    from near2_tasks import index as idx

    settings = ctx.settings
    products = idx.prepare_products(_accepted(validation)[0])
    report = idx.verify_index(settings, built["index"], products)
    return _record(ctx, "verify_index", {
        "index": built["index"], "documents": report.actual_count, "self_hit_rate": report.self_hit_rate,
        "links": {"Elasticsearch index": index_url(settings, built["index"])},
    })


def swap_alias(ctx: StepContext, built: Result) -> Result:
    """Point the serving alias at the verified index (compare-and-swap), then prune old indices.

    Only the champion's index is served, even with two runs at once: a run whose model is no longer the
    champion (a later run promoted another version) ends here, "not served", leaving the alias alone.
    If another run moved the alias after this one read it (AliasChanged) to an index whose model is not
    the champion, while this run's model is, the swap is retried against that new target.
    """
    from near2_tasks import index as idx
    from near2_tasks.es_client import make_client

    settings = ctx.settings
    alias, new, version = settings.elasticsearch.alias, built["index"], str(built["model_version"])
    client = make_client(settings)
    champion = champion_version(settings)
    refusal = not_served_reason(champion, version)
    if refusal is not None:
        skip_rest(f"not served: {refusal}; the alias {alias} was left where it is")
    previous = idx.swap_to_champion_index(client, alias, new, built["expected_current"], version, champion)
    deleted = idx.prune_indices(settings, client)
    return _record(ctx, "swap_alias", {
        "alias": alias, "index": new, "previous": previous, "deleted": deleted,
        "model_version": built["model_version"],
        "links": {"Elasticsearch index": index_url(settings, new)},
    })


def smoke_dims(dims: list[int]) -> list[int]:
    """Largest, a middle one and the smallest dimension: what the smoke search and the demo query at."""
    picked = [dims[0], dims[len(dims) // 2], dims[-1]]
    return sorted(set(picked), reverse=True)


def smoke_queries(ctx: StepContext, validation: Result, n: int = 3) -> list[str]:
    if ctx.settings.airflow.smoke_queries:
        return list(ctx.settings.airflow.smoke_queries)[:max(n, 1)]
    products, judgments = _accepted(validation)
    if not judgments.empty:
        return judgments["query"].astype(str).drop_duplicates().head(n).tolist()
    return products["title"].astype(str).head(n).tolist()


def smoke_search(ctx: StepContext, validation: Result, swapped: Result) -> Result:
    """Storefront queries through the alias at several dimensions: each must return products from the
    new index, encoded by the model named in its ``_meta``."""
    from near2_tasks.search import search

    settings = ctx.settings
    answers = []
    for query in smoke_queries(ctx, validation):
        for dim in smoke_dims(settings.model.dims):
            response = search(settings, query, k=5, dim=dim)
            if response.index != swapped["index"]:
                raise Near2Error(f"the alias {swapped['alias']} serves {response.index}, expected {swapped['index']}",
                                 hint="another run moved the alias; check `near2 index status`")
            if not response.hits:
                raise Near2Error(f"smoke search {query!r} at dim {dim} returned nothing from {response.index}")
            answers.append({"query": query, "dim": dim, "titles": [hit.title for hit in response.hits[:3]],
                            "took_ms": response.timings_ms.get("total")})
    return _record(ctx, "smoke_search", {"index": swapped["index"], "answers": answers})


# ----- near2_reindex ---------------------------------------------------------------------------------
def reindex_needed(ctx: StepContext, validation: Result) -> Result:
    """The champion to index with, and whether the alias already serves it on this catalog."""
    from near2_tasks import registry
    from near2_tasks.index import index_status

    settings = ctx.settings
    champion = champion_version(settings)
    if champion is None:
        raise Near2Error(f"registered model {settings.mlflow.registered_model!r} has no champion yet",
                         hint="run the near2_retrain DAG first (or `near2 promote`)")
    version = registry.get_version(settings, champion)
    status = index_status(settings)
    serving = next((info for info in status.indices if info.name == status.target), None)
    up_to_date = (serving is not None and serving.model_version == champion
                  and serving.catalog_version == validation["catalog_version"])
    target = status.target
    result = _record(ctx, "reindex_needed", {
        "needed": ctx.params.force or not up_to_date, "serving": target, "model_version": champion,
        "model_uri": registry.model_uri(settings, champion), "run_id": version.run_id,
        "links": {"MLflow model version": mlflow_version_url(settings, champion)},
    })
    if not result["needed"]:
        log.info("alias %s already serves champion v%s on catalog %s (%s): nothing to do; trigger with "
                 "force=true to rebuild anyway", settings.elasticsearch.alias, champion,
                 validation["catalog_version"], target)
    return result
