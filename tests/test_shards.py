"""Sharded encode-and-load (issue 14): the catalog split by a stable hash of ``product_id``, each shard
encoded and bulk-loaded into the same new index, in the DAGs (mapped ``encode_shard`` tasks, run with
``dag.test()`` against the real Elasticsearch, MLflow and Airflow) and in ``near2 index --shards N``.

The reference is a one-shard build of the same catalog with the same champion: a sharded build must give
the same index (documents, ids, vectors within float tolerance, bit codes, ``_meta`` centres), also when a
shard loses its connection half-way and Airflow retries that shard alone.

The settings make every shard really encode (a fresh embedding cache per run, so nothing is reused from an
earlier run), give an index dim bit codes (``binary_dims: [32]``, whose centre comes from a sample smaller
than the catalog), keep the vectors in ``_source`` so the test can read them back, and write the funnel's
rescoring store (``serving.funnel_rescore: local``: a part per shard, merged by ``finalize_index``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.tiny_model import TINY_DIMS

pytestmark = pytest.mark.slow

PRODUCTS = 300
SHARDS = 4
CHUNK = 25  # documents per bulk request: each of the 4 shards (~75 products) needs several
VECTOR_TOLERANCE = 1e-5  # stored vectors are rounded to 6 decimals (bulk.VECTOR_DECIMALS)
INDEX_TASKS = ["create_index", "encode_shard", "finalize_index", "verify_index", "swap_alias", "smoke_search"]


def _sections(es_url: str, alias: str, home: Path, model_dir: Path) -> dict[str, dict[str, Any]]:
    return {
        "home": str(home),
        "model": {"base_model": str(model_dir), "dims": TINY_DIMS},
        "dataset": {"synthetic_products": PRODUCTS, "synthetic_queries": 60},
        "elasticsearch": {"url": es_url, "alias": alias, "binary_dims": [32], "binary_centre_sample_size": 120,
                          "vectors_in_source": True, "bulk_chunk_size": CHUNK, "max_retries": 1,
                          "bulk_max_retries": 1, "bulk_initial_backoff_s": 0.05, "bulk_max_backoff_s": 0.1},
        "serving": {"funnel_rescore": "local"},  # every shard writes its part of the rescoring store
    }


class Runs:
    """This module's settings, a champion in its MLflow store, and near2_reindex runs with ``dag.test()``."""

    def __init__(self, settings, directory: Path) -> None:
        self.settings = settings
        self.directory = directory

    def config_file(self, name: str, es_url: str | None = None) -> str:
        """The settings as a YAML file, with an embedding cache of this run's own (nothing reused)."""
        data = self.settings.model_dump(mode="json")
        data["evaluation"]["cache_dir"] = str(self.directory / "cache" / name)
        if es_url:
            data["elasticsearch"]["url"] = es_url
        path = self.directory / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)

    def reindex(self, name: str, monkeypatch, shards: int, retries: int = 0, es_url: str | None = None):
        """A forced near2_reindex run; the DAG file is parsed with ``airflow.encode_shards = shards``."""
        from airflow.dag_processing.dagbag import DagBag

        from tests.conftest import REPO

        monkeypatch.setenv("NEAR2_AIRFLOW__ENCODE_SHARDS", str(shards))
        monkeypatch.setenv("NEAR2_AIRFLOW__RETRIES", str(retries))
        monkeypatch.setenv("NEAR2_AIRFLOW__RETRY_DELAY_S", "0")
        bag = DagBag(dag_folder=str(REPO / "dags" / "near2_reindex.py"))
        assert bag.import_errors == {}
        return bag.dags["near2_reindex"].test(run_conf={"config_file": self.config_file(name, es_url), "force": True})


@pytest.fixture(scope="module")
def runs(airflow_db, es_url, es_client, tiny_model_dir, register_model_dir, tmp_path_factory):
    from near2_tasks.config import load_settings
    from near2_tasks.conventions import CHAMPION
    from near2_tasks.models.registry import client as mlflow_client

    directory = tmp_path_factory.mktemp("shards")
    alias = f"test-shards-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as env:
        for name in [n for n in os.environ if n.startswith("NEAR2_") and n != "NEAR2_ES_URL"]:
            env.delenv(name)
        settings = load_settings(**_sections(es_url, alias, directory / "home", tiny_model_dir))
        # the champion: the tiny encoder as a registered version (how it got there is promotion's tests)
        version = register_model_dir(settings, tiny_model_dir)
        mlflow_client(settings).set_registered_model_alias(settings.mlflow.registered_model, CHAMPION, version)
        yield Runs(settings, directory)
    es_client.indices.delete(index=f"{alias}-*", ignore_unavailable=True, allow_no_indices=True)


@pytest.fixture(scope="module")
def reference(runs):
    """The one-shard build: near2_reindex as it ran before sharding existed."""
    with pytest.MonkeyPatch.context() as env:
        dagrun = runs.reindex("one-shard", env, shards=1)
    assert str(dagrun.state) == "success", _states(dagrun)
    return _run_step(runs, dagrun, "swap_alias")["index"]


# ----- reading runs and indices ------------------------------------------------------------------
def _states(dagrun) -> dict[str, str]:
    return {f"{ti.task_id}[{ti.map_index}]" if ti.map_index >= 0 else ti.task_id: str(ti.state)
            for ti in dagrun.get_task_instances()}


def _run_step(runs: Runs, dagrun, step: str) -> dict[str, Any]:
    from near2_tasks.run import read_step, run_directory

    result = read_step(run_directory(runs.settings, dagrun.dag_id, dagrun.run_id), step)
    assert result is not None, f"{step} did not finish in {dagrun.run_id}"
    return result


def _shard_tis(dagrun) -> list:
    return sorted((ti for ti in dagrun.get_task_instances() if ti.task_id == "encode_shard"), key=lambda ti: ti.map_index)


def _documents(es_client, index: str) -> dict[str, dict[str, Any]]:
    """Every document of ``index`` by id (with repeats detected)."""
    from elasticsearch import helpers

    es_client.indices.refresh(index=index)
    docs: dict[str, dict[str, Any]] = {}
    for hit in helpers.scan(es_client, index=index, query={"query": {"match_all": {}}},
                            source_exclude_vectors=False):  # 9.x leaves vectors out of _source answers
        assert hit["_id"] not in docs, f"{hit['_id']} twice in {index}"
        docs[hit["_id"]] = hit["_source"]
    return docs


def _meta(es_client, index: str) -> dict[str, Any]:
    return es_client.indices.get_mapping(index=index)[index]["mappings"]["_meta"]


def _code_bytes(code: str | list[int]) -> bytes:
    """A bit code as sent (hex) or as Elasticsearch returns it from _source (signed bytes)."""
    return bytes.fromhex(code) if isinstance(code, str) else bytes(b & 0xFF for b in code)


def _bit_differences(a, b) -> int:
    a, b = _code_bytes(a), _code_bytes(b)
    assert len(a) == len(b) == 32 // 8
    return sum(bin(x ^ y).count("1") for x, y in zip(a, b))


def assert_same_index(es_client, expected: str, actual: str) -> dict[str, Any]:
    """``actual`` holds what ``expected`` holds: the same ids, product fields, vectors at every dim within
    float tolerance, bit codes and ``_meta`` (model, dims, catalog version, centres). Returns what was compared."""
    want, got = _documents(es_client, expected), _documents(es_client, actual)
    assert len(want) == PRODUCTS and es_client.count(index=actual)["count"] == PRODUCTS
    assert sorted(got) == sorted(want)
    worst, bits_differing = 0.0, 0
    for pid, source in want.items():
        other = got[pid]
        for field in ("product_id", "title", "category", "brand", "price"):
            assert other[field] == source[field], (pid, field)
        for dim in TINY_DIMS:
            a, b = np.asarray(source[f"embedding_{dim}"]), np.asarray(other[f"embedding_{dim}"])
            assert a.shape == b.shape == (dim,)
            worst = max(worst, float(np.abs(a - b).max()))
        bits_differing += _bit_differences(source["embedding_32_bits"], other["embedding_32_bits"])
    assert worst <= VECTOR_TOLERANCE, f"vectors differ by up to {worst}"
    # a bit flips only for a component within float noise of the centre: none here
    assert bits_differing == 0, f"{bits_differing} bit codes differ"
    meta_a, meta_b = _meta(es_client, expected), _meta(es_client, actual)
    for key in ("model_uri", "model_version", "dims", "catalog_version", "binary_centres"):
        assert meta_b[key] == meta_a[key], key
    assert "verified_at" in meta_b
    return {"documents": len(got), "max_vector_difference": worst}


def assert_same_store(settings, expected: str, actual: str) -> None:
    """The rescoring store the shards' parts merged into holds what the one-shard build's holds."""
    from near2_tasks.serving.rescore_store import store_dir

    want, got = store_dir(settings, expected), store_dir(settings, actual)
    assert not (got / "parts").exists()
    assert (np.load(want / "ids.npy") == np.load(got / "ids.npy")).all() and len(np.load(got / "ids.npy")) == PRODUCTS
    np.testing.assert_allclose(np.load(got / "vectors.npy").astype(np.float32),
                               np.load(want / "vectors.npy").astype(np.float32), atol=1e-3)
    assert (got / "fields.bin").read_bytes() == (want / "fields.bin").read_bytes()


# ----- (a) four shards give the same index as one ----------------------------------------------------
def test_four_mapped_shards_build_the_same_index_as_one(runs, reference, es_client, monkeypatch):
    from near2_tasks.data.hashing import stable_bucket

    dagrun = runs.reindex("four-shards", monkeypatch, shards=SHARDS)
    states = _states(dagrun)
    assert str(dagrun.state) == "success", states
    shard_tis = _shard_tis(dagrun)
    assert [ti.map_index for ti in shard_tis] == list(range(SHARDS))
    assert all(str(ti.state) == "success" and ti.try_number == 1 for ti in shard_tis), states

    created = _run_step(runs, dagrun, "create_index")
    assert created["shards"] == SHARDS
    loaded = [_run_step(runs, dagrun, f"encode_shard_{shard}") for shard in range(SHARDS)]
    assert sum(result["documents"] for result in loaded) == PRODUCTS
    assert all(0 < result["documents"] < PRODUCTS for result in loaded)  # a real split, no empty shard
    assert not any(result["reused_cached_vectors"] for result in loaded)  # each shard encoded its slice
    assert {result["model_uri"] for result in loaded} == {_meta(es_client, reference)["model_uri"]}

    new = _run_step(runs, dagrun, "swap_alias")["index"]
    assert new != reference and created["index"] == new
    assert _run_step(runs, dagrun, "swap_alias")["previous"] == reference
    assert list(es_client.indices.get_alias(name=runs.settings.elasticsearch.alias)) == [new]
    assert_same_index(es_client, reference, new)
    assert_same_store(runs.settings, reference, new)
    # each shard's documents are exactly the products whose stable hash falls in it
    ids = sorted(_documents(es_client, new))
    per_shard = [sorted(pid for pid in ids if stable_bucket(pid, SHARDS) == shard) for shard in range(SHARDS)]
    assert [len(group) for group in per_shard] == [result["documents"] for result in loaded]


# ----- (b) a shard killed mid-load retries alone and the index is still the same -----------------------
def test_a_shard_that_fails_mid_load_retries_alone_and_gives_the_same_index(runs, reference, es_client,
                                                                           monkeypatch):
    """Elasticsearch stops answering shard 2 after its first bulk chunk is in (the proxy drops the
    connections, as a dead node would); the task fails after its bulk retries, Airflow retries that mapped
    instance alone, and its second attempt re-sends the shard from the start (ids, not appends)."""
    from near2_tasks.data.hashing import stable_bucket
    from tests.faults.harness import DROP, FaultyProxy

    alias = runs.settings.elasticsearch.alias
    failing_shard = 2
    seen: dict[str, Any] = {"phase": "before", "first_chunk": None, "dropped": 0, "at_failure": None}

    def bulk_ids(body: bytes) -> list[str]:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        return [next(iter(line.values()))["_id"] for line in lines
                if len(line) == 1 and next(iter(line)) in ("index", "create")]

    def shard_2_dies_after_its_first_chunk(request):
        if not request.is_bulk:
            return None
        ids = bulk_ids(request.body)
        if not ids or stable_bucket(ids[0], SHARDS) != failing_shard:
            return None
        if seen["phase"] == "before":  # the first chunk of shard 2 goes in
            seen["phase"], seen["first_chunk"] = "failing", ids
            return None
        if seen["phase"] == "failing":
            if ids == seen["first_chunk"]:  # the retried attempt starts the shard over: the server is back
                seen["phase"] = "after"
                return None
            if seen["at_failure"] is None:  # what the storefront and the index look like while it is down
                (index,) = set(es_client.indices.get(index=f"{alias}-*")) - seen["older"]
                es_client.indices.refresh(index=index)
                shard_docs = es_client.count(index=index, query={"ids": {"values": seen["first_chunk"]}})["count"]
                seen["at_failure"] = {"alias": list(es_client.indices.get_alias(name=alias)), "index": index,
                                      "shard_docs_written": shard_docs, "verified": "verified_at" in _meta(es_client, index)}
            seen["dropped"] += 1
            return DROP
        return None

    seen["older"] = set(es_client.indices.get(index=f"{alias}-*"))
    serving_before = list(es_client.indices.get_alias(name=alias))
    proxy = FaultyProxy(runs.settings.elasticsearch.url, rule=shard_2_dies_after_its_first_chunk)
    try:
        dagrun = runs.reindex("failing-shard", monkeypatch, shards=SHARDS, retries=1, es_url=proxy.url)
    finally:
        proxy.close()
    states = _states(dagrun)
    assert str(dagrun.state) == "success", states
    assert seen["phase"] == "after" and seen["dropped"] >= 1, seen

    # while shard 2 was failing: part of it was written, the index was unverified, the alias had not moved
    at_failure = seen["at_failure"]
    assert at_failure["shard_docs_written"] == CHUNK
    assert at_failure["alias"] == serving_before and at_failure["index"] not in serving_before
    assert at_failure["verified"] is False

    # only the failed mapped instance ran twice; the swap started after every shard had succeeded
    shard_tis = {ti.map_index: ti for ti in _shard_tis(dagrun)}
    assert {i: ti.try_number for i, ti in shard_tis.items()} == {
        i: 2 if i == failing_shard else 1 for i in range(SHARDS)}
    assert all(str(ti.state) == "success" for ti in shard_tis.values())
    swap = next(ti for ti in dagrun.get_task_instances() if ti.task_id == "swap_alias")
    assert swap.start_date >= max(ti.end_date for ti in shard_tis.values())

    new = _run_step(runs, dagrun, "swap_alias")["index"]
    assert new == at_failure["index"]  # the retry finished the index the failed attempt was loading
    assert list(es_client.indices.get_alias(name=alias)) == [new]
    assert_same_index(es_client, reference, new)


# ----- (c) the DAG files declare the mapped task ------------------------------------------------------
@pytest.mark.parametrize("dag_id", ["near2_retrain", "near2_reindex"])
def test_the_dags_map_encode_shard_over_encode_shards(dag_id, monkeypatch, airflow_db):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.definitions.mappedoperator import MappedOperator
    from airflow.serialization.serialized_objects import DagSerialization

    from near2_tasks.config import load_settings
    from tests.conftest import REPO

    for shards in (3, 1):
        monkeypatch.setenv("NEAR2_AIRFLOW__ENCODE_SHARDS", str(shards))
        bag = DagBag(dag_folder=str(REPO / "dags" / f"{dag_id}.py"))
        assert bag.import_errors == {}
        dag = bag.dags[dag_id]
        mapped = dag.get_task("encode_shard")
        assert isinstance(mapped, MappedOperator)
        assert mapped.op_kwargs_expand_input.value == {"shard": list(range(shards))}  # TaskFlow's .expand()
        # what the scheduler sees: that many mapped task instances per run
        scheduled = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
        assert scheduled.get_task("encode_shard").get_parse_time_mapped_ti_count() == shards
        for before, after in zip(INDEX_TASKS, INDEX_TASKS[1:]):
            assert before in dag.get_task(after).upstream_task_ids, f"{before} -> {after}"
        assert dag.get_task("finalize_index").trigger_rule == "all_success"  # waits for every shard
        assert "encode_shard" not in dag.get_task("swap_alias").upstream_task_ids  # only through verification
        assert mapped.retries == load_settings().airflow.retries >= 1  # a failed shard is retried


def test_encode_shards_must_be_at_least_one(tmp_path):
    from near2_tasks.config import load_settings
    from near2_tasks.errors import Near2Error

    assert load_settings(home=str(tmp_path)).airflow.encode_shards == 1
    with pytest.raises(Near2Error, match="airflow.encode_shards"):
        load_settings(home=str(tmp_path), airflow={"encode_shards": 0})


# ----- (d) near2 index --shards N ----------------------------------------------------------------------
def test_cli_shards_run_in_process_and_give_the_same_index(es_url, es_client, tiny_model_dir, tmp_path, monkeypatch):
    """Before any champion exists ``near2 index`` indexes the base model (here the tiny encoder)."""
    from click.testing import CliRunner

    from near2_tasks.serving import index as idx
    from near2_tasks.cli import cli

    alias = f"test-cli-shards-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "near2.yaml"
    config.write_text(yaml.safe_dump(_sections(es_url, alias, tmp_path / "home", tiny_model_dir)))
    loads: list[int] = []
    real_load_shard = idx.load_shard  # what the encode_shard step calls

    def counting_load_shard(settings, index_name, products, vectors, **kwargs):
        loads.append(len(products))
        return real_load_shard(settings, index_name, products, vectors, **kwargs)

    monkeypatch.setattr(idx, "load_shard", counting_load_shard)

    def near2_index(*args: str) -> dict[str, Any]:
        result = CliRunner().invoke(cli, ["--config", str(config), "index", *args, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout.strip().splitlines()[-1])

    try:
        one = near2_index()
        assert loads == [PRODUCTS]
        loads.clear()
        three = near2_index("--shards", "3")
        assert len(loads) == 3 and sum(loads) == PRODUCTS and min(loads) > 0
        assert three["shards"] == 3 and three["count"] == PRODUCTS == one["count"]
        assert three["verification"]["passed"] and three["previous"] == one["index"]
        assert list(es_client.indices.get_alias(name=alias)) == [three["index"]]
        assert_same_index(es_client, one["index"], three["index"])

        refused = CliRunner().invoke(cli, ["--config", str(config), "index", "--shards", "0"])
        assert refused.exit_code != 0 and "--shards" in refused.output
    finally:
        es_client.indices.delete(index=f"{alias}-*", ignore_unavailable=True, allow_no_indices=True)


# ----- the pieces -------------------------------------------------------------------------------------
def test_shard_of_a_product_is_a_stable_hash_not_pythons_hash():
    """The same product is in the same shard in every process (Python's hash() is salted per process)."""
    probe = ("from near2_tasks.data.hashing import stable_bucket; "
             "print([stable_bucket(f'P-{i}', 4) for i in range(40)])")
    answers = {subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONHASHSEED": seed},
                              capture_output=True, text=True, check=True).stdout for seed in ("1", "2")}
    assert len(answers) == 1
    buckets = json.loads(answers.pop())
    assert set(buckets) == {0, 1, 2, 3}


def test_shards_partition_the_catalog():
    import pandas as pd

    from near2_tasks.serving.index import centre_sample_positions, shard_positions

    products = pd.DataFrame({"product_id": [f"P-{i}" for i in range(500)]})
    parts = [shard_positions(products, shard, 7) for shard in range(7)]
    joined = np.concatenate(parts)
    assert sorted(joined) == list(range(500)) and len(set(joined)) == 500
    assert all(list(part) == sorted(part) for part in parts)  # catalog order inside a shard
    assert list(shard_positions(products, 0, 1)) == list(range(500))
    # the centre sample: the whole catalog up to its size, else the same rows whatever the order
    assert list(centre_sample_positions(products, 500)) == list(range(500))
    sample = set(products.product_id.iloc[centre_sample_positions(products, 50)])
    shuffled = products.sample(frac=1, random_state=0).reset_index(drop=True)
    assert set(shuffled.product_id.iloc[centre_sample_positions(shuffled, 50)]) == sample and len(sample) == 50


def test_finalize_refuses_an_index_a_shard_did_not_load(tiny_settings, es_client, tiny_model_dir):
    """The count check: finalize fails (nothing is verified or swapped) when a shard is missing, whether
    the DAG forgot it or its documents are not in the index."""
    from near2_tasks.serving import index as idx
    from near2_tasks.serving import alias
    from near2_tasks.run import StepContext
    from near2_tasks.serving import step as serving_step
    from near2_tasks.errors import Near2Error
    from tests.serving_support import titled_catalog

    products = idx.prepare_products(titled_catalog(60))
    created = {"index": "x", "shards": 3, "model_version": "1", "expected_current": None}
    with pytest.raises(Near2Error, match=r"shards \[1\] of 3 have not loaded"):
        serving_step.finalize_index(StepContext(tiny_settings), {}, created,
                                [{"index": "x", "shard": 0}, {"index": "x", "shard": 2}])

    made = idx.create_index(tiny_settings, str(tiny_model_dir), products, 1)
    vectors = np.random.default_rng(0).normal(size=(len(products), TINY_DIMS[0])).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for shard in (0, 2):
        rows = idx.shard_positions(products, shard, 3)
        idx.load_shard(tiny_settings, made.name, products.iloc[rows], vectors[rows])
    with pytest.raises(Near2Error, match=r"a shard did not load"):
        idx.finalize_index(tiny_settings, made.name, products)
    rows = idx.shard_positions(products, 1, 3)
    idx.load_shard(tiny_settings, made.name, products.iloc[rows], vectors[rows])
    assert idx.finalize_index(tiny_settings, made.name, products).count == len(products)
    assert alias.current_target(es_client, tiny_settings.elasticsearch.alias) is None
