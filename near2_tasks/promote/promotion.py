"""Approval, promotion and rollback of registered encoder versions (MLflow aliases and tags).

The rule (ARCHITECTURE.md, invariant 2): the ``champion`` alias moves to a version only when its gate passed
(version tag ``gate`` = ``pass``, written by :mod:`near2_tasks.promote.gates`) **and** it is approved:

* a person sets the version tag ``approval`` = ``approved`` (or ``rejected``) in the MLflow UI, on the
  model version page, after reading the gate summary there; ``near2 approve VERSION [--reject]`` does
  the same from a terminal;
* or ``gates.auto_approve: true`` in config treats every passed gate as approved (an explicit
  ``rejected`` tag still wins).

A version that failed its gate or was rejected keeps only the ``challenger`` alias it got at
registration. When ``champion`` moves, the new champion gets the tag ``previous_champion`` = the
version it replaced, so :func:`rollback` can move the alias back (repeatedly, along the chain).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from near2_tasks.conventions import (
    APPROVED,
    CHAMPION,
    PENDING,
    REJECTED,
    TAG_APPROVAL,
    TAG_GATE,
    TAG_PREVIOUS_CHAMPION,
)
from near2_tasks.errors import Near2Error

if TYPE_CHECKING:
    from near2_tasks.config import Settings

log = logging.getLogger(__name__)

APPROVAL_VALUES = (APPROVED, REJECTED, PENDING)


@dataclass(frozen=True)
class PromotionStatus:
    """Where a version stands: gate result, approval, and whether it may become champion now."""

    version: str
    gate: str | None  # "pass" | "fail" | None (not gated yet)
    approval: str  # approved | rejected | pending
    auto_approved: bool
    is_champion: bool
    champion: str | None  # the current champion's version

    @property
    def ready(self) -> bool:
        return self.gate == "pass" and self.approval == APPROVED

    @property
    def reason(self) -> str:
        """Why the version may, or may not, be promoted: one line for logs and errors."""
        if self.gate is None:
            return f"version {self.version} has not been gated yet (run `near2 gate --version {self.version}`)"
        if self.gate != "pass":
            return f"version {self.version} failed its gate (tag gate={self.gate}); see its gate summary"
        if self.approval == REJECTED:
            return f"version {self.version} was rejected by a reviewer (tag approval=rejected)"
        if self.approval != APPROVED:
            return (f"version {self.version} passed its gate and awaits approval: set the tag approval=approved "
                    f"on the version in the MLflow UI, or run `near2 approve {self.version}`")
        how = "auto-approved (gates.auto_approve)" if self.auto_approved else "approved"
        return f"version {self.version} passed its gate and is {how}"


@dataclass(frozen=True)
class AliasMove:
    """The ``champion`` alias moved (or stayed, ``moved`` False) from one version to another."""

    champion: str
    previous: str | None
    moved: bool


def _registry(settings: Settings):
    from near2_tasks.models.registry import client

    return client(settings)


def champion_version(settings: Settings) -> str | None:
    """The version number the ``champion`` alias points at, or None when there is no champion yet."""
    from near2_tasks.promote.gates import current_champion

    champion = current_champion(settings)
    return None if champion is None else str(champion.version)


def registered_version(settings: Settings, model_ref: str) -> str | None:
    """The version of ``settings.mlflow.registered_model`` that ``model_ref`` names, or None for anything
    else (a directory, a hub id, a logged model, another registered model). ``models:/name/3`` -> ``3``;
    ``models:/name@alias`` (or ``/latest``) -> the version it points at now."""
    from near2_tasks.conventions import parse_model_uri
    from near2_tasks.models.registry import resolve_model_uri

    parsed = parse_model_uri(model_ref)
    if parsed is None or parsed.selector is None or parsed.name != settings.mlflow.registered_model:
        return None
    return parsed.version if parsed.pinned else str(resolve_model_uri(settings, parsed).version)


def not_served_reason(champion: str | None, model_version: str | int | None) -> str | None:
    """Why an index built with ``model_version`` must not take the serving alias, or None when it may.

    ARCHITECTURE.md, "Who may serve": the serving alias points only at an index built with the champion.
    ``model_version`` is the registered version the index was built with, None for a model that is not
    a registered version (a directory, the base model). Before the first promotion there is no
    champion, and any model may serve (the first deployment indexes the base model).
    ``champion`` is :func:`champion_version`'s answer. The DAG's swap step and ``near2 index`` both
    ask this one function.
    """
    if champion is None or (model_version is not None and str(model_version) == champion):
        return None
    what = f"v{model_version}" if model_version is not None else "a model that is not a registered version"
    return f"{what} is not the champion (v{champion} is)"


def read_approval(tags: dict[str, str], auto_approve: bool) -> tuple[str, bool]:
    """(approval, auto_approved) from a version's tags. A value typed by hand is read leniently
    (``Approved `` is approved); anything unrecognised counts as pending."""
    raw = (tags.get(TAG_APPROVAL) or "").strip().lower()
    if raw == REJECTED:
        return REJECTED, False
    if raw == APPROVED:
        return APPROVED, False
    if raw and raw != PENDING:
        log.warning("approval tag %r is not one of %s; treating it as pending", raw, APPROVAL_VALUES)
    return (APPROVED, True) if auto_approve else (PENDING, False)


def promotion_status(settings: Settings, version: str | int) -> PromotionStatus:
    """The gate and approval state of ``version`` (a number or an alias such as ``challenger``)."""
    from near2_tasks.models.registry import get_version

    found = get_version(settings, version)
    approval, auto = read_approval(found.tags, settings.gates.auto_approve)
    champion = champion_version(settings)
    return PromotionStatus(
        version=str(found.version), gate=found.tags.get(TAG_GATE), approval=approval, auto_approved=auto,
        is_champion=champion == str(found.version), champion=champion,
    )


def set_approval(settings: Settings, version: str | int, approved: bool = True) -> str:
    """Tag ``version`` approval=approved (or rejected), as a reviewer would in the MLflow UI.

    Returns the version number. Approval alone never moves ``champion``: :func:`promote` does.
    """
    from near2_tasks.models.registry import get_version

    number = str(get_version(settings, version).version)
    value = APPROVED if approved else REJECTED
    _registry(settings).set_model_version_tag(settings.mlflow.registered_model, number, TAG_APPROVAL, value)
    log.info("version %s: %s=%s", number, TAG_APPROVAL, value)
    return number


def promote(settings: Settings, version: str | int) -> AliasMove:
    """Point ``champion`` at ``version`` if its gate passed and it is approved; else raise Near2Error.

    The new champion is tagged ``previous_champion`` = the version it replaces *before* the alias moves,
    so a crash in between leaves the old champion serving and nothing to undo. Promoting the current
    champion changes nothing.
    """
    status = promotion_status(settings, version)
    if not status.ready:
        raise Near2Error(f"not promoted: {status.reason}", hint="champion stays at "
                         f"{'version ' + status.champion if status.champion else 'no version (none yet)'}")
    if status.is_champion:
        return AliasMove(champion=status.version, previous=None, moved=False)
    registry = _registry(settings)
    name = settings.mlflow.registered_model
    if status.champion is not None:
        registry.set_model_version_tag(name, status.version, TAG_PREVIOUS_CHAMPION, status.champion)
    else:  # a stale tag from an earlier promotion would make rollback jump to the wrong version
        found = registry.get_model_version(name, status.version)
        if TAG_PREVIOUS_CHAMPION in found.tags:
            registry.delete_model_version_tag(name, status.version, TAG_PREVIOUS_CHAMPION)
    registry.set_registered_model_alias(name, CHAMPION, status.version)
    log.info("champion: %s -> %s (%s)", status.champion, status.version, status.reason)
    return AliasMove(champion=status.version, previous=status.champion, moved=True)


def rollback(settings: Settings) -> AliasMove:
    """Point ``champion`` back at the version the current champion replaced (its ``previous_champion`` tag)."""
    from near2_tasks.models.registry import get_version

    registry = _registry(settings)
    name = settings.mlflow.registered_model
    current = champion_version(settings)
    if current is None:
        raise Near2Error(f"registered model {name!r} has no champion to roll back",
                         hint="promote a version first (`near2 promote VERSION`)")
    previous = registry.get_model_version(name, current).tags.get(TAG_PREVIOUS_CHAMPION)
    if not previous:
        raise Near2Error(f"champion version {current} has no previous champion to roll back to",
                         hint="it was the first champion; promote another version instead")
    restored = str(get_version(settings, previous).version)  # fails clearly if it was deleted
    registry.set_registered_model_alias(name, CHAMPION, restored)
    log.info("rolled back champion: %s -> %s", current, restored)
    return AliasMove(champion=restored, previous=current, moved=True)
