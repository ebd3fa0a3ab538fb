"""`/1.0/storage-pools/{pool}/volumes/custom/{name}/backups`: create (an operation writing the
tarball), list, get, rename, delete, `.../export`; and `lxc storage volume import`: a POST to
`/1.0/storage-pools/{pool}/volumes[/custom]` whose body is a backup tarball, which
api/storage_volumes.py hands to import_volume()."""

from __future__ import annotations

from fastapi import Request
from starlette.responses import Response

from lxd_daemon.api.access import Access, Routes
from lxd_daemon.api.envelope import async_, sync
from lxd_daemon.api.instance_backups import receive_upload
from lxd_daemon.api.request import parse, project_of, recursion
from lxd_daemon.errors import BadRequest
from lxd_daemon.projects.naming import query
from lxd_daemon.services import get_services, requestor
from lxd_daemon.wire.backups import BackupPost, StorageVolumeBackupsPost

router = Routes()
BASE = "/1.0/storage-pools/{pool}/volumes/{type}/{name}/backups"


def _custom(type: str) -> None:
    if type != "custom":
        raise BadRequest(f"Backups of {type!r} volumes are not supported: only custom volumes "
                         "(instance volumes are backed up through the instance)")


def _url(pool: str, name: str, project: str, bname: str = "") -> str:
    u = f"/1.0/storage-pools/{pool}/volumes/custom/{name}"
    return u + (f"/backups/{bname}" if bname else "") + query(project)


def _resources(pool: str, name: str, project: str, bname: str = "") -> dict:
    out = {"storage_volumes": [_url(pool, name, project)]}
    if bname:
        out["backups"] = [bname]
    return out


def _svc(request: Request):
    return get_services(request).backups.volumes


@router.get(BASE, access=Access.TRUSTED)
async def list_backups(request: Request, pool: str, type: str, name: str) -> Response:
    _custom(type)
    svc = _svc(request)
    project = project_of(request).name
    rows = await svc.list(pool, name, project)
    if recursion(request) == 0:
        return sync([_url(pool, name, project, r.name) for r in rows])
    return sync([svc.render(r) for r in rows])


@router.post(BASE, access=Access.TRUSTED)
async def create_backup(request: Request, pool: str, type: str, name: str) -> Response:
    _custom(type)
    services = get_services(request)
    svc = services.backups.volumes
    project = project_of(request).name
    body = await parse(request, StorageVolumeBackupsPost)
    from lxd_daemon.backups.service import parse_expiry

    bname = body.name or await svc.next_name(pool, name, project)
    compression = await svc.check_create(pool, name, bname, body.compression_algorithm, project)
    expires_at = parse_expiry(body.expires_at)
    who = requestor(request)

    async def run(op):
        await svc.create(pool, name, bname, expires_at=expires_at, volume_only=body.volume_only,
                         optimized=body.optimized_storage, compression=compression, project=project)
        services.events.lifecycle("storage-volume-backup-created", _url(pool, name, project, bname),
                                  requestor=who, project=project)

    op = services.ops.create(description="Backing up storage volume", resources=_resources(pool, name, project, bname),
                             run=run, project=project)
    return async_(op.render())


@router.get(BASE + "/{backup}", access=Access.TRUSTED)
async def get_backup(request: Request, pool: str, type: str, name: str, backup: str) -> Response:
    _custom(type)
    svc = _svc(request)
    return sync(svc.render(await svc.get(pool, name, backup, project_of(request).name)))


@router.post(BASE + "/{backup}", access=Access.TRUSTED)
async def rename_backup(request: Request, pool: str, type: str, name: str, backup: str) -> Response:
    _custom(type)
    services = get_services(request)
    svc = services.backups.volumes
    project = project_of(request).name
    await svc.get(pool, name, backup, project)
    body = await parse(request, BackupPost)
    if not body.name:
        raise BadRequest("A new name is required")
    who = requestor(request)

    async def run(op):
        await svc.rename(pool, name, backup, body.name, project)
        services.events.lifecycle("storage-volume-backup-renamed", _url(pool, name, project, body.name),
                                  {"old_name": backup}, requestor=who, project=project)

    op = services.ops.create(description="Renaming storage volume backup",
                             resources=_resources(pool, name, project, backup), run=run, project=project)
    return async_(op.render())


@router.delete(BASE + "/{backup}", access=Access.TRUSTED)
async def delete_backup(request: Request, pool: str, type: str, name: str, backup: str) -> Response:
    _custom(type)
    services = get_services(request)
    svc = services.backups.volumes
    project = project_of(request).name
    await svc.get(pool, name, backup, project)
    who = requestor(request)

    async def run(op):
        await svc.delete(pool, name, backup, project)
        services.events.lifecycle("storage-volume-backup-deleted", _url(pool, name, project, backup),
                                  requestor=who, project=project)

    op = services.ops.create(description="Deleting storage volume backup",
                             resources=_resources(pool, name, project, backup), run=run, project=project)
    return async_(op.render())


@router.get(BASE + "/{backup}/export", access=Access.TRUSTED)
async def export_backup(request: Request, pool: str, type: str, name: str, backup: str) -> Response:
    from lxd_daemon.api.images import FileParts

    _custom(type)
    services = get_services(request)
    project = project_of(request).name
    f, size = await services.backups.volumes.open_file(pool, name, backup, project)
    services.events.lifecycle("storage-volume-backup-retrieved", _url(pool, name, project, backup),
                              requestor=requestor(request), project=project)
    return FileParts([(f, size)], media_type="application/octet-stream",
                     headers={"Content-Disposition": f"attachment;filename={backup}"})


async def import_volume(request: Request, pool: str) -> Response:
    """`lxc storage volume import POOL FILE [NAME]`: the body is a custom volume backup tarball."""
    services = get_services(request)
    backups = services.backups
    svc = backups.volumes
    project = project_of(request).name
    new_name = request.headers.get("x-lxd-name", "")
    services.storage.get(pool)
    upload = backups.new_upload()
    try:
        size = await receive_upload(request, upload)
        if size == 0:
            raise BadRequest("The backup file is empty")
        plan = await svc.prepare_import(upload, pool, new_name, project)
    except BaseException:
        await backups.discard_upload(upload)
        raise
    who = requestor(request)

    async def run(op):
        try:
            await svc.run_import(plan)
        finally:
            await backups.discard_upload(upload)
        services.events.lifecycle("storage-volume-created", _url(pool, plan.name, project), requestor=who,
                                  project=project)

    op = services.ops.create(description="Creating storage volume", resources=_resources(pool, plan.name, project),
                             run=run, project=project)
    return async_(op.render())
