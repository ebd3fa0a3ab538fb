"""The event hub: fan-out of `operation`, `logging` and `lifecycle` events to /1.0/events listeners.

Every event belongs to a project (lifecycle and operation events: their object's project) or to
the whole server (project "": the daemon's log lines). A listener gets the events of the projects it
listens to (one, or with all-projects those its caller may see) and, unless it is a restricted
certificate's, the server's.

Every listener has a bounded queue. A listener that falls too far behind is cut off (its
websocket is closed) instead of stalling the publisher: the daemon never waits on a consumer.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Callable, Iterable

from lxd_daemon.util.timefmt import rfc3339

log = logging.getLogger("lxd.events")

EVENT_TYPES = frozenset({"operation", "logging", "lifecycle"})
QUEUE_LIMIT = 4096


SERVER = ""  # the project of server-wide events (log lines)


class Listener:
    def __init__(self, types: frozenset[str], projects: frozenset[str] | None, server_wide: bool = True):
        self.types = types
        self.projects = projects  # None: every project
        self.server_wide = server_wide
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_LIMIT)
        self.lagged = False

    def wants(self, kind: str, project: str) -> bool:
        if kind not in self.types:
            return False
        if project == SERVER:
            return self.server_wide
        return self.projects is None or project in self.projects

    def offer(self, data: bytes) -> None:
        if self.lagged:
            return
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            # Too slow: drop the listener rather than buffer without bound.
            self.lagged = True
            self.queue = asyncio.Queue(1)
            self.queue.put_nowait(None)


class EventHub:
    def __init__(self, location: str = "none"):
        self.location = location
        self._listeners: set[Listener] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        # In-process observers: fn(kind, metadata), called as each event of their types is published.
        self._taps: list[tuple[frozenset[str], Callable[[str, dict], None]]] = []

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def subscribe(self, types: Iterable[str] | None = None, *, project: str | None = "default",
                  all_projects: bool = False, visible: Iterable[str] | None = None,
                  server_wide: bool = True) -> Listener:
        """A listener for `project`'s events (None: every project's), or with `all_projects` for
        those of every project in `visible` (None: all); `server_wide`: also the server's."""
        wanted = frozenset(types) if types else EVENT_TYPES
        if all_projects or project is None:
            projects = None if visible is None else frozenset(visible)
        else:
            projects = frozenset([project])
            if visible is not None:
                projects &= frozenset(visible)
        listener = Listener(wanted, projects, server_wide)
        self._listeners.add(listener)
        return listener

    def tap(self, types: Iterable[str], fn: Callable[[str, dict], None]) -> None:
        """Let part of the daemon observe events (a cache that goes stale on a change): fn runs on
        the loop thread, synchronously, for each event of `types`; it must not block or raise."""
        self._taps.append((frozenset(types), fn))

    def unsubscribe(self, listener: Listener) -> None:
        self._listeners.discard(listener)

    @property
    def listener_count(self) -> int:
        return len(self._listeners)

    def publish(self, kind: str, metadata: dict, *, project: str = "default") -> None:
        """Send an event to every interested listener. Must run on the event loop thread."""
        for types, fn in self._taps:
            if kind in types:
                try:
                    fn(kind, metadata)
                except Exception:  # an observer's bug must not stop the event
                    log.exception("event observer failed")
        targets = [lis for lis in self._listeners if lis.wants(kind, project)]
        if not targets:
            return
        event = {"type": kind, "timestamp": rfc3339(), "metadata": metadata, "location": self.location}
        if project != SERVER:  # LXD leaves a server-wide event's project out
            event["project"] = project
        data = json.dumps(event, separators=(",", ":")).encode()
        for lis in targets:
            lis.offer(data)

    def publish_threadsafe(self, kind: str, metadata: dict, *, project: str = "default") -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.publish(kind, metadata, project=project)
        else:
            loop.call_soon_threadsafe(functools.partial(self.publish, kind, metadata, project=project))

    def lifecycle(self, action: str, source: str, context: dict | None = None, *,
                  requestor: dict | None = None, project: str = "default") -> None:
        meta: dict = {"action": action, "source": source}
        if context:  # LXD leaves an empty context out
            meta["context"] = context
        if requestor:
            meta["requestor"] = requestor
        self.publish("lifecycle", meta, project=project)


_LEVELS = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "crit",
}

_STD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class LoggingToEvents(logging.Handler):
    """Forwards every daemon log record as a `logging` event (LXD's `lxc monitor --type logging`)."""

    def __init__(self, hub: EventHub):
        super().__init__(logging.DEBUG)
        self.hub = hub

    def emit(self, record: logging.LogRecord) -> None:
        if not self.hub._listeners:
            return
        try:
            context = {k: str(v) for k, v in record.__dict__.items() if k not in _STD_ATTRS}
            meta = {
                "message": record.getMessage(),
                "level": _LEVELS.get(record.levelno, "info"),
                "context": context,
            }
            self.hub.publish_threadsafe("logging", meta, project=SERVER)
        except Exception:  # never let logging break the caller
            pass
