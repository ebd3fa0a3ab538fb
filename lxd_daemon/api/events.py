"""`/1.0/events`: the event stream (websocket) of the request's project, or with
`all-projects=true` of every project the caller may see (api.access.visible_projects)."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect

from lxd_daemon.api.access import Access, Routes, visible_projects
from lxd_daemon.api.envelope import error
from lxd_daemon.api.request import project_of
from lxd_daemon.events.hub import EVENT_TYPES
from lxd_daemon.services import get_services

router = Routes()


@router.websocket("/1.0/events", access=Access.TRUSTED)
async def events(websocket: WebSocket) -> None:
    hub = get_services(websocket).events
    raw = websocket.query_params.get("type", "")
    types = [t for t in raw.split(",") if t] if raw else list(EVENT_TYPES)
    bad = [t for t in types if t not in EVENT_TYPES]
    if bad:
        await websocket.send_denial_response(error(400, f"{bad[0]!r} isn't a supported event type"))
        return
    all_projects = websocket.query_params.get("all-projects", "").lower() in ("1", "true")
    # A restricted certificate hears its projects only (access.check confined `project`), and
    # never the server's own log lines.
    visible = visible_projects(websocket)
    # Subscribe before the handshake completes: a client sends its request once connected and
    # must not miss that request's first events.
    listener = hub.subscribe(types, project=project_of(websocket).name, all_projects=all_projects,
                             visible=visible, server_wide=visible is None)
    try:
        await websocket.accept()
    except BaseException:
        hub.unsubscribe(listener)
        raise

    async def drain_client() -> None:
        # The client never sends anything useful; reading tells us when it goes away.
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            while True:
                msg = await websocket.receive()
                if msg["type"] == "websocket.disconnect":
                    return

    reader = asyncio.create_task(drain_client())
    try:
        while not reader.done():
            getter = asyncio.ensure_future(listener.queue.get())
            done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                break
            data = getter.result()
            if data is None:  # the listener fell too far behind
                break
            await websocket.send_text(data.decode())
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass
    finally:
        hub.unsubscribe(listener)
        reader.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(websocket.close(), 1.0)
