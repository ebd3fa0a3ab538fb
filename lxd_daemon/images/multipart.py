"""A streaming multipart/form-data parser for split image uploads (never buffers a whole part)."""

from __future__ import annotations

from email.message import Message

from lxd_daemon.errors import BadRequest

MAX_HEADERS = 16 << 10


def boundary_of(content_type: str) -> str:
    msg = Message()
    msg["content-type"] = content_type
    b = msg.get_param("boundary")
    if not b or not isinstance(b, str) or len(b) > 200:
        raise BadRequest("Invalid multipart image: missing boundary")
    return b


def _disposition(headers: bytes) -> tuple[str, str]:
    name = filename = ""
    for line in headers.decode("utf-8", "replace").split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() != "content-disposition":
            continue
        msg = Message()
        msg["content-disposition"] = value.strip()
        name = msg.get_param("name", header="content-disposition") or ""
        filename = msg.get_param("filename", header="content-disposition") or ""
        if isinstance(name, tuple):
            name = name[2]
        if isinstance(filename, tuple):
            filename = filename[2]
    return str(name), str(filename)


class MultipartParser:
    """feed(chunk) returns events: ("begin", name, filename), ("data", bytes), ("end",).

    finish() raises if the body ended before the closing boundary.
    """

    def __init__(self, boundary: str):
        self.delim = b"\r\n--" + boundary.encode("latin-1")
        self.buf = b"\r\n"  # the first boundary has no leading CRLF
        self.state = "preamble"
        self.in_part = False

    def feed(self, chunk: bytes) -> list[tuple]:
        events: list[tuple] = []
        self.buf += chunk
        while True:
            if self.state == "preamble":
                i = self.buf.find(self.delim)
                if i < 0:
                    self.buf = self.buf[-len(self.delim):]
                    return events
                self.buf = self.buf[i + len(self.delim):]
                self.state = "after-delim"
            elif self.state == "after-delim":
                if len(self.buf) < 2:
                    return events
                if self.buf.startswith(b"--"):
                    self.state = "done"
                    self.buf = b""
                    return events
                j = self.buf.find(b"\r\n")
                if j < 0:
                    if len(self.buf) > 1024:
                        raise BadRequest("Invalid multipart image: bad boundary line")
                    return events
                if self.buf[:j].strip(b" \t"):
                    raise BadRequest("Invalid multipart image: bad boundary line")
                self.buf = self.buf[j + 2:]
                self.state = "headers"
            elif self.state == "headers":
                i = self.buf.find(b"\r\n\r\n")
                if i < 0:
                    if self.buf.startswith(b"\r\n"):  # a part with no headers
                        i = -2
                    elif len(self.buf) > MAX_HEADERS:
                        raise BadRequest("Invalid multipart image: part headers too large")
                    else:
                        return events
                name, filename = _disposition(self.buf[: max(i, 0)])
                self.buf = self.buf[i + 4:]
                events.append(("begin", name, filename))
                self.in_part = True
                self.state = "body"
            elif self.state == "body":
                i = self.buf.find(self.delim)
                if i < 0:
                    keep = len(self.delim) - 1
                    if len(self.buf) > keep:
                        events.append(("data", self.buf[:-keep]))
                        self.buf = self.buf[-keep:]
                    return events
                if i:
                    events.append(("data", self.buf[:i]))
                events.append(("end",))
                self.in_part = False
                self.buf = self.buf[i + len(self.delim):]
                self.state = "after-delim"
            else:  # done: ignore the epilogue
                self.buf = b""
                return events

    def finish(self) -> None:
        if self.state != "done":
            raise BadRequest("Invalid multipart image: the upload ended before the closing boundary")
