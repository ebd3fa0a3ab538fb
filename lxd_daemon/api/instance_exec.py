"""`POST /1.0/instances/{name}/exec` (and `/1.0/containers/...`), plus the setup() that wires
the exec, files, console and metadata endpoints into the daemon."""

from __future__ import annotations

from fastapi import Request
from starlette.responses import Response

from lxd_daemon.api.access import Access, Routes
from lxd_daemon.api.envelope import async_
from lxd_daemon.api.instance_files import PREFIXES, get_instance
from lxd_daemon.api.request import parse
from lxd_daemon.errors import BadRequest
from lxd_daemon.instances.exec import exec_instance
from lxd_daemon.services import requestor
from lxd_daemon.wire.exec import InstanceExecPost

router = Routes()

EXTENSIONS = (
    "container_exec_recording",
    "container_exec_signal_handling",
    "container_exec_user_group_cwd",
    "directory_manipulation",
    "file_delete",
    "file_append",
    "file_symlinks",
    "file_get_symlink",
    "container_edit_metadata",
    "console",
)


async def running_pid(services, name: str) -> int:
    status, pid = await services.instances.runtime_state(name)
    if status == "Frozen":
        raise BadRequest("Instance is frozen")
    if status != "Running" or pid <= 0:
        raise BadRequest("Instance is not running")
    return pid


async def exec_post(request: Request, name: str) -> Response:
    req = await parse(request, InstanceExecPost)
    services, inst = await get_instance(request, name)
    init_pid = await running_pid(services, inst.name)
    op = await exec_instance(services, inst, req, init_pid=init_pid, requestor=requestor(request))
    return async_(op.render())


for _prefix in PREFIXES:
    router.add(f"{_prefix}/{{name}}/exec", exec_post, methods=["POST"], access=Access.TRUSTED)


async def setup(services) -> list[Routes]:
    from lxd_daemon.api import instance_console, instance_files, instance_metadata

    services.server.advertise(*EXTENSIONS)
    return [router, instance_files.router, instance_console.router, instance_metadata.router]
