"""The serving stage's steps: build the champion's versioned index (sharded), verify it, move the alias, smoke-test it;
and, for near2_reindex, whether a rebuild is needed."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from near2_tasks import conventions
from near2_tasks.data.step import accepted
from near2_tasks.errors import Near2Error
from near2_tasks.models.registry import mlflow_version_url
from near2_tasks.promote.promotion import champion_version, not_served_reason, registered_version
from near2_tasks.run import Result, StepContext, record, skip_rest

if TYPE_CHECKING:
    from near2_tasks.config import Settings

log = logging.getLogger(__name__)


def index_url(settings: Settings, index: str) -> str:
    from near2_tasks.serving.es_client import redact_url

    base = settings.airflow.elasticsearch_ui_url or redact_url(settings.elasticsearch.url)
    return f"{base.rstrip('/')}/{index}"


def _index_state(ctx: StepContext, model: Result) -> dict[str, Any]:
    """The new index's name and the alias target it replaces, chosen once per run (``index/state.json``):
    a retry finishes the same index instead of starting another."""
    from near2_tasks.serving import index as idx
    from near2_tasks.serving.alias import current_target
    from near2_tasks.serving.es_client import es_errors, make_client

    settings = ctx.settings
    state_path = ctx.run_dir / "index" / "state.json"
    if state_path.exists():
        return json.loads(state_path.read_text())
    client = make_client(settings)
    with es_errors(settings.elasticsearch.url, "reading the alias"):
        current = current_target(client, settings.elasticsearch.alias)
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
    from near2_tasks.serving import index as idx
    from near2_tasks.models.embeddings import check_dims, encode_cached, model_dimension
    from near2_tasks.models.refs import embedding_cache_dir, resolve_model

    settings = ctx.settings
    shards = int(shards or settings.airflow.encode_shards)
    if shards < 1:
        raise Near2Error(f"shards must be >= 1, got {shards}", hint="set airflow.encode_shards to 1 or more")
    products = idx.prepare_products(accepted(validation)[0])
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
    return record(ctx, "create_index", {
        "index": created.name, "model_version": str(model["model_version"]), "model_uri": created.meta["model_uri"],
        "dims": created.meta["dims"], "shards": shards, "expected_current": state["expected_current"],
        "links": {"Elasticsearch index": index_url(settings, created.name)},
    })


def encode_shard(ctx: StepContext, validation: Result, created: Result, shard: int) -> Result:
    """Encode one slice of the catalog (products whose stable hash of ``product_id`` mod
    ``created["shards"]`` is ``shard``) with the model named in the new index's ``_meta``, and bulk-load it
    into that index. Documents are keyed by ``product_id``: a retried shard overwrites what its failed
    attempt wrote. Vectors the evaluation cached for this model and catalog are reused."""
    from near2_tasks.serving import index as idx
    from near2_tasks.models.embeddings import cached_encoding, encode_cached
    from near2_tasks.serving.es_client import make_client
    from near2_tasks.models.refs import embedding_cache_dir, resolve_model

    settings = ctx.settings
    name, shards, shard = created["index"], int(created["shards"]), int(shard)
    products = idx.prepare_products(accepted(validation)[0])
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
    return record(ctx, f"encode_shard_{shard}", {
        "index": name, "shard": shard, "shards": shards, "documents": sent, "model_uri": meta["model_uri"],
        "reused_cached_vectors": whole is not None,
        "links": {"Elasticsearch index": index_url(settings, name)},
    })


def finalize_index(ctx: StepContext, validation: Result, created: Result, loaded: list[Result]) -> Result:
    """After every shard loaded: serving settings, refresh, force-merge (``elasticsearch.force_merge``),
    documents no longer in the catalog removed, and the count must be the catalog's."""
    from near2_tasks.serving import index as idx

    settings = ctx.settings
    name, shards = created["index"], int(created["shards"])
    done = {int(result["shard"]) for result in loaded if result and result.get("index") == name}
    missing = sorted(set(range(shards)) - done)
    if missing:
        raise Near2Error(f"shards {missing} of {shards} have not loaded {name}", hint="re-run those encode_shard tasks")
    products = idx.prepare_products(accepted(validation)[0])
    built = idx.finalize_index(settings, name, products)
    weights: dict[str, float] = {}
    judgments = accepted(validation)[1]
    if settings.evaluation.tune_hybrid and not judgments.empty:
        # the hybrid linear weight per dim, measured on the validation split, into _meta before the swap
        from near2_tasks.train.examples import configured_splits
        from near2_tasks.serving.hybrid_tuning import tune_weights

        tuned = tune_weights(settings, built.name, products, configured_splits(settings, judgments).validation)
        weights = {str(d): w for d, w in tuned.weights.items()}
    return record(ctx, "finalize_index", {
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
    return record(ctx, "build_index", finalize_index(ctx, validation, created, loaded))


def verify_index(ctx: StepContext, validation: Result, built: Result) -> Result:
    """Check the new index (counts, every dimension answers, products find themselves) and mark it verified."""
    from near2_tasks.serving import index as idx
    from near2_tasks.serving.verify import verify_index

    settings = ctx.settings
    products = idx.prepare_products(accepted(validation)[0])
    report = verify_index(settings, built["index"], products)
    return record(ctx, "verify_index", {
        "index": built["index"], "documents": report.actual_count, "self_hit_rate": report.self_hit_rate,
        "verification": report.to_dict(),
        "links": {"Elasticsearch index": index_url(settings, built["index"])},
    })


def swap_alias(ctx: StepContext, built: Result) -> Result:
    """Point the serving alias at the verified index (compare-and-swap), then prune old indices.

    Only the champion's index is served, even with two runs at once: a run whose model is no longer the
    champion (a later run promoted another version) ends here, "not served", leaving the alias alone.
    (``near2 index --force`` starts its run with ``serve_non_champion``: then it is served, with a warning.)
    If another run moved the alias after this one read it (AliasChanged) to an index whose model is not
    the champion, while this run's model is, the swap is retried against that new target.
    """
    from near2_tasks.serving.alias import prune_indices, swap_to_champion_index
    from near2_tasks.serving.es_client import make_client

    settings = ctx.settings
    alias, new, version = settings.elasticsearch.alias, built["index"], str(built["model_version"])
    client = make_client(settings)
    champion = champion_version(settings)
    refusal = not_served_reason(champion, registered_version(settings, built["model_uri"]))
    if refusal is not None and not ctx.params.serve_non_champion:
        skip_rest(f"not served: {refusal}; the alias {alias} was left where it is")
    if refusal is not None:
        log.warning("serving %s on %s although %s (serve_non_champion)", built["model_uri"], alias, refusal)
    previous = swap_to_champion_index(client, alias, new, built["expected_current"], version, champion)
    deleted = prune_indices(settings, client)
    return record(ctx, "swap_alias", {
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
    products, judgments = accepted(validation)
    if not judgments.empty:
        return judgments["query"].astype(str).drop_duplicates().head(n).tolist()
    return products["title"].astype(str).head(n).tolist()


def smoke_search(ctx: StepContext, validation: Result, swapped: Result) -> Result:
    """Storefront queries through the alias at several dimensions: each must return products from the
    new index, encoded by the model named in its ``_meta``."""
    from near2_tasks.serving.search import search

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
    return record(ctx, "smoke_search", {"index": swapped["index"], "answers": answers})


def reindex_needed(ctx: StepContext, validation: Result) -> Result:
    """The champion to index with, and whether the alias already serves it on this catalog."""
    from near2_tasks.models import registry
    from near2_tasks.serving.alias import index_status

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
    result = record(ctx, "reindex_needed", {
        "needed": ctx.params.force or not up_to_date, "serving": target, "model_version": champion,
        "model_uri": registry.model_uri(settings, champion), "run_id": version.run_id,
        "links": {"MLflow model version": mlflow_version_url(settings, champion)},
    })
    if not result["needed"]:
        log.info("alias %s already serves champion v%s on catalog %s (%s): nothing to do; trigger with "
                 "force=true to rebuild anyway", settings.elasticsearch.alias, champion,
                 validation["catalog_version"], target)
    return result

