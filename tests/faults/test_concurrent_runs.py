"""Fault 6: two retraining runs at once race to move the serving alias.

Both runs start from the same served index (champion v1). Run X promotes v2 and builds its index;
run Y then promotes v3 (the champion now) and builds its own. Both read the same alias target before
building, so both hold a compare-and-swap ticket for it. Whatever the order of their swap steps, the
alias must end on an index whose ``_meta.model_version`` is the champion, and it must point at exactly
one index:

* ``stale_run_first``: X (no longer champion) reaches its swap step first, then Y;
* ``simultaneous``: both swap steps start at the same instant (threads released by a barrier);
* ``late_stale_swap``: X checked the champion just before Y's promotion, so its compare-and-swap lands
  after it (replayed here with the index module's CAS, the last call of X's swap step); then Y swaps.

The registry is a real MLflow SQLite store; the indices live on the dedicated Elasticsearch.
"""

from __future__ import annotations

import threading

import pytest

from near2_tasks.run import StepContext

from near2_tasks.serving import step as serving_step

from near2_tasks.promote import promotion

from near2_tasks.models import registry
from near2_tasks.conventions import TAG_GATE
from near2_tasks.errors import Near2Error
from near2_tasks.promote.gates import current_champion
from near2_tasks.serving.alias import swap_alias
from tests.faults.support import alias_indices, alias_target, doc_count, index_meta, index_steps


def _registry_model(settings, version: str) -> dict:
    return {"model_uri": registry.model_uri(settings, version), "model_version": version,
            "run_id": registry.get_version(settings, version).run_id}


def _promote(settings, version: str) -> None:
    """What a passed gate and a reviewer leave on a version, then the real promotion."""
    registry.client(settings).set_model_version_tag(settings.mlflow.registered_model, version, TAG_GATE, "pass")
    promotion.set_approval(settings, version, approved=True)
    promotion.promote(settings, version)


def _swap(ctx, built) -> str:
    """The swap step's outcome in words: swapped, or the one-line reason it did not."""
    try:
        serving_step.swap_alias(ctx, built)
        return "swapped"
    except Near2Error as exc:
        return f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize("order", ["stale_run_first", "simultaneous", "late_stale_swap"])
def test_racing_runs_leave_the_alias_on_the_champion(
    order, fault_settings, validation, fault_es_client, tiny_model_dir, second_tiny_model_dir, register_model_dir,
    fault_record,
):
    settings, alias, client = fault_settings, fault_settings.elasticsearch.alias, fault_es_client
    v1 = register_model_dir(settings, tiny_model_dir)
    _promote(settings, v1)
    initial = index_steps(StepContext(settings, run_id="initial"), validation,
                          _registry_model(settings, v1))["index"]
    v2 = register_model_dir(settings, second_tiny_model_dir)
    v3 = register_model_dir(settings, tiny_model_dir)
    before = {"champion": v1, "alias_target": alias_target(client, alias), "versions": [v1, v2, v3]}
    assert before["alias_target"] == initial

    run_x, run_y = (StepContext(settings, run_id=name) for name in ("run-x", "run-y"))
    _promote(settings, v2)
    built_x = serving_step.build_index(run_x, validation, _registry_model(settings, v2))
    _promote(settings, v3)  # run Y was approved later: v3 is the champion now
    built_y = serving_step.build_index(run_y, validation, _registry_model(settings, v3))
    serving_step.verify_index(run_x, validation, built_x)
    serving_step.verify_index(run_y, validation, built_y)
    assert built_x["expected_current"] == built_y["expected_current"] == initial

    if order == "stale_run_first":
        outcomes = {"run-x": _swap(run_x, built_x), "run-y": _swap(run_y, built_y)}
    elif order == "late_stale_swap":
        swap_alias(fault_es_client, alias, built_x["index"], built_x["expected_current"])
        assert alias_target(client, alias) == built_x["index"]  # v2 served while v3 is champion, for a moment
        outcomes = {"run-x": "swapped (its check passed just before v3 was promoted)",
                    "run-y": _swap(run_y, built_y)}
    else:
        barrier, outcomes = threading.Barrier(2), {}

        def race(name, ctx, built):
            barrier.wait()
            outcomes[name] = _swap(ctx, built)

        threads = [threading.Thread(target=race, args=("run-x", run_x, built_x)),
                   threading.Thread(target=race, args=("run-y", run_y, built_y))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)

    champion = str(current_champion(settings).version)
    served = alias_target(client, alias)  # asserts it is exactly one index
    assert champion == v3
    assert served == built_y["index"], outcomes
    assert index_meta(client, served)["model_version"] == champion
    assert doc_count(client, served) == validation["products"]
    assert outcomes["run-y"] == "swapped", outcomes
    if order != "late_stale_swap":
        assert outcomes["run-x"] != "swapped", "a run whose model is no longer the champion must not swap"

    fault_record.update(
        fault=f"two runs swap the alias ({order})", before=before,
        run_x={"model_version": v2, "index": built_x["index"], "swap": outcomes["run-x"]},
        run_y={"model_version": v3, "index": built_y["index"], "swap": outcomes["run-y"]},
        after={"champion": champion, "alias_target": served,
               "served_model_version": index_meta(client, served)["model_version"],
               "indices": alias_indices(client, alias)},
    )
