"""Pulling an image from a remote server into the local store (`services.images.pull`).

The files are downloaded into a `tmp-*` work directory of the image store, every sha256 checked,
then the image goes through the store's ordinary check (content scan, duplicate check) and add
(rename into place and the database row in one step), so the store never holds half an image;
any failure removes the work directory. Pulls of one fingerprint running at the same time share
one download; each caller's operation shows its progress under `download_progress`, the key
LXD's daemon uses and the stock client renders.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import update

from lxd_daemon.errors import BadRequest, Conflict, NotFound
from lxd_daemon.images.models import images as images_table

if TYPE_CHECKING:
    from lxd_daemon.images.remote.client import RemoteInfo

log = logging.getLogger("lxd.images")

PROGRESS_KEY = "download_progress"


@dataclass
class _Shared:
    task: asyncio.Future
    ops: set = field(default_factory=set)


def _is_true(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


class Puller:
    def __init__(self, images):
        self.images = images
        self._shared: dict[str, _Shared] = {}

    async def resolve(self, source: dict) -> tuple[object, RemoteInfo, str]:
        """(remote client, the image's remote info, the name it was asked by)."""
        from lxd_daemon.images.remote.client import remote_for  # httpx: loaded on the first pull

        remote = remote_for(source)
        name = (source.get("fingerprint") or source.get("alias") or "").strip()
        if not name:
            raise BadRequest("No image alias or fingerprint given (source.alias or source.fingerprint)")
        info = await remote.resolve(name, source.get("image_type") or "")
        return remote, info, name

    async def pull(self, source: dict, *, project: str, aliases=(), auto_update: bool | None = None,
                   public: bool = False, op=None, cached: bool = False, requestor: dict | None = None) -> str:
        remote, info, name = await self.resolve(source)
        return await self.obtain(remote, info, name, project=project, certificate=source.get("certificate") or "",
                                 image_type=source.get("image_type") or "", aliases=aliases,
                                 auto_update=auto_update, public=public, op=op, cached=cached,
                                 requestor=requestor)

    async def obtain(self, remote, info: RemoteInfo, name: str, *, project: str, certificate: str = "",
                     image_type: str = "", aliases=(), auto_update: bool | None = None, public: bool = False,
                     op=None, cached: bool = False, requestor: dict | None = None) -> str:
        """The image `info` (resolved by `remote` from `name`) in the images `project` uses: reused,
        shared with another project's row (the files are there), or downloaded and added. Returns
        its fingerprint."""
        fp = info.fingerprint
        eff = self.images.effective(project)
        if auto_update is None:
            auto_update = cached and _is_true(self.images.server.config.get("images.auto_update_cached"))
        # Where it came from, kept for auto-update and refresh when asked by a name (LXD: alias != fp).
        origin = None
        if name != fp:
            origin = {"server": remote.server, "protocol": remote.protocol, "alias": name,
                      "certificate": certificate, "image_type": image_type}
        existing = await self._exists(fp, eff)
        if not existing:
            try:
                if await self._exists(fp, None):  # another project's row has the files
                    await self.images.share(fp, project=project, public=public, auto_update=auto_update,
                                            cached=cached, source=origin, requestor=requestor)
                else:
                    await self._download(remote, info, op, project=project, cached=cached, public=public,
                                         auto_update=auto_update, origin=origin, requestor=requestor)
            except Conflict:
                pass  # it arrived meanwhile (another pull or an upload)
        await self._settle(fp, eff, cached=cached, public=public, auto_update=auto_update, origin=origin,
                           downloaded=not existing)
        for a in aliases or ():
            entry = a if isinstance(a, dict) else {"name": str(a)}
            await self.images.create_alias(entry["name"], fp, entry.get("description") or "", project=project,
                                           requestor=requestor)
        return fp

    async def _exists(self, fp: str, project: str | None) -> bool:
        try:
            await self.images.locate(fp, project=project)
        except NotFound:
            return False
        return True

    async def _download(self, remote, info: RemoteInfo, op, *, project: str, **settings) -> None:
        fp = info.fingerprint
        key = (self.images.effective(project), fp)
        shared = self._shared.get(key)
        if shared is None:
            task = asyncio.ensure_future(self._fetch_and_add(remote, info, fp, project=project, **settings))
            shared = self._shared[key] = _Shared(task)
            task.add_done_callback(lambda _t, key=key: self._shared.pop(key, None))
            task.add_done_callback(_consume)
        if op is not None:
            shared.ops.add(op)
        try:
            await asyncio.shield(shared.task)
        finally:
            shared.ops.discard(op)

    def _report(self, key: tuple[str, str]):
        def report(text: str) -> None:
            shared = self._shared.get(key)
            for op in list(shared.ops) if shared else ():
                if not op.status.final:
                    op.update_metadata({PROGRESS_KEY: text})
        return report

    async def _fetch_and_add(self, remote, info: RemoteInfo, fp: str, *, project: str, cached: bool, public: bool,
                             auto_update: bool, origin: dict | None, requestor: dict | None) -> None:
        from lxd_daemon.images.service import Upload

        images = self.images
        store = images.store
        workdir = await asyncio.to_thread(store.new_workdir)
        upload = fetched = None
        try:
            fetched = await remote.download(info, workdir, self._report((images.effective(project), fp)))
            try:
                compression, rootfs_format = await asyncio.to_thread(_formats, fetched.meta, fetched.rootfs)
            except BaseException:
                for scan in fetched.scans.values():  # the Upload that would stop them is not made
                    scan.abort()
                raise
            upload = Upload(workdir=workdir, meta=fetched.meta, rootfs=fetched.rootfs,
                            fingerprint=fetched.fingerprint, size=fetched.size, compression=compression,
                            rootfs_format=rootfs_format, part_filename=fetched.rootfs_name,
                            scans=fetched.scans)
            await images.check(upload, project=project)
            props = dict(info.properties)
            await images.add(upload, project=project, filename=info.filename or fetched.meta.name, public=public,
                             properties=props, auto_update=auto_update, cached=cached, source=origin,
                             requestor=requestor)
            log.info("image pulled", extra={"fingerprint": fp, "server": remote.server})
        except BaseException:
            if upload is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(upload.discard)
            await asyncio.to_thread(shutil.rmtree, workdir, True)
            raise

    async def _settle(self, fp: str, project: str, *, cached: bool, public: bool, auto_update: bool,
                      origin: dict | None, downloaded: bool) -> None:
        """Apply this pull's wishes to an image that was there already (or pulled by another caller):
        an explicit copy makes a cached image a real one; public/auto_update only ever turn on; a
        launch marks it used."""
        flags: dict = {}
        if not cached:
            flags["cached"] = False
        if public:
            flags["public"] = True
        if auto_update:
            flags["auto_update"] = True
        if cached:
            flags["last_used_at"] = time.time()
        src: dict = {}
        if origin is not None and not downloaded:
            src = dict(source_server=origin["server"], source_protocol=origin["protocol"],
                       source_alias=origin["alias"], source_certificate=origin["certificate"],
                       source_image_type=origin["image_type"])
        if not flags and not src:
            return
        t = images_table.c

        def write(session):
            if flags:
                session.execute(update(images_table).where(t.fingerprint == fp, t.project == project)
                                .values(flags))
            if src:  # an image keeps the source it has (the first one, as in LXD)
                session.execute(update(images_table).where(t.fingerprint == fp, t.project == project,
                                                           t.source_server.is_(None)).values(src))

        await self.images.db.run(write)
        self.images._index.invalidate()  # the public flag may have changed


def _formats(meta, rootfs) -> tuple[str, str]:
    from lxd_daemon.images import formats

    compression = formats.detect_file(meta)
    if rootfs is None:
        return compression, ""
    if compression == "squashfs":
        raise BadRequest("Invalid image: the metadata file must be a tarball")
    return compression, formats.detect_file(rootfs)


def _consume(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


__all__ = ["PROGRESS_KEY", "Puller"]
