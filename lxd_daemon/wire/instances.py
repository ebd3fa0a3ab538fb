"""Wire models for instances (LXD's api.InstancesPost / InstancePut / InstancePost / InstanceStatePut)."""

from __future__ import annotations

from typing import Any

from pydantic import StrictBool, StrictStr, field_validator

from lxd_daemon.wire import Request


def _none_to_default(v, default):
    return default if v is None else v


class InstancePut(Request):
    architecture: StrictStr = ""
    config: dict[StrictStr, StrictStr] = {}
    devices: dict[StrictStr, dict[StrictStr, StrictStr]] = {}
    ephemeral: StrictBool = False
    profiles: list[StrictStr] | None = None
    description: StrictStr = ""
    stateful: StrictBool = False
    restore: StrictStr = ""

    @field_validator("config", "devices", mode="before")
    @classmethod
    def _maps(cls, v):
        return _none_to_default(v, {})

    @field_validator("description", "architecture", mode="before")
    @classmethod
    def _strs(cls, v):
        return _none_to_default(v, "")

    @field_validator("ephemeral", "stateful", mode="before")
    @classmethod
    def _bools(cls, v):
        return _none_to_default(v, False)


class InstancesPost(InstancePut):
    name: StrictStr = ""
    type: StrictStr = ""
    instance_type: StrictStr = ""
    source: dict[StrictStr, Any] = {}
    start: StrictBool = False

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, v):
        return _none_to_default(v, {})

    @field_validator("type", "instance_type", mode="before")
    @classmethod
    def _type(cls, v):
        return _none_to_default(v, "")


class InstancePost(Request):
    name: StrictStr = ""
    migration: StrictBool = False


class InstanceStatePut(Request):
    action: StrictStr
    timeout: int | float = -1
    force: StrictBool = False
    stateful: StrictBool = False

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, v):
        return _none_to_default(v, -1)


class InstancesPut(Request):
    state: InstanceStatePut
