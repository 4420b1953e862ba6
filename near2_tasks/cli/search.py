"""``near2 search`` (one storefront query) and ``near2 serve`` (the HTTP search service)."""

from __future__ import annotations

import json

import click

from near2_tasks.cli import settings_from


@click.command("search")
@click.argument("query")
@click.option("--k", "k", type=int, default=10, show_default=True, help="How many products.")
@click.option("--dim", type=int, help="Embedding dimension (default: serving.default_dim or the full one).")
@click.option("--mode", type=click.Choice(["knn", "funnel", "hybrid"]), help="Default: serving.mode.")
@click.option("--fusion", type=click.Choice(["rrf", "linear"]),
              help="mode hybrid: rrf or linear (weight from the index _meta); default: serving.hybrid_fusion.")
@click.option("--category", help="Only this exact category.")
@click.option("--brand", help="Only this exact brand.")
@click.option("--price-min", type=float)
@click.option("--price-max", type=float)
@click.option("--num-candidates", type=int, help="kNN candidates (default: elasticsearch.num_candidates).")
@click.option("--json", "as_json", is_flag=True, help="Print the full response as JSON.")
@click.pass_context
def search_command(ctx: click.Context, query, k, dim, mode, fusion, category, brand, price_min, price_max,
                   num_candidates, as_json) -> None:
    """Search the products behind the serving alias, e.g. near2 search "cordless drill" --dim 64."""
    from near2_tasks.serving.search import search

    settings = settings_from(ctx)
    response = search(settings, query, k=k, dim=dim, mode=mode, num_candidates=num_candidates, fusion=fusion,
                      filters={"category": category, "brand": brand, "price_min": price_min, "price_max": price_max})
    if as_json:
        click.echo(json.dumps(response.to_dict()))
        return
    extra = f" (shortlist {response.shortlist_size} at dim {response.shortlist_dim})" if response.shortlist_dim else ""
    if response.hybrid:
        h = response.hybrid
        how = f"rrf k={h['rrf_k']:g}" if h["fusion"] == "rrf" else f"linear w={h['weight']:.2f} ({h['weight_source']})"
        extra += f", {how}, {h['dense_hits']} dense + {h['lexical_hits']} BM25 candidates"
    click.echo(f"{len(response.hits)} results for {response.query!r}: {response.mode} at dim {response.dim}{extra}, "
               f"model {response.model_name} v{response.model_version}, index {response.index}")
    for rank, hit in enumerate(response.hits, 1):
        details = " · ".join(str(v) for v in (hit.brand, hit.category) if v)
        price = f"  ${hit.price:,.2f}" if hit.price is not None else ""
        click.echo(f"{rank:>3}. {hit.score:.4f}  {hit.title}  [{hit.product_id}]{price}"
                   + (f"  ({details})" if details else ""))
    t = response.timings_ms
    click.echo(f"encode {t['encode']:.1f} ms, search {t['search']:.1f} ms (es {t['es_took']:.0f} ms)")


@click.command("serve")
@click.option("--host", help="Bind address (default: serving.host, 127.0.0.1).")
@click.option("--port", type=int, help="Port (default: serving.port, 8000).")
@click.option("--workers", type=click.IntRange(min=1), help="Worker processes (default: serving.workers).")
@click.pass_context
def serve(ctx: click.Context, host: str | None, port: int | None, workers: int | None) -> None:
    """Run the storefront search API (OpenAPI docs at /docs)."""
    import os

    import uvicorn

    from near2_tasks.serving.service import create_app

    settings = settings_from(ctx)
    workers = workers or settings.serving.workers
    options = dict(host=host or settings.serving.host, port=port or settings.serving.port,
                   # bounded work per connection: header size, concurrency, keep-alive
                   h11_max_incomplete_event_size=settings.serving.max_request_bytes * 2,
                   limit_concurrency=64, timeout_keep_alive=5, server_header=False, log_level="info",
                   access_log=settings.serving.access_log)
    if workers == 1:
        uvicorn.run(create_app(settings), **options)
        return
    # each worker process builds its app from the same configuration (file and NEAR2_* variables)
    config_file = ctx.find_root().obj.get("config_file")
    if config_file:
        os.environ["NEAR2_CONFIG"] = str(config_file)
    uvicorn.run("near2_tasks.serving.service:app_from_settings", factory=True, workers=workers, **options)


COMMANDS = [search_command, serve]
