"""The production stack (docker-compose.yml, docker/, mlflow/, .env.example) stays valid, secure and
consistent with the code.

No Docker engine runs here, so nothing is started: the file is resolved the way `docker compose config`
resolves it -- by `docker compose` itself when the plugin (or a v2 `docker-compose`) is installed, else
by PyYAML plus compose's variable interpolation, `extends` and multi-file merge rules -- and its properties
are checked against near2's real settings, CLI and Airflow connection code. The cluster override
(docker-compose.cluster.yml) has its own tests in tests/test_compose_cluster.py, on the same helpers.
The scripts the stack runs (es_setup.py, setup_users.py, start-server.sh, es-certs.sh) are exercised
against real servers in tests/test_stack_security.py.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.stack_support import REPO, load_script

COMPOSE_FILE = REPO / "docker-compose.yml"
#: The cluster profile: an override, `docker compose -f docker-compose.yml -f docker-compose.cluster.yml`.
CLUSTER_FILE = REPO / "docker-compose.cluster.yml"
#: Every compose file in the repository (all read the same .env).
COMPOSE_FILES = (COMPOSE_FILE, CLUSTER_FILE)
ENV_EXAMPLE = REPO / ".env.example"

#: The services the code and the README rely on.
AIRFLOW_COMPONENTS = {"airflow-apiserver": "api-server", "airflow-scheduler": "scheduler",
                      "airflow-dag-processor": "dag-processor", "airflow-triggerer": "triggerer"}
ONE_SHOTS = {"es-certs", "es-setup", "minio-setup", "mlflow-setup", "airflow-init"}
EXPECTED_SERVICES = {"postgres", "elasticsearch", "minio", "mlflow", "storefront",
                     *AIRFLOW_COMPONENTS, *ONE_SHOTS}
#: Containers that run near2 code (and so read NEAR2_* settings).
NEAR2_SERVICES = {*AIRFLOW_COMPONENTS, "storefront"}

#: Names of variables that hold secrets (environment keys in compose, variables in .env.example).
SECRET_NAME = re.compile(r"PASSWORD|SECRET|FERNET|TOKEN|API_KEY$|PRIVATE_KEY")
#: ${NAME...} references in compose text ($${...} is an escaped literal for the container's shell).
VARIABLE_REF = re.compile(r"(?<!\$)\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}")


# ----- loading ---------------------------------------------------------------------------------------
def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition("=")
        values[name.strip()] = value.strip().strip("'\"")
    return values


def compose_command() -> list[str] | None:
    """`docker compose` (or a standalone Compose v2) when one is installed, else None."""
    for argv in (["docker", "compose"], ["docker-compose"]):
        if not shutil.which(argv[0]):
            continue
        try:
            out = subprocess.run([*argv, "version", "--short"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        version = out.stdout.strip().lstrip("v")
        if out.returncode == 0 and (version[:1] not in "01" or version == "dev"):
            return argv
    return None


class ComposeError(Exception):
    pass


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err},
    ${VAR:+alt}, ${VAR+alt}, $VAR, and $$ for a literal $."""
    def replace(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name = match["name"] or match["bare"]
        op, arg = match["op"] or "", match["arg"] or ""
        present, current = name in env, env.get(name, "")
        if op in (":-", "-"):
            return current if (current if op == ":-" else present) else arg
        if op in (":?", "?"):
            if not (current if op == ":?" else present):
                raise ComposeError(f"required variable {name} is missing a value: {arg}")
            return current
        if op in (":+", "+"):
            return arg if (current if op == ":+" else present) else ""
        return current

    pattern = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?"
                         r"(?P<arg>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")
    return pattern.sub(replace, value)


def interpolate_tree(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    return node


def resolve(env_file: Path, files: tuple[Path, ...] = (COMPOSE_FILE,)) -> dict[str, Any]:
    """The compose model of `files` (later ones override earlier ones, as with repeated `-f`) with
    `env_file`'s values, as `docker compose config` sees it."""
    command = compose_command()
    if command:
        clean_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
        file_args = [arg for path in files for arg in ("-f", str(path))]
        out = subprocess.run(
            [*command, "--project-directory", str(REPO), *file_args, "--env-file", str(env_file),
             "config", "--format", "json"], capture_output=True, text=True, env=clean_env, timeout=120)
        if out.returncode != 0:
            raise ComposeError(out.stderr.strip())
        return json.loads(out.stdout)
    merged: dict[str, Any] = {}
    for path in files:
        merged = merge_models(merged, load_with_extends(path))
    return interpolate_tree(merged, read_env_file(env_file))


def raw_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The file as written (anchors merged, ${...} not interpolated)."""
    return yaml.safe_load(path.read_text())


# ----- compose's merge rules (the fallback when no `docker compose` is installed) -----------------------
# From the Compose Specification ("Merge and override", "extends"), as compose-go applies them: mappings
# merge key by key (environment, depends_on, networks, healthcheck, ...); command, entrypoint and
# healthcheck.test are replaced; volumes are unique by target; other sequences (ports, security_opt, ...)
# are appended. `extends` takes the named service as its own file defines it, depends_on included.
REPLACED_ATTRIBUTES = {"command", "entrypoint"}


def mount_target(volume: Any) -> str:
    if isinstance(volume, str):
        return volume.split(":")[1]
    return volume["target"]


def normalise_service(service: dict) -> dict:
    """The short forms that merge as mappings (environment, depends_on, networks), as mappings."""
    service = dict(service)
    env = service.get("environment")
    if isinstance(env, list):
        service["environment"] = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    deps = service.get("depends_on")
    if isinstance(deps, list):
        service["depends_on"] = {name: {"condition": "service_started"} for name in deps}
    nets = service.get("networks")
    if isinstance(nets, list):
        service["networks"] = {name: None for name in nets}
    return service


def merge_values(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge_values(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + [item for item in override if item not in base]
    return override


def merge_service(base: dict, override: dict) -> dict:
    base, override = normalise_service(base), normalise_service(override)
    merged = dict(base)
    for key, value in override.items():
        if key not in base or key in REPLACED_ATTRIBUTES:
            merged[key] = value
        elif key == "healthcheck":
            merged[key] = {**base[key], **value}  # test replaced, timing merged
        elif key == "volumes":
            by_target = {mount_target(v): v for v in base[key]}
            by_target.update({mount_target(v): v for v in value})
            merged[key] = list(by_target.values())
        else:
            merged[key] = merge_values(base[key], value)
    return merged


def merge_models(base: dict, override: dict) -> dict:
    merged = {key: value for key, value in base.items() if key != "services"}
    merged = merge_values(merged, {key: value for key, value in override.items() if key != "services"})
    services = dict(base.get("services") or {})
    for name, service in (override.get("services") or {}).items():
        services[name] = merge_service(services[name], service) if name in services else service
    merged["services"] = services
    return merged


def load_with_extends(path: Path, seen: tuple[tuple[str, str], ...] = ()) -> dict:
    """One compose file as written, each `extends` replaced by the service it names merged with its own
    attributes."""
    model = raw_compose(path)
    services = model.get("services") or {}
    for name, service in list(services.items()):
        if "extends" not in service:
            continue
        spec = service["extends"]
        base_path = (path.parent / spec["file"]).resolve() if spec.get("file") else path.resolve()
        key = (str(base_path), spec["service"])
        if key in seen:
            raise ComposeError(f"extends cycle at {name}")
        base_services = load_with_extends(base_path, (*seen, key))["services"]
        if spec["service"] not in base_services:
            raise ComposeError(f"{name} extends unknown service {spec['service']} in {base_path.name}")
        own = {k: v for k, v in service.items() if k != "extends"}
        services[name] = merge_service(base_services[spec["service"]], own)
    return model


def strings(node: Any) -> list[str]:
    """Every string value in a YAML tree (what compose interpolates; comments are not in it)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings(value)]
    return []


def variable_refs(files: tuple[Path, ...] = COMPOSE_FILES) -> list[re.Match]:
    return [m for path in files for value in strings(raw_compose(path)) for m in VARIABLE_REF.finditer(value)]


# ----- normalising the short and long compose forms ------------------------------------------------
def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def volumes(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each mount."""
    mounts = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            parts = volume.split(":")
            source, target = parts[0], parts[1]
            mounts.append((source, target, len(parts) > 2 and "ro" in parts[2].split(",")))
        else:
            mounts.append((volume.get("source", ""), volume["target"], bool(volume.get("read_only"))))
    return mounts


def ports(service: dict) -> list[tuple[str, str, int]]:
    """(host_ip, published, target) of each published port."""
    result = []
    for port in service.get("ports") or []:
        if isinstance(port, str):
            parts = port.rsplit(":", 2)
            host_ip = parts[0] if len(parts) == 3 else ""
            result.append((host_ip, parts[-2], int(parts[-1])))
        else:
            result.append((port.get("host_ip", ""), str(port.get("published", "")), int(port["target"])))
    return result


def depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def networks(service: dict) -> set[str]:
    nets = service.get("networks") or {}
    return set(nets) if isinstance(nets, (list, dict)) else set()


def as_list(command: Any) -> list[str]:
    return command.split() if isinstance(command, str) else list(command or [])


# ----- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generate_env() -> ModuleType:
    return load_script(REPO / "docker" / "generate_env.py")


@pytest.fixture(scope="module")
def env_file(tmp_path_factory, generate_env) -> Path:
    """A .env made the way the README says: docker/generate_env.py from .env.example."""
    path = tmp_path_factory.mktemp("stack") / ".env"
    assert generate_env.main(["--example", str(ENV_EXAMPLE), "--output", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def config(env_file) -> dict[str, Any]:
    return resolve(env_file)


@pytest.fixture(scope="module")
def services(config) -> dict[str, dict]:
    return config["services"]


# ----- validity ------------------------------------------------------------------------------------------
def test_compose_file_resolves_with_a_generated_env_and_has_every_service(services):
    assert set(services) == EXPECTED_SERVICES, (
        f"missing: {EXPECTED_SERVICES - set(services)}, unexpected: {set(services) - EXPECTED_SERVICES}")
    for name, command in AIRFLOW_COMPONENTS.items():
        assert as_list(services[name].get("command"))[:1] == [command], name


def test_compose_refuses_to_resolve_while_a_secret_is_empty():
    """.env.example ships no secret values, and compose must then refuse: a stack never starts with an
    empty (or default) password."""
    with pytest.raises(ComposeError) as failure:
        resolve(ENV_EXAMPLE)
    empty_secrets = {name for name, value in read_env_file(ENV_EXAMPLE).items()
                     if SECRET_NAME.search(name) and not value}
    named = set(re.findall(r"required variable (\w+) is missing", str(failure.value)))
    assert named, failure.value
    assert named <= empty_secrets


def test_env_example_declares_exactly_the_variables_compose_reads():
    referenced = {m["name"] for m in variable_refs()}
    declared = set(read_env_file(ENV_EXAMPLE))
    assert referenced - declared == set(), "referenced in a compose file but missing from .env.example"
    assert declared - referenced == set(), "declared in .env.example but never used by a compose file"


def test_env_file_is_git_ignored_and_example_is_not():
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0

    assert ignored(".env")
    assert not ignored(".env.example")
    tracked = subprocess.run(["git", "ls-files", ".env"], cwd=REPO, capture_output=True, text=True).stdout
    assert tracked.strip() == ""


# ----- no secret in the files ------------------------------------------------------------------------
SECRET_KEY_NAME = r"\b[A-Za-z0-9_.]*(?i:password|passwd|secret|token|api_key|private_key|fernet_key)"
#: In YAML / env / ini / shell: NAME=value, NAME = value, NAME: value (a YAML mapping needs ": ").
CONFIG_ASSIGNMENT = re.compile(
    rf"""(?P<name>{SECRET_KEY_NAME})["']?(?:\s*=\s*|:\s+)(?P<value>"[^"]*"|'[^']*'|[^\s#,)]+)""")
#: In Python: a secret-named name, key or keyword given a string literal.
PYTHON_ASSIGNMENT = re.compile(rf"""(?P<name>{SECRET_KEY_NAME})["']?\]?\s*[:=]\s*(?P<q>["'])(?P<value>[^"']+)(?P=q)""")
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/:@'\"]+:(?P<password>[^\s/@'\"]+)@", re.I)


def plaintext_secrets(text: str, python: bool = False) -> list[str]:
    """Literal secret values: a secret-named key given a literal, or a URL with a literal password.
    References (${VAR}, $VAR) and empty values pass; in Python, so does anything but a string literal.
    Full-line comments are prose (no assignments there), but URLs are checked in them too."""
    findings = []
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for match in (PYTHON_ASSIGNMENT if python else CONFIG_ASSIGNMENT).finditer(code):
        value = match["value"].strip("\"'")
        if value and not value.startswith("$"):
            findings.append(match.group(0))
    for match in URL_WITH_PASSWORD.finditer(text):
        if not match["password"].startswith("$"):
            findings.append(match.group(0))
    return findings


def stack_files() -> list[Path]:
    files = list(COMPOSE_FILES)
    for folder in ("docker", "mlflow"):
        files += [p for p in (REPO / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and not p.name.endswith(".lock")]
    return files


def test_the_secret_scanner_finds_planted_secrets():
    """Positive control: the scan below would notice a real leak, and passes the stack's idioms."""
    planted = ('ELASTIC_PASSWORD: hunter2hunter2\n'
               'AIRFLOW__DATABASE__SQL_ALCHEMY_CONN: postgresql://airflow:airflow@postgres/airflow\n'
               'admin_password = s3cr3t-value\n'
               'MINIO_ROOT_PASSWORD=minioadmin\n')
    assert len(plaintext_secrets(planted)) == 4
    assert len(plaintext_secrets('client.create_user("u", password="abc123")\nAPI_KEY = "QmFzZTY0"\n',
                                 python=True)) == 2
    clean = ('ELASTIC_PASSWORD: ${ELASTIC_PASSWORD:?set it}\n'
             'url: postgresql+psycopg2://mlflow:${MLFLOW_DB_PASSWORD:?x}@postgres:5432/mlflow\n'
             ': "${AIRFLOW_DB_PASSWORD:?AIRFLOW_DB_PASSWORD is not set}"\n'
             "CREATE ROLE airflow LOGIN PASSWORD :'airflow_password';\n"
             'curl -u "elastic:$${ELASTIC_PASSWORD}" https://localhost:9200\n')
    assert plaintext_secrets(clean) == []
    assert plaintext_secrets('password = env["MLFLOW_PIPELINE_PASSWORD"]\n', python=True) == []


def test_no_plaintext_secret_in_compose_docker_or_mlflow_files():
    leaks = {str(path.relative_to(REPO)): found for path in stack_files()
             if (found := plaintext_secrets(path.read_text(errors="replace"), python=path.suffix == ".py"))}
    assert leaks == {}


def test_secret_variables_are_required_and_have_no_default_anywhere():
    """A secret never falls back to a value written in the file: every reference is ${VAR:?...}."""
    for match in variable_refs():
        if SECRET_NAME.search(match["name"]):
            assert match["op"] == ":?", f"{match.group(0)}: secrets must be required, without a default"
    example = read_env_file(ENV_EXAMPLE)
    shipped = {name: value for name, value in example.items() if SECRET_NAME.search(name) and value}
    assert shipped == {}, ".env.example must not carry secret values"


def test_secret_environment_entries_are_pure_references():
    """Every secret-named container variable is filled from .env (or, for the API key, from a file by
    near2-env) -- in each compose file as written, before interpolation."""
    for path in COMPOSE_FILES:
        for name, service in raw_compose(path)["services"].items():
            for key, value in environment(service).items():
                if (SECRET_NAME.search(key) and not key.endswith("_FILE")) or URL_WITH_PASSWORD.search(value):
                    assert VARIABLE_REF.search(value), \
                        f"{path.name}: {name}.{key} = {value!r} is not a ${{VAR}} reference"


def test_images_ship_no_secret_and_build_only_allowlisted_files():
    for dockerfile in (REPO / "docker").glob("*.Dockerfile"):
        text = dockerfile.read_text()
        for line in text.splitlines():
            if re.match(r"\s*(ENV|ARG)\b", line):
                assert not SECRET_NAME.search(line.upper().split("#")[0]), f"{dockerfile.name}: {line}"
        ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
        patterns = [p.strip() for p in ignore.read_text().splitlines() if p.strip() and not p.startswith("#")]
        assert patterns[0] == "*", f"{ignore.name} must exclude everything first (an allowlist)"
        allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
        assert not any(a == ".env" or a.startswith(".env") for a in allowed)
        # every COPY source is in the allowlist and exists, so the build neither leaks nor breaks
        for line in re.findall(r"^COPY\s+(.+)$", text, re.M):
            sources = [t for t in line.split() if not t.startswith("--")][:-1]
            for source in sources:
                assert any(source == a or source.startswith(a + "/") for a in allowed), \
                    f"{dockerfile.name}: COPY {source} is excluded by {ignore.name}"
                assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"


# ----- Elasticsearch -----------------------------------------------------------------------------------
def test_elasticsearch_image_matches_the_client_major_and_the_tested_server(services):
    from near2_tasks.serving.settings import LocalElasticsearchSettings

    image = services["elasticsearch"]["image"]
    assert image.startswith("docker.elastic.co/elasticsearch/elasticsearch:")
    server_version = image.rsplit(":", 1)[1]
    client_major = importlib.metadata.version("elasticsearch").split(".")[0]
    assert server_version.split(".")[0] == client_major
    # the tests run against the same server version that the stack deploys
    assert server_version == LocalElasticsearchSettings().version
    assert services["es-certs"]["image"] == image


def test_elasticsearch_has_security_and_tls_on(services):
    env = environment(services["elasticsearch"])
    for setting in ("xpack.security.enabled", "xpack.security.http.ssl.enabled",
                    "xpack.security.transport.ssl.enabled"):
        assert env.get(setting) == "true", setting
    assert env["ELASTIC_PASSWORD"]
    # the certificate files it is told to use are the ones es-certs writes into the mounted volume
    node = environment(services["es-certs"])["ES_NODE_NAME"]
    node_volume = next(src for src, target, _ in volumes(services["es-certs"])
                       if target == environment(services["es-certs"])["NODE_DIR"])
    mounted = {target: (src, ro) for src, target, ro in volumes(services["elasticsearch"])}
    assert mounted["/usr/share/elasticsearch/config/certs"] == (node_volume, True)
    assert env["xpack.security.http.ssl.key"] == f"certs/{node}.key"
    assert env["xpack.security.http.ssl.certificate"] == f"certs/{node}.crt"
    assert env["xpack.security.http.ssl.certificate_authorities"] == "certs/ca.crt"
    # the health check authenticates over TLS, so "healthy" means security works
    test = " ".join(as_list(services["elasticsearch"]["healthcheck"]["test"]))
    assert "https://" in test and "--cacert" in test and "-u" in test


def test_clients_reach_elasticsearch_over_verified_tls(services):
    es_certs_env = environment(services["es-certs"])
    cert_names = set(es_certs_env["ES_CERT_DNS"].split(","))
    public_volume = next(src for src, target, _ in volumes(services["es-certs"])
                         if target == es_certs_env["PUBLIC_DIR"])
    private_volume = next(src for src, target, _ in volumes(services["es-certs"])
                          if target == es_certs_env["CA_DIR"])
    for name in (*NEAR2_SERVICES, "es-setup"):
        env = environment(services[name])
        url = env.get("NEAR2_ELASTICSEARCH__URL") or env["ELASTICSEARCH_URL"]
        ca = env.get("NEAR2_ELASTICSEARCH__CA_CERTS") or env["ELASTICSEARCH_CA_CERTS"]
        assert urlsplit(url).scheme == "https", name
        assert urlsplit(url).hostname in cert_names, f"{name}: the certificate does not name {url}"
        mounts = volumes(services[name])
        assert any(src == public_volume and ca.startswith(target + "/") and ro for src, target, ro in mounts), \
            f"{name}: {ca} is not on the CA certificate volume"
        assert all(src != private_volume for src, _, _ in mounts), f"{name} must not see the CA key"


def test_storefront_gets_only_the_read_only_key_and_no_backend_network(services):
    storefront = services["storefront"]
    mounted = {src for src, _, _ in volumes(storefront)}
    assert "es-storefront-key" in mounted and "es-indexer-key" not in mounted
    key_file = environment(storefront)["ES_API_KEY_FILE"]
    setup_env = environment(services["es-setup"])
    assert key_file == setup_env["ES_SETUP_STOREFRONT_KEY_FILE"]
    for name in AIRFLOW_COMPONENTS:
        airflow_mounts = {src for src, _, _ in volumes(services[name])}
        assert "es-indexer-key" in airflow_mounts and "es-storefront-key" not in airflow_mounts, name
        assert environment(services[name])["ES_API_KEY_FILE"] == setup_env["ES_SETUP_INDEXER_KEY_FILE"]
    # the storefront's network reaches Elasticsearch and MLflow, not Postgres, MinIO or Airflow
    reachable = {name for name, svc in services.items() if networks(svc) & networks(storefront)}
    assert reachable == {"storefront", "elasticsearch", "mlflow"}
    assert environment(storefront)["MLFLOW_TRACKING_USERNAME"] == \
        environment(services["mlflow-setup"])["MLFLOW_STOREFRONT_USERNAME"]


def test_es_setup_roles_give_the_storefront_read_access_only():
    es_setup = load_script(REPO / "docker" / "es_setup.py")
    roles = es_setup.role_definitions("products")
    storefront = roles[es_setup.STOREFRONT]
    granted = {p for entry in storefront["indices"] for p in entry["privileges"]}
    assert granted == {"read", "view_index_metadata"}
    assert storefront["cluster"] == []
    indexer = {p for entry in roles[es_setup.INDEXER]["indices"] for p in entry["privileges"]}
    assert {"create_index", "write", "manage"} <= indexer
    for role in roles.values():  # scoped to the serving alias and its versioned indices only
        assert all(set(entry["names"]) == {"products", "products-*"} for entry in role["indices"])


def test_es_setup_key_files_are_private_and_replaced_atomically(tmp_path, capsys):
    """What can be checked without a native realm: the local server lacks the module the .security
    index needs, so the API-key calls themselves run only in the compose stack."""
    import base64

    es_setup = load_script(REPO / "docker" / "es_setup.py")
    encoded = base64.b64encode(b"key-id-123:secret-part").decode()
    assert es_setup.key_id(encoded) == "key-id-123"
    assert es_setup.key_id("not base64!") == ""
    path = tmp_path / "es-storefront" / "api_key"
    es_setup.write_key(path, encoded)
    es_setup.write_key(path, encoded)  # replacing a read-only file works (rename, not rewrite)
    assert es_setup.read_key(path) == encoded
    assert stat.S_IMODE(path.stat().st_mode) == 0o440
    assert [p.name for p in path.parent.iterdir()] == ["api_key"], "no temporary file left behind"
    with pytest.raises(SystemExit, match="refusing to revoke them all"):
        es_setup.invalidate_stale(None, es_setup.STOREFRONT, tmp_path / "missing")
    assert es_setup.main([], env={"ELASTICSEARCH_URL": "https://elasticsearch:9200"}) == 78
    assert "ELASTIC_PASSWORD is not set" in capsys.readouterr().err


# ----- MLflow ----------------------------------------------------------------------------------------------
def test_mlflow_runs_the_basic_auth_app_with_allowed_hosts(services):
    dockerfile = (REPO / "docker" / "mlflow.Dockerfile").read_text()
    assert re.search(r'ENTRYPOINT \["/opt/mlflow/start-server.sh"\]', dockerfile)
    assert services["mlflow"]["build"]["dockerfile"] == "docker/mlflow.Dockerfile"
    assert not services["mlflow"].get("entrypoint"), "the image's start-server.sh must stay the entrypoint"
    script = (REPO / "mlflow" / "start-server.sh").read_text()
    server_call = script[script.index("exec "):]
    assert "--app-name basic-auth" in server_call
    assert '--allowed-hosts "$MLFLOW_ALLOWED_HOSTS"' in server_call
    env = environment(services["mlflow"])
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_DATABASE_URI"):
        assert env[name], name
    assert env["MLFLOW_AUTH_DEFAULT_PERMISSION"] == "NO_PERMISSIONS"
    # every client's Host header is allowed (the server answers 403 to others)
    allowed = env["MLFLOW_ALLOWED_HOSTS"].split(",")
    for name in (*NEAR2_SERVICES, "mlflow-setup"):
        uri = environment(services[name]).get("NEAR2_MLFLOW__TRACKING_URI") or \
            environment(services[name])["MLFLOW_TRACKING_URI"]
        assert urlsplit(uri).netloc in allowed, name


def test_mlflow_artifacts_go_to_the_bucket_minio_setup_creates(services):
    mlflow_env, minio_env = environment(services["mlflow"]), environment(services["minio-setup"])
    assert mlflow_env["MLFLOW_ARTIFACTS_DESTINATION"] == f"s3://{minio_env['MLFLOW_ARTIFACTS_BUCKET']}"
    assert mlflow_env["AWS_ACCESS_KEY_ID"] == minio_env["MLFLOW_S3_ACCESS_KEY_ID"]
    assert mlflow_env["AWS_SECRET_ACCESS_KEY"] == minio_env["MLFLOW_S3_SECRET_ACCESS_KEY"]
    assert mlflow_env["AWS_ACCESS_KEY_ID"] != environment(services["minio"])["MINIO_ROOT_USER"], \
        "MLflow must not use the MinIO root account"


def test_setup_scripts_default_to_near2s_own_names():
    from near2_tasks.models.settings import MLflowSettings
    from near2_tasks.serving.settings import ElasticsearchSettings

    assert load_script(REPO / "docker" / "es_setup.py").DEFAULT_ALIAS == ElasticsearchSettings().alias
    setup_users = load_script(REPO / "mlflow" / "setup_users.py")
    assert setup_users.DEFAULT_EXPERIMENT == MLflowSettings().experiment
    assert setup_users.DEFAULT_REGISTERED_MODEL == MLflowSettings().registered_model


# ----- Postgres ----------------------------------------------------------------------------------------------
def test_every_database_a_service_uses_is_created_with_its_owner(services):
    script = (REPO / "docker" / "postgres" / "init-databases.sh").read_text()
    created = dict(re.findall(r"CREATE DATABASE (\w+) OWNER (\w+);", script))
    roles = set(re.findall(r"CREATE ROLE (\w+) LOGIN", script))
    uris = [environment(services["mlflow"])["MLFLOW_BACKEND_STORE_URI"],
            environment(services["mlflow"])["MLFLOW_AUTH_DATABASE_URI"],
            environment(services["airflow-scheduler"])["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]]
    for uri in uris:
        parts = urlsplit(uri)
        database = parts.path.lstrip("/")
        assert parts.hostname == "postgres" and parts.username in roles, uri.replace(parts.password, "***")
        assert created.get(database) == parts.username, f"database {database} is not owned by {parts.username}"
    postgres_env = environment(services["postgres"])
    for name in re.findall(r'\$\{(\w+_DB_PASSWORD):\?', script):
        assert postgres_env.get(name), f"postgres container lacks {name} for init-databases.sh"
    assert (REPO / "docker/postgres/init-databases.sh").stat().st_mode & stat.S_IXUSR


# ----- Airflow -----------------------------------------------------------------------------------------------
def test_airflow_uses_local_executor_mounted_dags_and_a_non_default_admin(services, env_file):
    for name in AIRFLOW_COMPONENTS:
        env = environment(services[name])
        assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
        assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("SimpleAuthManager")
        mounts = {target: (src, ro) for src, target, ro in volumes(services[name])}
        for folder in ("dags", "plugins"):
            source, read_only = mounts[f"/opt/airflow/{folder}"]
            assert Path(source).resolve() == (REPO / folder).resolve() and read_only, name
    api_env = environment(services["airflow-apiserver"])
    admin = api_env["AIRFLOW_ADMIN_USERNAME"]
    assert api_env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == f"{admin}:admin"
    password = api_env["AIRFLOW_ADMIN_PASSWORD"]
    assert password == read_env_file(env_file)["AIRFLOW_ADMIN_PASSWORD"]
    assert password.lower() not in {"admin", "airflow", "password"}
    # only the api-server holds the admin password
    for name, service in services.items():
        if name != "airflow-apiserver":
            assert "AIRFLOW_ADMIN_PASSWORD" not in environment(service), name


def test_near2_env_refuses_default_airflow_admin_passwords(tmp_path):
    near2_env = load_script(REPO / "docker" / "near2_env.py")
    passwords_file = tmp_path / "passwords.json"
    base = {"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file),
            "AIRFLOW_ADMIN_USERNAME": "admin"}
    for bad in ("", "admin", "airflow", "AIRFLOW", "short-one", "changeme"):
        with pytest.raises(near2_env.SetupError, match="AIRFLOW_ADMIN_PASSWORD"):
            near2_env.prepare({**base, "AIRFLOW_ADMIN_PASSWORD": bad})
    assert not passwords_file.exists()
    env = near2_env.prepare({**base, "AIRFLOW_ADMIN_PASSWORD": "a-long-generated-secret"})
    assert "AIRFLOW_ADMIN_PASSWORD" not in env, "child processes must not inherit the admin password"
    assert json.loads(passwords_file.read_text()) == {"admin": "a-long-generated-secret"}
    assert stat.S_IMODE(passwords_file.stat().st_mode) == 0o600


def test_simple_auth_manager_reads_the_passwords_file_near2_env_writes(tmp_path, monkeypatch):
    near2_env = load_script(REPO / "docker" / "near2_env.py")
    passwords_file = tmp_path / "passwords.json"
    env = {"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file),
           "AIRFLOW_ADMIN_USERNAME": "ops", "AIRFLOW_ADMIN_PASSWORD": "Ops-password-123"}
    near2_env.prepare(env)
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(passwords_file))
    assert SimpleAuthManager.get_generated_password_file() == str(passwords_file)
    assert SimpleAuthManager.get_passwords() == {"ops": "Ops-password-123"}


# ----- compose <-> near2's settings, CLI and Airflow connections --------------------------------------------
def settings_from_env(env: dict[str, str], monkeypatch):
    """near2's Settings as a container with this environment would load them."""
    from near2_tasks.config import load_settings

    for name in list(os.environ):
        if name.startswith("NEAR2_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("NEAR2_"):
            monkeypatch.setenv(name, value)
    return load_settings()


def test_every_near2_variable_names_a_real_setting(services):
    check_near2_variables(services, ("es-setup", "storefront", *AIRFLOW_COMPONENTS))


def check_near2_variables(services: dict[str, dict], script_services: tuple[str, ...]) -> None:
    """Every NEAR2_* variable of every service names a real near2 setting (also used by the cluster tests)."""
    from near2_tasks.config import Settings

    for name, service in services.items():
        for key in environment(service):
            if not key.startswith("NEAR2_"):
                continue
            path = key[len("NEAR2_"):].lower().split("__")
            model: Any = Settings
            for part in path:
                assert part in model.model_fields, f"{name}: {key} is not a near2 setting"
                model = model.model_fields[part].annotation
    # and the scripts' own variables do not pose as settings
    for name in script_services:
        assert not any(k.startswith("NEAR2_") and k.endswith("_FILE") for k in environment(services[name]))


@pytest.mark.parametrize("service_name", sorted(NEAR2_SERVICES))
def test_near2_settings_land_where_the_stack_points_them(service_name, services, tmp_path, monkeypatch):
    check_near2_settings_land(services[service_name], tmp_path, monkeypatch)


def check_near2_settings_land(service: dict, tmp_path: Path, monkeypatch) -> Any:
    """near2's Settings as this container loads them (through near2-env) point where the stack says;
    returns them (also used by the cluster tests)."""
    near2_env = load_script(REPO / "docker" / "near2_env.py")
    env = environment(service)
    key_file = tmp_path / "api_key"
    key_file.write_text("ZmFrZS1pZDpmYWtlLWtleQ==\n")
    env.update(ES_API_KEY_FILE=str(key_file),
               AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(tmp_path / "passwords.json"))
    prepared = near2_env.prepare(env)
    settings = settings_from_env(prepared, monkeypatch)

    assert settings.elasticsearch.url == "https://elasticsearch:9200"
    assert settings.elasticsearch.api_key == "ZmFrZS1pZDpmYWtlLWtleQ=="
    assert str(settings.elasticsearch.ca_certs) == env["NEAR2_ELASTICSEARCH__CA_CERTS"]
    assert settings.elasticsearch.alias == env["NEAR2_ELASTICSEARCH__ALIAS"]
    assert settings.tracking_uri == "http://mlflow:5000"
    # unset: with a tracking server near2 then leaves the artifact root to the server (mlflow-artifacts:/<id>),
    # which the basic-auth app needs to apply experiment permissions to artifacts
    assert settings.mlflow.artifact_location is None
    home_volume = next(src for src, target, _ in volumes(service) if target == env["NEAR2_HOME"])
    assert settings.home == Path(env["NEAR2_HOME"]) and home_volume, "NEAR2_HOME must be on a volume"
    assert prepared["MLFLOW_TRACKING_PASSWORD"], "the MLflow client authenticates from the environment"
    return settings


def test_airflow_connections_agree_with_the_near2_settings(services, tmp_path, monkeypatch):
    """AIRFLOW_CONN_NEAR2_* (built by near2-env) read through near2's own connection code give the same
    settings as the NEAR2_* variables."""
    from near2_tasks import airflow_support

    near2_env = load_script(REPO / "docker" / "near2_env.py")
    env = environment(services["airflow-scheduler"])
    key_file = tmp_path / "api_key"
    key_file.write_text("aWQ6c2VjcmV0\n")
    prepared = near2_env.prepare({**env, "ES_API_KEY_FILE": str(key_file)})
    for name in (near2_env.ES_CONNECTION_ENV, near2_env.MLFLOW_CONNECTION_ENV):
        monkeypatch.setenv(name, prepared[name])
    overrides = airflow_support.connection_overrides()
    expected = settings_from_env(prepared, monkeypatch)
    assert overrides["elasticsearch"] == {
        "url": expected.elasticsearch.url, "api_key": expected.elasticsearch.api_key,
        "ca_certs": str(expected.elasticsearch.ca_certs), "alias": expected.elasticsearch.alias}
    assert overrides["mlflow"] == {"tracking_uri": expected.tracking_uri}
    assert json.loads(prepared[near2_env.MLFLOW_CONNECTION_ENV])["login"] == env["MLFLOW_TRACKING_USERNAME"]


def test_storefront_runs_the_real_serve_command_on_its_published_port(services):
    from click.testing import CliRunner

    from near2_tasks.cli import cli

    storefront = services["storefront"]
    command = as_list(storefront["command"])
    assert command[:2] == ["near2", "serve"]
    serve = cli.commands["serve"]
    options = {opt for param in serve.params for opt in param.opts}
    flags = [arg for arg in command[2:] if arg.startswith("--")]
    assert set(flags) <= options, f"near2 serve does not take {set(flags) - options}"
    port = int(command[command.index("--port") + 1])
    assert [target for _, _, target in ports(storefront)] == [port]
    assert f"localhost:{port}/health" in " ".join(as_list(storefront["healthcheck"]["test"]))
    assert CliRunner().invoke(cli, ["serve", "--help"]).exit_code == 0
    assert as_list(storefront["entrypoint"])[-1] == "near2-env"


def near2_image_services(services: dict[str, dict]) -> dict[str, dict]:
    return {name: svc for name, svc in services.items()
            if (svc.get("build") or {}).get("dockerfile") == "docker/airflow.Dockerfile"}


def test_a_container_that_loads_an_api_key_starts_after_es_setup_and_mounts_it(services):
    assert set(near2_image_services(services)) == {*AIRFLOW_COMPONENTS, "airflow-init", "storefront", "es-setup"}
    check_api_key_loaders(services)


def check_api_key_loaders(services: dict[str, dict]) -> None:
    for name, service in near2_image_services(services).items():
        key_file = environment(service).get("ES_API_KEY_FILE")
        if not key_file:
            continue
        assert depends_on(service).get("es-setup") == "service_completed_successfully", name
        assert any(key_file.startswith(target + "/") for _, target, _ in volumes(service)), name


def test_writable_volumes_of_the_near2_image_are_directories_it_owns(services):
    check_writable_volumes(services)


def check_writable_volumes(services: dict[str, dict]) -> None:
    """A fresh named volume takes the owner of the image directory it is mounted on: a mount point the
    image does not create would be root's, and the airflow user (uid 50000) could not write there."""
    dockerfile = (REPO / "docker" / "airflow.Dockerfile").read_text().replace("\\\n", " ")
    created = {path for block in re.findall(r"mkdir -p ([^&]+)", dockerfile) for path in block.split()}
    owned = {path for block in re.findall(r"chown -R airflow:0 ([^&]+)", dockerfile) for path in block.split()}
    writable_in_base_image = {"/opt/airflow/logs"}  # created and owned by apache/airflow itself
    for name, service in near2_image_services(services).items():
        for source, target, read_only in volumes(service):
            if read_only or source.startswith((".", "/")):
                continue
            assert target in writable_in_base_image or (
                target in created and any(target == o or target.startswith(o + "/") for o in owned)), \
                f"{name}: volume {source} on {target}, which the image does not create for the airflow user"


# ----- health and start order ------------------------------------------------------------------------------
def test_every_long_running_service_has_a_healthcheck_and_one_shots_do_not_restart(services):
    check_health_and_restart(services)


def check_health_and_restart(services: dict[str, dict]) -> None:
    for name, service in services.items():
        if name in ONE_SHOTS:
            assert str(service.get("restart", "no")) == "no", name
        else:
            assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
            assert service.get("restart") in ("unless-stopped", "always"), name


def test_every_dependency_waits_for_health_or_completion(services):
    check_dependencies(services, NEAR2_SERVICES)


def check_dependencies(services: dict[str, dict], near2_services: set[str]) -> None:
    """depends_on waits for health (servers) or completion (one-shots), without cycles, and nothing that
    runs near2 starts before its keys and users exist."""
    for name, service in services.items():
        for dependency, condition in depends_on(service).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            expected = "service_completed_successfully" if dependency in ONE_SHOTS else "service_healthy"
            assert condition == expected, f"{name} -> {dependency}: {condition}"
    # and the graph has no cycle (compose would refuse to start)
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"dependency cycle: {' -> '.join((*path, name))}"
        if name not in order:
            for dependency in depends_on(services[name]):
                visit(dependency, (*path, name))
            order.append(name)

    for name in services:
        visit(name, ())
    # nothing that runs near2 starts before its keys and users exist
    for name in near2_services:
        assert {"es-setup", "mlflow-setup"} <= set(depends_on(services[name])), name


def test_only_front_doors_are_published_and_only_on_the_bind_address(services, env_file):
    bind = read_env_file(env_file)["NEAR2_BIND_ADDRESS"]
    assert bind == "127.0.0.1"
    published = {name for name, service in services.items() if ports(service)}
    assert published == {"elasticsearch", "mlflow", "airflow-apiserver", "storefront"}
    for name in published:
        assert all(host_ip == bind for host_ip, _, _ in ports(services[name])), name


# ----- docker/generate_env.py ------------------------------------------------------------------------------
def test_generate_env_fills_every_secret_once_and_copies_the_rest(env_file, generate_env, tmp_path):
    example, generated = read_env_file(ENV_EXAMPLE), read_env_file(env_file)
    assert set(generated) == set(example)
    secrets = {name: value for name, value in generated.items() if generate_env.is_secret(name)}
    assert secrets and all(secrets.values())
    assert len(set(secrets.values())) == len(secrets), "every secret is different"
    assert {n: v for n, v in generated.items() if n not in secrets} == \
        {n: v for n, v in example.items() if n not in secrets}
    from cryptography.fernet import Fernet

    Fernet(generated["AIRFLOW_FERNET_KEY"].encode())  # a valid key, or this raises
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert all(re.fullmatch(r"[0-9a-f]{32}", v) for n, v in secrets.items() if n != "AIRFLOW_FERNET_KEY")
    # an existing .env is kept
    before = env_file.read_text()
    assert generate_env.main(["--example", str(ENV_EXAMPLE), "--output", str(env_file)]) == 1
    assert env_file.read_text() == before
