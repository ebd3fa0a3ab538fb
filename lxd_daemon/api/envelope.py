"""LXD's response envelope: sync, async (operation) and error replies."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any
from urllib.parse import quote

from starlette.responses import Response

_JSON = "application/json"
_LONE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")  # a `%` that doesn't start an escape already


def dumps(obj: Any) -> bytes:
    # A lone surrogate (text that isn't Unicode) can't be UTF-8: it leaves as a JSON \\u escape.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "backslashreplace")


class JSONBytes(Response):
    media_type = _JSON


def sync_body(metadata: Any, status_code: int = 200) -> bytes:
    return dumps(
        {
            "type": "sync",
            "status": "Success",
            "status_code": status_code if status_code < 300 else 200,
            "operation": "",
            "error_code": 0,
            "error": "",
            "metadata": metadata,
        }
    )


def header_url(url: str) -> str:
    """A URL made safe for a response header: anything but printable ASCII is percent-encoded
    (UTF-8), so that no name can break the response after the work was done."""
    return quote(_LONE_PERCENT.sub("%25", url), safe="/:?=&%+,;@!$'()*~")


def sync(metadata: Any = None, *, status: int = 200, etag: str | None = None,
         location: str | None = None) -> Response:
    headers = {}
    if etag is not None:
        headers["ETag"] = etag
    if location is not None:
        headers["Location"] = header_url(location)
    return JSONBytes(sync_body(metadata, 200), status_code=status, headers=headers)


def async_(op: dict, *, status: int = 202) -> Response:
    url = f"/1.0/operations/{op['id']}"
    body = dumps(
        {
            "type": "async",
            "status": "Operation created",
            "status_code": 100,
            "operation": url,
            "error_code": 0,
            "error": "",
            "metadata": op,
        }
    )
    return JSONBytes(body, status_code=status, headers={"Location": header_url(url)})


def error_body(status: int, message: str) -> bytes:
    return dumps(
        {
            "type": "error",
            "status": "",
            "status_code": 0,
            "operation": "",
            "error_code": status,
            "error": message,
            "metadata": None,
        }
    )


def error(status: int, message: str) -> Response:
    return JSONBytes(error_body(status, message), status_code=status)


def etag_of(*parts: Any) -> str:
    """A stable hash of the user-editable fields of an object, as LXD's ETag."""
    return '"' + hashlib.sha256(dumps(parts)).hexdigest() + '"'
