"""Wire models for profiles (LXD's api.ProfilesPost / ProfilePut / ProfilePost)."""

from __future__ import annotations

from pydantic import StrictStr, field_validator

from lxd_daemon.wire import Request


class ProfilePut(Request):
    description: StrictStr = ""
    config: dict[StrictStr, StrictStr] = {}
    devices: dict[StrictStr, dict[StrictStr, StrictStr]] = {}

    @field_validator("config", "devices", "description", mode="before")
    @classmethod
    def _null_is_empty(cls, v, info):
        if v is None:
            return "" if info.field_name == "description" else {}
        return v


class ProfilesPost(ProfilePut):
    name: StrictStr


class ProfilePost(Request):
    name: StrictStr
