"""`/1.0/storage-pools/{pool}/volumes`: volumes of every type (container volumes from the
instance records, image volumes from the pool, custom volumes from their records), custom
volume create/copy/update/rename/move/delete, `state`, and custom volume snapshots."""

from __future__ import annotations

from fastapi import Request
from starlette.responses import Response

from lxd_daemon.api.access import STREAM, Access, Routes, shown
from lxd_daemon.api.envelope import async_, etag_of, sync
from lxd_daemon.api.request import (
    check_etag,
    listed_projects,
    parse,
    project_of,
    read_json,
    recursion,
    validate,
    visible_project,
)
from lxd_daemon.errors import BadRequest, NotFound, NotImplementedYet
from lxd_daemon.projects.naming import DEFAULT, query
from lxd_daemon.services import get_services, requestor
from lxd_daemon.storage.volume import Volume, VolumeType
from lxd_daemon.util.timefmt import ZERO_TIME
from lxd_daemon.wire.storage import (
    StorageVolumePost,
    StorageVolumePut,
    StorageVolumeSnapshotPost,
    StorageVolumeSnapshotPut,
    StorageVolumeSnapshotsPost,
    StorageVolumesPost,
)

router = Routes()

# What this module serves completely (LXD's api-extensions names).
EXTENSIONS = (
    "storage_api_volume_rename",
    "storage_api_local_volume_handling",
    "storage_api_volume_snapshots",
    "storage_volume_state",
    "custom_volume_snapshot_expiry",
    "volume_snapshot_scheduling",
    "custom_volume_refresh",
    "storage_api_remote_volume_handling",  # `lxc storage volume copy/move A:pool/vol b:pool/vol`
    "storage_api_remote_volume_snapshots",  # ... with the volume's snapshots
    "storage_api_project",
    "storage_volumes_all_projects",  # `lxc storage volume list --all-projects`  # `lxc storage volume copy/move --target-project`
)

TYPES = ("container", "virtual-machine", "image", "custom")
BASE = "/1.0/storage-pools/{pool}/volumes"


def _type(vtype: str) -> str:
    if vtype not in TYPES:
        raise BadRequest(f"Invalid storage volume type {vtype!r}")
    return vtype


def _custom_only(vtype: str, what: str) -> None:
    _type(vtype)
    if vtype != "custom":
        raise BadRequest(f"Storage volumes of type {vtype!r} can't be {what} through the storage API")


def _url(pool: str, vtype: str, name: str, project: str = DEFAULT) -> str:
    if "/" in name:
        parent, snap = name.split("/", 1)
        return f"/1.0/storage-pools/{pool}/volumes/{vtype}/{parent}/snapshots/{snap}{query(project)}"
    return f"/1.0/storage-pools/{pool}/volumes/{vtype}/{name}{query(project)}"


def _resources(pool: str, name: str, project: str, snap: str = "") -> dict:
    out = {"storage_volumes": [_url(pool, "custom", name, project)]}
    if snap:
        out["storage_volume_snapshots"] = [_url(pool, "custom", f"{name}/{snap}", project)]
    return out


def _vol(name: str, vtype: str, *, description: str = "", config: dict | None = None, used_by=None,
         content_type: str = "filesystem", project: str = "default", created_at: str = ZERO_TIME) -> dict:
    return {"name": name, "description": description, "type": vtype, "config": dict(config or {}),
            "used_by": list(used_by or []), "location": "none", "content_type": content_type,
            "project": project, "created_at": created_at or ZERO_TIME}


def _etag(v: dict) -> str:
    return etag_of(v["description"], v["config"])


def _snap(s) -> dict:
    return {"name": s.name, "description": s.description, "config": dict(s.config), "content_type": "filesystem",
            "created_at": s.created_at, "expires_at": s.expires_at or ZERO_TIME}


# -- gathering volumes of every type --------------------------------------------------------------

async def _custom_volumes(services, pool: str, project: str) -> list[dict]:
    custom = services.storage.custom
    out = []
    for v in await custom.list(pool, project):
        out.append(_vol(v.name, "custom", description=v.description, config=v.config,
                        used_by=await custom.used_by(pool, v.name, v.project), content_type=v.content_type,
                        project=v.project, created_at=v.created_at))
        for s in await custom.snapshots(pool, v.name, v.project):
            out.append(_vol(f"{v.name}/{s.name}", "custom", description=s.description, config=s.config,
                            content_type=v.content_type, project=v.project, created_at=s.created_at))
    return out


async def _instance_snapshot_rows(services, instance_id: int) -> list:
    return await services.storage.custom.instance_snapshots(instance_id)


def _instances_on(services, pool: str, project: str | None) -> list:
    """Records of the instances of `project` (None: of every project) whose root volume is on `pool`."""
    instances = services.instances
    if instances is None:
        return []
    from lxd_daemon.instances import validation

    out = []
    keys = sorted(instances.records) if project is None else instances.keys_in(project)
    for n in keys:
        try:
            rec = instances.record(n)
            root = validation.root_disk(instances.expanded(n)[1])
        except NotFound:
            continue
        if root is not None and root[1].get("pool") == pool:
            out.append((rec, root[1]))
    return out


async def _container_volume(services, pool: str, rec, root: dict, snapshots: bool) -> list[dict]:
    config = {"size": root["size"]} if root.get("size") else {}
    used_by = [f"/1.0/instances/{rec.name}{query(rec.project)}"]
    out = [_vol(rec.name, "container", config=config, used_by=used_by, project=rec.project,
                created_at=rec.created_at)]
    if snapshots:
        for s in await _instance_snapshot_rows(services, rec.id):
            out.append(_vol(f"{rec.name}/{s.name}", "container", description=s.description, config=config,
                            project=rec.project, created_at=s.created_at))
    return out


async def _container_volumes(services, pool: str, project: str) -> list[dict]:
    out = []
    for rec, root in _instances_on(services, pool, project):
        out += await _container_volume(services, pool, rec, root, True)
    return out


async def _image_fingerprints(services, pool: str) -> list[str]:
    """Images with a volume (btrfs: `<fp>_<uid>_<gid>`, once per image) or a cache (dir) on the pool."""
    p = services.storage.get(pool)
    fps: list[str] = []
    try:
        vols = await p.driver.list_volumes()
    except Exception:
        return []
    for v in vols:
        if v.type is not VolumeType.IMAGE or v.is_snapshot:
            continue
        fp = v.name.split("_", 1)[0]
        if len(fp) == 64 and all(c in "0123456789abcdef" for c in fp) and fp not in fps:
            fps.append(fp)
    return fps


async def _visible_image_fingerprints(services, pool: str, project: str) -> list[str]:
    """Image volumes are shared by every project: `default` lists them all, another project those
    of the images it uses."""
    fps = await _image_fingerprints(services, pool)
    if project == DEFAULT or services.images is None:
        return fps
    mine = {i["fingerprint"] for i in await services.images.list(project=project)}
    return [fp for fp in fps if fp in mine]


def _image_vol(fp: str, project: str) -> dict:
    return _vol(fp, "image", used_by=[f"/1.0/images/{fp}{query(project)}"], project=project)


async def _image_volumes(services, pool: str, project: str) -> list[dict]:
    return [_image_vol(fp, project) for fp in await _visible_image_fingerprints(services, pool, project)]


async def _volumes(services, pool: str, vtype: str | None, project: str) -> list[dict]:
    services.storage.get(pool)
    out: list[dict] = []
    if vtype in (None, "container"):
        out += await _container_volumes(services, pool, project)
    if vtype in (None, "image"):
        out += await _image_volumes(services, pool, project)
    if vtype in (None, "custom"):
        out += await _custom_volumes(services, pool, project)
    return out


async def _one(services, pool: str, vtype: str, name: str, project: str) -> dict:
    services.storage.get(pool)
    if vtype == "custom":
        custom = services.storage.custom
        v = await custom.get(pool, name, project)
        return _vol(v.name, "custom", description=v.description, config=v.config,
                    used_by=await custom.used_by(pool, v.name, v.project), content_type=v.content_type,
                    project=v.project, created_at=v.created_at)
    if vtype == "container":
        for rec, root in _instances_on(services, pool, project):
            if rec.name == name:
                return (await _container_volume(services, pool, rec, root, False))[0]
    if vtype == "image" and name in await _visible_image_fingerprints(services, pool, project):
        return _image_vol(name, project)
    raise NotFound("Storage volume not found")


def _listing(request: Request, pool: str, vols: list[dict]) -> Response:
    if recursion(request):
        return sync([shown(request, v) for v in vols])
    return sync([_url(pool, v["type"], v["name"], v["project"]) for v in vols])


async def _listed(request: Request, pool: str, vtype: str | None) -> list[dict]:
    """The volumes of the request's project, or with `all-projects=true` of every project the
    caller may see (each once: projects without features.storage.volumes share default's)."""
    services = get_services(request)
    out, seen = [], set()
    for project in listed_projects(request):
        for v in await _volumes(services, pool, vtype, project):
            if (v["project"], v["type"], v["name"]) not in seen:
                seen.add((v["project"], v["type"], v["name"]))
                out.append(v)
    return out


# -- collection -----------------------------------------------------------------------------------

@router.get(BASE, access=Access.TRUSTED)
async def list_volumes(request: Request, pool: str) -> Response:
    return _listing(request, pool, await _listed(request, pool, None))


@router.get(BASE + "/{type}", access=Access.TRUSTED)
async def list_volumes_of_type(request: Request, pool: str, type: str) -> Response:
    return _listing(request, pool, await _listed(request, pool, _type(type)))


async def _create(request: Request, pool: str, vtype: str | None) -> Response:
    services = get_services(request)
    storage = services.storage
    storage.get(pool)
    if request.headers.get("content-type", "").split(";")[0].strip() == "application/octet-stream":
        try:
            from lxd_daemon.api.storage_volume_backups import import_volume
        except ImportError:
            raise NotImplementedYet("Importing storage volume backups is not implemented yet") from None
        return await import_volume(request, pool)
    body = validate(StorageVolumesPost, await read_json(request, default={}))
    vtype = vtype or body.type or "custom"
    if body.type and body.type != vtype:
        raise BadRequest(f"Volume type {body.type!r} doesn't match the URL's {vtype!r}")
    _custom_only(vtype, "created")
    if not body.name:
        raise BadRequest("No name provided")
    project = project_of(request).name
    who = requestor(request)
    url = _url(pool, "custom", body.name, project)
    src = body.source
    if src.type in ("", "none"):
        await storage.custom.create(pool, body.name, project=project, description=body.description,
                                    config=body.config, content_type=body.content_type)
        services.events.lifecycle("storage-volume-created", url, {"type": "custom"}, requestor=who, project=project)
        return sync(None, status=201, location=url)
    if src.type == "migration":  # from another server (migration/volumes.py)
        return await _receive(request, pool, body)
    if src.type != "copy":
        raise NotImplementedYet(f"Storage volume source type {src.type!r} is not implemented")
    if not src.name:
        raise BadRequest("No source volume name provided")
    src_pool = src.pool or pool
    storage.get(src_pool)
    src_project = src.project or project
    # Checked before the operation starts: a typo gets its 404 at once.
    await storage.custom.get(src_pool, src.name.split("/", 1)[0], src_project)
    if src.refresh and await _exists(storage, pool, body.name, project):
        async def refresh(op):
            await storage.custom.refresh(pool, body.name, src_pool=src_pool, src_name=src.name, project=project,
                                         src_project=src_project, volume_only=src.volume_only)
            services.events.lifecycle("storage-volume-updated", url, {"type": "custom"}, requestor=who, project=project)

        op = services.ops.create(description="Refreshing storage volume",
                                 resources=_resources(pool, body.name, project), run=refresh, project=project)
        return async_(op.render())

    async def run(op):
        await storage.custom.copy(pool, body.name, src_pool=src_pool, src_name=src.name, project=project,
                                  src_project=src_project, description=body.description or None,
                                  config=body.config or None, volume_only=src.volume_only)
        services.events.lifecycle("storage-volume-created", url, {"type": "custom"}, requestor=who, project=project)

    op = services.ops.create(description="Copying storage volume", resources=_resources(pool, body.name, project),
                             run=run, project=project)
    return async_(op.render())


async def _receive(request: Request, pool: str, body) -> Response:
    """The sink of a volume migration: pull (a task dialing the source's operation) or push (a
    websocket operation the source or the relaying client connects)."""
    from lxd_daemon.migration import volumes
    from lxd_daemon.ops.manager import CLASS_WEBSOCKET

    services = get_services(request)
    project = project_of(request).name
    sink = await volumes.prepare_sink(services, pool, body, project)  # every check before data moves
    url = _url(pool, "custom", body.name, sink.project)
    who = requestor(request)

    async def run(op):
        await sink.run(op)
        action = "storage-volume-updated" if sink.refresh else "storage-volume-created"
        services.events.lifecycle(action, url, {"type": "custom"}, requestor=who, project=sink.project)

    res = _resources(pool, body.name, sink.project)
    if sink.mode == "pull":
        op = services.ops.create(description="Creating storage volume", resources=res, run=run,
                                 on_cancel=sink.on_cancel, may_cancel=True, project=project)
        return async_(op.render())
    op = services.ops.create(cls=CLASS_WEBSOCKET, description="Creating storage volume", resources=res, run=run,
                             on_connect=sink.on_connect, on_cancel=sink.on_cancel, may_cancel=True,
                             project=project, start=False)
    op.metadata = sink.ends.secrets(op)
    services.ops.start(op)
    return async_(op.render())


async def _migrate(request: Request, pool: str, name: str, body) -> Response:
    """The source of a volume migration: a websocket operation with the `control` and `fs`
    secrets (pull, relay), or, given `target`, a task that dials the sink's operation (push)."""
    from lxd_daemon.migration import volumes
    from lxd_daemon.ops.manager import CLASS_WEBSOCKET

    services = get_services(request)
    project = project_of(request).name
    src = volumes.VolumeSource(services, pool, name, project, volume_only=body.volume_only, target=body.target)
    await src.check()
    res = _resources(pool, name, src.project)
    if body.target is not None:
        op = services.ops.create(description="Migrating storage volume", resources=res, run=src.run,
                                 on_cancel=src.on_cancel, may_cancel=True, project=project)
        return async_(op.render())
    op = services.ops.create(cls=CLASS_WEBSOCKET, description="Migrating storage volume", resources=res,
                             run=src.run, on_connect=src.on_connect, on_cancel=src.on_cancel, may_cancel=True,
                             project=project, start=False)
    op.metadata = src.ends.secrets(op)
    services.ops.start(op)
    return async_(op.render())


async def _exists(storage, pool: str, name: str, project: str) -> bool:
    try:
        await storage.custom.get(pool, name, project)
        return True
    except NotFound:
        return False


@router.post(BASE, access=Access.TRUSTED, body=STREAM)
async def create_volume(request: Request, pool: str) -> Response:
    return await _create(request, pool, None)


@router.post(BASE + "/{type}", access=Access.TRUSTED, body=STREAM)
async def create_volume_of_type(request: Request, pool: str, type: str) -> Response:
    return await _create(request, pool, _type(type))


# -- one volume -----------------------------------------------------------------------------------

@router.get(BASE + "/{type}/{name}", access=Access.TRUSTED)
async def get_volume(request: Request, pool: str, type: str, name: str) -> Response:
    v = await _one(get_services(request), pool, _type(type), name, project_of(request).name)
    return sync(shown(request, v), etag=_etag(v))


async def _update(request: Request, pool: str, vtype: str, name: str, replace: bool) -> Response:
    services = get_services(request)
    project = project_of(request).name
    current = await _one(services, pool, _type(vtype), name, project)
    _custom_only(vtype, "changed")
    check_etag(request, _etag(current))
    body = await parse(request, StorageVolumePut)
    url = _url(pool, "custom", name, project)
    custom = services.storage.custom
    if body.restore:
        await custom.restore(pool, name, body.restore, project)
        services.events.lifecycle("storage-volume-restored", url, {"snapshot": body.restore},
                                  requestor=requestor(request), project=project)
        return sync({})
    config = dict(body.config) if replace else {**current["config"], **body.config}
    description = body.description if (replace or "description" in body.model_fields_set) else current["description"]
    await custom.update(pool, name, description=description, config=config, project=project)
    services.events.lifecycle("storage-volume-updated", url, requestor=requestor(request), project=project)
    return sync({})


@router.put(BASE + "/{type}/{name}", access=Access.TRUSTED)
async def put_volume(request: Request, pool: str, type: str, name: str) -> Response:
    return await _update(request, pool, type, name, True)


@router.patch(BASE + "/{type}/{name}", access=Access.TRUSTED)
async def patch_volume(request: Request, pool: str, type: str, name: str) -> Response:
    return await _update(request, pool, type, name, False)


@router.post(BASE + "/{type}/{name}", access=Access.TRUSTED)
async def rename_volume(request: Request, pool: str, type: str, name: str) -> Response:
    services = get_services(request)
    storage = services.storage
    project = project_of(request).name
    storage.get(pool)
    _custom_only(type, "renamed or moved")
    body = await parse(request, StorageVolumePost)
    if body.migration:  # to another server (migration/volumes.py)
        return await _migrate(request, pool, name, body)
    await storage.custom.get(pool, name, project)
    if body.project and body.project != project:  # `lxc storage volume move --target-project`
        target = visible_project(request, body.project)
        dest_pool = body.pool or pool
        storage.get(dest_pool)
        new_name = body.name or name
        who = requestor(request)

        async def move_project(op):
            await storage.custom.move(pool, name, dest_pool, new_name, project, target)
            services.events.lifecycle("storage-volume-moved", _url(dest_pool, "custom", new_name, target),
                                      {"old_pool": pool, "old_name": name, "old_project": project},
                                      requestor=who, project=target)

        op = services.ops.create(description="Moving storage volume", resources=_resources(pool, name, project),
                                 run=move_project, project=project)
        return async_(op.render())
    new_name = body.name or name
    who = requestor(request)
    old_url = _url(pool, "custom", name, project)
    if not body.pool or body.pool == pool:
        await storage.custom.rename(pool, name, new_name, project)
        new_url = _url(pool, "custom", new_name, project)
        services.events.lifecycle("storage-volume-renamed", new_url, {"old_name": name}, requestor=who, project=project)
        if not body.pool:
            return sync(None, status=201, location=new_url)

        async def done(op):
            return None

        op = services.ops.create(description="Moving storage volume", resources=_resources(pool, name, project),
                                 run=done, project=project)
        return async_(op.render())
    storage.get(body.pool)

    async def run(op):
        await storage.custom.move(pool, name, body.pool, new_name, project)
        services.events.lifecycle("storage-volume-moved", _url(body.pool, "custom", new_name, project),
                                  {"old_pool": pool, "old_name": name}, requestor=who, project=project)

    op = services.ops.create(description="Moving storage volume", resources={"storage_volumes": [old_url]}, run=run,
                             project=project)
    return async_(op.render())


@router.delete(BASE + "/{type}/{name}", access=Access.TRUSTED)
async def delete_volume(request: Request, pool: str, type: str, name: str) -> Response:
    services = get_services(request)
    services.storage.get(pool)
    _custom_only(type, "deleted")
    project = project_of(request).name
    await services.storage.custom.delete(pool, name, project)
    services.events.lifecycle("storage-volume-deleted", _url(pool, "custom", name, project),
                              requestor=requestor(request), project=project)
    return sync({})


@router.get(BASE + "/{type}/{name}/state", access=Access.TRUSTED)
async def volume_state(request: Request, pool: str, type: str, name: str) -> Response:
    services = get_services(request)
    project = project_of(request).name
    await _one(services, pool, _type(type), name, project)
    if type == "custom":
        return sync({"usage": await services.storage.custom.usage(pool, name, project)})
    p = services.storage.get(pool)
    vol = Volume(pool, VolumeType(type), name, project=project)
    try:
        used = await p.driver.volume_usage(vol)
    except Exception:
        used = None
    return sync({"usage": {"used": used or 0, "total": -1}})


# -- snapshots ------------------------------------------------------------------------------------

@router.get(BASE + "/{type}/{name}/snapshots", access=Access.TRUSTED)
async def list_snapshots(request: Request, pool: str, type: str, name: str) -> Response:
    services = get_services(request)
    project = project_of(request).name
    await _one(services, pool, _type(type), name, project)
    if type == "custom":
        snaps = [_snap(s) for s in await services.storage.custom.snapshots(pool, name, project)]
    elif type == "container":
        rec = services.instances.lookup(project, name)
        snaps = [{"name": s.name, "description": s.description, "config": {}, "content_type": "filesystem",
                  "created_at": s.created_at, "expires_at": s.expires_at or ZERO_TIME}
                 for s in await _instance_snapshot_rows(services, rec.id)]
    else:
        snaps = []
    if recursion(request):
        return sync(snaps)
    return sync([_url(pool, type, f"{name}/{s['name']}", project) for s in snaps])


@router.post(BASE + "/{type}/{name}/snapshots", access=Access.TRUSTED)
async def create_snapshot(request: Request, pool: str, type: str, name: str) -> Response:
    services = get_services(request)
    project = project_of(request).name
    services.storage.get(pool)
    _custom_only(type, "snapshotted")
    custom = services.storage.custom
    await custom.get(pool, name, project)
    body = await parse(request, StorageVolumeSnapshotsPost)
    if body.name:
        if any(s.name == body.name for s in await custom.snapshots(pool, name, project)):
            raise BadRequest(f"Snapshot {body.name!r} already exists")
    who = requestor(request)

    async def run(op):
        s = await custom.create_snapshot(pool, name, body.name or None, project=project, expires_at=body.expires_at)
        services.events.lifecycle("storage-volume-snapshot-created", _url(pool, "custom", f"{name}/{s.name}", project),
                                  requestor=who, project=project)

    op = services.ops.create(description="Creating storage volume snapshot",
                             resources=_resources(pool, name, project), run=run, project=project)
    return async_(op.render())


async def _snapshot_of(request: Request, pool: str, type: str, name: str, snapshot: str):
    services = get_services(request)
    services.storage.get(pool)
    _type(type)
    project = project_of(request).name
    if type == "custom":
        return services, project, await services.storage.custom.get_snapshot(pool, name, snapshot, project)
    raise NotFound("Storage volume snapshot not found")


@router.get(BASE + "/{type}/{name}/snapshots/{snapshot}", access=Access.TRUSTED)
async def get_snapshot(request: Request, pool: str, type: str, name: str, snapshot: str) -> Response:
    if type == "container":
        services = get_services(request)
        rec = services.instances.lookup(project_of(request).name, name)
        for s in await _instance_snapshot_rows(services, rec.id):
            if s.name == snapshot:
                return sync({"name": s.name, "description": s.description, "config": {},
                             "content_type": "filesystem", "created_at": s.created_at, "expires_at": s.expires_at or ZERO_TIME})
        raise NotFound("Storage volume snapshot not found")
    _, _, s = await _snapshot_of(request, pool, type, name, snapshot)
    v = _snap(s)
    return sync(v, etag=etag_of(v["description"], v["expires_at"]))


async def _update_snapshot(request: Request, pool: str, type: str, name: str, snapshot: str, replace: bool) -> Response:
    services, project, s = await _snapshot_of(request, pool, type, name, snapshot)
    current = _snap(s)
    check_etag(request, etag_of(current["description"], current["expires_at"]))
    body = await parse(request, StorageVolumeSnapshotPut)
    given = body.model_fields_set
    description = body.description if (replace or "description" in given) else s.description
    expires_at = body.expires_at if (replace or "expires_at" in given) else s.expires_at
    await services.storage.custom.update_snapshot(pool, name, snapshot, description=description,
                                                  expires_at=expires_at, project=project)
    services.events.lifecycle("storage-volume-snapshot-updated", _url(pool, "custom", f"{name}/{snapshot}", project),
                              requestor=requestor(request), project=project)
    return sync({})


@router.put(BASE + "/{type}/{name}/snapshots/{snapshot}", access=Access.TRUSTED)
async def put_snapshot(request: Request, pool: str, type: str, name: str, snapshot: str) -> Response:
    return await _update_snapshot(request, pool, type, name, snapshot, True)


@router.patch(BASE + "/{type}/{name}/snapshots/{snapshot}", access=Access.TRUSTED)
async def patch_snapshot(request: Request, pool: str, type: str, name: str, snapshot: str) -> Response:
    return await _update_snapshot(request, pool, type, name, snapshot, False)


@router.post(BASE + "/{type}/{name}/snapshots/{snapshot}", access=Access.TRUSTED)
async def rename_snapshot(request: Request, pool: str, type: str, name: str, snapshot: str) -> Response:
    services, project, s = await _snapshot_of(request, pool, type, name, snapshot)
    body = await parse(request, StorageVolumeSnapshotPost)
    if body.migration:
        raise NotImplementedYet("Migrating storage volume snapshots is not implemented yet")
    if not body.name:
        raise BadRequest("No name provided")
    custom = services.storage.custom
    if body.name != snapshot and any(x.name == body.name for x in await custom.snapshots(pool, name, project)):
        raise BadRequest(f"Snapshot {body.name!r} already exists")
    who = requestor(request)

    async def run(op):
        await custom.rename_snapshot(pool, name, snapshot, body.name, project)
        services.events.lifecycle("storage-volume-snapshot-renamed",
                                  _url(pool, "custom", f"{name}/{body.name}", project),
                                  {"old_name": snapshot}, requestor=who, project=project)

    op = services.ops.create(description="Renaming storage volume snapshot",
                             resources=_resources(pool, name, project, snapshot), run=run, project=project)
    return async_(op.render())


@router.delete(BASE + "/{type}/{name}/snapshots/{snapshot}", access=Access.TRUSTED)
async def delete_snapshot(request: Request, pool: str, type: str, name: str, snapshot: str) -> Response:
    services, project, s = await _snapshot_of(request, pool, type, name, snapshot)
    who = requestor(request)
    custom = services.storage.custom

    async def run(op):
        await custom.delete_snapshot(pool, name, snapshot, project)
        services.events.lifecycle("storage-volume-snapshot-deleted",
                                  _url(pool, "custom", f"{name}/{snapshot}", project),
                                  requestor=who, project=project)

    op = services.ops.create(description="Deleting storage volume snapshot",
                             resources=_resources(pool, name, project, snapshot), run=run, project=project)
    return async_(op.render())
