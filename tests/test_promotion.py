"""Approval, promotion and rollback on a real MLflow registry (SQLite), with real gate runs.

The two registered encoders differ at the smallest dimension only (fixture ``tiny_prefix_variants``):
``strong`` beats ``weak`` at 16 dimensions and ties at 64 and 32.
"""

from __future__ import annotations

import json

import pytest

from near2_tasks.promote.settings import GateRules, GateSettings, MetricGate
from near2_tasks.conventions import CHALLENGER, CHAMPION, TAG_APPROVAL, TAG_PREVIOUS_CHAMPION
from near2_tasks.data.synthetic import generate_catalog
from near2_tasks.errors import Near2Error
from near2_tasks.promote.step import gate_version
from near2_tasks.promote.promotion import promote, promotion_status, read_approval, rollback, set_approval


@pytest.fixture(scope="module")
def catalog():
    return generate_catalog(300, 60, 7)


def with_base(settings, base_dir, **gates):
    """Settings whose base model (the reference before any champion) is ``base_dir``; NDCG@10 may drop
    by float noise only."""
    return settings.model_copy(update={
        "model": settings.model.model_copy(update={"base_model": str(base_dir)}),
        "gates": GateSettings(overall=GateRules(metrics={"ndcg@10": MetricGate(max_drop=1e-4)}), **gates),
    })


def alias(settings, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    from near2_tasks.models.registry import client

    try:
        return str(client(settings).get_model_version_by_alias(settings.mlflow.registered_model, name).version)
    except MlflowException:
        return None


def tags(settings, version: str) -> dict[str, str]:
    from near2_tasks.models.registry import client

    return client(settings).get_model_version(settings.mlflow.registered_model, version).tags


def test_a_challenger_worse_at_one_dimension_fails_the_gate_and_champion_does_not_move(
        tiny_settings, tiny_prefix_variants, register_model_dir, catalog, tmp_path):
    settings = with_base(tiny_settings, tiny_prefix_variants["strong"])
    first = register_model_dir(settings, tiny_prefix_variants["strong"])
    assert gate_version(settings, catalog.products, catalog.judgments, output_dir=tmp_path / "1").decision.passed
    set_approval(settings, first)
    assert promote(settings, first).moved
    assert alias(settings, CHAMPION) == first

    worse = register_model_dir(settings, tiny_prefix_variants["weak"])
    decision = gate_version(settings, catalog.products, catalog.judgments, output_dir=tmp_path / "2").decision
    assert [check.dim for check in decision.failures] == [16]
    set_approval(settings, worse)  # even an approval cannot promote a failed gate
    with pytest.raises(Near2Error, match=f"not promoted: version {worse} failed its gate"):
        promote(settings, worse)
    assert alias(settings, CHAMPION) == first
    assert alias(settings, CHALLENGER) == worse  # it keeps challenger only


def test_a_better_challenger_moves_champion_only_once_approved_and_rollback_restores_the_previous(
        tiny_settings, tiny_prefix_variants, register_model_dir, catalog, tmp_path):
    settings = with_base(tiny_settings, tiny_prefix_variants["weak"])
    first = register_model_dir(settings, tiny_prefix_variants["weak"])
    gate_version(settings, catalog.products, catalog.judgments, output_dir=tmp_path / "1")
    set_approval(settings, first)
    promote(settings, first)

    better = register_model_dir(settings, tiny_prefix_variants["strong"])
    result = gate_version(settings, catalog.products, catalog.judgments, output_dir=tmp_path / "2")
    assert result.decision.passed and result.decision.reference_role == "champion"
    status = promotion_status(settings, CHALLENGER)
    assert (status.version, status.gate, status.approval, status.ready) == (better, "pass", "pending", False)
    with pytest.raises(Near2Error, match="awaits approval: set the tag approval=approved"):
        promote(settings, better)
    assert alias(settings, CHAMPION) == first

    set_approval(settings, better)  # what a reviewer does in the MLflow UI
    move = promote(settings, better)
    assert (move.champion, move.previous, move.moved) == (better, first, True)
    assert alias(settings, CHAMPION) == better
    assert tags(settings, better)[TAG_PREVIOUS_CHAMPION] == first
    assert not promote(settings, better).moved  # promoting the champion again changes nothing

    back = rollback(settings)
    assert (back.champion, back.previous) == (first, better)
    assert alias(settings, CHAMPION) == first
    with pytest.raises(Near2Error, match=f"champion version {first} has no previous champion"):
        rollback(settings)
    assert alias(settings, CHAMPION) == first


def test_rejection_and_auto_approval(tiny_settings, tiny_model_dir, register_model_dir, catalog, tmp_path):
    settings = with_base(tiny_settings, tiny_model_dir, auto_approve=True)
    version = register_model_dir(settings, tiny_model_dir)
    with pytest.raises(Near2Error, match=f"version {version} has not been gated yet"):
        promote(settings, version)
    gate_version(settings, catalog.products, catalog.judgments, output_dir=tmp_path)

    set_approval(settings, version, approved=False)  # an explicit rejection beats auto-approval
    assert tags(settings, version)[TAG_APPROVAL] == "rejected"
    with pytest.raises(Near2Error, match="rejected by a reviewer"):
        promote(settings, version)
    assert alias(settings, CHAMPION) is None

    from near2_tasks.models.registry import client

    client(settings).delete_model_version_tag(settings.mlflow.registered_model, version, TAG_APPROVAL)
    status = promotion_status(settings, version)
    assert status.approval == "approved" and status.auto_approved
    assert promote(settings, version).previous is None
    assert alias(settings, CHAMPION) == version
    with pytest.raises(Near2Error, match="has no previous champion"):
        rollback(settings)


def test_rollback_without_a_champion_and_unknown_versions_are_clear_errors(tiny_settings):
    with pytest.raises(Near2Error, match="has no champion to roll back"):
        rollback(tiny_settings)
    with pytest.raises(Near2Error, match="has no version '42'"):
        promote(tiny_settings, "42")


@pytest.mark.parametrize("value, auto, expected", [
    ("approved", False, ("approved", False)),
    (" Approved ", False, ("approved", False)),
    ("REJECTED", True, ("rejected", False)),
    ("pending", False, ("pending", False)),
    ("pending", True, ("approved", True)),
    ("yes", False, ("pending", False)),  # not a recognised value: waits for a clear decision
    (None, False, ("pending", False)),
])
def test_approval_tags_typed_by_hand_are_read_leniently(value, auto, expected):
    assert read_approval({} if value is None else {TAG_APPROVAL: value}, auto) == expected


def test_cli_approve_promote_rollback(tiny_settings, tiny_prefix_variants, register_model_dir, catalog, tmp_path,
                                      monkeypatch, capsys):
    from near2_tasks.cli import main
    from near2_tasks.data.synthetic import write_catalog

    settings = with_base(tiny_settings, tiny_prefix_variants["strong"])
    config = tmp_path / "near2.yaml"
    config.write_text(
        f"home: {settings.home}\n"
        f"model: {{base_model: '{settings.model.base_model}', dims: [64, 32, 16]}}\n"
        "gates: {overall: {metrics: {ndcg@10: {max_drop: 0.0001}}}}\n")
    monkeypatch.setenv("NEAR2_CONFIG", str(config))
    catalog_csv, judgments_csv = write_catalog(tmp_path / "data", n_products=300, n_queries=60, seed=7)
    data = ["--catalog", str(catalog_csv), "--judgments", str(judgments_csv)]

    first = register_model_dir(settings, tiny_prefix_variants["strong"])
    main(["gate", *data, "--output-dir", str(tmp_path / "g1")])
    assert "Gate PASSED" in capsys.readouterr().out
    main(["approve", first])
    main(["promote", first])
    assert capsys.readouterr().out.splitlines()[-1] == f"champion: none -> v{first}"

    worse = register_model_dir(settings, tiny_prefix_variants["weak"])
    with pytest.raises(SystemExit) as failed:
        main(["gate", *data, "--output-dir", str(tmp_path / "g2")])
    assert failed.value.code == 1 and "Gate FAILED" in capsys.readouterr().out
    main(["approve", worse, "--reject"])
    with pytest.raises(SystemExit) as refused:
        main(["promote", worse])
    assert refused.value.code == 2
    assert f"near2: error: not promoted: version {worse} failed its gate" in capsys.readouterr().err
    assert alias(settings, CHAMPION) == first


def test_near2_index_serves_the_champion_and_refuses_any_other_model(
        tiny_settings, tiny_prefix_variants, register_model_dir, catalog, tmp_path, es_client):
    """Issue 13's defect: with a champion serving, `near2 index` without --model built an index with the
    base model and moved the alias to it. Now it indexes the champion; another model needs
    --allow-non-champion, and a refusal leaves the alias where it was."""
    import yaml
    from click.testing import CliRunner

    from near2_tasks.cli import cli
    from near2_tasks.serving.alias import index_status

    settings = with_base(tiny_settings, tiny_prefix_variants["strong"])
    champion = register_model_dir(settings, tiny_prefix_variants["strong"])
    gate_version(settings, catalog.products, catalog.judgments, output_dir=tmp_path / "1")
    set_approval(settings, champion)
    promote(settings, champion)
    challenger = register_model_dir(settings, tiny_prefix_variants["weak"])  # registered, never promoted
    config = tmp_path / "near2.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json", include={
        "home", "elasticsearch", "dataset", "model", "mlflow"})))

    def near2_index(*args: str):
        return CliRunner().invoke(cli, ["--config", str(config), "index", *args, "--json"])

    served = near2_index()
    assert served.exit_code == 0, served.output
    meta = json.loads(served.stdout)["meta"]
    assert (meta["model_version"], meta["model_uri"]) == (champion, f"models:/{settings.mlflow.registered_model}/{champion}")
    target = index_status(settings).target
    assert target == json.loads(served.stdout)["index"]

    for model in (f"models:/{settings.mlflow.registered_model}/{challenger}",
                  f"models:/{settings.mlflow.registered_model}@{CHALLENGER}", str(tiny_prefix_variants["weak"])):
        refused = near2_index("--model", model)
        assert refused.exit_code != 0
        assert "is not the champion" in str(refused.exception) and f"v{champion} is" in str(refused.exception)
        assert index_status(settings).target == target  # the alias did not move

    # another alias than the serving one (a staging alias) may point at any model; the serving one stays
    staging = f"{settings.elasticsearch.alias}-staging"
    staged = near2_index("--model", str(tiny_prefix_variants["weak"]), "--alias", staging)
    assert staged.exit_code == 0, staged.output
    assert "is not the champion" in staged.stderr and index_status(settings).target == target
    assert index_status(settings.model_copy(update={"elasticsearch": settings.elasticsearch.model_copy(
        update={"alias": staging})})).target == json.loads(staged.stdout)["index"]

    forced = near2_index("--model", f"models:/{settings.mlflow.registered_model}/{challenger}", "--force")
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout)["meta"]["model_version"] == challenger
    assert index_status(settings).target == json.loads(forced.stdout)["index"] != target
