#!/usr/bin/env python3
"""One-shot ``mlflow-setup`` service: near2's MLflow users and their permissions, least privilege.

Runs as the MLflow admin (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``) against the
basic-auth server, after it is healthy. Idempotent, and the way to rotate a password: change it in
.env, then ``docker compose up -d mlflow-setup`` and restart the service that uses it.

* the near2 experiment and registered model exist (created here, so their permissions are explicit
  rather than "whoever came first");
* ``MLFLOW_PIPELINE_USERNAME`` (Airflow): MANAGE on both -- logs runs, registers versions, moves the
  challenger/champion aliases;
* ``MLFLOW_STOREFRONT_USERNAME`` (search service): READ on both -- loads the model named in the serving
  index, can change nothing. With ``default_permission = NO_PERMISSIONS`` it sees nothing else.

Names come from the same variables near2 reads (``NEAR2_MLFLOW__EXPERIMENT``,
``NEAR2_MLFLOW__REGISTERED_MODEL``), with near2's defaults. The experiment gets the server's default
artifact root, ``mlflow-artifacts:/<experiment id>``: the basic-auth app reads the experiment id from
proxied artifact paths to apply its permissions, so a custom root would lock everyone but the admin out
of the artifacts.
"""

from __future__ import annotations

import os
import sys
import time

# = near2_tasks.models.settings.MLflowSettings defaults (a test keeps them equal)
DEFAULT_EXPERIMENT = "near2"
DEFAULT_REGISTERED_MODEL = "near2-encoder"


def ensure_user(auth, username: str, password: str) -> str:
    """Create the user, or set its password to the configured one; return what happened."""
    from mlflow.exceptions import RestException

    try:
        auth.get_user(username)
    except RestException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        auth.create_user(username, password)
        return "created"
    auth.update_user_password(username, password)
    return "password set"


def ensure_permission(auth, username: str, resource_type: str, resource_id: str, permission: str) -> None:
    """Give ``username`` exactly ``permission`` on the resource (grant, or replace a different grant)."""
    from mlflow.exceptions import RestException

    if auth.get_user_permission(username, resource_type, resource_id).permission == permission:
        return
    try:
        auth.grant_user_permission(username, resource_type, resource_id, permission)
    except RestException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.revoke_user_permission(username, resource_type, resource_id)
        auth.grant_user_permission(username, resource_type, resource_id, permission)


def ensure_experiment(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name)


def ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import RestException

    try:
        client.get_registered_model(name)
    except RestException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, description="near2 query/product encoder (NEAR² nested embeddings)")


def wait_for_server(auth, username: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            auth.get_user(username)
            return
        except Exception as exc:  # noqa: BLE001 - "not yet" until the deadline
            if time.monotonic() > deadline:
                raise SystemExit(f"mlflow-setup: error: the tracking server does not accept the admin: {exc}") from exc
            time.sleep(2)


def main(env: dict[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    required = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_PIPELINE_USERNAME", "MLFLOW_PIPELINE_PASSWORD",
                "MLFLOW_STOREFRONT_USERNAME", "MLFLOW_STOREFRONT_PASSWORD")
    missing = [name for name in required if not env.get(name)]
    if missing:
        print(f"mlflow-setup: error: {', '.join(missing)} not set (see docker-compose.yml)", file=sys.stderr)
        return 78
    os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                                           "MLFLOW_TRACKING_PASSWORD")})
    from mlflow import MlflowClient
    from mlflow.server.auth.client import AuthServiceClient

    uri = env["MLFLOW_TRACKING_URI"]
    auth, client = AuthServiceClient(uri), MlflowClient(tracking_uri=uri, registry_uri=uri)
    wait_for_server(auth, env["MLFLOW_TRACKING_USERNAME"], float(env.get("MLFLOW_SETUP_WAIT_S", "120")))

    experiment = env.get("NEAR2_MLFLOW__EXPERIMENT") or DEFAULT_EXPERIMENT
    model = env.get("NEAR2_MLFLOW__REGISTERED_MODEL") or DEFAULT_REGISTERED_MODEL
    experiment_id = ensure_experiment(client, experiment)
    ensure_registered_model(client, model)

    grants = {"MLFLOW_PIPELINE": "MANAGE", "MLFLOW_STOREFRONT": "READ"}
    for prefix, permission in grants.items():
        username = env[f"{prefix}_USERNAME"]
        what = ensure_user(auth, username, env[f"{prefix}_PASSWORD"])
        ensure_permission(auth, username, "experiment", experiment_id, permission)
        ensure_permission(auth, username, "registered_model", model, permission)
        print(f"mlflow-setup: user {username}: {what}; {permission} on experiment {experiment!r} "
              f"(id {experiment_id}) and registered model {model!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
