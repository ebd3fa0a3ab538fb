"""`/1.0/instances/{name}/console` (and `/1.0/containers/...`): attach, read and clear the log."""

from __future__ import annotations

import asyncio

from fastapi import Request
from starlette.responses import Response

from lxd_daemon.api.access import Access, Routes
from lxd_daemon.api.envelope import async_, sync
from lxd_daemon.api.instance_exec import running_pid
from lxd_daemon.api.instance_files import PREFIXES, get_instance, lifecycle
from lxd_daemon.api.request import parse
from lxd_daemon.instances import console
from lxd_daemon.wire.exec import InstanceConsolePost

router = Routes()


async def console_post(request: Request, name: str) -> Response:
    req = await parse(request, InstanceConsolePost)
    services, inst = await get_instance(request, name)
    await running_pid(services, inst.name)
    op = console.console_operation(services, inst, req.width, req.height, req.type)
    lifecycle(request, services, inst, "instance-console", {"type": req.type or "console"})
    return async_(op.render())


async def console_get(request: Request, name: str) -> Response:
    services, inst = await get_instance(request, name)
    data = await asyncio.to_thread(console.read_log, inst)
    lifecycle(request, services, inst, "instance-console-retrieved")
    return Response(data, media_type="application/octet-stream")


async def console_delete(request: Request, name: str) -> Response:
    services, inst = await get_instance(request, name)
    await asyncio.to_thread(console.clear_log, inst)
    lifecycle(request, services, inst, "instance-console-reset")
    return sync({})


for _prefix in PREFIXES:
    router.add(f"{_prefix}/{{name}}/console", console_post, methods=["POST"], access=Access.TRUSTED)
    router.add(f"{_prefix}/{{name}}/console", console_get, methods=["GET"], access=Access.TRUSTED)
    router.add(f"{_prefix}/{{name}}/console", console_delete, methods=["DELETE"], access=Access.TRUSTED)
