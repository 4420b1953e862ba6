"""``near2 index``: build, verify and swap a serving index; ``status``; ``rollback``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click

from near2_tasks.cli import cli_run, parse_dims, settings_from, show_progress


def choose_model(settings, model_ref: str | None, allowed: bool) -> dict[str, str | None]:
    """The model to index as a step result (``model_version``, ``model_uri``, ``run_id``): the champion
    unless told otherwise.

    Without ``--model``: the champion (pinned as ``models:/<name>/<N>``), or before the first promotion
    the base model (version ``0``). With ``--model``: that model, but the serving alias may point only at
    the champion's index (ARCHITECTURE.md, "Who may serve": the rule the DAG's swap step applies): any
    other model is refused before any work unless ``allowed`` (``--force``, or an ``--alias`` that is not
    the serving one).
    """
    from near2_tasks.errors import Near2Error
    from near2_tasks.models.registry import get_version, model_uri
    from near2_tasks.promote.promotion import champion_version, not_served_reason, registered_version

    champion = champion_version(settings)
    if model_ref is None:
        if champion is None:
            click.echo(f"no champion in {settings.mlflow.registered_model!r} yet: indexing the base model "
                       f"{settings.model.base_model}", err=True)
            return {"model_version": "0", "model_uri": settings.model.base_model, "run_id": None}
        model_ref, registered = model_uri(settings, champion), champion
    else:
        registered = registered_version(settings, model_ref)
    refusal = not_served_reason(champion, registered)
    if refusal is not None and not allowed:
        raise Near2Error(f"refusing to point the alias {settings.elasticsearch.alias} at an index of {model_ref}: "
                         f"{refusal}",
                         hint="omit --model to index the champion, promote this version first, "
                              "or pass --force to serve it anyway")
    if refusal is not None:
        click.echo(f"warning: serving {model_ref} on {settings.elasticsearch.alias}, although {refusal}", err=True)
    run_id = get_version(settings, registered).run_id if registered is not None else None
    return {"model_version": registered or "0", "model_uri": model_ref, "run_id": run_id}


@click.group("index", invoke_without_command=True)
@click.option("--model", "model_ref", help="Model: MLflow URI (models:/near2-encoder/3), directory, or a "
                                           "hub id (default: the champion; before the first promotion "
                                           "model.base_model).")
@click.option("--force", "--allow-non-champion", "force", is_flag=True,
              help="Serve a model that is not the champion (refused by default, as in the DAG).")
@click.option("--catalog", "catalog", type=click.Path(exists=True, path_type=Path),
              help="Catalog file or dataset directory (default: dataset.catalog_path, else the synthetic catalog).")
@click.option("--dims", callback=parse_dims, help="Comma-separated dimensions, descending (default: model.dims).")
@click.option("--model-version", help="Version recorded in the index name and _meta (default: from the URI).")
@click.option("--catalog-version", help="Catalog version for _meta (default: the validated catalog's version).")
@click.option("--alias", help="Alias to swap (default: elasticsearch.alias). Another alias than the serving "
                              "one may point at any model.")
@click.option("--tune-hybrid", is_flag=True,
              help="Before verification, tune the hybrid linear weight per dim on the validation split of the "
                   "judgments (--judgments, else the catalog dataset's own) and store it in the index _meta.")
@click.option("--judgments", "judgments_path", type=click.Path(exists=True, path_type=Path),
              help="Judgments, validated with the catalog: for --tune-hybrid and the smoke queries (default: "
                   "dataset.judgments_path, else the --catalog dataset's judgments).")
@click.option("--shards", type=click.IntRange(min=1), default=None,
              help="Encode and load the catalog in N slices (a stable hash of product_id mod N), one after "
                   "another, into the same index: what the DAG's mapped encode_shard tasks do in parallel "
                   "(airflow.encode_shards). Same index as one slice. Default 1.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def index(ctx: click.Context, model_ref, force, catalog, dims, model_version, catalog_version, alias,
          tune_hybrid, judgments_path, shards, as_json) -> None:
    """Build a new index with the champion, verify it, then move the alias to it (one atomic call).

    Runs the DAG's steps validate, build_index (create_index, encode_shard per shard, finalize_index),
    verify_index, swap_alias and smoke_search; their records go to <home>/runs/near2_index/<run id>/steps/.
    Subcommands: `status` lists indices, `rollback` moves the alias back.
    """
    if ctx.invoked_subcommand is not None:
        if any(v for v in (model_ref, force, catalog, dims, model_version, catalog_version,
                           tune_hybrid, judgments_path, shards)):
            raise click.UsageError("build options go before no subcommand: near2 index --model ... --catalog ...")
        ctx.obj = {**(ctx.obj or {}), "alias": alias}
        return
    from near2_tasks.data import step as data_step
    from near2_tasks.errors import Near2Error
    from near2_tasks.run import RunParams, SkipRest, settings_for_run, with_section
    from near2_tasks.serving import step as serving_step
    from near2_tasks.serving.index import index_meta

    show_progress()
    params = RunParams(config_file=ctx.find_root().obj.get("config_file"), catalog_path=str(catalog) if catalog else None,
                       judgments_path=str(judgments_path) if judgments_path else None, dims=dims)
    settings = settings_for_run(params)
    serving_alias = settings.elasticsearch.alias
    settings = with_section(settings, "elasticsearch", {"alias": alias or serving_alias})
    settings = with_section(settings, "evaluation", {"tune_hybrid": tune_hybrid})
    settings = with_section(settings, "airflow", {"encode_shards": shards or 1})
    allowed = force or settings.elasticsearch.alias != serving_alias
    model = choose_model(settings, model_ref, allowed)
    model["model_version"] = model_version or model["model_version"]
    run = cli_run(settings, replace(params, serve_non_champion=allowed), "near2_index")
    validation = data_step.validate(run)
    if tune_hybrid and not validation["judgments"]:
        raise Near2Error("--tune-hybrid needs judgments: none were accepted for this catalog",
                         hint="pass --judgments PATH")
    if catalog_version:
        validation = {**validation, "catalog_version": catalog_version}
    click.echo(f"indexing {validation['products']} products with {model['model_uri']} (version "
               f"{model['model_version']})" + (f" in {shards} shards" if (shards or 1) > 1 else ""), err=True)
    built = serving_step.build_index(run, validation, model)
    verified = serving_step.verify_index(run, validation, built)
    try:
        swapped = serving_step.swap_alias(run, built)
    except SkipRest as exc:
        raise Near2Error(str(exc), hint="`near2 index status` shows what serves") from exc
    serving_step.smoke_search(run, validation, swapped)
    if as_json:
        click.echo(json.dumps({"index": built["index"], "count": built["documents"], "shards": built["shards"],
                               "meta": index_meta(settings, built["index"]), "previous": swapped["previous"],
                               "deleted": swapped["deleted"], "verification": verified["verification"]},
                              default=str))
        return
    rates = ", ".join(f"{d}: {r:.0%}" for d, r in verified["self_hit_rate"].items())
    click.echo(f"built {built['index']}: {built['documents']} documents, dims {built['dims']}"
               + (f", {built['shards']} shards" if built["shards"] > 1 else ""))
    if built["hybrid_weights"]:
        click.echo("hybrid weights (dense side, tuned on validation): "
                   + ", ".join(f"{d}: {w:.1f}" for d, w in built["hybrid_weights"].items()))
    click.echo(f"verified: count matches, self-retrieval in top {verified['verification']['top_k']} by dim: {rates}")
    click.echo(f"alias {settings.elasticsearch.alias}: {swapped['previous'] or '(none)'} -> {built['index']}")
    if swapped["deleted"]:
        click.echo(f"deleted old indices: {', '.join(swapped['deleted'])}")


def _sub_settings(ctx: click.Context):
    alias = (ctx.parent.obj or {}).get("alias") if ctx.parent else None
    return settings_from(ctx, **({"elasticsearch": {"alias": alias}} if alias else {}))


@index.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """The alias target and every kept index: model version, dims, documents, size."""
    from near2_tasks.serving.alias import index_status

    info = index_status(_sub_settings(ctx))
    if as_json:
        click.echo(json.dumps(info.to_dict()))
        return
    click.echo(f"alias {info.alias} -> {info.target or '(none)'}")
    if not info.indices:
        click.echo("no indices")
    for row in info.indices:
        flags = ("  * serving" if row.serving else "") + ("" if row.verified else " unverified")
        click.echo(f"  {row.name}  model {row.model_name} v{row.model_version}  dims {row.dims}  "
                   f"{row.docs} docs  {row.size_bytes / 2**20:.1f} MiB  built {row.built_at}{flags}")


@index.command("rollback")
@click.pass_context
def rollback_command(ctx: click.Context) -> None:
    """Move the alias back to the previous verified index."""
    from near2_tasks.serving.alias import rollback

    moved_from, moved_to = rollback(_sub_settings(ctx))
    click.echo(f"alias moved back: {moved_from} -> {moved_to}")


COMMANDS = [index]
