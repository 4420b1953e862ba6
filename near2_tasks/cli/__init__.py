"""The ``near2`` command line. Each concern registers its commands from its own module below.

Expected failures (``Near2Error``) print one line, ``near2: error: ...``, and exit non-zero without a
traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys
from datetime import datetime, timezone

import click

from near2_tasks.errors import Near2Error

#: Modules of ``near2_tasks.cli`` that each expose ``COMMANDS``: a list of click commands.
COMMAND_MODULES = ["es", "index", "search", "data", "evaluate", "demo", "train", "backends"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(dir_okay=False), envvar="NEAR2_CONFIG",
              help="YAML settings file (also NEAR2_CONFIG).")
@click.pass_context
def cli(ctx: click.Context, config_file: str | None) -> None:
    """near2: nested-embedding semantic search, trained, gated and served."""
    ctx.obj = {"config_file": config_file}


def settings_from(ctx: click.Context, **overrides):
    """Settings for a command: the group's --config file plus the command's overrides."""
    from near2_tasks.config import load_settings

    return load_settings(ctx.find_root().obj.get("config_file"), **overrides)


#: The handler :func:`show_progress` installed, if any (one per process).
_progress_handler: logging.StreamHandler | None = None


def show_progress() -> None:
    """Print near2's INFO log lines (stages, per-dimension results) on stderr: evaluations take minutes.

    The handler writes to the stderr of the command running now: a second command in the same process
    (click's ``CliRunner`` gives each invocation its own stderr) must not log to the first one's, closed."""
    global _progress_handler
    logger = logging.getLogger("near2_tasks")
    if _progress_handler is None and not logger.handlers:
        _progress_handler = logging.StreamHandler()
        _progress_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(_progress_handler)
        logger.setLevel(logging.INFO)
    if _progress_handler is not None:  # not setStream: it flushes the previous stream, which may be closed
        _progress_handler.stream = sys.stderr


def parse_dims(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        dims = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 384,256,128,64,32")
    if not dims or min(dims) <= 0:
        raise click.BadParameter(f"{value!r}: give positive dimensions, e.g. 384,256,128,64,32")
    return dims


def cli_run(settings, params, dag_id: str):
    """The :class:`~near2_tasks.run.StepContext` of one command that runs pipeline steps: its records go to
    ``<home>/runs/<dag_id>/cli-<UTC time>/``."""
    from near2_tasks.run import StepContext

    return StepContext(settings, params, dag_id=dag_id,
                       run_id=datetime.now(timezone.utc).strftime("cli-%Y%m%dT%H%M%S%fZ"))


for _name in COMMAND_MODULES:
    for _command in importlib.import_module(f"{__name__}.{_name}").COMMANDS:
        cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="near2", standalone_mode=False)
    except Near2Error as exc:
        click.echo(f"near2: error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"near2: hint: {exc.hint}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("near2: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
