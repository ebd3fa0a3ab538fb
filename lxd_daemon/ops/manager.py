"""Operations: background tasks, websocket sessions and tokens with LXD's status model.

An operation emits an `operation` event when created, at every status or metadata change,
and at its final state; the stock client waits on those events, never by polling.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from lxd_daemon.errors import BadRequest, Forbidden, LXDError, NotFound, insufficient_storage
from lxd_daemon.events import EventHub
from lxd_daemon.util.timefmt import rfc3339

log = logging.getLogger("lxd.ops")

CLASS_TASK = "task"
CLASS_WEBSOCKET = "websocket"
CLASS_TOKEN = "token"

# How long a finished operation stays readable.
RETAIN_SECONDS = 5.0


class Status(enum.Enum):
    PENDING = ("Pending", 105)
    RUNNING = ("Running", 103)
    CANCELLING = ("Cancelling", 104)
    SUCCESS = ("Success", 200)
    FAILURE = ("Failure", 400)
    CANCELLED = ("Cancelled", 401)

    @property
    def label(self) -> str:
        return self.value[0]

    @property
    def code(self) -> int:
        return self.value[1]

    @property
    def final(self) -> bool:
        return self in (Status.SUCCESS, Status.FAILURE, Status.CANCELLED)


RunFn = Callable[["Operation"], Awaitable[Any]]
ConnectFn = Callable[["Operation", str, Any], Awaitable[None]]
CancelFn = Callable[["Operation"], Awaitable[None]]


class Operation:
    """One operation. Create through OperationManager.create()."""

    def __init__(self, manager: OperationManager, *, cls: str, description: str,
                 resources: dict[str, list[str]] | None, metadata: dict | None,
                 run: RunFn | None, on_connect: ConnectFn | None, on_cancel: CancelFn | None,
                 may_cancel: bool, project: str):
        self.manager = manager
        self.id = str(uuid.uuid4())
        self.cls = cls
        self.description = description
        self.resources = resources or {}
        self.metadata: dict | None = metadata
        self.project = project
        self.status = Status.PENDING
        self.err = ""
        self.created_at = rfc3339()
        self.updated_at = self.created_at
        # A token operation can always be cancelled (that is how a token is revoked), as in LXD.
        self.may_cancel = may_cancel or cls == CLASS_TOKEN
        self._run = run
        self._on_connect = on_connect
        self._on_cancel = on_cancel
        self.task: asyncio.Task | None = None
        self.done = asyncio.Event()
        self.finished_monotonic: float | None = None
        # Websocket class: secret -> channel name ("0", "1", "control", "fs", ...).
        self.secrets: dict[str, str] = {}

    # -- rendering -------------------------------------------------------
    def render(self) -> dict:
        return {
            "id": self.id,
            "class": self.cls,
            "description": self.description,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "status": self.status.label,
            "status_code": self.status.code,
            "resources": self.resources or None,  # LXD sends null when there are none
            "metadata": self.metadata,
            "may_cancel": self.may_cancel,
            "err": self.err,
            "location": self.manager.location,
        }

    @property
    def url(self) -> str:
        return f"/1.0/operations/{self.id}"

    # -- state changes ---------------------------------------------------
    def _changed(self) -> None:
        self.updated_at = rfc3339()
        self.manager.events.publish("operation", self.render(), project=self.project)

    def set_status(self, status: Status, err: str = "") -> None:
        if self.status.final:
            return
        self.status = status
        if err:
            self.err = err
        if status.final:
            self.finished_monotonic = time.monotonic()
            # Kept a few seconds for its status only: let go of what the owner's callbacks hold
            # (an exec's session, its websockets and their buffers: ~55 KiB each).
            self._run = self._on_connect = self._on_cancel = None
            self.done.set()
            self.manager._retire(self)
        self._changed()

    def update_metadata(self, values: dict) -> None:
        """Merge values into the metadata (progress and the like) and tell listeners."""
        if self.metadata is None:
            self.metadata = {}
        self.metadata.update(values)
        self._changed()

    def new_secret(self, channel: str) -> str:
        s = secrets.token_hex(32)
        self.secrets[s] = channel
        return s

    async def connect(self, secret: str, websocket: Any) -> None:
        """Hand an accepted websocket to the operation's owner."""
        channel = self.secrets.get(secret)
        if channel is None or self._on_connect is None:
            raise Forbidden("Invalid websocket secret")
        await self._on_connect(self, channel, websocket)

    def check_secret(self, secret: str | None) -> None:
        if self.cls != CLASS_WEBSOCKET:
            raise BadRequest("Only websocket operations can be connected")
        if self.status.final:
            raise Forbidden("Operation has already finished")
        if not secret or secret not in self.secrets:
            raise Forbidden("Invalid websocket secret")

    async def cancel(self) -> None:
        if self.status not in (Status.PENDING, Status.RUNNING):
            raise BadRequest("Only running operations can be cancelled")
        if not self.may_cancel:
            raise BadRequest("This operation can't be cancelled")
        self.set_status(Status.CANCELLING)
        if self._on_cancel is not None:
            await self._on_cancel(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()
            try:
                await self.task
            except BaseException:
                pass
        self.set_status(Status.CANCELLED, "Operation cancelled")

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until final; returns False on timeout."""
        if self.done.is_set():
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self.done.wait()), timeout)
        except TimeoutError:
            return False
        return True

    # -- running ---------------------------------------------------------
    async def _main(self) -> None:
        self.set_status(Status.RUNNING)
        if self._run is None:
            return  # token / websocket operations end through their owner
        try:
            result = await self._run(self)
        except asyncio.CancelledError:
            if not self.status.final:
                self.set_status(Status.CANCELLED, "Operation cancelled")
            return
        except LXDError as e:
            self.set_status(Status.FAILURE, e.message)
            return
        except Exception as e:  # a bug: report it on the operation and in the log
            full = insufficient_storage(e, "this operation's data")  # a stray ENOSPC/EDQUOT
            if full is not None:
                self.set_status(Status.FAILURE, full.message)
                return
            log.exception("operation failed", extra={"operation": self.id})
            self.set_status(Status.FAILURE, str(e) or e.__class__.__name__)
            return
        if isinstance(result, dict):
            if self.metadata is None:
                self.metadata = {}
            self.metadata.update(result)
        if not self.status.final:
            self.set_status(Status.SUCCESS)

    def succeed(self, metadata: dict | None = None) -> None:
        if metadata:
            if self.metadata is None:
                self.metadata = {}
            self.metadata.update(metadata)
        self.set_status(Status.SUCCESS)

    def fail(self, err: str, metadata: dict | None = None) -> None:
        if metadata:
            if self.metadata is None:
                self.metadata = {}
            self.metadata.update(metadata)
        self.set_status(Status.FAILURE, err)


class OperationManager:
    def __init__(self, events: EventHub, *, location: str = "none", retain: float = RETAIN_SECONDS):
        self.events = events
        self.location = location
        self.retain = retain
        self._ops: dict[str, Operation] = {}
        self._tasks: set[asyncio.Task] = set()

    def create(self, *, cls: str = CLASS_TASK, description: str,
               resources: dict[str, list[str]] | None = None, metadata: dict | None = None,
               run: RunFn | None = None, on_connect: ConnectFn | None = None,
               on_cancel: CancelFn | None = None, may_cancel: bool = False,
               project: str = "default", start: bool = True) -> Operation:
        op = Operation(self, cls=cls, description=description, resources=resources, metadata=metadata,
                       run=run, on_connect=on_connect, on_cancel=on_cancel, may_cancel=may_cancel,
                       project=project)
        self._ops[op.id] = op
        op._changed()  # creation event (Pending)
        if start:
            self.start(op)
        return op

    def start(self, op: Operation) -> None:
        task = asyncio.get_running_loop().create_task(op._main(), name=f"op-{op.id}")
        op.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _retire(self, op: Operation) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._ops.pop(op.id, None)
            return
        loop.call_later(self.retain, self._ops.pop, op.id, None)

    def get(self, op_id: str) -> Operation:
        op = self._ops.get(op_id)
        if op is None:
            raise NotFound("Operation not found")
        return op

    def find(self, predicate: Callable[[Operation], bool]) -> Operation | None:
        for op in self._ops.values():
            if predicate(op):
                return op
        return None

    def list(self, project: str | None = None) -> list[Operation]:
        return [op for op in self._ops.values() if project is None or op.project == project]

    def running(self) -> list[Operation]:
        return [op for op in self._ops.values() if not op.status.final]

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Cancel what can be cancelled and give the rest a moment to finish."""
        pending = [op for op in self._ops.values() if not op.status.final]
        for op in pending:
            if op.cls == CLASS_TOKEN:
                op.set_status(Status.CANCELLED, "Daemon is shutting down")
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
