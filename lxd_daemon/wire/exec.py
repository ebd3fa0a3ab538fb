"""Request bodies of exec and console (LXD's api.InstanceExecPost / api.InstanceConsolePost)."""

from __future__ import annotations

from pydantic import Field

from lxd_daemon.wire import Request, StrictBool, StrictInt, StrictStr


class InstanceExecPost(Request):
    command: list[StrictStr] = []
    environment: dict[StrictStr, StrictStr] | None = None
    wait_for_websocket: StrictBool = Field(False, alias="wait-for-websocket")
    interactive: StrictBool = False
    width: StrictInt = 0
    height: StrictInt = 0
    record_output: StrictBool = Field(False, alias="record-output")
    user: StrictInt = 0
    group: StrictInt = 0
    cwd: StrictStr = ""


class InstanceConsolePost(Request):
    width: StrictInt = 0
    height: StrictInt = 0
    type: StrictStr = "console"


class InstanceMetadataTemplate(Request):
    when: list[StrictStr] = []
    create_only: StrictBool = False
    template: StrictStr = ""
    properties: dict[StrictStr, StrictStr] = {}


class ImageMetadata(Request):
    architecture: StrictStr = ""
    creation_date: StrictInt = 0
    expiry_date: StrictInt = 0
    properties: dict[StrictStr, StrictStr] = {}
    templates: dict[StrictStr, InstanceMetadataTemplate] = {}
