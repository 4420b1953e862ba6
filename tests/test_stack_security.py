"""The stack's security scripts, run for real (no Docker needed):

* docker/es-certs.sh makes the TLS material with the real elasticsearch-certutil, and a real
  Elasticsearch (the version local_elasticsearch pins) starts with security and HTTPS on it. The roles
  docker/es_setup.py defines are loaded (as file-realm roles) and near2's own index and search code run through TLS with them: the
  indexer builds, verifies and swaps an index; the storefront searches it but cannot write, delete or
  move the alias.
  The local distribution lacks the analysis-common module that the .security index needs, so native
  roles and API keys cannot be created here: es_setup.py's key lifecycle (create, keep, rotate,
  invalidate) runs only in the compose stack. The privileges those keys carry are the ones tested here.
* mlflow/start-server.sh starts a real MLflow server with the basic-auth app and --allowed-hosts, and
  mlflow/setup_users.py creates the pipeline (MANAGE) and storefront (READ) users.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import ES_DOWNLOAD_CACHE
from tests.stack_support import REPO, load_script

pytestmark = pytest.mark.slow

ALIAS = "products"  # the compose default (NEAR2_ES_ALIAS)
ES_USER = "near2-es"  # = near2_tasks.serving.elasticsearch_local.ES_USER, the user the local server runs as


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    pytest.fail(f"{what} did not come up within {timeout_s:.0f}s\n{tail}", pytrace=False)


# ----- a secured Elasticsearch ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def secured_es():
    """Elasticsearch with xpack security and HTTPS (certificates from docker/es-certs.sh), users
    near2_indexer / near2_storefront holding es_setup.py's roles, on free loopback ports; stopped and
    removed afterwards."""
    from near2_tasks.serving.elasticsearch_install import install
    from near2_tasks.serving.elasticsearch_java import find_java
    from near2_tasks.config import load_settings

    settings = load_settings(local_elasticsearch={"cache_dir": str(ES_DOWNLOAD_CACHE)})
    es_home = install(settings)
    java = find_java(settings.local_elasticsearch.version)
    as_root = os.geteuid() == 0
    # Elasticsearch refuses root: as root the node runs as the unprivileged user near2 already uses,
    # in a directory that user can reach (not under root's private /tmp/pytest-of-root)
    base = Path(tempfile.mkdtemp(prefix="near2-es-secure-", dir="/var/tmp" if as_root else None))
    pid_file = base / "es.pid"
    try:
        yield _start_secured_es(es_home, java, settings, base, pid_file, as_root)
    finally:
        _stop(pid_file)
        shutil.rmtree(base, ignore_errors=True)


def _stop(pid_file: Path, timeout_s: float = 60.0) -> None:
    """SIGTERM the node started by the fixture, SIGKILL it if it lingers."""
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)


def _start_secured_es(es_home: Path, java, settings, base: Path, pid_file: Path, as_root: bool) -> dict:
    base.chmod(0o755)
    from near2_tasks.serving import elasticsearch_local
    from near2_tasks.serving.elasticsearch_java import node_config

    user = elasticsearch_local.ensure_user() if as_root else pwd.getpwuid(os.geteuid())
    owner = f"{user.pw_uid}:{user.pw_gid}"
    conf = base / "config"
    node_config(es_home, conf, java)
    java_home = elasticsearch_local.java_home_for_es_user(java, settings)
    java_env = {**os.environ, "ES_JAVA_HOME": str(java_home), "ES_PATH_CONF": str(conf)}

    certs_env = {**java_env, "ES_HOME": str(es_home), "CA_DIR": str(base / "ca"), "NODE_DIR": str(conf / "certs"),
                 "PUBLIC_DIR": str(base / "public"), "ES_NODE_NAME": "elasticsearch",
                 "ES_CERT_DNS": "elasticsearch,localhost", "CERT_OWNER": owner}
    run = subprocess.run(["bash", str(REPO / "docker" / "es-certs.sh")], env=certs_env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr

    # es_setup.py's role definitions as file-realm roles, one file-realm user per principal
    es_setup = load_script(REPO / "docker" / "es_setup.py")
    (conf / "roles.yml").write_text(yaml.safe_dump(es_setup.role_definitions(ALIAS)))
    users = {name: secrets.token_hex(12) for name in es_setup.PRINCIPALS}
    for name, user_password in users.items():
        done = subprocess.run([str(es_home / "bin" / "elasticsearch-users"), "useradd", name, "-p", user_password,
                               "-r", name], env=java_env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
    for path in [base, *base.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)

    http_port, transport_port = free_port(), free_port()
    logs = base / "logs"
    command = [
        str(es_home / "bin" / "elasticsearch"), "-d", "-p", str(pid_file),
        "-E", "discovery.type=single-node", "-E", "network.host=127.0.0.1",
        "-E", f"http.port={http_port}", "-E", f"transport.port={transport_port}",
        "-E", f"path.data={base / 'data'}", "-E", f"path.logs={logs}",
        "-E", "cluster.routing.allocation.disk.threshold_enabled=false",
        # the same security settings as the elasticsearch service in docker-compose.yml
        "-E", "xpack.security.enabled=true",
        "-E", "xpack.security.http.ssl.enabled=true",
        "-E", "xpack.security.http.ssl.key=certs/elasticsearch.key",
        "-E", "xpack.security.http.ssl.certificate=certs/elasticsearch.crt",
        "-E", "xpack.security.http.ssl.certificate_authorities=certs/ca.crt",
    ]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "ES_JAVA_HOME": str(java_home),
           "ES_PATH_CONF": str(conf), "ES_JAVA_OPTS": "-Xms512m -Xmx512m", "HOME": str(base)}
    if as_root:
        command = ["runuser", "-u", ES_USER, "--", "env", *[f"{k}={v}" for k, v in env.items()], *command]
    started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr

    url, ca = f"https://localhost:{http_port}", str(base / "public" / "ca.crt")

    def healthy() -> bool:
        try:
            return requests.get(f"{url}/_cluster/health", auth=("near2_indexer", users["near2_indexer"]),
                                verify=ca, timeout=5).status_code == 200
        except requests.RequestException:
            return False

    wait_until(healthy, 240, "the secured Elasticsearch", logs / "elasticsearch.log")
    return {"url": url, "ca": ca, "base": base, "certs_env": certs_env, "users": users}


def near2_settings(tmp_path, tiny_model_dir, secured_es, principal: str):
    """near2's settings as the stack gives them to a container, authenticated as ``principal``."""
    from near2_tasks.config import load_settings
    from tests.serving_support import serving_settings
    from tests.tiny_model import TINY_DIMS

    settings = load_settings(
        home=str(tmp_path / "home"), model={"base_model": str(tiny_model_dir), "dims": TINY_DIMS},
        elasticsearch={"url": secured_es["url"], "ca_certs": secured_es["ca"], "alias": ALIAS,
                       "username": principal, "password": secured_es["users"][principal]})
    return serving_settings(settings)


def test_es_certs_is_idempotent_and_keeps_the_ca_key_out_of_the_client_volume(secured_es):
    base = secured_es["base"]
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (base / "config" / "certs").iterdir()}
    run = subprocess.run(["bash", str(REPO / "docker" / "es-certs.sh")], env=secured_es["certs_env"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert digest == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in (base / "config" / "certs").iterdir()}
    assert sorted(p.name for p in (base / "public").iterdir()) == ["ca.crt"]
    assert not any(p.name.endswith(".key") for p in (base / "config" / "certs").glob("ca*"))


def test_anonymous_and_plain_http_requests_are_refused(secured_es):
    assert requests.get(f"{secured_es['url']}/_cat/indices", verify=secured_es["ca"], timeout=10).status_code == 401
    with pytest.raises(requests.RequestException):
        requests.get(secured_es["url"].replace("https://", "http://"), timeout=10)


def test_indexer_role_builds_and_swaps_and_storefront_role_only_searches(secured_es, tiny_model_dir, tmp_path):
    from elasticsearch import AuthorizationException

    from near2_tasks.errors import Near2Error
    from near2_tasks.serving.es_client import make_client
    from near2_tasks.serving.build import build_index
    from near2_tasks.serving.alias import current_target, swap_alias
    from near2_tasks.serving.publish import build_verify_swap
    from near2_tasks.serving.search import Searcher
    from tests.serving_support import titled_catalog

    indexer = near2_settings(tmp_path / "i", tiny_model_dir, secured_es, "near2_indexer")
    storefront = near2_settings(tmp_path / "s", tiny_model_dir, secured_es, "near2_storefront")
    products = titled_catalog(40)

    # the indexer: near2's real build -> verify -> compare-and-swap -> prune, over verified TLS
    served = build_verify_swap(indexer, str(tiny_model_dir), products, model_version=1).index.name
    indexer_client = make_client(indexer)
    assert current_target(indexer_client, ALIAS) == served
    with pytest.raises(AuthorizationException):  # nothing outside the serving alias's indices
        indexer_client.indices.create(index="customers")
    with pytest.raises(AuthorizationException):  # and no security administration
        indexer_client.security.get_role()

    # the storefront: near2's real search through the alias...
    response = Searcher(storefront).search(products.title.iloc[0], k=5, dim=storefront.model.dims[-1])
    assert response.hits[0].product_id == products.product_id.iloc[0]
    assert response.model_version == "1"
    # ...and nothing else
    client = make_client(storefront)
    for forbidden in (
        lambda: client.index(index=served, id="x", document={"title": "injected"}),
        lambda: client.delete(index=served, id=str(products.product_id.iloc[0])),
        lambda: client.indices.delete(index=served),
        lambda: client.indices.create(index=f"{ALIAS}-v9-evil"),
        lambda: client.indices.put_settings(index=served, settings={"index.blocks.read_only": True}),
        lambda: client.indices.update_aliases(actions=[{"remove": {"index": served, "alias": ALIAS}}]),
        lambda: client.search(index="customers", query={"match_all": {}}),
    ):
        with pytest.raises(AuthorizationException):
            forbidden()
    with pytest.raises(Near2Error):  # near2's own code path cannot build with it either...
        build_verify_swap(storefront, str(tiny_model_dir), products, model_version=2)
    # ...nor move the alias to an index the indexer built
    candidate = build_index(indexer, str(tiny_model_dir), products, model_version=3).name
    with pytest.raises((Near2Error, AuthorizationException)):
        swap_alias(client, ALIAS, candidate, expected_current=served, require_verified=False)
    assert current_target(indexer_client, ALIAS) == served
    assert indexer_client.count(index=ALIAS)["count"] == len(products)


# ----- MLflow with the basic-auth app ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """mlflow/start-server.sh with SQLite stores and a file artifact destination (Postgres and MinIO
    in the stack); stopped afterwards."""
    base = tmp_path_factory.mktemp("mlflow-auth")
    port = free_port()
    venv_bin = Path(sys.executable).parent
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{base / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS_DESTINATION": str(base / "artifacts"),
        "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{base / 'auth.db'}",
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": secrets.token_hex(16),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_ALLOWED_HOSTS": f"127.0.0.1:{port},localhost:{port}",
        "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1",
        "MLFLOW_AUTH_CONFIG_PATH": str(base / "conf" / "basic_auth.ini"),
        "PYTHON": sys.executable, "MLFLOW": str(venv_bin / "mlflow"),
        "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
    }
    log = base / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(["sh", str(REPO / "mlflow" / "start-server.sh")], env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited: {log.read_text()[-2000:]}", pytrace=False)
        try:
            return requests.get(f"{url}/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_until(healthy, 180, "the MLflow server", log)
        yield {"url": url, "env": env, "base": base}
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)  # the server and its workers: their own session
            server.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def run_setup_users(mlflow_server, **overrides: str) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
           "MLFLOW_TRACKING_URI": mlflow_server["url"],
           "MLFLOW_TRACKING_USERNAME": "admin",
           "MLFLOW_TRACKING_PASSWORD": mlflow_server["env"]["MLFLOW_AUTH_ADMIN_PASSWORD"],
           "MLFLOW_PIPELINE_USERNAME": "near2-pipeline", "MLFLOW_PIPELINE_PASSWORD": "pipeline-pass-1",
           "MLFLOW_STOREFRONT_USERNAME": "near2-storefront", "MLFLOW_STOREFRONT_PASSWORD": "storefront-pass-1",
           **overrides}
    return subprocess.run([sys.executable, str(REPO / "mlflow" / "setup_users.py")], env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def mlflow_users(mlflow_server):
    result = run_setup_users(mlflow_server)
    assert result.returncode == 0, result.stdout + result.stderr
    return mlflow_server


def api(server, method: str, path: str, user: tuple[str, str] | None, **kwargs) -> requests.Response:
    return requests.request(method, f"{server['url']}/api/2.0/mlflow/{path}", auth=user, timeout=30, **kwargs)


PIPELINE = ("near2-pipeline", "pipeline-pass-1")
STOREFRONT = ("near2-storefront", "storefront-pass-1")


def test_mlflow_requires_credentials_and_an_allowed_host(mlflow_users):
    from near2_tasks.models.settings import MLflowSettings

    params = {"experiment_name": MLflowSettings().experiment}
    assert api(mlflow_users, "GET", "experiments/get-by-name", None, params=params).status_code == 401
    assert api(mlflow_users, "GET", "experiments/get-by-name", ("near2-pipeline", "wrong"),
               params=params).status_code == 401
    rebinding = api(mlflow_users, "GET", "experiments/get-by-name", PIPELINE, params=params,
                    headers={"Host": "attacker.example:5000"})
    assert rebinding.status_code == 403
    rendered = Path(mlflow_users["env"]["MLFLOW_AUTH_CONFIG_PATH"])
    assert oct(rendered.stat().st_mode & 0o777) == oct(0o600)
    assert mlflow_users["env"]["MLFLOW_AUTH_ADMIN_PASSWORD"] not in rendered.read_text()
    assert "default_permission = NO_PERMISSIONS" in rendered.read_text()


def test_pipeline_user_manages_and_storefront_user_only_reads(mlflow_users):
    from near2_tasks.models.settings import MLflowSettings

    defaults = MLflowSettings()
    experiment = api(mlflow_users, "GET", "experiments/get-by-name", STOREFRONT,
                     params={"experiment_name": defaults.experiment})
    assert experiment.status_code == 200, experiment.text
    experiment = experiment.json()["experiment"]
    assert experiment["artifact_location"] == f"mlflow-artifacts:/{experiment['experiment_id']}"
    model = {"name": defaults.registered_model}
    assert api(mlflow_users, "GET", "registered-models/get", STOREFRONT, params=model).status_code == 200

    run = api(mlflow_users, "POST", "runs/create", PIPELINE, json={"experiment_id": experiment["experiment_id"]})
    assert run.status_code == 200, run.text
    tag = {**model, "key": "owner", "value": "near2"}
    assert api(mlflow_users, "POST", "registered-models/set-tag", PIPELINE, json=tag).status_code == 200

    for method, path, body in (
        ("POST", "runs/create", {"experiment_id": experiment["experiment_id"]}),
        ("POST", "registered-models/set-tag", tag),
        ("DELETE", "registered-models/delete", model),
        ("POST", "runs/log-metric", {"run_id": run.json()["run"]["info"]["run_id"], "key": "x", "value": 1,
                                     "timestamp": 0}),
    ):
        response = api(mlflow_users, method, path, STOREFRONT, json=body)
        assert response.status_code == 403, f"storefront may not {path}: {response.status_code}"
    assert api(mlflow_users, "GET", "registered-models/get", PIPELINE, params=model).status_code == 200

    # artifacts go through the server's proxy (mlflow-artifacts:/): the pipeline uploads, the storefront
    # downloads (how it loads the champion model) but cannot overwrite
    info = run.json()["run"]["info"]
    assert info["artifact_uri"].startswith(experiment["artifact_location"] + "/")
    url = f"{mlflow_users['url']}/api/2.0/mlflow-artifacts/artifacts/{info['artifact_uri'].split(':/', 1)[1]}/model.txt"
    assert requests.put(url, data=b"weights", auth=PIPELINE, timeout=30).status_code == 200
    download = requests.get(url, auth=STOREFRONT, timeout=30)
    assert (download.status_code, download.content) == (200, b"weights")
    assert requests.get(url, timeout=30).status_code == 401
    assert requests.put(url, data=b"tampered", auth=STOREFRONT, timeout=30).status_code == 403


def test_setup_users_rerun_sets_the_configured_passwords(mlflow_users):
    from near2_tasks.models.settings import MLflowSettings

    params = {"name": MLflowSettings().registered_model}
    result = run_setup_users(mlflow_users, MLFLOW_STOREFRONT_PASSWORD="storefront-pass-2")
    assert result.returncode == 0, result.stderr
    assert api(mlflow_users, "GET", "registered-models/get", STOREFRONT, params=params).status_code == 401
    assert api(mlflow_users, "GET", "registered-models/get", ("near2-storefront", "storefront-pass-2"),
               params=params).status_code == 200
    assert api(mlflow_users, "GET", "registered-models/get", PIPELINE, params=params).status_code == 200
    assert run_setup_users(mlflow_users).returncode == 0  # back to the password the other tests use
