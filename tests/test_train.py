"""NEAR² training end to end: the real trainer, a real MLflow SQLite store and registry, the tiny encoder.

One short training (module fixture) is shared by the checks on what it left behind; the bad-input
tests stop before any training step, except the one that fails mid-run on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from near2_tasks.conventions import CHALLENGER, CHAMPION, metric_key, truncate
from near2_tasks.errors import Near2Error, ServiceUnavailable
from tests.tiny_model import TINY_DIMS

TRAINING = {"max_steps": 2, "batch_size": 8, "eval_steps": 1, "logging_steps": 1, "learning_rate": 1e-3,
            "val_max_queries": 20, "val_corpus_size": 120,
            "ranking_weight": 0.05}  # the hybrid objective (off by default since the recipe benchmark): keep it tested


@dataclass
class Examples:
    """The shape ``examples.mine_examples`` returns."""

    triplets: pd.DataFrame
    pairs: pd.DataFrame
    counts: dict = field(default_factory=dict)


def synthetic_training_data(n_products: int = 240, n_queries: int = 60, seed: int = 3):
    """Triplets, pairs and validation IR data from the synthetic catalog (queries split by parity)."""
    from near2_tasks.data.synthetic import generate_catalog

    data = generate_catalog(n_products, n_queries, seed)
    title = data.products.set_index("product_id")["title"]
    judgments = data.judgments
    is_train = judgments["query_id"].str[1:].astype(int) % 2 == 0
    train, val = judgments[is_train], judgments[~is_train]
    triplets, pairs = [], []
    for query, group in train.groupby("query"):
        positives = group.loc[group["relevance"] >= 2.5, "product_id"].tolist()
        negatives = group.loc[group["relevance"] < 2.0, "product_id"].tolist()
        for i, pos in enumerate(positives):
            if negatives:
                triplets.append((query, title[pos], title[negatives[i % len(negatives)]]))
            pairs.append((query, title[pos], 1))
        pairs.extend((query, title[neg], 0) for neg in negatives)
    examples = Examples(
        pd.DataFrame(triplets, columns=["anchor", "positive", "negative"]),
        pd.DataFrame(pairs, columns=["sentence1", "sentence2", "label"]),
        {"triplets": len(triplets), "pairs": len(pairs)},
    )
    queries = dict(zip(val["query_id"], val["query"]))
    relevant = {q: set(g.loc[g["relevance"] >= 2.0, "product_id"]) for q, g in val.groupby("query_id")}
    return examples, (queries, title.to_dict(), relevant)


def make_settings(home: Path, model_dir: Path, model: dict | None = None, training: dict | None = None,
                  **overrides):
    """Settings with the tiny encoder, a few training steps and an own MLflow SQLite store under home."""
    from near2_tasks.config import load_settings

    return load_settings(home=str(home), model={"base_model": str(model_dir), "dims": TINY_DIMS, **(model or {})},
                         training={**TRAINING, **(training or {})}, **overrides)


def registered_versions(settings) -> list:
    from mlflow.exceptions import MlflowException

    from near2_tasks.models import registry

    if not (settings.home / "mlflow.db").exists():  # the store was never even created
        return []
    try:
        return list(registry.client(settings).search_model_versions(f"name = '{settings.mlflow.registered_model}'"))
    except MlflowException:
        return []


@pytest.fixture(scope="module")
def data():
    return synthetic_training_data()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, data):
    from near2_tasks.train.trainer import train_model

    home = tmp_path_factory.mktemp("train-home")
    settings = make_settings(home, tiny_model_dir)
    examples, validation = data
    result = train_model(settings, examples, validation, dataset_version="ds-test-1",
                         output_dir=home / "model-out", run_key="dagrun-1", reports={"validation": {"ok": True}})
    return settings, result


def test_training_logs_a_complete_run(trained):
    from near2_tasks.models import registry

    settings, result = trained
    client = registry.client(settings)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["dims"] == "64,32,16"
    assert run.data.params["dataset_version"] == "ds-test-1"
    assert int(run.data.params["train_triplets"]) > 0 and int(run.data.params["train_pairs"]) > 0
    assert run.data.tags["run_key"] == "dagrun-1"
    # per-dimension validation metrics: base model at step 0, then every eval_steps, then (step 3) the model
    # after the prefix refit, which is the registered model and the result's val_metrics
    for dim in TINY_DIMS:
        for metric in ("ndcg@10", "mrr@10", "recall@100"):
            history = client.get_metric_history(result.run_id, metric_key("val", metric, dim))
            assert {m.step for m in history} == {0, 1, 2, 3}
            assert all(0.0 <= m.value <= 1.0 for m in history)
            last = next(m.value for m in history if m.step == 3)
            assert result.val_metrics[metric_key("val", metric, dim)] == pytest.approx(last)
    refit_losses = client.get_metric_history(result.run_id, "prefix_refit_loss")
    assert [m.step for m in sorted(refit_losses, key=lambda m: m.step)] == list(range(6))  # the default 6 epochs
    assert run.data.metrics["prefix_refit_triplets"] == int(run.data.params["train_triplets"])
    # loss per objective at every step: round-robin + accumulation puts one batch of each into every step
    for name in ("train_loss", "train_loss_retrieval", "train_loss_ranking"):
        assert {m.step for m in client.get_metric_history(result.run_id, name)} == {1, 2}, name
    assert run.data.params["gradient_accumulation_steps"] == "2"
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "reports")}
    assert artifacts == {"reports/training_examples.json", "reports/validation.json"}


def test_training_registers_challenger_with_tags_and_never_champion(trained):
    from near2_tasks.models import registry

    settings, result = trained
    version = registry.get_version(settings, CHALLENGER)
    assert str(version.version) == result.model_version
    assert result.model_uri == registry.model_uri(settings, result.model_version)
    assert version.run_id == result.run_id
    assert version.tags["dataset_version"] == "ds-test-1"
    assert version.tags["dims"] == "64,32,16"
    assert len(version.tags["git_commit"]) >= 7
    model = registry.client(settings).get_registered_model(settings.mlflow.registered_model)
    assert CHAMPION not in model.aliases
    with pytest.raises(Near2Error, match="no version 'champion'"):
        registry.get_version(settings, CHAMPION)


def test_registered_model_reloads_to_the_same_embeddings(trained, tiny_model_dir):
    import mlflow
    from sentence_transformers import SentenceTransformer

    from near2_tasks.models.embeddings import encode, load_encoder

    settings, result = trained
    texts = ["cordless drill 20v", "Moen pull-down kitchen faucet", "DCD771C2"]
    saved = encode(SentenceTransformer(str(result.output_dir), device="cpu"), texts)
    from near2_tasks.models import registry

    registry.configure_mlflow(settings)
    reloaded = encode(load_encoder(f"models:/{settings.mlflow.registered_model}@{CHALLENGER}", device="cpu"), texts)
    np.testing.assert_allclose(reloaded, saved, atol=1e-6)
    # the training changed the weights
    base = encode(SentenceTransformer(str(tiny_model_dir), device="cpu"), texts)
    assert np.abs(base - saved).max() > 1e-3
    # as a pyfunc the dimension is a parameter; the default is the full dimension
    pyfunc = mlflow.pyfunc.load_model(result.model_uri)
    np.testing.assert_allclose(np.asarray(pyfunc.predict(texts)), saved, atol=1e-5)
    at_16 = np.asarray(pyfunc.predict(texts, params={"truncate_dim": 16}))
    np.testing.assert_allclose(at_16, truncate(saved, 16), atol=1e-5)


def test_same_run_key_returns_the_existing_version_without_training(trained, data, tmp_path):
    from near2_tasks.train.trainer import train_model

    settings, first = trained
    examples, validation = data
    runs_before = len(registered_versions(settings))
    again = train_model(settings, examples, validation, "ds-test-1", tmp_path / "again", run_key="dagrun-1")
    assert (again.run_id, again.model_version) == (first.run_id, first.model_version)
    assert again.val_metrics == pytest.approx(first.val_metrics)
    assert len(registered_versions(settings)) == runs_before
    assert (tmp_path / "again" / "modules.json").exists()  # the model is where the caller asked


# ----- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("dims, problem", [
    ([128, 64], "exceed the model's embedding dimension 64"),
    ([32, 64, 16], "not in descending order"),
    ([64, 32, 32], "repeat a dimension"),
    ([32, 16], "must start at the model's full dimension 64"),
])
def test_bad_dims_fail_clearly_and_register_nothing(tmp_path, tiny_model_dir, data, dims, problem):
    from near2_tasks.train.trainer import train_model

    settings = make_settings(tmp_path / "home", tiny_model_dir)
    # bypass the config validators, as a caller building settings in code could
    settings = settings.model_copy(update={"model": settings.model.model_copy(update={"dims": dims})})
    with pytest.raises(Near2Error, match=problem):
        train_model(settings, *data, dataset_version="x", output_dir=tmp_path / "out")
    assert registered_versions(settings) == []


def test_bad_dims_in_config_are_rejected_when_loading(tmp_path, tiny_model_dir):
    with pytest.raises(Near2Error, match="descending"):
        make_settings(tmp_path, tiny_model_dir, model={"dims": [16, 32, 64]})


@pytest.mark.parametrize("which", ["triplets", "pairs"])
def test_empty_training_split_fails_clearly(tmp_path, tiny_model_dir, data, which):
    from near2_tasks.train.trainer import train_model

    settings = make_settings(tmp_path / "home", tiny_model_dir)
    examples, validation = data
    empty = Examples(examples.triplets, examples.pairs)
    setattr(empty, which, getattr(examples, which).iloc[:0])
    with pytest.raises(Near2Error, match=f"no training {which}"):
        train_model(settings, empty, validation, dataset_version="x", output_dir=tmp_path / "out")
    assert registered_versions(settings) == []


def test_matryoshka_weights_by_dimension(tmp_path, tiny_model_dir):
    from near2_tasks.train.objective import matryoshka_weights

    dims = list(TINY_DIMS)
    assert matryoshka_weights(make_settings(tmp_path, tiny_model_dir, training={"matryoshka_weights": None})) == \
        [1.0] * len(dims)
    listed = [float(i + 1) for i in range(len(dims))]
    assert matryoshka_weights(make_settings(tmp_path, tiny_model_dir, training={"matryoshka_weights": listed})) == listed
    by_dim = {dims[-1]: 3.0, 999: 5.0}  # a dim the model does not train is ignored
    assert matryoshka_weights(make_settings(tmp_path, tiny_model_dir, training={"matryoshka_weights": by_dim})) == \
        [1.0] * (len(dims) - 1) + [3.0]
    # the default doubles the 64- and 32-d prefixes where the model has them
    assert matryoshka_weights(make_settings(tmp_path, tiny_model_dir, model={"dims": [384, 128, 64, 32]})) == \
        [1.0, 1.0, 2.0, 2.0]


def test_other_unusable_inputs_fail_before_any_work(tmp_path, tiny_model_dir, data):
    from near2_tasks.train.trainer import train_model

    examples, (queries, corpus, relevant) = data
    settings = make_settings(tmp_path / "home", tiny_model_dir)
    cases = [
        (settings, examples, (queries, corpus, {}), "validation split has no query with a relevant product"),
        (settings, Examples(examples.triplets, examples.pairs.assign(label=2)), (queries, corpus, relevant),
         r"pair labels must be 0 or 1, got \['2'\]"),
        (make_settings(tmp_path / "home", tiny_model_dir, training={"matryoshka_weights": [1, 1]}), examples,
         (queries, corpus, relevant), "matryoshka_weights has 2 entries for 3 dims"),
        (make_settings(tmp_path / "home", tiny_model_dir, training={"retrieval_weight": 0, "ranking_weight": 0}),
         examples, (queries, corpus, relevant), "both 0: nothing to train"),
    ]
    for case_settings, case_examples, validation, problem in cases:
        with pytest.raises(Near2Error, match=problem):
            train_model(case_settings, case_examples, validation, dataset_version="x", output_dir=tmp_path / "out")
    assert not (tmp_path / "home" / "mlflow.db").exists() and not (tmp_path / "out").exists()


def test_unreachable_tracking_server_is_retried_then_reported(tmp_path, tiny_model_dir, data):
    import socket

    from near2_tasks.train.trainer import train_model

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = make_settings(tmp_path / "home", tiny_model_dir, mlflow={
        "tracking_uri": f"http://127.0.0.1:{port}", "connect_retries": 2, "retry_backoff_s": 0.05})
    with pytest.raises(ServiceUnavailable, match=f"127.0.0.1:{port} is unreachable after 3 attempts"):
        train_model(settings, *data, dataset_version="x", output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_training_that_fails_mid_run_registers_nothing(trained, data, tmp_path):
    """A max_seq_length beyond the tiny model's 128 positions breaks the first training step."""
    from near2_tasks.models import registry
    from near2_tasks.train.trainer import train_model

    settings, _ = trained
    settings = settings.model_copy(update={"training": settings.training.model_copy(update={"max_seq_length": 1000})})
    versions_before = registered_versions(settings)
    examples, validation = data
    long_text = "heavy duty " * 200
    broken = Examples(examples.triplets.assign(positive=long_text), examples.pairs.assign(sentence2=long_text))
    with pytest.raises(RuntimeError):
        train_model(settings, broken, validation, dataset_version="x", output_dir=tmp_path / "out",
                    run_key="dagrun-broken")
    latest = registry.client(settings).search_runs([registry.configure_mlflow(settings)],
                                                   order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert latest.data.tags["run_key"] == "dagrun-broken" and latest.info.status == "FAILED"
    assert registered_versions(settings) == versions_before
    assert registry.find_version_by_run_key(settings, "dagrun-broken") is None
    assert not (settings.home / "checkpoints" / latest.info.run_id).exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a GPU")
def test_gpu_out_of_memory_names_the_batch_size(tmp_path, tiny_model_dir, data):
    import torch

    from near2_tasks.train.trainer import train_model

    settings = make_settings(tmp_path / "home", tiny_model_dir, model={"device": "cuda"},
                             training={"gpu_batch_size": 4096, "max_seq_length": 128})
    examples, validation = data
    many = Examples(pd.concat([examples.triplets.assign(anchor=examples.triplets["anchor"] + f" {i}")
                               for i in range(60)]), examples.pairs)
    torch.cuda.set_per_process_memory_fraction(0.002)
    try:
        with pytest.raises(Near2Error, match="out of GPU memory at batch size 4096"):
            train_model(settings, many, validation, dataset_version="x", output_dir=tmp_path / "out")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert registered_versions(settings) == []


# ----- the command line -----------------------------------------------------------------------
def write_config(path: Path, home: Path, model_dir: Path, dims: list[int]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({
        "home": str(home), "model": {"base_model": str(model_dir), "dims": dims},
        "training": {**TRAINING, "val_max_queries": 10, "val_corpus_size": 60},
    }))
    return path


def test_near2_train_command_trains_saves_and_registers(tmp_path, tiny_model_dir, capsys):
    from sentence_transformers import SentenceTransformer

    from near2_tasks.models import registry
    from near2_tasks.cli import main
    from near2_tasks.config import load_settings
    from near2_tasks.data.synthetic import write_catalog
    from near2_tasks.run import read_step

    catalog, judgments = write_catalog(tmp_path / "data", n_products=200, n_queries=45, seed=5)
    config = write_config(tmp_path / "near2.yaml", tmp_path / "home", tiny_model_dir, TINY_DIMS)
    main(["train", "--catalog", str(catalog), "--judgments", str(judgments), "--config", str(config),
          "--max-steps", "1", "--output", str(tmp_path / "model")])
    out = capsys.readouterr().out
    run_id = out.split("run id: ", 1)[1].split()[0]
    version = out.split("model version: ", 1)[1].split()[0]
    settings = load_settings(config)
    registered = registry.get_version(settings, CHALLENGER)
    assert (str(registered.version), registered.run_id) == (version, run_id)
    assert registry.client(settings).get_run(run_id).data.params["max_steps"] == "1"
    assert SentenceTransformer(str(tmp_path / "model"), device="cpu").get_embedding_dimension() == 64
    # the command ran the DAG's own steps: their records sit in the run directory it names
    steps = Path(out.split("steps recorded in ", 1)[1].split()[0])
    assert read_step(steps.parent, "train")["model_version"] == version
    assert read_step(steps.parent, "validate")["dataset_version"] == registered.tags["dataset_version"]
    assert read_step(steps.parent, "mine_examples")["triplets"] > 0


def test_near2_train_command_rejects_bad_dims_in_one_line(tmp_path, tiny_model_dir, capsys):
    from near2_tasks.cli import main
    from near2_tasks.data.synthetic import write_catalog

    catalog, judgments = write_catalog(tmp_path / "data", n_products=50, n_queries=10, seed=5)
    config = write_config(tmp_path / "near2.yaml", tmp_path / "home", tiny_model_dir, [16, 32, 64])
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--catalog", str(catalog), "--judgments", str(judgments), "--config", str(config),
              "--output", str(tmp_path / "model")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("near2: error: invalid configuration: model.dims") and "descending" in err
    assert "Traceback" not in err
    assert not (tmp_path / "home" / "mlflow.db").exists() and not (tmp_path / "model").exists()


# ----- recipe pieces: precision, principal-axes prefix, GradCache loss, run names -----------------------
def test_precision_follows_the_device_and_the_cpu():
    from near2_tasks.train.trainer import cpu_has_native_bf16, pick_precision

    assert cpu_has_native_bf16("flags\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    assert not cpu_has_native_bf16("flags\t: fpu sse avx2\n")
    assert pick_precision("auto", "cpu", native_cpu_bf16=True) == {"bf16": True, "fp16": False}
    assert pick_precision("auto", "cpu", native_cpu_bf16=False) == {"bf16": False, "fp16": False}
    assert pick_precision("bf16", "cpu", native_cpu_bf16=False) == {"bf16": True, "fp16": False}
    assert pick_precision("fp32", "cpu", native_cpu_bf16=True) == {"bf16": False, "fp16": False}
    with pytest.raises(Near2Error, match="fp16 needs a GPU"):
        pick_precision("fp16", "cpu")


def test_principal_axes_keep_full_cosine_and_order_the_prefix(tmp_path, tiny_model_dir, data):
    from sentence_transformers import SentenceTransformer

    from near2_tasks.train.init import load_base_model, product_texts

    examples, _ = data
    texts = product_texts(examples)
    assert len(texts) == len(set(texts)) > 64 and set(examples.triplets["positive"]) <= set(texts)
    plain = load_base_model(make_settings(tmp_path, tiny_model_dir), "cpu")
    rotated = load_base_model(make_settings(tmp_path, tiny_model_dir, training={"prefix_init": "pca"}), "cpu", texts)
    assert [type(m).__name__ for m in rotated] == ["Transformer", "Pooling", "Dense", "Normalize"]
    a, b = (m.encode(texts, convert_to_numpy=True) for m in (plain, rotated))
    # an orthogonal rotation: every pair's full-dimension cosine is unchanged
    np.testing.assert_allclose(a @ a.T, b @ b.T, atol=1e-5)
    # the rotated first 16 dims carry the most variance; the plain ones carry an arbitrary quarter of it
    share = lambda e: e[:, :16].var(axis=0).sum() / e.var(axis=0).sum()  # noqa: E731
    assert share(b) > share(a) + 0.1
    rotated.save(str(tmp_path / "saved"))
    np.testing.assert_allclose(SentenceTransformer(str(tmp_path / "saved"), device="cpu").encode(texts[:20]),
                               b[:20], atol=1e-6)


def test_principal_axes_need_enough_product_texts(tmp_path, tiny_model_dir):
    from near2_tasks.train.init import load_base_model

    settings = make_settings(tmp_path, tiny_model_dir, training={"prefix_init": "pca"})
    with pytest.raises(Near2Error, match="at least 2 product texts, got 1"):
        load_base_model(settings, "cpu", ["drill"])
    # fewer texts than dimensions still give an orthogonal rotation
    weight = load_base_model(settings, "cpu", ["drill", "hammer", "saw"])[2].linear.weight.detach()
    np.testing.assert_allclose(weight @ weight.T, np.eye(64), atol=1e-5)


def test_mnrl_mini_batch_size_switches_to_the_cached_loss(tmp_path, tiny_model_dir):
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    from near2_tasks.train.init import load_base_model

    from near2_tasks.train.objective import RETRIEVAL, hybrid_losses

    plain = make_settings(tmp_path, tiny_model_dir, training={"mnrl_mini_batch_size": None, "prefix_distill_weight": 0})
    cached = make_settings(tmp_path, tiny_model_dir, training={"mnrl_mini_batch_size": 4})
    model = load_base_model(plain, "cpu")
    assert type(hybrid_losses(model, plain)[RETRIEVAL].loss) is MultipleNegativesRankingLoss
    inner = hybrid_losses(model, cached)[RETRIEVAL].loss
    assert isinstance(inner, CachedMultipleNegativesRankingLoss) and inner.mini_batch_size == 4


def test_run_names_are_readable_and_distinct(trained, data, tmp_path):
    from near2_tasks.models import registry
    from near2_tasks.train.tracking import run_name
    from near2_tasks.train.trainer import train_model

    assert run_name("0123456789abcdef", "manual__2026", now=0) == "train-0123456789ab-19700101T000000.000Z-manual__2026"
    settings, first = trained
    examples, validation = data
    second = train_model(settings, examples, validation, dataset_version="ds-test-1", output_dir=tmp_path / "m2")
    names = [registry.client(settings).get_run(r.run_id).info.run_name for r in (first, second)]
    assert names[0].startswith("train-ds-test-1-") and names[0].endswith("-dagrun-1")
    assert names[1].startswith("train-ds-test-1-") and names[0] != names[1]


def _retrieval_batch(model, examples, n: int = 6):
    rows = examples.triplets.head(n)
    return [model.tokenize(rows[column].tolist()) for column in ("anchor", "positive", "negative")]


def test_prefix_distillation_adds_the_kl_term_with_its_gradients(tmp_path, tiny_model_dir, data):
    """The cached (GradCache) loss with prefix_distill_weight equals, in value and in every parameter's gradient,
    the Matryoshka MNRL loss plus weight x KL(full-dim softmax || prefix softmax) computed directly."""
    import torch
    import torch.nn.functional as F

    from near2_tasks.train.init import load_base_model
    from near2_tasks.train.objective import RETRIEVAL, hybrid_losses, matryoshka_weights

    dims, weight, scale = list(TINY_DIMS), 0.7, 20.0
    settings = make_settings(tmp_path, tiny_model_dir, training={
        "mnrl_mini_batch_size": 2, "prefix_distill_weight": weight, "matryoshka_weights": [1.0, 2.0, 3.0]})
    model = load_base_model(settings, "cpu")
    model.eval()  # no dropout: the two computations must see the same embeddings
    batch = _retrieval_batch(model, data[0])

    cached = hybrid_losses(model, settings)[RETRIEVAL](batch, None)
    cached.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    anchors, positives, negatives = (model(dict(features))["sentence_embedding"] for features in batch)
    docs = torch.cat([positives, negatives])

    def logits(dim, detach=False):
        q, d = (anchors.detach(), docs.detach()) if detach else (anchors, docs)
        return scale * F.normalize(q[:, :dim], dim=-1) @ F.normalize(d[:, :dim], dim=-1).T

    target = torch.arange(len(anchors))
    mnrl = sum(w * F.cross_entropy(logits(d), target) for d, w in zip(dims, matryoshka_weights(settings)))
    teacher = F.log_softmax(logits(dims[0], detach=True), dim=-1)
    kl = sum(F.kl_div(F.log_softmax(logits(d), dim=-1), teacher, log_target=True, reduction="batchmean")
             for d in dims[1:])
    direct = mnrl + weight * kl
    direct.backward()

    assert kl.item() > 1e-4  # the term is not trivially zero on this batch
    assert cached.item() == pytest.approx(direct.item(), rel=1e-4)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    # attention key biases get ~0 gradient in theory (softmax shift): compare against the model's largest one
    scale_of_grads = max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert (grads[name] - p.grad).abs().max().item() <= 1e-4 * scale_of_grads, name


def test_prefix_distillation_needs_the_cached_loss(tmp_path, tiny_model_dir):
    """The distillation runs inside CachedMNRL: plain MNRL with it on is refused when the settings load."""
    with pytest.raises(Near2Error, match="prefix_distill_weight > 0 needs mnrl_mini_batch_size"):
        make_settings(tmp_path, tiny_model_dir, training={"mnrl_mini_batch_size": None})
    plain = make_settings(tmp_path, tiny_model_dir, training={"mnrl_mini_batch_size": None, "prefix_distill_weight": 0})
    assert plain.training.prefix_distill_weight == 0 and plain.training.mnrl_mini_batch_size is None


def test_hardness_weighting_reaches_the_retrieval_loss(tmp_path, tiny_model_dir):
    from near2_tasks.train.init import load_base_model
    from near2_tasks.train.objective import RETRIEVAL, hybrid_losses

    for mini_batch in (None, 4):
        settings = make_settings(tmp_path, tiny_model_dir, training={
            "mnrl_mini_batch_size": mini_batch, "mnrl_hardness_mode": "hard_negatives", "mnrl_hardness_strength": 5,
            "prefix_distill_weight": 1.0 if mini_batch else 0.0})  # the distillation needs the cached loss
        inner = hybrid_losses(load_base_model(settings, "cpu"), settings)[RETRIEVAL].loss
        assert (inner.hardness_mode, inner.hardness_strength) == ("hard_negatives", 5)


def test_relevance_axes_keep_full_cosine_and_order_by_query_positive_agreement(tmp_path, tiny_model_dir, data):
    import torch

    from near2_tasks.train.init import load_base_model, product_texts, relevance_pairs

    examples, _ = data
    pairs = relevance_pairs(examples)
    assert len(pairs) == len(set(pairs)) > 20 and all(q in set(examples.triplets["anchor"]) for q, _ in pairs)
    plain = load_base_model(make_settings(tmp_path, tiny_model_dir), "cpu")
    rotated = load_base_model(make_settings(tmp_path, tiny_model_dir, training={"prefix_init": "relevance"}), "cpu",
                              product_texts(examples), pairs)
    assert [type(m).__name__ for m in rotated] == ["Transformer", "Pooling", "Dense", "Normalize"]
    queries, positives = ([q for q, _ in pairs], [p for _, p in pairs])
    qa, pa, qb, pb = (m.encode(t, convert_to_numpy=True) for m in (plain, rotated) for t in (queries, positives))
    np.testing.assert_allclose((qa * pa).sum(1), (qb * pb).sum(1), atol=1e-5)  # orthogonal: full cosine kept
    # recomputed here: each rotated axis's mean query-positive product is that axis's eigenvalue, descending
    agreement = (qb * pb).mean(axis=0)
    assert np.all(np.diff(agreement) <= 1e-6) and agreement[0] > agreement[-1] + 1e-3
    cross = qa.T @ pa / len(qa)
    expected = np.sort(np.linalg.eigvalsh((cross + cross.T) / 2))[::-1]
    np.testing.assert_allclose(agreement, expected, atol=1e-5)
    # so the 16-d prefix keeps more of the positives' agreement than the plain model's first 16 dims
    assert agreement[:16].sum() > (qa[:, :16] * pa[:, :16]).sum(1).mean() + 0.01
    weight = rotated[2].linear.weight.detach()
    torch.testing.assert_close(weight @ weight.T, torch.eye(64), atol=1e-5, rtol=0)


def test_relevance_pairs_come_from_the_ranking_pairs_without_triplets(data):
    """A ranking-only objective has no triplets: the relevance rotation then uses the label-1 pairs."""
    import pandas as pd

    from near2_tasks.train.init import relevance_pairs

    examples, _ = data
    pairs = examples.pairs
    ranking_only = Examples(pd.DataFrame(columns=["anchor", "positive", "negative"]), pairs, {})
    expected = {(q, p) for q, p, label in pairs[["sentence1", "sentence2", "label"]].itertuples(index=False)
                if label == 1}
    assert set(relevance_pairs(ranking_only)) == expected and len(expected) > 20
    assert relevance_pairs(Examples(pairs.iloc[:0], pairs.iloc[:0], {})) == []


def test_relevance_axes_need_training_pairs(tmp_path, tiny_model_dir):
    from near2_tasks.train.init import load_base_model

    settings = make_settings(tmp_path, tiny_model_dir, training={"prefix_init": "relevance"})
    with pytest.raises(Near2Error, match=r"relevance needs at least 2 \(query, positive\) pairs, got 1"):
        load_base_model(settings, "cpu", ["drill"], [("cordless drill", "drill")])


def _prefix_problem(n: int = 96, dim: int = 32, prefix: int = 8, seed: int = 0):
    """Triplets whose query-positive signal sits only *outside* the first ``prefix`` axes."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(n, dim - prefix, generator=g)
    anchors = F.normalize(torch.cat([torch.randn(n, prefix, generator=g), signal], 1), dim=-1)
    positives = F.normalize(torch.cat([torch.randn(n, prefix, generator=g),
                                       signal + 0.3 * torch.randn(n, dim - prefix, generator=g)], 1), dim=-1)
    negatives = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    return anchors, positives, negatives


def _top1(queries, products, d: int) -> float:
    import torch.nn.functional as F

    scores = F.normalize(queries[:, :d], dim=-1) @ F.normalize(products[:, :d], dim=-1).T
    return float((scores.argmax(1) == __import__("torch").arange(len(queries))).float().mean())


def test_prefix_refit_moves_the_signal_into_the_prefix_and_keeps_the_full_cosine():
    import torch

    from near2_tasks.train.refit import fit_prefix_rotation

    anchors, positives, negatives = _prefix_problem()
    n = len(anchors)
    pool = torch.cat([positives, negatives])
    ids = torch.arange(n)
    result = fit_prefix_rotation(anchors, pool, ids, ids, ids + n, {(i, i) for i in range(n)}, [32, 8], [1.0, 1.0],
                                 epochs=30, learning_rate=1e-2, batch_size=32, random_candidates=16, scale=20.0,
                                 distill_weight=1.0, seed=0)
    w = result.rotation
    torch.testing.assert_close(w @ w.T, torch.eye(32), atol=1e-4, rtol=0)
    rotated_a, rotated_p = anchors @ w.T, positives @ w.T
    torch.testing.assert_close((rotated_a * rotated_p).sum(1), (anchors * positives).sum(1), atol=1e-4, rtol=0)
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    before, after = _top1(anchors, positives, 8), _top1(rotated_a, rotated_p, 8)
    assert before < 0.2 and after > before + 0.3, (before, after)
    assert _top1(rotated_a, rotated_p, 32) == _top1(anchors, positives, 32)  # the full dimension: same ranking


def test_prefix_refit_never_pushes_away_another_known_positive():
    """A batch candidate that is another known positive of the anchor is masked: with every candidate a known
    positive but the triplet's own, the loss has nothing to push away (its value is the same for any W)."""
    import torch

    from near2_tasks.train.refit import fit_prefix_rotation

    anchors, positives, negatives = _prefix_problem(n=8)
    pool = torch.cat([positives, negatives])
    ids = torch.arange(8)
    everything = {(a, p) for a in range(8) for p in range(16)}
    result = fit_prefix_rotation(anchors, pool, ids, ids, ids + 8, everything, [32, 8],
                                 [1.0, 1.0], epochs=3, learning_rate=1e-2, batch_size=8, random_candidates=4,
                                 scale=20.0, distill_weight=1.0, seed=0)
    assert result.epoch_losses == pytest.approx([0.0] * 3, abs=1e-6)
    torch.testing.assert_close(result.rotation, torch.eye(32), atol=1e-6, rtol=0)


def test_fold_rotation_composes_with_the_dense_rotation_or_inserts_one(tmp_path, tiny_model_dir, data):
    import torch

    from near2_tasks.train.init import fold_rotation, load_base_model, product_texts, relevance_pairs

    examples, _ = data
    texts = ["cordless drill 20v", "Moen pull-down kitchen faucet", "DCD771C2"]
    permutation = torch.eye(64)[torch.randperm(64, generator=torch.Generator().manual_seed(1))]
    plain = load_base_model(make_settings(tmp_path, tiny_model_dir, training={"prefix_init": "none"}), "cpu")
    before = plain.encode(texts, convert_to_tensor=True)
    fold_rotation(plain, permutation)
    assert [type(m).__name__ for m in plain] == ["Transformer", "Pooling", "Dense", "Normalize"]
    torch.testing.assert_close(plain.encode(texts, convert_to_tensor=True), before @ permutation.T, atol=1e-5,
                               rtol=0)
    rotated = load_base_model(make_settings(tmp_path, tiny_model_dir), "cpu", product_texts(examples),
                              relevance_pairs(examples))
    before = rotated.encode(texts, convert_to_tensor=True)
    fold_rotation(rotated, permutation)
    assert [type(m).__name__ for m in rotated] == ["Transformer", "Pooling", "Dense", "Normalize"]  # composed
    torch.testing.assert_close(rotated.encode(texts, convert_to_tensor=True), before @ permutation.T, atol=1e-5,
                               rtol=0)


def test_prefix_refit_needs_two_triplets_and_can_be_turned_off(tmp_path, tiny_model_dir, data):
    from near2_tasks.train.init import load_base_model
    from near2_tasks.train.refit import refit_prefixes

    examples, _ = data
    model = load_base_model(make_settings(tmp_path, tiny_model_dir), "cpu")
    off = make_settings(tmp_path, tiny_model_dir, training={"prefix_refit_epochs": 0})
    assert refit_prefixes(model, examples, off) is None
    one = Examples(examples.triplets.iloc[:1], examples.pairs, {})
    with pytest.raises(Near2Error, match="prefix_refit_epochs needs at least 2 training triplets, got 1"):
        refit_prefixes(model, one, make_settings(tmp_path, tiny_model_dir))
