"""Warnings: conditions the daemon found and keeps on record until they go away (`/1.0/warnings`,
`lxc warning`).

Code that finds a condition calls `raise_warning()` where it happens and `resolve_warning()` where
it is seen to be gone; both do nothing when the warnings service isn't there (a unit test's bare
Services, a subsystem wired before it) and never raise: a warning that can't be recorded is
logged, and never stops what found it.
"""

from __future__ import annotations

import logging

from lxd_daemon.warnings.service import (
    CRIU_UNUSABLE,
    INSTANCE_AUTOSTART_FAILURE,
    SCHEDULED_SNAPSHOT_FAILURE,
    STORAGE_POOL_NEARLY_FULL,
    STORAGE_POOL_UNAVAILABLE,
    SUBID_RANGE_MISSING,
    TYPES,
    WarningService,
)

__all__ = ["CRIU_UNUSABLE", "INSTANCE_AUTOSTART_FAILURE", "SCHEDULED_SNAPSHOT_FAILURE",
           "STORAGE_POOL_NEARLY_FULL", "STORAGE_POOL_UNAVAILABLE", "SUBID_RANGE_MISSING", "TYPES",
           "WarningService", "forget_warnings", "raise_warning", "resolve_warning"]

log = logging.getLogger("lxd.warnings")


async def raise_warning(services, type_: str, message: str, *, project: str | None = None,
                        entity_url: str | None = None) -> None:
    svc = getattr(services, "warnings", None)
    if svc is None:
        return
    try:
        await svc.raise_(type_, message, project=project, entity_url=entity_url)
    except Exception as e:
        log.error("couldn't record a warning", extra={"type": type_, "warning": message, "err": str(e)})


async def forget_warnings(services, entity_url: str) -> None:
    """Drop the warnings about an object that was deleted."""
    svc = getattr(services, "warnings", None)
    if svc is None:
        return
    try:
        await svc.forget(entity_url)
    except Exception as e:
        log.error("couldn't delete warnings", extra={"entity": entity_url, "err": str(e)})


async def resolve_warning(services, type_: str, *, project: str | None = None,
                          entity_url: str | None = None) -> None:
    svc = getattr(services, "warnings", None)
    if svc is None:
        return
    try:
        await svc.resolve(type_, project=project, entity_url=entity_url)
    except Exception as e:
        log.error("couldn't resolve a warning", extra={"type": type_, "err": str(e)})
