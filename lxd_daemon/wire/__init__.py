"""Wire-format models named after LXD's shared/api structs. No behaviour.

Request models ignore unknown fields (clients of several LXD versions send extra ones) but
type-check the fields they know, so a wrong type is a 400 that names the field.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ServerPut(Request):
    config: dict[StrictStr, Any] = {}


class ProjectPut(Request):
    description: StrictStr = ""
    config: dict[StrictStr, StrictStr] = {}


class ProjectsPost(ProjectPut):
    name: StrictStr


class OperationWaitQuery(Request):
    timeout: StrictInt = -1


__all__ = [
    "ProjectPut",
    "ProjectsPost",
    "Request",
    "ServerPut",
    "OperationWaitQuery",
    "StrictBool",
    "StrictInt",
    "StrictStr",
]
