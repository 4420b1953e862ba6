"""The cluster profile (docker-compose.cluster.yml over docker-compose.yml) stays valid, secure and
consistent with the code: three Elasticsearch nodes with security and TLS, the CeleryExecutor with Redis
and two workers, the train task routed to the `gpu` queue, index shards/replicas from near2's settings.

Resolved exactly as `docker compose -f docker-compose.yml -f docker-compose.cluster.yml config` (or, with
no Compose v2 installed, by the same fallback as tests/test_compose.py: PyYAML, compose's interpolation,
`extends` and merge rules). Nothing is started.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

import pytest

from tests.stack_support import REPO
from tests.test_compose import (AIRFLOW_COMPONENTS, COMPOSE_FILE, COMPOSE_FILES, ENV_EXAMPLE, NEAR2_SERVICES,
                                SECRET_NAME, URL_WITH_PASSWORD, ComposeError, as_list, check_api_key_loaders,
                                check_dependencies, check_health_and_restart, check_near2_settings_land,
                                check_near2_variables, check_writable_volumes, depends_on, environment,
                                near2_image_services, networks, ports, read_env_file, resolve, volumes)
from tests.test_compose import config, env_file, generate_env, services  # noqa: F401  (fixtures)

ES_NODES = ("elasticsearch", "elasticsearch-2", "elasticsearch-3")
WORKERS = {"airflow-worker": "default", "airflow-worker-gpu": "gpu"}
CLUSTER_ONLY = {"elasticsearch-2", "elasticsearch-3", "redis", *WORKERS}
#: Every container that runs Airflow (and so must share its executor configuration).
AIRFLOW_CONTAINERS = {*AIRFLOW_COMPONENTS, "airflow-init", *WORKERS}
CLUSTER_NEAR2_SERVICES = {*NEAR2_SERVICES, *WORKERS}
#: The client-facing name of Elasticsearch (every near2 container's NEAR2_ELASTICSEARCH__URL).
ES_CLIENT_HOST = "elasticsearch"


@pytest.fixture(scope="module")
def cluster(env_file) -> dict[str, dict]:  # noqa: F811
    return resolve(env_file, COMPOSE_FILES)["services"]


def aliases(service: dict, network: str) -> set[str]:
    nets = service.get("networks") or {}
    if isinstance(nets, list):
        return set()
    return set(((nets.get(network) or {}).get("aliases")) or [])


def worker_queues(service: dict) -> set[str]:
    command = as_list(service["command"])
    assert command[:2] == ["celery", "worker"], command
    return set(command[command.index("--queues") + 1].split(","))


# ----- it resolves, and changes only what it says -----------------------------------------------------
def test_cluster_profile_resolves_with_the_generated_env_and_adds_only_its_services(cluster, services):  # noqa: F811
    assert set(cluster) == set(services) | CLUSTER_ONLY
    for name, command in AIRFLOW_COMPONENTS.items():
        assert as_list(cluster[name].get("command"))[:1] == [command], name


def test_mlflow_postgres_minio_and_storefront_are_unchanged(cluster, services):  # noqa: F811
    for name in ("mlflow", "mlflow-setup", "postgres", "minio", "minio-setup", "storefront"):
        assert cluster[name] == services[name], f"the cluster profile must not change {name}"


def test_the_cluster_needs_the_redis_password_and_the_single_node_does_not(env_file, tmp_path):  # noqa: F811
    without = tmp_path / ".env"
    without.write_text("".join(line + "\n" for line in env_file.read_text().splitlines()
                               if not line.startswith("REDIS_PASSWORD=")) + "REDIS_PASSWORD=\n")
    with pytest.raises(ComposeError, match="REDIS_PASSWORD"):
        resolve(without, COMPOSE_FILES)
    assert "redis" not in resolve(without)["services"]
    # and with .env.example's empty secrets it refuses, naming only secrets
    with pytest.raises(ComposeError) as failure:
        resolve(ENV_EXAMPLE, COMPOSE_FILES)
    empty = {name for name, value in read_env_file(ENV_EXAMPLE).items() if SECRET_NAME.search(name) and not value}
    assert "required variable" in str(failure.value)
    assert any(name in str(failure.value) for name in empty)


# ----- secrets: only from .env -------------------------------------------------------------------------
def test_every_secret_in_the_cluster_comes_from_env(cluster, env_file):  # noqa: F811
    env = read_env_file(env_file)
    from_env = {value for name, value in env.items() if SECRET_NAME.search(name) and value}
    assert env["REDIS_PASSWORD"] in from_env
    checked = 0
    for name, service in cluster.items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key) and not key.endswith("_FILE"):
                assert value in from_env, f"{name}.{key} is not a value from .env"
                checked += 1
            for match in URL_WITH_PASSWORD.finditer(value):
                assert match["password"] in from_env, f"{name}.{key}: a URL password that is not from .env"
                checked += 1
    assert checked > 20
    # the broker password is the one Redis requires
    redis_password = environment(cluster["redis"])["REDIS_PASSWORD"]
    for name in AIRFLOW_CONTAINERS:
        assert urlsplit(environment(cluster[name])["AIRFLOW__CELERY__BROKER_URL"]).password == redis_password, name
    # Redis gets it from the environment, never on its command line (ps would show it)
    redis = cluster["redis"]
    assert redis_password not in json.dumps([redis.get("command"), redis.get("entrypoint"), redis["healthcheck"]])
    script = (REPO / "docker" / "redis-start.sh").read_text()
    assert "requirepass $REDIS_PASSWORD" in script and "redis-server -" in script
    assert "$${REDIS_PASSWORD}" in (REPO / "docker-compose.cluster.yml").read_text()  # the healthcheck's own shell


def test_generate_env_fills_the_cluster_secrets(env_file, generate_env):  # noqa: F811
    generated = read_env_file(env_file)
    assert generate_env.is_secret("REDIS_PASSWORD") and len(generated["REDIS_PASSWORD"]) == 32
    assert read_env_file(ENV_EXAMPLE)["REDIS_PASSWORD"] == ""


# ----- Elasticsearch: three nodes, security + TLS, discovery ------------------------------------------
def test_three_elasticsearch_nodes_with_security_tls_and_discovery(cluster, env_file):  # noqa: F811
    nodes = {name: environment(svc) for name, svc in cluster.items() if "node.name" in environment(svc)}
    assert set(nodes) == set(ES_NODES)
    image = cluster["es-certs"]["image"]
    certs_env = environment(cluster["es-certs"])
    node_volume = next(src for src, target, _ in volumes(cluster["es-certs"]) if target == certs_env["NODE_DIR"])
    assert set(certs_env["ES_NODE_NAMES"].split(",")) == set(ES_NODES), "es-certs must make every node's certificate"
    data_volumes = set()
    for name, env in nodes.items():
        node = env["node.name"]
        assert node == name, "node names are the service (host) names the others discover"
        assert cluster[name]["image"] == image
        for setting in ("xpack.security.enabled", "xpack.security.http.ssl.enabled",
                        "xpack.security.transport.ssl.enabled"):
            assert env.get(setting) == "true", f"{name}: {setting}"
        for layer in ("http", "transport"):
            assert env[f"xpack.security.{layer}.ssl.key"] == f"certs/{node}.key", name
            assert env[f"xpack.security.{layer}.ssl.certificate"] == f"certs/{node}.crt", name
            assert env[f"xpack.security.{layer}.ssl.certificate_authorities"] == "certs/ca.crt", name
        assert env["xpack.security.transport.ssl.verification_mode"] in ("certificate", "full"), name
        assert env["ELASTIC_PASSWORD"] == read_env_file(env_file)["ELASTIC_PASSWORD"], name
        assert env["cluster.name"] == nodes["elasticsearch"]["cluster.name"]
        # discovery: not single-node, the seeds are the other two, all three bootstrap the first election
        assert env.get("discovery.type", "multi-node") == "multi-node", name
        assert set(env["discovery.seed_hosts"].split(",")) == set(ES_NODES) - {name}, name
        assert set(env["cluster.initial_master_nodes"].split(",")) == set(ES_NODES), name
        assert env.get("node.roles") is None, f"{name}: every node stays master-eligible and data"
        mounted = {target: (src, ro) for src, target, ro in volumes(cluster[name])}
        assert mounted["/usr/share/elasticsearch/config/certs"] == (node_volume, True), name
        data_volumes.add(mounted["/usr/share/elasticsearch/data"][0])
        test = " ".join(as_list(cluster[name]["healthcheck"]["test"]))
        assert "https://" in test and "--cacert" in test and "-u" in test, name
        assert depends_on(cluster[name]) == {"es-certs": "service_completed_successfully"}, name
        assert cluster[name]["ulimits"]["memlock"] in ({"soft": -1, "hard": -1}, -1), name
    assert len(data_volumes) == 3, "each node needs its own data volume"
    # only node 1 is published: the host sees one entry point, as with the single node
    assert [name for name in ES_NODES if ports(cluster[name])] == ["elasticsearch"]


def test_every_node_answers_to_the_client_name_with_a_certificate_for_it(cluster):
    """Clients keep https://elasticsearch:9200: nodes 2 and 3 carry the name as a network alias on every
    network a client uses, and every node's certificate names it (es-certs: node name + ES_CERT_DNS)."""
    cert_dns = set(environment(cluster["es-certs"])["ES_CERT_DNS"].split(","))
    assert {ES_CLIENT_HOST, "localhost"} <= cert_dns
    clients = [name for name in cluster if urlsplit(environment(cluster[name]).get("NEAR2_ELASTICSEARCH__URL")
                                                  or environment(cluster[name]).get("ELASTICSEARCH_URL", "")).hostname]
    assert set(clients) >= {"es-setup", *CLUSTER_NEAR2_SERVICES}
    for client in clients:
        env = environment(cluster[client])
        assert urlsplit(env.get("NEAR2_ELASTICSEARCH__URL") or env["ELASTICSEARCH_URL"]).hostname == ES_CLIENT_HOST
        for node in ES_NODES:
            shared = networks(cluster[client]) & networks(cluster[node])
            assert shared, f"{client} cannot reach {node}"
            for network in shared:
                assert node == ES_CLIENT_HOST or ES_CLIENT_HOST in aliases(cluster[node], network), \
                    f"{node} does not answer to {ES_CLIENT_HOST} on {network}"


FAKE_CERTUTIL = """\
#!{python}
# elasticsearch-certutil's interface, for tests: each "certificate" records the names it was asked for
import sys, zipfile, yaml
args = sys.argv[1:]
with zipfile.ZipFile(args[args.index("--out") + 1], "w") as out:
    if args[0] == "ca":
        out.writestr("ca/ca.crt", "ca"); out.writestr("ca/ca.key", "ca key")
    else:
        for instance in yaml.safe_load(open(args[args.index("--in") + 1]))["instances"]:
            name = instance["name"]
            out.writestr(f"{{name}}/{{name}}.crt", ",".join(instance["dns"]) + " " + ",".join(instance["ip"]))
            out.writestr(f"{{name}}/{{name}}.key", "key of " + name)
"""


def test_es_certs_makes_one_certificate_per_node_naming_it_and_the_client_name(cluster, tmp_path):
    """docker/es-certs.sh with the cluster's es-certs environment (elasticsearch-certutil replaced by a
    recorder; the real one runs in tests/test_stack_security.py)."""
    es_home = tmp_path / "es"
    (es_home / "bin").mkdir(parents=True)
    certutil = es_home / "bin" / "elasticsearch-certutil"
    certutil.write_text(FAKE_CERTUTIL.format(python=sys.executable))
    certutil.chmod(0o755)
    owner = f"{os.getuid()}:{os.getgid()}"

    def run(service_env: dict[str, str]) -> None:
        env = {**service_env, "PATH": os.environ["PATH"], "ES_HOME": str(es_home), "CERT_OWNER": owner,
               "CA_DIR": str(tmp_path / "ca"), "NODE_DIR": str(tmp_path / "node"),
               "PUBLIC_DIR": str(tmp_path / "public")}
        out = subprocess.run(["bash", str(REPO / "docker" / "es-certs.sh")], env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr

    node_dir = tmp_path / "node"
    # the single node first (its environment in docker-compose.yml alone): one certificate, as before
    single_env = {k: v for k, v in environment(cluster["es-certs"]).items() if k != "ES_NODE_NAMES"}
    run(single_env)
    assert sorted(p.name for p in node_dir.iterdir()) == ["ca.crt", "elasticsearch.crt", "elasticsearch.key"]
    assert (node_dir / "elasticsearch.crt").read_text() == "elasticsearch,localhost 127.0.0.1"
    before = (node_dir / "elasticsearch.crt").stat().st_mtime_ns

    # then the cluster's: the missing nodes are added, the existing certificate is kept
    run(environment(cluster["es-certs"]))
    for node in ES_NODES:
        names = (node_dir / f"{node}.crt").read_text().split()[0].split(",")
        assert names[0] == node and {ES_CLIENT_HOST, "localhost"} <= set(names), node
        assert stat.S_IMODE((node_dir / f"{node}.key").stat().st_mode) == 0o640
        key = environment(cluster[node])["xpack.security.http.ssl.key"]
        assert (node_dir / Path(key).name).is_file(), f"{node} is told to use {key}, which es-certs does not write"
    assert (node_dir / "elasticsearch.crt").stat().st_mtime_ns == before
    assert sorted(p.name for p in (tmp_path / "public").iterdir()) == ["ca.crt"]


def test_index_shards_and_replicas_come_from_near2_settings(cluster, env_file, tmp_path, monkeypatch):  # noqa: F811
    from near2_tasks.serving.bulk import finish_load
    from near2_tasks.serving.mapping import index_body
    from near2_tasks.serving.settings import ElasticsearchSettings

    env = read_env_file(env_file)
    shards, replicas = int(env["NEAR2_ES_SHARDS"]), int(env["NEAR2_ES_REPLICAS"])
    assert shards >= 1 and 1 <= replicas <= len(ES_NODES) - 1, \
        "replicas beyond nodes - 1 are never allocated (the cluster stays yellow)"
    # the single node keeps today's behaviour: the settings' defaults, 1 shard and no replica
    assert (ElasticsearchSettings().number_of_shards, ElasticsearchSettings().number_of_replicas) == (1, 0)
    for name in sorted(AIRFLOW_CONTAINERS - {"airflow-init"}):
        (tmp_path / name).mkdir()
        settings = check_near2_settings_land(cluster[name], tmp_path / name, monkeypatch)
        assert settings.elasticsearch.number_of_shards == shards, name
        assert settings.elasticsearch.number_of_replicas == replicas, name
    # where near2 uses them: the new index is created with the shards (no replica while loading) ...
    body = index_body(settings, settings.model.dims, {"model_uri": "models:/m/1"})
    assert body["settings"]["index"]["number_of_shards"] == shards
    assert body["settings"]["index"]["number_of_replicas"] == 0
    # ... and gets the replicas once loaded
    client = mock.MagicMock()
    finish_load(client, settings, "products-test")
    assert client.indices.put_settings.call_args.kwargs["settings"]["index"]["number_of_replicas"] == replicas


# ----- Airflow: CeleryExecutor, Redis, two workers ---------------------------------------------------------
SHARED_AIRFLOW_CONFIG = ("AIRFLOW__CORE__EXECUTOR", "AIRFLOW__CELERY__BROKER_URL", "AIRFLOW__CELERY__RESULT_BACKEND",
                         "AIRFLOW__OPERATORS__DEFAULT_QUEUE", "AIRFLOW__CORE__FERNET_KEY",
                         "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__API_AUTH__JWT_SECRET",
                         "AIRFLOW__CORE__EXECUTION_API_SERVER_URL")


def test_every_airflow_container_runs_the_celery_executor_on_one_broker_and_backend(cluster):
    from airflow.executors.executor_constants import CELERY_EXECUTOR
    from airflow.executors.executor_loader import ExecutorLoader

    reference = environment(cluster["airflow-scheduler"])
    for name in AIRFLOW_CONTAINERS:
        env = environment(cluster[name])
        for key in SHARED_AIRFLOW_CONFIG:
            assert env.get(key) == reference[key], f"{name}: {key} differs from the scheduler's"
    assert reference["AIRFLOW__CORE__EXECUTOR"] == CELERY_EXECUTOR
    # a name Airflow resolves, to the executor of the celery provider
    assert ExecutorLoader.executors[CELERY_EXECUTOR].startswith("airflow.providers.celery.")
    broker = urlsplit(reference["AIRFLOW__CELERY__BROKER_URL"])
    assert (broker.scheme, broker.hostname, broker.port) == ("redis", "redis", 6379)
    assert "6379" not in json.dumps(cluster["redis"].get("ports") or []), "Redis is not published"
    assert networks(cluster["redis"]) == {"backend"}
    # results go to the metadata database, as the same role
    backend = urlsplit(reference["AIRFLOW__CELERY__RESULT_BACKEND"].removeprefix("db+"))
    metadata = urlsplit(reference["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    assert backend.scheme.startswith("postgresql")
    assert (backend.hostname, backend.username, backend.password, backend.path) == \
        (metadata.hostname, metadata.username, metadata.password, metadata.path)
    # the scheduler and the workers wait for the broker
    for name in ("airflow-scheduler", *WORKERS):
        assert depends_on(cluster[name]).get("redis") == "service_healthy", name


def test_workers_run_the_schedulers_image_environment_and_volumes(cluster):
    scheduler = cluster["airflow-scheduler"]
    near2_of = {name: {k: v for k, v in environment(cluster[name]).items() if k.startswith("NEAR2_")}
                for name in AIRFLOW_CONTAINERS}
    for name in WORKERS:
        worker = cluster[name]
        assert near2_of[name] == near2_of["airflow-scheduler"], f"{name}: NEAR2_* differ from the scheduler's"
        # the dag-processor parses the DAGs (the train task's queue is read there): the same settings
        assert near2_of[name] == near2_of["airflow-dag-processor"], name
        assert worker["image"] == scheduler["image"], name
        assert worker["build"]["dockerfile"] == scheduler["build"]["dockerfile"], name
        assert sorted(volumes(worker)) == sorted(volumes(scheduler)), name
        assert networks(worker) == networks(scheduler) == {"backend"}, name
        env, reference = environment(worker), environment(scheduler)
        for key in ("ES_API_KEY_FILE", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert env[key] == reference[key], f"{name}: {key}"
        assert "AIRFLOW_ADMIN_PASSWORD" not in env
        assert env["DUMB_INIT_SETSID"] == "0", "warm shutdown: SIGTERM to the worker process only"
        test = " ".join(as_list(worker["healthcheck"]["test"]))
        assert "inspect ping" in test and "celery@$${HOSTNAME}" not in test and "celery@${HOSTNAME}" in test


PARSE_QUEUES = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
print(json.dumps({"errors": {path: str(error)[-2000:] for path, error in bag.import_errors.items()},
                  "queues": {dag_id: {t.task_id: t.queue for t in dag.tasks} for dag_id, dag in bag.dags.items()}}))
"""


def task_queues(near2_env: dict[str, str], home: Path) -> dict[str, dict[str, str]]:
    """The queue of every task, as a dag-processor with this NEAR2_* environment parses the DAG files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEAR2_")}
    env.update({**near2_env, "NEAR2_HOME": str(home), "PYTHONPATH": str(REPO)})
    out = subprocess.run([sys.executable, "-c", PARSE_QUEUES, str(REPO / "dags")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    parsed = json.loads(out.stdout.strip().splitlines()[-1])
    assert parsed["errors"] == {}
    return parsed["queues"]


def test_the_train_task_goes_to_the_gpu_worker_and_everything_else_to_default(cluster, tmp_path):
    dag_processor = environment(cluster["airflow-dag-processor"])
    near2_env = {k: v for k, v in dag_processor.items() if k.startswith("NEAR2_")}
    queues = task_queues(near2_env, tmp_path / "home")
    assert queues["near2_retrain"]["train"] == near2_env["NEAR2_AIRFLOW__TRAIN_QUEUE"] == "gpu"
    default = dag_processor["AIRFLOW__OPERATORS__DEFAULT_QUEUE"]
    others = {queue for dag in queues.values() for task, queue in dag.items()} - {"gpu"}
    assert others == {default} == {"default"}
    assert [task for task, queue in queues["near2_retrain"].items() if queue == "gpu"] == ["train"]
    # every queue a task can land on has a worker, and each worker consumes its own queue only
    consumed = {name: worker_queues(cluster[name]) for name in WORKERS}
    assert consumed == {name: {queue} for name, queue in WORKERS.items()}
    assert {"gpu", default} <= set().union(*consumed.values())
    command = as_list(cluster["airflow-worker-gpu"]["command"])
    assert command[command.index("--concurrency") + 1] == "1", "one training at a time on the GPU"


def test_without_the_cluster_profile_the_train_task_stays_on_the_default_queue(services, tmp_path):  # noqa: F811
    env = environment(services["airflow-dag-processor"])
    assert "NEAR2_AIRFLOW__TRAIN_QUEUE" not in env and env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    queues = task_queues({k: v for k, v in env.items() if k.startswith("NEAR2_")}, tmp_path / "home")
    assert queues["near2_retrain"]["train"] == "default"


def test_the_image_installs_the_celery_provider_the_cluster_executor_needs():
    """The CeleryExecutor is in apache-airflow-providers-celery: the near2 image installs requirements.lock,
    so the lock must pin it (with celery and redis), and the Dockerfile must not filter it out."""
    import importlib.metadata

    lock = (REPO / "requirements.lock").read_text()
    for package in ("apache-airflow-providers-celery", "celery", "redis"):
        assert re.search(rf"^{package}==", lock, re.M), f"{package} is not pinned in requirements.lock"
    dockerfile = (REPO / "docker" / "airflow.Dockerfile").read_text()
    excluded = re.search(r"grep -vE '([^']+)'", dockerfile).group(1)
    assert not re.match(excluded, "apache-airflow-providers-celery==") and not re.match(excluded, "celery==")
    # and the executor class the cluster names imports from what the lock installs here
    importlib.metadata.version("apache-airflow-providers-celery")
    from airflow.providers.celery.executors.celery_executor import CeleryExecutor  # noqa: F401


# ----- the rules docker-compose.yml keeps hold in the cluster too -----------------------------------------------
def test_cluster_health_restart_and_start_order(cluster):
    check_health_and_restart(cluster)
    check_dependencies(cluster, CLUSTER_NEAR2_SERVICES)
    # no server starts before the cluster it talks to can answer
    for name in ("es-setup",):
        assert {node for node in ES_NODES if depends_on(cluster[name]).get(node) == "service_healthy"} == set(ES_NODES)


def test_cluster_near2_variables_keys_and_volumes(cluster):
    check_near2_variables(cluster, ("es-setup", "storefront", *AIRFLOW_COMPONENTS, *WORKERS))
    assert set(near2_image_services(cluster)) == {*AIRFLOW_CONTAINERS, "storefront", "es-setup"}
    check_api_key_loaders(cluster)
    check_writable_volumes(cluster)
    for name in WORKERS:
        mounted = {src for src, _, _ in volumes(cluster[name])}
        assert "es-indexer-key" in mounted and "es-storefront-key" not in mounted, name


@pytest.mark.parametrize("service_name", sorted(CLUSTER_NEAR2_SERVICES))
def test_cluster_near2_settings_land_where_the_stack_points_them(service_name, cluster, tmp_path, monkeypatch):
    check_near2_settings_land(cluster[service_name], tmp_path, monkeypatch)


def test_cluster_publishes_the_same_front_doors_and_keeps_the_storefront_apart(  # noqa: F811
        cluster, services, env_file):
    bind = read_env_file(env_file)["NEAR2_BIND_ADDRESS"]
    published = {name for name, service in cluster.items() if ports(service)}
    assert published == {name for name, service in services.items() if ports(service)}
    for name in published:
        assert all(host_ip == bind for host_ip, _, _ in ports(cluster[name])), name
    storefront = cluster["storefront"]
    reachable = {name for name, svc in cluster.items() if networks(svc) & networks(storefront)}
    assert reachable == {"storefront", "mlflow", *ES_NODES}
    # the elastic password reaches the nodes and es-setup only
    holders = {name for name, svc in cluster.items() if "ELASTIC_PASSWORD" in environment(svc)}
    assert holders == {*ES_NODES, "es-setup"}


def test_cluster_file_is_documented_with_the_command_that_uses_it():
    text = (REPO / "docker-compose.cluster.yml").read_text()
    command = "docker compose -f docker-compose.yml -f docker-compose.cluster.yml up -d"
    assert command in text and command in (REPO / "README.md").read_text()
    assert f"extends:\n      file: {COMPOSE_FILE.name}" in text, "the workers extend docker-compose.yml's scheduler"
