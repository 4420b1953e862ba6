"""Fault 4: the challenger fails its gate, is rejected, or is never approved (the approval wait times out).

v1 is the champion and its index serves (set up once by a first run, shared by the cases). Another
run registers a challenger, evaluates and gates it (the real evaluate and gate steps), then reaches
promotion:

* ``gate_fails``: an NDCG@10 floor no model reaches (1.01);
* ``rejected``: the gate passes, the reviewer sets ``approval=rejected``;
* ``approval_times_out``: the gate passes and nobody answers (the DAG's approval sensor times out;
  the version stays ``pending``).

Each time the run ends with a one-line reason and nothing moves: the champion, the alias target, the
served index and its document count, the set of indices. Only the registry gains the challenger (with its gate
tags), which is what a reviewer needs to see why.
"""

from __future__ import annotations

import uuid

import pytest

from near2_tasks.run import SkipRest, StepContext

from near2_tasks.evaluate import step as evaluate_step

from near2_tasks.promote import step as promote_step

from near2_tasks.promote import promotion

from near2_tasks.models import registry
from near2_tasks.conventions import CHAMPION, PENDING, REJECTED, TAG_GATE
from near2_tasks.errors import Near2Error
from near2_tasks.promote.gates import current_champion
from tests.faults.support import (
    alias_indices,
    alias_target,
    doc_count,
    drop_alias_indices,
    index_steps,
    make_fault_settings,
    with_sections,
)

LENIENT = {"overall": {"metrics": {"ndcg@10": {"max_drop": 1.0}}}}  # any model passes
IMPOSSIBLE = {"overall": {"metrics": {"ndcg@10": {"floor": 1.01}}}}  # no model passes


def _trained(settings, version: str) -> dict:
    """The train step's result for a version registered directly (no training needed here)."""
    return {"model_version": version, "model_uri": registry.model_uri(settings, version),
            "run_id": registry.get_version(settings, version).run_id}


def _state(settings, client) -> dict:
    alias = settings.elasticsearch.alias
    target = alias_target(client, alias)
    versions = registry.client(settings).search_model_versions(f"name = '{settings.mlflow.registered_model}'")
    return {"champion": str(current_champion(settings).version), "alias_target": target,
            "docs": doc_count(client, target), "indices": alias_indices(client, alias),
            "versions": sorted((str(v.version) for v in versions), key=int)}


@pytest.fixture(scope="module")
def champion_serving(_dedicated_es_session, validation, examples, tiny_model_dir, register_model_dir,
                     tmp_path_factory):
    """Settings whose registry has champion v1, evaluated, gated, approved, promoted and served by a
    first run (shared by the cases below: none of them may change any of it)."""
    alias = f"faults-gate-{uuid.uuid4().hex[:8]}"
    _dedicated_es_session.ensure_running()
    settings = make_fault_settings(tmp_path_factory.mktemp("faults-gate") / "home", _dedicated_es_session.url,
                                   alias, tiny_model_dir, gates=LENIENT)
    first = StepContext(settings, run_id="first")
    trained_v1 = _trained(settings, register_model_dir(settings, tiny_model_dir))
    assert promote_step.gate(first, trained_v1, evaluate_step.evaluate(first, validation, examples, trained_v1))["passed"]
    promotion.set_approval(settings, trained_v1["model_version"])
    index_steps(first, validation, promote_step.promote(first, trained_v1))
    yield settings
    drop_alias_indices(_dedicated_es_session, alias)


@pytest.mark.parametrize("fault", ["gate_fails", "rejected", "approval_times_out"])
def test_failed_gate_or_missing_approval_moves_nothing(
    fault, champion_serving, validation, examples, fault_es_client, second_tiny_model_dir, register_model_dir,
    fault_record,
):
    settings, client = champion_serving, fault_es_client
    before = _state(settings, client)
    assert before["docs"] == validation["products"]

    # another run: its challenger is evaluated and gated, then the run stops before promotion
    run = StepContext(with_sections(settings, gates=IMPOSSIBLE if fault == "gate_fails" else LENIENT),
                               run_id=f"second-{fault}")
    trained = _trained(settings, register_model_dir(settings, second_tiny_model_dir))
    version = trained["model_version"]
    gate = promote_step.gate(run, trained, evaluate_step.evaluate(run, validation, examples, trained))
    assert gate["passed"] is (fault != "gate_fails")
    if fault == "rejected":
        promotion.set_approval(settings, version, approved=False)
    approval = promote_step.approval_status(run, trained)
    with pytest.raises(Near2Error) as stopped:  # the DAG would not even call promote after a failed gate
        promote_step.promote(run, trained)
    reason = str(stopped.value)

    after = _state(settings, client)
    assert "\n" not in reason and f"version {version}" in reason
    if fault == "gate_fails":
        assert gate["reasons"] and any("1.01" in r for r in gate["reasons"]) and "failed its gate" in reason
        assert registry.get_version(settings, version).tags[TAG_GATE] == "fail"
    elif fault == "rejected":
        assert approval["state"] == REJECTED and isinstance(stopped.value, SkipRest)
        assert "rejected" in reason
    else:
        assert approval["state"] == PENDING and "awaits approval" in reason
    assert after == {**before, "versions": sorted(before["versions"] + [version], key=int)}
    aliases = registry.client(settings).get_registered_model(settings.mlflow.registered_model).aliases
    assert str(aliases[CHAMPION]) == before["champion"]

    fault_record.update(fault=fault, gate_passed=gate["passed"], approval=approval["state"], reason=reason,
                        gate_reasons=gate["reasons"][:3], before=before, after=after)
