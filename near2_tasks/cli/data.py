"""``near2 validate`` and ``near2 examples``: the data stage on the command line."""

from __future__ import annotations

import json
import time

import click

from near2_tasks.cli import settings_from

FORMAT_CHOICES = ["homedepot", "wands", "esci", "csv", "parquet", "jsonl"]


@click.command("validate")
@click.option("--catalog", "catalog", type=click.Path(), default=None,
              help="Catalog file or dataset directory (default: dataset.catalog_path, else the synthetic catalog).")
@click.option("--judgments", "judgments", type=click.Path(), default=None, help="Judgments file (optional).")
@click.option("--format", "fmt", type=click.Choice(FORMAT_CHOICES), default=None,
              help="Input format (default: dataset.format; auto guesses from names).")
@click.option("--report-dir", "report_dir", type=click.Path(file_okay=False), required=True,
              help="Where report.json, quarantine/, data_docs/ and accepted/ are written.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole JSON report.")
@click.pass_context
def validate(ctx: click.Context, catalog: str | None, judgments: str | None, fmt: str | None, report_dir: str,
             as_json: bool) -> None:
    """Validate a catalog and judgments; exit 0 when accepted, 1 when the run must stop."""
    from near2_tasks.data.validate import validate_dataset

    settings = settings_from(ctx)
    began = time.monotonic()
    result = validate_dataset(settings, catalog, judgments, fmt=fmt, report_dir=report_dir)
    if as_json:
        click.echo(json.dumps(result.report, indent=2, default=str))
        return
    for name, table in result.report["tables"].items():
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(table["quarantined_by_check"].items(), key=lambda kv: -kv[1]))
        click.echo(f"{name}: {table['input_rows']} rows, {table['accepted_rows']} accepted, "
                   f"{table['quarantined_rows']} quarantined{' (' + reasons + ')' if reasons else ''}")
    click.echo(f"accepted: {len(result.products)} products, {len(result.judgments)} judgments "
               f"(duplicates merged); dataset_version {result.dataset_version}, "
               f"catalog_version {result.catalog_version} ({time.monotonic() - began:.1f}s)")
    click.echo(f"report: {result.report_path}")
    if result.report["paths"].get("data_docs"):
        click.echo(f"data docs: {result.report['paths']['data_docs']}")


@click.command("examples")
@click.option("--report-dir", "report_dir", type=click.Path(file_okay=False, exists=True), required=True,
              help="A report directory a passed `near2 validate` wrote.")
@click.option("--output", "output", type=click.Path(file_okay=False), required=True,
              help="Where splits, triplets, pairs and manifest.json are written.")
@click.option("--model", "model", default=None,
              help="Mine hard negatives with this encoder (path, packaged name or models:/ URI); default: none.")
@click.pass_context
def examples(ctx: click.Context, report_dir: str, output: str, model: str | None) -> None:
    """Split accepted judgments by query and mine MMSE-style training examples."""
    from near2_tasks.train.examples import configured_splits, mine_examples, write_examples
    from near2_tasks.data.outputs import load_accepted

    settings = settings_from(ctx)
    began = time.monotonic()
    accepted = load_accepted(report_dir)
    splits = configured_splits(settings, accepted.judgments)
    mined = mine_examples(accepted.products, splits.train, settings, model=model)
    write_examples(output, splits, mined, extra={"dataset_version": accepted.dataset_version,
                                                 "catalog_version": accepted.catalog_version,
                                                 "model": model})
    sizes = ", ".join(f"{k} {v['queries']} queries / {v['judgments']} judgments" for k, v in splits.sizes.items())
    click.echo(f"splits: {sizes}")
    click.echo("examples: " + ", ".join(f"{k} {v}" for k, v in mined.counts.items()))
    click.echo(f"written to {output} ({time.monotonic() - began:.1f}s)")


COMMANDS = [validate, examples]
