"""``near2 es start|stop|status``: the local single-node Elasticsearch for the demo and tests."""

from __future__ import annotations

import json
import time

import click

from near2_tasks.cli import settings_from


@click.group("es")
def es() -> None:
    """Run a local Elasticsearch on 127.0.0.1 (downloaded once from Maven Central)."""


@es.command("start")
@click.pass_context
def start(ctx: click.Context) -> None:
    """Download (once), start and wait until healthy; print the URL."""
    from near2_tasks.serving import elasticsearch_local

    settings = settings_from(ctx)
    began = time.monotonic()
    server = elasticsearch_local.start(settings)
    click.echo(f"Elasticsearch {server.version} is up at {server.url} (pid {server.pid}, "
               f"{time.monotonic() - began:.1f}s, {server.java}); logs: {server.log_file}")


@es.command("stop")
@click.pass_context
def stop(ctx: click.Context) -> None:
    """Stop the server started by ``near2 es start``."""
    from near2_tasks.serving import elasticsearch_local

    stopped = elasticsearch_local.stop(settings_from(ctx))
    click.echo("stopped" if stopped else "not running")


@es.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Whether the local server runs, its URL, pid and resident memory."""
    from near2_tasks.serving import elasticsearch_local

    info = elasticsearch_local.status(settings_from(ctx))
    if as_json:
        click.echo(json.dumps(info))
    else:
        state = "running" if info["running"] else "not running"
        memory = f", {info['rss_mib']} MiB resident" if "rss_mib" in info else ""
        click.echo(f"Elasticsearch {info['version']} {state} at {info['url']}{memory}")
    if not info["running"]:
        raise SystemExit(1)


COMMANDS = [es]
