"""``near2 index``: build, verify and swap a serving index; ``status``; ``rollback``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from near2_tasks.cli import settings_from


def read_catalog(settings, path: Path | None):
    """The products to index: a catalog file or dataset directory, or the synthetic catalog.

    Malformed records (wrong field count, bad encoding) are left out; anything else a catalog can
    get wrong (repeated ids, empty titles) stops the build with a message: validate first.
    """
    import pandas as pd

    if path is None:
        from near2_tasks.data.synthetic import generate_catalog

        ds = settings.dataset
        return generate_catalog(ds.synthetic_products, ds.synthetic_queries, ds.synthetic_seed).products
    from near2_tasks.data.adapters import load_dataset

    frame = load_dataset(settings, Path(path)).catalog.frame
    frame = frame[frame["_well_formed"] & frame["_valid_encoding"]]
    frame = frame[[c for c in frame.columns if not c.startswith("_")]].dropna(axis="columns", how="all")
    if "price" in frame.columns:
        frame["price"] = pd.to_numeric(frame["price"], errors="coerce")
    return frame.reset_index(drop=True)


def read_judgments(settings, catalog: Path | None, judgments_path: Path | None):
    """Judgments (query, product_id, relevance) for tuning: ``judgments_path``, else the catalog dataset's
    own, else the synthetic catalog's (no ``--catalog``). Malformed records are left out."""
    import pandas as pd

    from near2_tasks.errors import Near2Error

    if catalog is None and judgments_path is None:
        from near2_tasks.data.synthetic import generate_catalog

        ds = settings.dataset
        return generate_catalog(ds.synthetic_products, ds.synthetic_queries, ds.synthetic_seed).judgments
    from near2_tasks.data.adapters import load_dataset

    if catalog is None:
        raise Near2Error("--judgments needs --catalog (the products the judgments refer to)")
    loaded = load_dataset(settings, Path(catalog), judgments_path)
    if loaded.judgments is None:
        raise Near2Error(f"no judgments found for {catalog}", hint="pass --judgments PATH")
    frame = loaded.judgments.frame
    frame = frame[frame["_well_formed"] & frame["_valid_encoding"]]
    frame = frame[[c for c in frame.columns if not c.startswith("_")]].copy()
    frame["relevance"] = pd.to_numeric(frame["relevance"], errors="coerce")
    return frame.dropna(subset=["query", "product_id", "relevance"]).reset_index(drop=True)


def model_ref_version(settings, model_ref: str) -> tuple[str, str | None]:
    """(the version recorded in the index name and _meta, the registered version of
    ``settings.mlflow.registered_model`` it is, or None).

    ``models:/name/3`` -> 3; ``models:/name@alias`` (or ``/latest``) -> the version it points at now;
    anything else (a directory, a hub id, a logged model) -> ``0``, not registered.
    """
    from near2_tasks.conventions import parse_model_uri
    from near2_tasks.models.registry import resolve_model_uri

    parsed = parse_model_uri(model_ref)
    if parsed is None or parsed.selector is None:
        return "0", None
    version = parsed.version if parsed.pinned else str(resolve_model_uri(settings, parsed).version)
    return version, version if parsed.name == settings.mlflow.registered_model else None


def choose_model(settings, model_ref: str | None, allow_non_champion: bool) -> tuple[str, str, str | None]:
    """The model to index, its version (:func:`model_ref_version`) and the champion's: the champion
    unless told otherwise.

    Without ``--model``: the champion (pinned as ``models:/<name>/<N>``), or before the first promotion
    the base model. With ``--model``: that model, but the serving alias may point only at the champion's
    index (ARCHITECTURE.md, "Who may serve": the rule the DAG's swap step applies): any other model is
    refused unless ``--allow-non-champion``.
    """
    from near2_tasks.errors import Near2Error
    from near2_tasks.promote.promotion import champion_version, not_served_reason
    from near2_tasks.models.registry import model_uri

    champion = champion_version(settings)
    if model_ref is None:
        if champion is None:
            click.echo(f"no champion in {settings.mlflow.registered_model!r} yet: indexing the base model "
                       f"{settings.model.base_model}", err=True)
            return settings.model.base_model, "0", None
        return model_uri(settings, champion), champion, champion
    version, registered = model_ref_version(settings, model_ref)
    refusal = not_served_reason(champion, registered)
    if refusal is not None and not allow_non_champion:
        raise Near2Error(f"refusing to point the alias {settings.elasticsearch.alias} at an index of {model_ref}: "
                         f"{refusal}",
                         hint="omit --model to index the champion, promote this version first, "
                              "or pass --allow-non-champion to serve it anyway")
    if refusal is not None:
        click.echo(f"warning: --allow-non-champion: serving {model_ref}, although {refusal}", err=True)
    return model_ref, version, champion


@click.group("index", invoke_without_command=True)
@click.option("--model", "model_ref", help="Model: MLflow URI (models:/near2-encoder/3), directory, or a "
                                           "hub id (default: the champion; before the first promotion "
                                           "model.base_model).")
@click.option("--allow-non-champion", is_flag=True,
              help="Serve a model that is not the champion (refused by default, as in the DAG).")
@click.option("--catalog", "catalog", type=click.Path(exists=True, path_type=Path),
              help="Catalog file or dataset directory (default: the synthetic catalog).")
@click.option("--dims", help="Comma-separated dimensions, descending (default: model.dims).")
@click.option("--model-version", help="Version recorded in the index name and _meta (default: from the URI).")
@click.option("--catalog-version", help="Catalog version for _meta (default: a content hash of the rows).")
@click.option("--alias", help="Alias to swap (default: elasticsearch.alias).")
@click.option("--tune-hybrid", is_flag=True,
              help="Before verification, tune the hybrid linear weight per dim on the validation split of the "
                   "judgments (--judgments, else the catalog dataset's own) and store it in the index _meta.")
@click.option("--judgments", "judgments_path", type=click.Path(exists=True, path_type=Path),
              help="Judgments file for --tune-hybrid (default: the --catalog dataset's judgments).")
@click.option("--shards", type=click.IntRange(min=1), default=None,
              help="Encode and load the catalog in N slices (a stable hash of product_id mod N), one after "
                   "another, into the same index: what the DAG's mapped encode_shard tasks do in parallel "
                   "(airflow.encode_shards). Same index as one slice. Default 1.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def index(ctx: click.Context, model_ref, allow_non_champion, catalog, dims, model_version, catalog_version, alias,
          tune_hybrid, judgments_path, shards, as_json) -> None:
    """Build a new index with the champion, verify it, then move the alias to it (one atomic call).

    Subcommands: `status` lists indices, `rollback` moves the alias back.
    """
    if ctx.invoked_subcommand is not None:
        if any(v for v in (model_ref, allow_non_champion, catalog, dims, model_version, catalog_version,
                           tune_hybrid, judgments_path, shards)):
            raise click.UsageError("build options go before no subcommand: near2 index --model ... --catalog ...")
        ctx.obj = {**(ctx.obj or {}), "alias": alias}
        return
    from near2_tasks.errors import Near2Error
    from near2_tasks.serving.publish import build_verify_swap

    overrides = {"elasticsearch": {"alias": alias}} if alias else {}
    settings = settings_from(ctx, **overrides)
    model_ref, ref_version, champion = choose_model(settings, model_ref, allow_non_champion)
    dim_list = None
    if dims:
        try:
            dim_list = [int(d) for d in dims.split(",") if d.strip()]
        except ValueError as exc:
            raise Near2Error(f"--dims {dims!r} is not a comma-separated list of integers",
                             hint="e.g. --dims 384,128,64") from exc
    version = model_version or ref_version
    products = read_catalog(settings, catalog)
    tune = None
    if tune_hybrid:
        from near2_tasks.train.examples import configured_splits

        from near2_tasks.serving.hybrid_tuning import weight_tuning

        validation = configured_splits(settings, read_judgments(settings, catalog, judgments_path)).validation
        click.echo(f"tuning the hybrid weights on {validation['query'].nunique()} validation queries", err=True)
        tune = weight_tuning(settings, products, validation)
    elif judgments_path is not None:
        raise click.UsageError("--judgments is for --tune-hybrid")
    shards = shards or 1
    click.echo(f"indexing {len(products)} products with {model_ref} (version {version})"
               + (f" in {shards} shards" if shards > 1 else ""), err=True)
    with click.progressbar(length=len(products), label="bulk load", file=click.get_text_stream("stderr")) as bar:
        def progress(done: int, total: int) -> None:
            bar.update(done - bar.pos)

        result = build_verify_swap(settings, model_ref, products, version, catalog_version=catalog_version,
                                   dims=dim_list, progress=progress, champion=champion, before_verify=tune,
                                   shards=shards)
    if as_json:
        click.echo(json.dumps({"index": result.index.name, "count": result.index.count, "shards": shards,
                               "meta": result.index.meta,
                               "previous": result.previous, "deleted": result.deleted,
                               "verification": result.report.to_dict()}, default=str))
        return
    rates = ", ".join(f"{d}: {r:.0%}" for d, r in result.report.self_hit_rate.items())
    click.echo(f"built {result.index.name}: {result.index.count} documents, dims {result.index.meta['dims']}"
               + (f", {shards} shards" if shards > 1 else ""))
    weights = result.index.meta.get("hybrid_weights")
    if weights:
        click.echo("hybrid weights (dense side, tuned on validation): "
                   + ", ".join(f"{d}: {w:.1f}" for d, w in weights.items()))
    click.echo(f"verified: count matches, self-retrieval in top {result.report.top_k} by dim: {rates}")
    click.echo(f"alias {settings.elasticsearch.alias}: {result.previous or '(none)'} -> {result.index.name}")
    if result.deleted:
        click.echo(f"deleted old indices: {', '.join(result.deleted)}")


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
