"""Operations and events, in process: create_app() with real services, served by uvicorn on a
temporary unix socket, driven with httpx and a websocket client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import unix_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from lxd_daemon.api.access import Gate
from lxd_daemon.app import create_app
from lxd_daemon.daemon import bind_unix_socket, make_server
from lxd_daemon.db import Database, migrate
from lxd_daemon.events import EventHub
from lxd_daemon.events.hub import QUEUE_LIMIT
from lxd_daemon.ops import CLASS_WEBSOCKET, OperationManager
from lxd_daemon.ops.manager import RETAIN_SECONDS
from lxd_daemon.runtime.pool import WorkerPool
from lxd_daemon.server.config import ServerConfig
from lxd_daemon.server.service import ServerService
from lxd_daemon.services import Services
from lxd_daemon.trust.certs import ensure_server_cert


class Harness:
    def __init__(self, base: Path):
        self.base = base
        self.sock_path = base / "unix.socket"

    async def __aenter__(self) -> Harness:
        loop = asyncio.get_running_loop()
        (self.base / "database").mkdir()
        db_path = self.base / "database" / "lxd.db"
        await asyncio.to_thread(migrate.upgrade, db_path)
        cert = await asyncio.to_thread(ensure_server_cert, self.base)
        self.pool = WorkerPool(1)
        self.pool.spawn()
        self.pool.attach(loop)
        self.db = Database(db_path)
        self.events = EventHub()
        self.events.bind_loop(loop)
        self.ops = OperationManager(self.events)
        server = ServerService(db=self.db, events=self.events, config=ServerConfig({}), certificate_pem=cert,
                               driver_version=await self.pool.call("version"))
        self.services = Services(lxd_dir=self.base, db=self.db, events=self.events, ops=self.ops,
                                 pool=self.pool, server=server)
        from lxd_daemon.projects.service import ProjectService

        self.services.projects = ProjectService(self.db, self.events)  # every request resolves its project
        await self.services.projects.load()
        self.server = make_server(Gate(create_app(self.services), self.services, "unix"))
        sock = bind_unix_socket(self.sock_path, None)
        self.serve_task = asyncio.create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            await asyncio.sleep(0.01)
        self.http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(self.sock_path)),
                                      base_url="http://lxd", timeout=30)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()
        self.server.should_exit = True
        await asyncio.wait_for(self.serve_task, 10)
        await self.ops.shutdown(1)
        self.db.close()
        self.pool.close()

    def ws(self, path: str):
        return unix_connect(str(self.sock_path), f"ws://lxd{path}", open_timeout=10)

    async def get(self, path: str) -> httpx.Response:
        return await self.http.get(path)


def run(tmp_path: Path, body, timeout: float = 60):
    async def main():
        async with Harness(tmp_path) as h:
            return await asyncio.wait_for(body(h), timeout)

    return asyncio.run(main())


async def next_event(ws, timeout: float = 5) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


def assert_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    doc = r.json()
    assert doc["type"] == "error" and doc["error_code"] == status and doc["error"], doc
    return doc


# -- events of an operation's life ------------------------------------------------------------

def test_operation_events_on_create_every_change_and_final_state(tmp_path):
    async def body(h: Harness):
        async with h.ws("/1.0/events?type=operation") as ws:
            step = asyncio.Event()

            async def work(op):
                op.update_metadata({"progress": "50%"})
                await step.wait()
                op.update_metadata({"progress": "100%"})
                return {"result": "done"}

            op = h.ops.create(description="Testing", resources={"instances": ["/1.0/instances/c1"]}, run=work)
            seen = [await next_event(ws) for _ in range(3)]
            step.set()
            seen += [await next_event(ws) for _ in range(2)]
            return op.id, seen

    op_id, seen = run(tmp_path, body)
    for ev in seen:
        assert ev["type"] == "operation" and ev["project"] == "default" and ev["timestamp"]
        assert ev["metadata"]["id"] == op_id
    codes = [(e["metadata"]["status"], e["metadata"]["status_code"]) for e in seen]
    assert codes == [("Pending", 105), ("Running", 103), ("Running", 103), ("Running", 103), ("Success", 200)]
    assert seen[2]["metadata"]["metadata"] == {"progress": "50%"}
    final = seen[-1]["metadata"]
    assert final["metadata"] == {"progress": "100%", "result": "done"}
    assert final["class"] == "task" and final["description"] == "Testing" and final["err"] == ""
    assert final["resources"] == {"instances": ["/1.0/instances/c1"]}
    for key in ("created_at", "updated_at", "may_cancel", "location"):
        assert key in final


def test_failed_operation_reports_its_error(tmp_path):
    async def body(h: Harness):
        async def work(op):
            raise RuntimeError("the disk is on fire")

        op = h.ops.create(description="Failing", run=work)
        r = await h.get(f"/1.0/operations/{op.id}/wait?timeout=5")
        return r.json()["metadata"]

    meta = run(tmp_path, body)
    assert meta["status"] == "Failure" and meta["status_code"] == 400
    assert "the disk is on fire" in meta["err"]


# -- listing, reading -------------------------------------------------------------------------

def test_list_operations_is_a_map_keyed_by_status(tmp_path):
    async def body(h: Harness):
        block = asyncio.Event()

        async def blocked(op):
            await block.wait()

        running = h.ops.create(description="Running one", run=blocked)
        done = h.ops.create(description="Quick one", run=lambda op: asyncio.sleep(0))
        await h.get(f"/1.0/operations/{done.id}/wait?timeout=5")
        plain = (await h.get("/1.0/operations")).json()
        full = (await h.get("/1.0/operations?recursion=1")).json()
        one = (await h.get(f"/1.0/operations/{running.id}")).json()
        block.set()
        return running.id, done.id, plain, full, one

    rid, did, plain, full, one = run(tmp_path, body)
    assert plain["type"] == "sync" and plain["status_code"] == 200
    assert plain["metadata"] == {"running": [f"/1.0/operations/{rid}"], "success": [f"/1.0/operations/{did}"]}
    assert [o["id"] for o in full["metadata"]["running"]] == [rid]
    assert [o["id"] for o in full["metadata"]["success"]] == [did]
    assert full["metadata"]["success"][0]["status_code"] == 200
    assert one["metadata"]["id"] == rid and one["metadata"]["status"] == "Running"


def test_unknown_operation_is_404(tmp_path):
    async def body(h: Harness):
        return [await h.get("/1.0/operations/00000000-0000-0000-0000-000000000000"),
                await h.http.delete("/1.0/operations/nope"),
                await h.get("/1.0/operations/nope/wait?timeout=1")]

    for r in run(tmp_path, body):
        assert_error(r, 404)


# -- cancel -----------------------------------------------------------------------------------

def test_cancel_a_cancellable_operation(tmp_path):
    async def body(h: Harness):
        cancelled_by_owner = []

        async def forever(op):
            await asyncio.sleep(3600)

        async def on_cancel(op):
            cancelled_by_owner.append(op.id)

        async with h.ws("/1.0/events?type=operation,lifecycle") as ws:
            op = h.ops.create(description="Long", run=forever, may_cancel=True, on_cancel=on_cancel)
            await next_event(ws)  # Pending
            await next_event(ws)  # Running
            r = await h.http.delete(f"/1.0/operations/{op.id}")
            events = []
            while len(events) < 3:
                events.append(await next_event(ws))
            after = (await h.get(f"/1.0/operations/{op.id}")).json()["metadata"]
            again = await h.http.delete(f"/1.0/operations/{op.id}")
            return r, events, after, again, cancelled_by_owner, op.id

    r, events, after, again, by_owner, op_id = run(tmp_path, body)
    assert r.status_code == 200 and r.json()["type"] == "sync"
    ops = [e["metadata"]["status_code"] for e in events if e["type"] == "operation"]
    assert ops == [104, 401]
    life = [e["metadata"] for e in events if e["type"] == "lifecycle"]
    assert life and life[0]["action"] == "operation-cancelled" and life[0]["source"] == f"/1.0/operations/{op_id}"
    assert after["status"] == "Cancelled" and after["status_code"] == 401
    assert by_owner == [op_id]
    assert_error(again, 400)


def test_cancel_refused_when_the_operation_cannot_be_cancelled(tmp_path):
    async def body(h: Harness):
        block = asyncio.Event()

        async def blocked(op):
            await block.wait()

        op = h.ops.create(description="Not cancellable", run=blocked)
        r = await h.http.delete(f"/1.0/operations/{op.id}")
        still = (await h.get(f"/1.0/operations/{op.id}")).json()["metadata"]
        block.set()
        return r, still

    r, still = run(tmp_path, body)
    assert "can't be cancelled" in assert_error(r, 400)["error"]
    assert still["status"] == "Running" and still["may_cancel"] is False


# -- wait -------------------------------------------------------------------------------------

def test_wait_returns_when_the_operation_finishes(tmp_path):
    async def body(h: Harness):
        op = h.ops.create(description="Short", run=lambda op: asyncio.sleep(0.3))
        t0 = time.monotonic()
        r = await h.get(f"/1.0/operations/{op.id}/wait?timeout=10")
        return r, time.monotonic() - t0

    r, took = run(tmp_path, body)
    assert r.status_code == 200
    assert r.json()["metadata"]["status"] == "Success"
    assert 0.2 < took < 5


def test_wait_timeout_returns_the_current_state(tmp_path):
    """LXD 5.0 (WaitFinal): at the timeout the reply is 200 with the operation as it is now."""
    async def body(h: Harness):
        block = asyncio.Event()

        async def blocked(op):
            await block.wait()

        op = h.ops.create(description="Blocked", run=blocked)
        t0 = time.monotonic()
        r = await h.get(f"/1.0/operations/{op.id}/wait?timeout=1")
        took = time.monotonic() - t0
        zero = await h.get(f"/1.0/operations/{op.id}/wait?timeout=0")
        bad = await h.get(f"/1.0/operations/{op.id}/wait?timeout=soon")
        block.set()
        return r, took, zero, bad

    r, took, zero, bad = run(tmp_path, body)
    assert r.status_code == 200 and r.json()["metadata"]["status"] == "Running"
    assert 0.9 < took < 3
    assert zero.status_code == 200 and zero.json()["metadata"]["status"] == "Running"
    assert_error(bad, 400)


def test_finished_operations_stay_readable_for_a_few_seconds(tmp_path):
    async def body(h: Harness):
        op = h.ops.create(description="Quick", run=lambda op: asyncio.sleep(0))
        await h.get(f"/1.0/operations/{op.id}/wait?timeout=5")
        soon = await h.get(f"/1.0/operations/{op.id}")
        await asyncio.sleep(RETAIN_SECONDS - 1.5)
        later = await h.get(f"/1.0/operations/{op.id}")
        await asyncio.sleep(2.0)
        gone = await h.get(f"/1.0/operations/{op.id}")
        return soon, later, gone

    assert RETAIN_SECONDS == 5.0
    soon, later, gone = run(tmp_path, body)
    assert soon.json()["metadata"]["status"] == "Success"
    assert later.status_code == 200
    assert_error(gone, 404)


# -- websocket operations ---------------------------------------------------------------------

def test_websocket_secret_reaches_the_owner_and_a_wrong_one_is_403(tmp_path):
    async def body(h: Harness):
        async def on_connect(op, channel, websocket):
            await websocket.send_text(f"hello on {channel}")
            await websocket.close()
            op.succeed({"connected": channel})

        op = h.ops.create(cls=CLASS_WEBSOCKET, description="Session", on_connect=on_connect)
        secret = op.new_secret("control")
        with pytest.raises(InvalidStatus) as wrong:
            async with h.ws(f"/1.0/operations/{op.id}/websocket?secret={'0' * 64}"):
                pass
        with pytest.raises(InvalidStatus) as missing:
            async with h.ws(f"/1.0/operations/{op.id}/websocket"):
                pass
        with pytest.raises(InvalidStatus) as no_op:
            async with h.ws(f"/1.0/operations/nope/websocket?secret={secret}"):
                pass
        async with h.ws(f"/1.0/operations/{op.id}/websocket?secret={secret}") as ws:
            greeting = await asyncio.wait_for(ws.recv(), 5)
        final = (await h.get(f"/1.0/operations/{op.id}/wait?timeout=5")).json()["metadata"]
        return wrong.value.response, missing.value.response, no_op.value.response, greeting, final

    wrong, missing, no_op, greeting, final = run(tmp_path, body)
    for resp, status in ((wrong, 403), (missing, 403), (no_op, 404)):
        assert resp.status_code == status
        doc = json.loads(resp.body)
        assert doc["type"] == "error" and doc["error_code"] == status
    assert greeting == "hello on control"
    assert final["status"] == "Success" and final["metadata"] == {"connected": "control"}


# -- the event stream -------------------------------------------------------------------------

def test_events_filter_by_type_and_reject_unknown_types(tmp_path):
    async def body(h: Harness):
        async with h.ws("/1.0/events?type=lifecycle") as ws:
            h.events.publish("logging", {"message": "not for you", "level": "info", "context": {}})
            h.events.lifecycle("config-updated", "/1.0", {"x": "y"})
            ev = await next_event(ws)
        with pytest.raises(InvalidStatus) as bad:
            async with h.ws("/1.0/events?type=lifecycle,nonsense"):
                pass
        return ev, bad.value.response

    ev, bad = run(tmp_path, body)
    assert ev["type"] == "lifecycle" and ev["metadata"]["action"] == "config-updated"
    assert bad.status_code == 400
    doc = json.loads(bad.body)
    assert doc["error_code"] == 400 and "nonsense" in doc["error"]


def test_a_slow_event_consumer_never_stalls_publishing(tmp_path):
    async def body(h: Harness):
        async with h.ws("/1.0/events?type=logging") as slow:
            # The connection is open and the server has subscribed it.
            deadline = time.monotonic() + 5
            while h.events.listener_count == 0:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            listener = next(iter(h.events._listeners))
            n = QUEUE_LIMIT * 3
            t0 = time.perf_counter()
            for i in range(n):  # no await: nothing drains the queue meanwhile
                h.events.publish("logging", {"message": f"event {i}", "level": "info", "context": {}})
            took = time.perf_counter() - t0
            lagged = listener.lagged
            # The server cuts the lagging listener off and closes its websocket.
            received = 0
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                while True:
                    await asyncio.wait_for(slow.recv(), 5)
                    received += 1
            count_after = h.events.listener_count
            # Publishing still works for new listeners.
            async with h.ws("/1.0/events?type=logging") as fresh:
                while h.events.listener_count == 0:
                    await asyncio.sleep(0.01)
                h.events.publish("logging", {"message": "still here", "level": "info", "context": {}})
                after = await next_event(fresh)
            return n, took, lagged, received, count_after, after

    n, took, lagged, received, count_after, after = run(tmp_path, body)
    assert lagged
    assert took < 2.0, f"{n} publishes took {took:.2f}s"
    assert received < n
    assert count_after == 0
    assert after["metadata"]["message"] == "still here"
