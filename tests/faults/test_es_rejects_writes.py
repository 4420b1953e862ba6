"""Fault 2: Elasticsearch rejects the writes of a new index's load.

Three real ways a cluster says no, each in front of a real server:

* ``request_429``: every bulk request is answered ``429 es_rejected_execution_exception`` (the proxy
  answers instead of the server, as an overloaded coordinating node does);
* ``item_429``: bulk requests are answered 200 with every item rejected 429 (write thread pool full);
* ``read_only``: when the load starts, the new index gets ``index.blocks.read_only_allow_delete`` (what
  the flood-stage disk watermark sets); the real server then rejects the documents itself.

Expected each time: bounded retries with backoff, then one clear Near2Error; the alias still on the
previous index, which still answers; the half-loaded index never verified, so it cannot be swapped in.
After the fault clears, re-running the run's steps converges to the full catalog and swaps.
"""

from __future__ import annotations

import json

import pytest

from near2_tasks.run import StepContext

from near2_tasks.data import step as data_step

from near2_tasks.serving import step as serving_step
from near2_tasks.errors import Near2Error
from near2_tasks.serving.alias import swap_alias
from near2_tasks.serving.search import search
from tests.faults.harness import CannedResponse
from tests.faults.support import (
    alias_indices,
    alias_target,
    doc_count,
    doc_ids,
    index_steps,
    is_verified,
    local_model,
    with_es_url,
)

REJECTED = {"type": "es_rejected_execution_exception",
            "reason": "rejected execution of coordinating operation [near2 fault test]"}


def _request_429(request) -> CannedResponse | None:
    if request.is_bulk:
        body = {"error": {**REJECTED, "root_cause": [REJECTED]}, "status": 429}
        return CannedResponse(429, json.dumps(body).encode())
    return None


def _item_429(request) -> CannedResponse | None:
    if not request.is_bulk:
        return None
    items = []
    for line in request.body.decode().splitlines():
        action = json.loads(line) if line.strip() else {}
        if len(action) == 1 and next(iter(action)) in ("index", "create", "update", "delete"):
            op, target = next(iter(action.items()))
            items.append({op: {"_index": target.get("_index"), "_id": target.get("_id"), "status": 429,
                               "error": REJECTED}})
    return CannedResponse(200, json.dumps({"took": 1, "errors": True, "items": items}).encode())


def _read_only_on_first_bulk(client):
    """The flood-stage watermark, on the index being loaded, as the first bulk request arrives."""
    blocked: list[str] = []

    def rule(request):
        if request.is_bulk and not blocked:
            index = json.loads(request.body.decode().splitlines()[0])["index"]["_index"]
            client.indices.put_settings(index=index, settings={"index.blocks.read_only_allow_delete": True})
            blocked.append(index)
        return None  # forwarded: the real server rejects the documents

    return rule, blocked


@pytest.mark.parametrize("fault", ["request_429", "item_429", "read_only"])
def test_rejected_writes_fail_cleanly_and_rerun_converges(
    fault, fault_settings, validation, faulty_proxy, fault_es_client, tiny_model_dir, second_tiny_model_dir,
    fault_record,
):
    settings, alias, client = fault_settings, fault_settings.elasticsearch.alias, fault_es_client
    es = settings.elasticsearch
    catalog_ids = sorted(data_step.accepted(validation)[0].product_id.astype(str))
    previous = index_steps(StepContext(settings, run_id="previous"), validation,
                           local_model(tiny_model_dir, "1"))["index"]
    before = {"alias_target": alias_target(client, alias), "docs": doc_count(client, previous)}
    assert before == {"alias_target": previous, "docs": len(catalog_ids)}

    blocked: list[str] = []
    if fault == "request_429":
        faulty_proxy.rule = _request_429
    elif fault == "item_429":
        faulty_proxy.rule = _item_429
    else:
        faulty_proxy.rule, blocked = _read_only_on_first_bulk(client)

    run = StepContext(with_es_url(settings, faulty_proxy.url), run_id=f"rejected-{fault}")
    with pytest.raises(Near2Error) as failure:
        serving_step.build_index(run, validation, local_model(second_tiny_model_dir, "2"))
    message = str(failure.value)
    bulk_requests = faulty_proxy.seen["bulk"]
    assert "\n" not in message
    if fault == "read_only":
        assert "read-only" in message and "index.blocks" in message, "the hint names the block, not overload"
    else:
        assert "429" in message
    # retried (more than one bulk request for the first chunk), and bounded
    assert 1 < bulk_requests <= (es.bulk_max_retries + 1) ** 2 * (es.max_retries + 1)

    # nothing half-swapped: the alias never moved, the previous index still serves
    assert alias_target(client, alias) == previous
    assert doc_count(client, previous) == len(catalog_ids)
    assert search(settings, "cordless drill", k=5).index == previous
    half_built = [name for name in alias_indices(client, alias) if name != previous]
    assert len(half_built) == 1
    docs_in_half_built = doc_count(client, half_built[0])
    assert docs_in_half_built < len(catalog_ids) and not is_verified(client, half_built[0])
    with pytest.raises(Near2Error, match="not passed verification"):
        swap_alias(client, alias, half_built[0], previous)
    assert alias_target(client, alias) == previous

    # the fault clears (an operator frees disk and lifts the block); the same run, re-run, converges
    faulty_proxy.rule = None
    for index in blocked:
        client.indices.put_settings(index=index, settings={"index.blocks.read_only_allow_delete": None})
    swapped = index_steps(run, validation, local_model(second_tiny_model_dir, "2"))
    ids_after = doc_ids(client, swapped["index"])
    assert swapped["index"] == half_built[0] and swapped["previous"] == previous
    assert alias_target(client, alias) == swapped["index"]
    assert sorted(ids_after) == catalog_ids

    fault_record.update(
        fault=fault, bulk_requests_until_failure=bulk_requests, error=message, before=before,
        docs_in_new_index_after_failure=docs_in_half_built,
        after_failure={"alias_target": previous, "docs": len(catalog_ids)},
        after_rerun={"alias_target": swapped["index"], "docs": len(ids_after), "distinct_ids": len(set(ids_after))},
    )
