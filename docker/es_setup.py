#!/usr/bin/env python3
"""One-shot ``es-setup`` service: near2's Elasticsearch roles and API keys, least privilege.

    es_setup.py                              # create what is missing, keep valid keys (every `up`)
    es_setup.py --rotate near2_storefront    # new key written to its file; the old one still works
    es_setup.py --invalidate-stale near2_storefront   # after the restart: revoke all but the current

Two principals, each with a role and an API key scoped to the serving alias and its indices:

* ``near2_indexer`` (Airflow): creates, fills and deletes ``<alias>-*`` indices and moves the alias.
* ``near2_storefront`` (search service): reads the alias target and its mapping ``_meta``; it cannot
  write, delete, or move the alias.

Each key is written to its own file on its own Docker volume; a container mounts only the volume of
the key it needs, so the storefront never sees the indexing key. Keys are created by the ``elastic``
superuser with the role's privileges as their role descriptors (one definition, :func:`role_definitions`,
also stored as a named role for human users). On every run a kept key's descriptors are brought up to
date with ``update_api_key`` (a no-op when unchanged).

Environment: ``ELASTICSEARCH_URL``, ``ELASTIC_PASSWORD``, ``ELASTICSEARCH_CA_CERTS``,
``NEAR2_ELASTICSEARCH__ALIAS`` (default ``products``, as near2's settings), ``ES_API_KEY_EXPIRATION``
(e.g. ``90d``; empty: never), ``ES_SETUP_INDEXER_KEY_FILE``, ``ES_SETUP_STOREFRONT_KEY_FILE``.
Secrets are never printed: only key ids.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time
from pathlib import Path
from typing import Any

INDEXER = "near2_indexer"
STOREFRONT = "near2_storefront"
PRINCIPALS = (INDEXER, STOREFRONT)
KEY_FILE_ENV = {INDEXER: "ES_SETUP_INDEXER_KEY_FILE", STOREFRONT: "ES_SETUP_STOREFRONT_KEY_FILE"}
DEFAULT_ALIAS = "products"  # = near2_tasks.serving.settings.ElasticsearchSettings.alias (a test keeps them equal)


def role_definitions(alias: str) -> dict[str, dict[str, Any]]:
    """The privileges of each principal: the one place they are written down."""
    def indices() -> list[str]:  # a fresh list per role: the roles never share (or alias) objects
        return [alias, f"{alias}-*"]

    return {
        INDEXER: {
            # monitor: cluster health while waiting for a new index to be ready
            "cluster": ["monitor"],
            "indices": [{
                "names": indices(),
                # manage: aliases, refresh, settings, force-merge, delete of old indices
                "privileges": ["create_index", "manage", "write", "read", "view_index_metadata"],
            }],
            "metadata": {"application": "near2"},
        },
        STOREFRONT: {
            "cluster": [],
            "indices": [{
                "names": indices(),
                # read: kNN search; view_index_metadata: resolve the alias and read the mapping's _meta
                "privileges": ["read", "view_index_metadata"],
            }],
            "metadata": {"application": "near2"},
        },
    }


def key_id(encoded: str) -> str:
    """The id part of an encoded API key (base64 of ``id:secret``)."""
    try:
        return base64.b64decode(encoded, validate=True).decode().split(":", 1)[0]
    except (ValueError, UnicodeDecodeError):
        return ""


def read_key(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def write_key(path: Path, encoded: str) -> None:
    """Atomically replace the key file; owner and group may read it (the near2 containers run with
    group 0), nobody may write it afterwards."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w") as out:
        out.write(encoded + "\n")
    os.chmod(tmp, 0o440)
    os.replace(tmp, path)


def active_keys(client, name: str) -> list[dict[str, Any]]:
    """Keys of this name owned by the setup user that are neither invalidated nor expired."""
    now_ms = time.time() * 1000
    keys = client.security.get_api_key(name=name, owner=True).get("api_keys", [])
    return [k for k in keys if not k.get("invalidated") and (k.get("expiration") or now_ms + 1) > now_ms]


def ensure_roles(client, alias: str) -> None:
    for name, definition in role_definitions(alias).items():
        client.security.put_role(name=name, **definition)
        print(f"es-setup: role {name} on {alias}, {alias}-*", flush=True)


def ensure_key(client, name: str, path: Path, alias: str, expiration: str | None, rotate: bool) -> str:
    """Make ``path`` hold a valid key for ``name``; return what happened: kept, created, rotated, or
    replaced (the file's key was invalidated or expired)."""
    descriptor = {name: role_definitions(alias)[name]}
    current = read_key(path)
    current_id = key_id(current) if current else ""
    if current_id and not rotate and current_id in {k["id"] for k in active_keys(client, name)}:
        client.security.update_api_key(id=current_id, role_descriptors=descriptor,
                                       metadata={"application": "near2", "principal": name})
        print(f"es-setup: {name}: kept key {current_id}", flush=True)
        return "kept"
    options: dict[str, Any] = {"expiration": expiration} if expiration else {}
    created = client.security.create_api_key(
        name=name, role_descriptors=descriptor, metadata={"application": "near2", "principal": name}, **options)
    write_key(path, created["encoded"])
    what = "rotated" if rotate else ("replaced" if current_id else "created")
    reason = " (the old key is invalid or expired)" if what == "replaced" else ""
    print(f"es-setup: {name}: {what} key {created['id']} -> {path}{reason}", flush=True)
    return what


def invalidate_stale(client, name: str, path: Path) -> list[str]:
    """Revoke every active key of ``name`` except the one in ``path``; return the revoked ids."""
    current = read_key(path)
    if not current:
        raise SystemExit(f"es-setup: error: {path} holds no key for {name}; refusing to revoke them all")
    keep = key_id(current)
    stale = [k["id"] for k in active_keys(client, name) if k["id"] != keep]
    if stale:
        client.security.invalidate_api_key(ids=stale)
    print(f"es-setup: {name}: invalidated {len(stale)} old key(s) {stale}; kept {keep}", flush=True)
    return stale


def connect(url: str, password: str, ca_certs: str | None, wait_s: float):
    """A client as ``elastic``, once the server answers (the compose healthcheck usually made sure)."""
    from elasticsearch import Elasticsearch

    options: dict[str, Any] = {"basic_auth": ("elastic", password), "request_timeout": 30}
    if ca_certs:
        options["ca_certs"] = ca_certs
    client = Elasticsearch(url, **options)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.security.authenticate()
            return client
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet", until the deadline
            if time.monotonic() > deadline:
                raise SystemExit(f"es-setup: error: cannot authenticate to {url} as elastic: {exc}") from exc
            time.sleep(2)


def main(argv: list[str] | None = None, env: dict[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    parser = argparse.ArgumentParser(description="Create near2's Elasticsearch roles and API keys.")
    parser.add_argument("--rotate", action="append", choices=PRINCIPALS, default=[],
                        help="issue a new key for this principal (repeatable); the old one stays valid")
    parser.add_argument("--invalidate-stale", action="append", choices=PRINCIPALS, default=[],
                        help="revoke this principal's keys other than the one in its file")
    parser.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the server")
    args = parser.parse_args(argv)
    for required in ("ELASTICSEARCH_URL", "ELASTIC_PASSWORD", *KEY_FILE_ENV.values()):
        if not env.get(required):
            print(f"es-setup: error: {required} is not set (see docker-compose.yml)", file=sys.stderr)
            return 78
    alias = env.get("NEAR2_ELASTICSEARCH__ALIAS") or DEFAULT_ALIAS
    client = connect(env["ELASTICSEARCH_URL"], env["ELASTIC_PASSWORD"], env.get("ELASTICSEARCH_CA_CERTS"),
                     args.wait)
    ensure_roles(client, alias)
    for name in PRINCIPALS:
        ensure_key(client, name, Path(env[KEY_FILE_ENV[name]]), alias,
                   env.get("ES_API_KEY_EXPIRATION") or None, rotate=name in args.rotate)
    for name in args.invalidate_stale:
        invalidate_stale(client, name, Path(env[KEY_FILE_ENV[name]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
