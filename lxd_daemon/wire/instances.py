"""Wire models for instances (LXD's api.InstancesPost / InstancePut / InstancePost / InstanceStatePut)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict, StrictBool, StrictStr

from lxd_daemon import names
from lxd_daemon.wire import Name, Request


class InstancePut(Request):
    architecture: StrictStr = ""
    config: dict[StrictStr, StrictStr] = {}
    devices: dict[StrictStr, dict[StrictStr, StrictStr]] = {}
    ephemeral: StrictBool = False
    profiles: list[StrictStr] | None = None
    description: StrictStr = ""
    stateful: StrictBool = False
    restore: StrictStr = ""


class InstanceSource(Request):
    """LXD's api.InstanceSource: the fields the daemon reads are type-checked; others pass."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    type: StrictStr = ""
    alias: StrictStr = ""
    fingerprint: StrictStr = ""
    properties: dict[StrictStr, StrictStr] = {}
    server: StrictStr = ""
    mode: StrictStr = ""
    source: StrictStr = ""
    project: StrictStr = ""


def _source(value: dict) -> dict:
    """The source as the dict the service reads, its known fields checked (nulls dropped)."""
    return InstanceSource.model_validate(value).model_dump(exclude_unset=True)


class InstancesPost(InstancePut):
    name: Name(names.instance) = ""
    type: StrictStr = ""
    instance_type: StrictStr = ""
    source: Annotated[dict[StrictStr, Any], AfterValidator(_source)] = {}
    start: StrictBool = False


class InstancePost(Request):
    name: Name(names.instance) = ""
    migration: StrictBool = False
    pool: StrictStr = ""  # with migration: move to this storage pool (instance_pool_move)
    instance_only: StrictBool = False
    # with migration to another server (migration/source.py): live (CRIU), the sink's operation
    # to dial in push mode ({"operation", "secrets", "certificate"}), the older name of instance_only
    live: StrictBool = False
    target: dict[StrictStr, Any] | None = None
    container_only: StrictBool = False
    allow_inconsistent: StrictBool = False


class InstanceStatePut(Request):
    action: StrictStr
    timeout: int | float = -1
    force: StrictBool = False
    stateful: StrictBool = False


class InstancesPut(Request):
    state: InstanceStatePut


class InstanceSnapshotsPost(Request):
    """POST /1.0/instances/NAME/snapshots. An absent `expires_at` means "from snapshots.expiry";
    Go's zero time ("0001-01-01T00:00:00Z", `lxc snapshot --no-expiry`) means never."""

    name: Name(names.snapshot) = ""
    stateful: StrictBool = False
    expires_at: StrictStr | None = None
    description: StrictStr = ""


class InstanceSnapshotPut(Request):
    expires_at: StrictStr | None = None
    description: StrictStr | None = None


class InstanceSnapshotPost(Request):
    name: Name(names.snapshot) = ""
    migration: StrictBool = False
    live: StrictBool = False
    target: dict[StrictStr, Any] | None = None
