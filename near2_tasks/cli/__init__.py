"""The ``near2`` command line. Each concern registers its commands from its own module below.

Expected failures (``Near2Error``) print one line, ``near2: error: ...``, and exit non-zero without a
traceback.
"""

from __future__ import annotations

import importlib
import sys

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
