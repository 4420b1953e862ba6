"""Fault 1: Elasticsearch dies while a new index is being bulk-loaded.

A run's build_index step loads the catalog into a new index through a proxy that kills the
(dedicated) Elasticsearch with SIGKILL when the third bulk request arrives. Expected: the step fails
after its retries with a one-line ServiceUnavailable; the alias still points at the previous index,
which answers searches once the server is back; re-running the same run's steps finishes the same
new index with exactly the catalog's documents (no duplicates, none missing) and then swaps.
"""

from __future__ import annotations

import pytest

from near2_tasks.run import StepContext

from near2_tasks.data import step as data_step

from near2_tasks.serving import step as serving_step
from near2_tasks.errors import ServiceUnavailable
from near2_tasks.serving.search import search
from tests.faults.harness import DROP
from tests.faults.support import (
    alias_indices,
    alias_target,
    doc_count,
    doc_ids,
    index_meta,
    index_steps,
    is_verified,
    local_model,
    with_es_url,
)

KILL_ON_BULK = 3  # two chunks are in when the server dies


def test_es_dies_mid_load_then_rerun_converges(
    fault_settings, validation, dedicated_es, faulty_proxy, fault_es_client, tiny_model_dir, second_tiny_model_dir,
    fault_record,
):
    settings, alias, client = fault_settings, fault_settings.elasticsearch.alias, fault_es_client
    catalog_ids = sorted(data_step.accepted(validation)[0].product_id.astype(str))
    chunk = settings.elasticsearch.bulk_chunk_size
    assert len(catalog_ids) > KILL_ON_BULK * chunk, "the catalog must need more chunks than the kill allows"

    # a previous run serves version 1
    previous = index_steps(StepContext(settings, run_id="previous"), validation,
                           local_model(tiny_model_dir, "1"))["index"]
    before = {"alias_target": alias_target(client, alias), "docs": doc_count(client, previous),
              "indices": alias_indices(client, alias)}
    assert before["alias_target"] == previous and before["docs"] == len(catalog_ids)

    # the next run's load goes through the proxy, which crashes the server on the third bulk request
    def crash_on_third_bulk(request):
        if request.is_bulk and faulty_proxy.seen["bulk"] == KILL_ON_BULK and dedicated_es.is_up():
            dedicated_es.kill()
            return DROP
        return None

    faulty_proxy.rule = crash_on_third_bulk
    crashing = StepContext(with_es_url(settings, faulty_proxy.url), run_id="crashing")
    with pytest.raises(ServiceUnavailable) as failure:
        serving_step.build_index(crashing, validation, local_model(second_tiny_model_dir, "2"))
    message = str(failure.value)
    assert "not reachable" in message and "\n" not in message
    bulk_requests = faulty_proxy.seen["bulk"]
    assert dedicated_es.kills == 1 and not dedicated_es.is_up()
    # the failed chunk was retried (each retry finds a dead server), and the retries were bounded
    es = settings.elasticsearch
    assert KILL_ON_BULK < bulk_requests <= KILL_ON_BULK + (es.bulk_max_retries + 1) * (es.max_retries + 1)

    # the server comes back: the alias never moved, and the previous index answers searches
    dedicated_es.ensure_running()
    faulty_proxy.rule = None
    assert alias_target(client, alias) == previous
    assert doc_count(client, previous) == len(catalog_ids)
    answer = search(settings, "cordless drill", k=5)
    assert answer.index == previous and answer.model_version == "1" and len(answer.hits) == 5
    half_built = [name for name in alias_indices(client, alias) if name != previous]
    assert len(half_built) == 1 and not is_verified(client, half_built[0])
    docs_at_crash = doc_count(client, half_built[0])
    assert docs_at_crash < len(catalog_ids)

    # re-running the same run's steps finishes that index and swaps
    swapped = index_steps(crashing, validation, local_model(second_tiny_model_dir, "2"))
    new = swapped["index"]
    ids_after = doc_ids(client, new)
    assert new == half_built[0], "the re-run finishes the index the failed attempt started"
    assert swapped["previous"] == previous
    assert alias_target(client, alias) == new
    assert len(ids_after) == len(set(ids_after)) == len(catalog_ids), "no duplicates, none missing"
    assert sorted(ids_after) == catalog_ids
    assert index_meta(client, new)["model_version"] == "2" and is_verified(client, new)
    assert search(settings, "cordless drill", k=5).index == new

    fault_record.update(
        fault="Elasticsearch SIGKILLed when bulk request 3 of the new index's load arrived",
        catalog_rows=len(catalog_ids), bulk_chunk=chunk, bulk_requests_until_failure=bulk_requests,
        error=message, before=before, docs_in_new_index_at_crash=docs_at_crash,
        after_restart={"alias_target": previous, "docs": len(catalog_ids)},
        after_rerun={"alias_target": new, "docs": len(ids_after), "distinct_ids": len(set(ids_after)),
                     "indices": alias_indices(client, alias)},
    )
