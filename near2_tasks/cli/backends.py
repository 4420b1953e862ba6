"""``near2 backend export``: export a registered encoder to ONNX Runtime / OpenVINO and log it next to it."""

from __future__ import annotations

import click

from near2_tasks.cli import settings_from


@click.group("backend")
def backend() -> None:
    """Fast inference backends for the encoder (ONNX Runtime fp32/int8, OpenVINO fp32/bf16)."""


@backend.command("export")
@click.option("--model", "model_ref", default="challenger", show_default=True,
              help="Registered version: a number, an alias, or models:/<name>/<version> / models:/<name>@<alias>.")
@click.option("--backend", "backend_name", type=click.Choice(["onnx", "openvino"]), default=None,
              help="Default: model.backend from config.")
@click.option("--quantize", type=click.Choice(["none", "int8"]), default=None,
              help="Default: model.quantize from config (int8: onnx only).")
@click.pass_context
def export(ctx: click.Context, model_ref: str, backend_name: str | None, quantize: str | None) -> None:
    """Export, check against the fp32 model (cosine), log to the version's MLflow run; print the URI.

    A local model directory (or the packaged base model) is exported into the cache under home instead;
    the command then prints that directory.
    """
    from pathlib import Path

    from near2_tasks.models.backends import BackendSpec, export_backend, load_inference_encoder, resolved_backend
    from near2_tasks.models.embeddings import MINILM_ALIASES
    from near2_tasks.errors import Near2Error

    settings = settings_from(ctx)
    spec = BackendSpec(backend_name or resolved_backend(settings.model), quantize or settings.model.quantize)  # type: ignore[arg-type]
    if spec.backend == "torch":
        raise Near2Error("model.backend is torch: nothing to export", hint="pass --backend onnx or openvino")
    if model_ref in MINILM_ALIASES or Path(model_ref).expanduser().is_dir():
        settings = settings.model_copy(update={"model": settings.model.model_copy(
            update={"backend": spec.backend, "quantize": spec.quantize})})
        click.echo(load_inference_encoder(settings, model_ref, missing="export").directory)
        return
    click.echo(export_backend(settings, model_ref, spec))


COMMANDS = [backend]
