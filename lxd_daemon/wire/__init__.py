"""Wire-format models named after LXD's shared/api structs. No behaviour.

Request models ignore unknown fields (clients of several LXD versions send extra ones) but
type-check the fields they know, so a wrong type is a 400 that names the field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, model_validator

from lxd_daemon import names


class Request(BaseModel):
    """Base of every request model. A JSON `null` means "not given", as in LXD (Go decodes null
    into a field's zero value): the field keeps its default, in every model and nested model."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, data: Any) -> Any:
        if isinstance(data, dict) and None in data.values():
            return {k: v for k, v in data.items() if v is not None}
        return data


def Name(check: Callable[[object], str]) -> Any:  # noqa: N802 (used as a type)
    """A str field holding an object name, checked by one of lxd_daemon.names' validators (an
    empty string passes: it means "not given", and the handler decides)."""
    return Annotated[StrictStr, AfterValidator(lambda v: check(v) if v else v)]


class ServerPut(Request):
    config: dict[StrictStr, Any] = {}


class ProjectPut(Request):
    description: StrictStr = ""
    config: dict[StrictStr, StrictStr] = {}


class ProjectsPost(ProjectPut):
    name: Name(names.project)


class ProjectPost(Request):
    name: Name(names.project)


class OperationWaitQuery(Request):
    timeout: StrictInt = -1


__all__ = [
    "Name",
    "ProjectPut",
    "ProjectsPost", "ProjectPost",
    "Request",
    "ServerPut",
    "OperationWaitQuery",
    "StrictBool",
    "StrictInt",
    "StrictStr",
]
