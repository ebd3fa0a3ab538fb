"""Wire models for profiles (LXD's api.ProfilesPost / ProfilePut / ProfilePost)."""

from __future__ import annotations

from pydantic import StrictStr

from lxd_daemon import names
from lxd_daemon.wire import Name, Request


class ProfilePut(Request):
    description: StrictStr = ""
    config: dict[StrictStr, StrictStr] = {}
    devices: dict[StrictStr, dict[StrictStr, StrictStr]] = {}


class ProfilesPost(ProfilePut):
    name: Name(names.profile)


class ProfilePost(Request):
    name: Name(names.profile)
