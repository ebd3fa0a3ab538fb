"""Logging set-up: logfmt lines like LXD's, to stderr, a log file or syslog, and to the event stream."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time

_STD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_LEVEL_NAMES = {"WARNING": "warn", "CRITICAL": "crit"}


def _q(v: object) -> str:
    s = str(v)
    if not s or any(c in s for c in ' ="\n'):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        level = _LEVEL_NAMES.get(record.levelname, record.levelname.lower())
        parts = [f"time={_q(t)}", f"level={level}", f"msg={_q(record.getMessage())}"]
        for k, v in record.__dict__.items():
            if k not in _STD:
                parts.append(f"{k}={_q(v)}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(*, debug: bool, verbose: bool, logfile: str | os.PathLike | None, syslog: bool) -> logging.Logger:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    root = logging.getLogger("lxd")
    root.setLevel(logging.DEBUG)
    root.propagate = False
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = LogfmtFormatter()
    stream = logging.StreamHandler(sys.stderr)
    stream.setLevel(level)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if logfile:
        fh = logging.FileHandler(logfile)
        fh.setLevel(level)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    if syslog and os.path.exists("/dev/log"):
        sh = logging.handlers.SysLogHandler(address="/dev/log")
        sh.setLevel(level)
        sh.setFormatter(logging.Formatter("lxd: %(message)s"))
        root.addHandler(sh)
    # uvicorn's own messages go through the same handlers; access logs are off.
    uv = logging.getLogger("uvicorn.error")
    uv.handlers = root.handlers[:]
    uv.setLevel(logging.WARNING)
    uv.propagate = False
    return root
