"""``near2 evaluate``, ``near2 gate``, ``near2 approve``, ``near2 promote``, ``near2 rollback``.

Evaluation and gating read the catalog and judgments with the data stage's loaders (any supported
format; the accepted Parquet files of ``near2 validate`` work too).
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from near2_tasks.cli import cli_run, parse_dims, settings_from, show_progress


def _parse_references(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, Path]:
    references: dict[str, Path] = {}
    for value in values:
        label, sep, path = value.partition("=")
        if not sep or not label or not path:
            raise click.BadParameter(f"{value!r}: expected LABEL=report.json, e.g. champion=champion.json")
        references[label] = Path(path)
    return references


def _load_frames(settings, catalog: str, judgments: str, fmt: str | None):
    """Catalog and judgments as frames: well-formed rows only (validation is `near2 validate`'s job)."""
    from near2_tasks.data.adapters import load_dataset

    loaded = load_dataset(settings, Path(catalog), Path(judgments), fmt)
    products, judged = loaded.catalog.frame, loaded.judgments.frame
    products = products[products["_well_formed"] & products["product_id"].notna() & products["title"].notna()]
    judged = judged[judged["_well_formed"] & judged["product_id"].notna() & judged["query"].notna()]
    return products.reset_index(drop=True), judged.reset_index(drop=True)


DATA_OPTIONS = [
    click.option("--catalog", required=True, type=click.Path(exists=True), help="Catalog file or dataset directory."),
    click.option("--judgments", required=True, type=click.Path(exists=True), help="Judgments file."),
    click.option("--format", "fmt", default=None, help="csv, parquet, jsonl, homedepot, wands, esci (default: auto)."),
]


def _with(options):
    def decorate(function):
        for option in reversed(options):
            function = option(function)
        return function
    return decorate


@click.command("evaluate")
@click.option("--model", "model_ref", required=True,
              help="Model directory, models:/near2-encoder@champion, runs:/<id>/model, or a hub id.")
@_with(DATA_OPTIONS)
@click.option("--dims", callback=parse_dims, default=None, help="Comma-separated, e.g. 384,256,128,64,32 "
              "(default: model.dims).")
@click.option("--k", "k", type=click.IntRange(min=1), default=None, help="Cut-off (default: evaluation.k, 10).")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="report.json to write; the "
              "Markdown table and the PNG plot go beside it.")
@click.option("--reference", "references", multiple=True, callback=_parse_references,
              help="LABEL=report.json of another model to compare with in the table and plot (repeatable).")
@click.option("--mlflow/--no-mlflow", "to_mlflow", default=True, help="Log metrics and files to MLflow.")
@click.pass_context
def evaluate(ctx: click.Context, model_ref: str, catalog: str, judgments: str, fmt: str | None,
             dims: list[int] | None, k: int | None, output: str, references: dict[str, Path],
             to_mlflow: bool) -> None:
    """Evaluate MODEL per dimension: exact cosine retrieval over the whole catalog, NDCG/MRR/P/R/MAP."""
    from near2_tasks.evaluate.evaluation import evaluate_model, log_evaluation
    from near2_tasks.evaluate.report import EvaluationReport, render_markdown, write_report

    began = time.monotonic()
    show_progress()
    settings = settings_from(ctx)
    reference_reports = {label: EvaluationReport.read_json(path) for label, path in references.items()}
    products, judged = _load_frames(settings, catalog, judgments, fmt)
    report = evaluate_model(settings, model_ref, products, judged, dims=dims, k=k or settings.evaluation.k,
                            reference_reports=reference_reports)
    files = write_report(report, Path(output))
    run_id = log_evaluation(settings, report, files) if to_mlflow else None
    click.echo(render_markdown(report).split("\n## Slice")[0].rstrip())
    click.echo("")
    click.echo(f"wrote {files.json}, {files.markdown.name}, {files.plot.name}"
               + (f"; MLflow run {run_id}" if run_id else "") + f" ({time.monotonic() - began:.1f}s)")


@click.command("gate")
@click.option("--catalog", type=click.Path(exists=True), default=None,
              help="Catalog file or dataset directory (default: dataset.catalog_path, else the synthetic catalog).")
@click.option("--judgments", type=click.Path(exists=True), default=None,
              help="Judgments file (default: dataset.judgments_path, else the catalog dataset's own).")
@click.option("--format", "fmt", default=None, help="csv, parquet, jsonl, homedepot, wands, esci (default: auto).")
@click.option("--version", "version", default="challenger", show_default=True,
              help="Version number or alias to gate.")
@click.option("--output-dir", type=click.Path(file_okay=False), default=None,
              help="Where the report and gate summary go (default: <home>/reports/v<version>).")
@click.pass_context
def gate(ctx: click.Context, catalog: str | None, judgments: str | None, fmt: str | None, version: str,
         output_dir: str | None) -> None:
    """Gate a version as the DAG does: validate the data, evaluate the version and its reference (champion,
    else base model) on the test split of the judgments, decide and record the gate.

    Runs the DAG's validate step, then its evaluate and gate steps on the version; their records go to
    <home>/runs/near2_gate/<run id>/steps/. Exits 1 when the gate fails.
    """
    from near2_tasks.data.step import accepted, validate
    from near2_tasks.errors import Near2Error
    from near2_tasks.promote.step import gate_version
    from near2_tasks.run import RunParams, settings_for_run
    from near2_tasks.train.examples import configured_splits

    show_progress()
    params = RunParams(config_file=ctx.find_root().obj.get("config_file"), catalog_path=catalog,
                       judgments_path=judgments, dataset_format=fmt)
    run = cli_run(settings_for_run(params), params, "near2_gate")
    products, judged = accepted(validate(run))
    if judged.empty:
        raise Near2Error("no accepted judgments: the gate evaluates on the test split of graded judgments",
                         hint="pass --judgments PATH (or set dataset.judgments_path)")
    test = configured_splits(run.settings, judged).test
    result = gate_version(run.settings, products, test, version=version,
                          output_dir=Path(output_dir) if output_dir else None, run=run)
    click.echo(result.decision.markdown().rstrip())
    click.echo(f"\nreport: {result.report_path}")
    if not result.decision.passed:
        raise SystemExit(1)


@click.command("approve")
@click.argument("version")
@click.option("--reject", is_flag=True, help="Record a rejection instead.")
@click.pass_context
def approve(ctx: click.Context, version: str, reject: bool) -> None:
    """Tag VERSION approval=approved (or rejected), as a reviewer does in the MLflow UI."""
    from near2_tasks.promote.promotion import set_approval

    number = set_approval(settings_from(ctx), version, approved=not reject)
    click.echo(f"version {number}: approval={'rejected' if reject else 'approved'}")


@click.command("promote")
@click.argument("version")
@click.pass_context
def promote(ctx: click.Context, version: str) -> None:
    """Move the champion alias to VERSION (its gate must have passed and it must be approved)."""
    from near2_tasks.promote.promotion import promote as promote_version

    move = promote_version(settings_from(ctx), version)
    if move.moved:
        click.echo(f"champion: {'v' + move.previous if move.previous else 'none'} -> v{move.champion}")
    else:
        click.echo(f"version {move.champion} is already the champion")


@click.command("rollback")
@click.pass_context
def rollback(ctx: click.Context) -> None:
    """Move the champion alias back to the version the current champion replaced."""
    from near2_tasks.promote.promotion import rollback as rollback_champion

    move = rollback_champion(settings_from(ctx))
    click.echo(f"champion: v{move.previous} -> v{move.champion} (rolled back)")


COMMANDS = [evaluate, gate, approve, promote, rollback]
