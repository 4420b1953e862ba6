"""The serving alias: read it, move it (compare-and-swap, only to a verified index of the champion), roll
it back, list and prune the versioned indices."""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from near2_tasks import conventions
from near2_tasks.errors import Near2Error
from near2_tasks.serving.es_client import es_errors, make_client

if TYPE_CHECKING:
    from elasticsearch import Elasticsearch

    from near2_tasks.config import Settings

log = logging.getLogger(__name__)


class AliasChanged(Near2Error):
    """The alias no longer points where the caller expected: someone else moved it meanwhile."""

    exit_code = 4


@dataclass(frozen=True)
class IndexInfo:
    name: str
    docs: int
    size_bytes: int
    serving: bool
    verified: bool
    model_name: str | None
    model_version: str | None
    model_uri: str | None
    dims: list[int]
    catalog_version: str | None
    built_at: str | None


@dataclass(frozen=True)
class IndexStatus:
    alias: str
    target: str | None
    indices: list[IndexInfo]

    def to_dict(self) -> dict[str, Any]:
        return {"alias": self.alias, "target": self.target, "indices": [asdict(i) for i in self.indices]}


def alias_targets(client: Elasticsearch, alias: str) -> list[str]:
    """The indices the alias points at (normally one; none before the first swap)."""
    from elasticsearch import NotFoundError

    try:
        return sorted(client.indices.get_alias(name=alias).keys())
    except NotFoundError:
        return []


def current_target(client: Elasticsearch, alias: str) -> str | None:
    targets = alias_targets(client, alias)
    if len(targets) > 1:
        raise Near2Error(f"alias {alias} points at several indices {targets}",
                         hint="`near2 index rollback` or an _aliases call must leave exactly one")
    return targets[0] if targets else None


def swap_alias(client: Elasticsearch | Settings, alias: str, new_index: str, expected_current: str | None,
               *, require_verified: bool = True) -> str | None:
    """Move ``alias`` to ``new_index`` in one atomic ``_aliases`` call, only if it still points at
    ``expected_current`` (None: only if it does not exist yet). Returns the previous target.

    Compare-and-swap: the removal of ``expected_current`` carries ``must_exist``, so if another run
    moved the alias after the caller read it, Elasticsearch rejects the whole call and AliasChanged
    is raised; the alias is then exactly where the other run left it. The first swap (no alias yet)
    has no server-side precondition: it adds, re-reads, and withdraws its own addition if a
    concurrent first swap also added one (then both fail and the alias stays absent, as before).
    """
    from elasticsearch import NotFoundError

    if not isinstance(client, _es_client_type()):
        client = make_client(client)
    url = client_url(client)
    with es_errors(url, f"swap of alias {alias}"):
        if not client.indices.exists(index=new_index):
            raise Near2Error(f"index {new_index} does not exist; the alias {alias} was not moved")
        if require_verified and conventions.META_VERIFIED_AT not in meta_of(client, new_index):
            raise Near2Error(f"index {new_index} has not passed verification; the alias {alias} was not moved",
                             hint="run verify_index first")
        current = alias_targets(client, alias)
        expected = [expected_current] if expected_current else []
        if current != expected:
            raise AliasChanged(f"alias {alias} points at {current or 'nothing'}, expected "
                               f"{expected_current or 'nothing'}: another run moved it; not swapped")
        if current == [new_index]:
            return expected_current
        actions: list[dict[str, Any]] = []
        if expected_current:
            actions.append({"remove": {"index": expected_current, "alias": alias, "must_exist": True}})
        actions.append({"add": {"index": new_index, "alias": alias}})
        try:
            client.indices.update_aliases(actions=actions)
        except NotFoundError as exc:
            raise AliasChanged(f"alias {alias} moved away from {expected_current} during the swap; not swapped"
                               ) from exc
        if expected_current is None and alias_targets(client, alias) != [new_index]:
            client.indices.update_aliases(actions=[{"remove": {"index": new_index, "alias": alias}}])
            raise AliasChanged(f"alias {alias} was created concurrently by another run; not swapped")
    log.info("alias %s: %s -> %s", alias, expected_current, new_index)
    return expected_current


def swap_to_champion_index(client: Elasticsearch, alias: str, new_index: str, expected_current: str | None,
                           model_version: str | int, champion: str | None) -> str | None:
    """:func:`swap_alias`, with the one retry both the DAG and ``near2 index`` apply. Returns the previous target.

    If the alias already points at ``new_index`` (a re-run after a swap), nothing moves. If another run
    moved the alias after ``expected_current`` was read (AliasChanged) to an index whose model is not
    the champion, while ``new_index``'s model is, the swap is retried against that new target; in any
    other case the alias stays where the other run put it and AliasChanged propagates. Whether this
    model may serve at all is :func:`near2_tasks.promote.promotion.not_served_reason`'s question, asked before.
    """
    url = client_url(client)
    with es_errors(url, "reading the alias"):
        current = current_target(client, alias)
    if current == new_index:
        log.info("alias %s already points at %s", alias, new_index)
        return expected_current
    try:
        return swap_alias(client, alias, new_index, expected_current)
    except AliasChanged:
        with es_errors(url, "reading the alias"):
            current = current_target(client, alias)
            serving = str(meta_of(client, current).get("model_version")) if current else None
        if champion is None or champion != str(model_version) or serving == champion:
            raise  # nothing says the other run's index is stale: leave it
        log.warning("alias %s moved to %s (v%s, not the champion) meanwhile; swapping from there",
                    alias, current, serving)
        return swap_alias(client, alias, new_index, current)


def _es_client_type():
    from elasticsearch import Elasticsearch

    return Elasticsearch


def client_url(client: Elasticsearch) -> str:
    try:
        node = client.transport.node_pool.all()[0]
        return node.base_url
    except Exception:  # noqa: BLE001 - only used in messages
        return "the configured Elasticsearch"


def meta_of(client, index: str) -> dict[str, Any]:
    return mapping_of(client, index).get("_meta") or {}


def mapping_of(client, index: str) -> dict[str, Any]:
    response = client.indices.get_mapping(index=index)
    return next(iter(response.values()))["mappings"]


def alias_indices(client, alias: str) -> list[dict[str, Any]]:
    """This alias's indices (by the naming convention), oldest first, with docs, size and ``_meta``."""
    pattern = re.compile(rf"{re.escape(alias)}-v[a-z0-9_.+-]+-\d{{8}}t\d{{6}}")
    rows = client.cat.indices(index=f"{alias}-v*", format="json", bytes="b",
                              h="index,docs.count,store.size,creation.date", expand_wildcards="open")
    rows = [r for r in rows if pattern.fullmatch(r["index"])]
    if not rows:
        return []
    mappings = client.indices.get_mapping(index=",".join(r["index"] for r in rows))
    for row in rows:
        row["meta"] = mappings.get(row["index"], {}).get("mappings", {}).get("_meta") or {}
    return sorted(rows, key=lambda r: (int(r["creation.date"]), r["index"]))


def prune_indices(settings: Settings, client: Elasticsearch | None = None) -> list[str]:
    """Delete old indices: keep the alias target, ``keep_indices`` newest others, and anything
    newer than the target (another run may still be building it). Returns the deleted names.

    Their funnel rescoring stores go with them (:mod:`near2_tasks.serving.rescore_store`), and so do the
    stores of this alias's indices that no longer exist (deleted by hand), up to the target's age."""
    from near2_tasks.serving import rescore_store

    es = settings.elasticsearch
    client = client or make_client(settings)
    with es_errors(es.url, "pruning old indices"):
        targets = set(alias_targets(client, es.alias))
        rows = alias_indices(client, es.alias)
        if not targets:
            return []
        newest_target = max(int(r["creation.date"]) for r in rows if r["index"] in targets) if any(
            r["index"] in targets for r in rows) else 0
        others = [r for r in reversed(rows) if r["index"] not in targets]
        doomed = [r["index"] for r in others[es.keep_indices:] if int(r["creation.date"]) <= newest_target]
        if doomed:
            client.indices.delete(index=",".join(doomed))
            log.info("deleted old indices %s", doomed)
    kept = {r["index"] for r in rows} - set(doomed)
    rescore_store.delete_stores(settings, doomed + rescore_store.orphans(settings, es.alias, kept, targets))
    return doomed


def rollback(settings: Settings, client: Elasticsearch | None = None) -> tuple[str, str]:
    """Move the alias back to the newest verified index older than its current target.

    Returns (from, to). Raises Near2Error when there is nothing to roll back to.
    """
    es = settings.elasticsearch
    client = client or make_client(settings)
    with es_errors(es.url, "rollback"):
        current = current_target(client, es.alias)
        if current is None:
            raise Near2Error(f"alias {es.alias} does not exist; nothing to roll back",
                             hint="build an index first with `near2 index --model ... --catalog ...`")
        rows = alias_indices(client, es.alias)
        position = next((i for i, r in enumerate(rows) if r["index"] == current), len(rows))
        earlier = [r["index"] for r in rows[:position] if conventions.META_VERIFIED_AT in r["meta"]]
        if not earlier:
            raise Near2Error(f"no verified index older than {current} to roll back to",
                             hint="`near2 index status` lists the indices that are kept")
    swap_alias(client, es.alias, earlier[-1], current)
    return current, earlier[-1]


def index_status(settings: Settings, client: Elasticsearch | None = None) -> IndexStatus:
    """The alias target and every kept index with its model, dims, documents and size."""
    es = settings.elasticsearch
    client = client or make_client(settings)
    with es_errors(es.url, "index status"):
        targets = alias_targets(client, es.alias)
        infos = []
        for row in reversed(alias_indices(client, es.alias)):
            meta = row["meta"]
            infos.append(IndexInfo(
                name=row["index"], docs=int(row["docs.count"] or 0), size_bytes=int(row["store.size"] or 0),
                serving=row["index"] in targets, verified=conventions.META_VERIFIED_AT in meta,
                model_name=meta.get("model_name"), model_version=meta.get("model_version"),
                model_uri=meta.get("model_uri"), dims=list(meta.get("dims") or []),
                catalog_version=meta.get("catalog_version"), built_at=meta.get("built_at")))
    return IndexStatus(alias=es.alias, target=targets[0] if len(targets) == 1 else None, indices=infos)

