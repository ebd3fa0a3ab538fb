"""A real migration websocket pair on 127.0.0.1 for tests: uvicorn serves an operation-like
`/1.0/operations/ID/websocket?secret=` route whose accepted sockets become Channels
(`wire.accepted`), and the other end comes from `wire.dial` (in process or in a child process)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from types import SimpleNamespace

SECRET = "s3cret-for-tests"


@contextlib.asynccontextmanager
async def ws_server(*, keypair: Path | None = None, secret: str = SECRET):
    """Serve until the block ends. Yields `.url` (https:// with `keypair` (a dir with server.crt/.key),
    else http://; .../1.0/operations/op1), `.accepted` (an asyncio.Queue of Channels, one per
    accepted websocket) and `.peers` (their client certificates)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket

    from lxd_daemon.migration.wire import accepted

    queue: asyncio.Queue = asyncio.Queue()
    peers: list[bytes | None] = []  # the client certificate (DER) of each accepted websocket (TLS)

    async def endpoint(ws: WebSocket) -> None:
        if ws.query_params.get("secret") != secret:
            await ws.send_denial_response(JSONResponse({"type": "error", "error": "not authorized",
                                                        "error_code": 403}, status_code=403))
            return
        await ws.accept()
        peers.append(ws.scope.get("lxd_peer_cert"))
        ch = accepted(ws, "fs")
        await queue.put(ch)
        await ch.wait_closed()

    app = Starlette(routes=[WebSocketRoute("/1.0/operations/{op}/websocket", endpoint)])
    info = SimpleNamespace(accepted=queue, secret=secret, peers=peers)
    if keypair is not None:
        # the daemon's own TLS listener (server/https.py): any client certificate is accepted and
        # lands in the scope as lxd_peer_cert
        from lxd_daemon.server import https

        services = SimpleNamespace(lxd_dir=keypair, app=app, trust=None, debug=False, startup_hooks=[],
                                   exit_hooks=[], server=SimpleNamespace(addresses=[], invalidate=lambda: None,
                                                                         config=SimpleNamespace(get=lambda k: ""),
                                                                         appliers={}))
        await https.setup(services)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            info.port = s.getsockname()[1]
        address = f"127.0.0.1:{info.port}"
        await services.https.apply(None, address)
        info.url = f"https://{address}/1.0/operations/op1"
        try:
            yield info
        finally:
            await services.https.apply(address, None)
        return
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    info.port = sock.getsockname()[1]
    info.url = f"http://127.0.0.1:{info.port}/1.0/operations/op1"
    config = uvicorn.Config(app, ws="websockets-sansio", lifespan="off", log_config=None, access_log=False,
                            ws_ping_interval=5, ws_ping_timeout=10)
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        assert server.started, "the test websocket server did not start"
        yield info
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)
        sock.close()

async def pair(server, **dial_kwargs):
    """(dialed channel, accepted channel) to `server`."""
    from lxd_daemon.migration.wire import dial

    dialed = await dial(server.url, server.secret, dial_kwargs.pop("certificate", None), **dial_kwargs)
    acc = await asyncio.wait_for(server.accepted.get(), 10)
    return dialed, acc
