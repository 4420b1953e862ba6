#!/usr/bin/env python3
"""``near2-env COMMAND...``: run COMMAND with near2's secrets loaded from where the stack keeps them.

The entrypoint of the near2 image (installed as /opt/near2/bin/near2-env), and the way to run a
one-off command in a running container with the same environment:

    docker compose exec airflow-scheduler near2-env near2 index status

It turns files and .env values into the variables near2 and Airflow read, then replaces itself with
COMMAND (exec: signals reach it, no extra process):

* ``ES_API_KEY_FILE`` (a file written by the es-setup service, on a volume only this container
  mounts) -> ``NEAR2_ELASTICSEARCH__API_KEY``.
* ``EXPORT_AIRFLOW_CONNECTIONS=true`` -> ``AIRFLOW_CONN_NEAR2_ELASTICSEARCH`` and
  ``AIRFLOW_CONN_NEAR2_MLFLOW`` (JSON, properly escaped) built from the same ``NEAR2_*`` and
  ``MLFLOW_TRACKING_*`` values, in the shape ``near2_tasks.airflow_support`` reads.
* ``AIRFLOW_ADMIN_PASSWORD`` (api-server only) -> the simple auth manager's passwords file, after
  refusing an empty, short or well-known password; the variable itself is removed from the
  environment so that no child process sees it.

Standard library only, so it also runs where near2 is not importable.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

ES_CONNECTION_ENV = "AIRFLOW_CONN_NEAR2_ELASTICSEARCH"
MLFLOW_CONNECTION_ENV = "AIRFLOW_CONN_NEAR2_MLFLOW"
#: Passwords nobody may keep for the Airflow admin (case-insensitive).
WELL_KNOWN_PASSWORDS = {"admin", "airflow", "password", "changeme", "change-me", "secret", "12345678"}
MIN_ADMIN_PASSWORD_LENGTH = 12


class SetupError(Exception):
    """A missing or bad secret: printed as one line, exit code 78 (EX_CONFIG)."""


def read_secret_file(path: str, what: str) -> str:
    try:
        value = Path(path).read_text().strip()
    except OSError as exc:
        raise SetupError(f"cannot read {what} from {path}: {exc.strerror}; did the es-setup service "
                         "complete? (docker compose logs es-setup)") from exc
    if not value:
        raise SetupError(f"{what} file {path} is empty; re-run `docker compose run --rm es-setup`")
    return value


def elasticsearch_connection(env: Mapping[str, str]) -> str:
    """``near2_elasticsearch`` as Airflow connection JSON: host/port/schema + extras api_key, ca_certs, alias."""
    url = urlsplit(env["NEAR2_ELASTICSEARCH__URL"])
    extra = {key: env[var] for key, var in (
        ("api_key", "NEAR2_ELASTICSEARCH__API_KEY"),
        ("ca_certs", "NEAR2_ELASTICSEARCH__CA_CERTS"),
        ("alias", "NEAR2_ELASTICSEARCH__ALIAS"),
    ) if env.get(var)}
    return json.dumps({
        "conn_type": "elasticsearch",
        "description": "near2 indexer: built by near2-env from NEAR2_ELASTICSEARCH__* and the es-setup API key",
        "host": url.hostname,
        "port": url.port or (443 if url.scheme == "https" else 9200),
        "schema": url.scheme,
        "extra": extra,
    })


def mlflow_connection(env: Mapping[str, str]) -> str:
    """``near2_mlflow`` as Airflow connection JSON: the tracking server, its user, the artifact root."""
    uri = env["NEAR2_MLFLOW__TRACKING_URI"]
    url = urlsplit(uri)
    extra = {"tracking_uri": uri}
    if env.get("NEAR2_MLFLOW__ARTIFACT_LOCATION"):
        extra["artifact_location"] = env["NEAR2_MLFLOW__ARTIFACT_LOCATION"]
    connection = {
        "conn_type": "http",
        "description": "near2 MLflow tracking server: built by near2-env from NEAR2_MLFLOW__* and MLFLOW_TRACKING_*",
        "host": url.hostname,
        "port": url.port,
        "schema": url.scheme,
        "extra": extra,
    }
    if env.get("MLFLOW_TRACKING_USERNAME"):
        connection["login"] = env["MLFLOW_TRACKING_USERNAME"]
        connection["password"] = env.get("MLFLOW_TRACKING_PASSWORD", "")
    return json.dumps(connection)


def check_admin_password(password: str) -> None:
    if len(password) < MIN_ADMIN_PASSWORD_LENGTH:
        raise SetupError(f"AIRFLOW_ADMIN_PASSWORD must have at least {MIN_ADMIN_PASSWORD_LENGTH} characters; "
                         "set it in .env (python docker/generate_env.py makes one)")
    if password.lower() in WELL_KNOWN_PASSWORDS:
        raise SetupError("AIRFLOW_ADMIN_PASSWORD is a well-known default; choose another one in .env")


def write_admin_passwords_file(env: Mapping[str, str], password: str) -> Path:
    """The simple auth manager's ``{"user": "password"}`` file, readable by this user only."""
    path = Path(env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")
                or Path(env.get("AIRFLOW_HOME", "/opt/airflow")) / "simple_auth_manager_passwords.json")
    username = env.get("AIRFLOW_ADMIN_USERNAME") or "admin"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps({username: password}) + "\n")
    return path


def prepare(env: Mapping[str, str]) -> dict[str, str]:
    """The environment COMMAND runs with (pure apart from reading the key file and writing the
    passwords file)."""
    result = dict(env)
    key_file = result.pop("ES_API_KEY_FILE", None)
    if key_file:
        result["NEAR2_ELASTICSEARCH__API_KEY"] = read_secret_file(key_file, "the Elasticsearch API key")
    admin_password = result.pop("AIRFLOW_ADMIN_PASSWORD", None)
    if admin_password is not None:
        check_admin_password(admin_password)
        write_admin_passwords_file(result, admin_password)
    if result.pop("EXPORT_AIRFLOW_CONNECTIONS", "").lower() == "true":
        result[ES_CONNECTION_ENV] = elasticsearch_connection(result)
        result[MLFLOW_CONNECTION_ENV] = mlflow_connection(result)
    return result


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: near2-env COMMAND [ARGS...]", file=sys.stderr)
        return 64
    try:
        env = prepare(os.environ)
    except SetupError as exc:
        print(f"near2-env: error: {exc}", file=sys.stderr)
        return 78
    except KeyError as exc:
        print(f"near2-env: error: {exc.args[0]} is not set (see docker-compose.yml)", file=sys.stderr)
        return 78
    os.execvpe(argv[0], argv, env)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
