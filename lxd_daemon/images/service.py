"""The image service: the store's records, uploads, aliases, unpacking, publishing.

Used by the API routers and by other subsystems (instances: resolve/get/unpack/mark_used; storage:
path/rootfs_path and the on_delete hooks). Never imports fastapi.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

from sqlalchemy import bindparam, delete, select, update

from lxd_daemon import names
from lxd_daemon.api.envelope import etag_of
from lxd_daemon.errors import BadRequest, Conflict, NotFound
from lxd_daemon.images import formats, tarscan
from lxd_daemon.images.index import ImageIndex, Located, check_prefix, pick
from lxd_daemon.images.models import images, images_aliases
from lxd_daemon.images.multipart import MultipartParser, boundary_of
from lxd_daemon.images.pipeline import UploadScan
from lxd_daemon.images.store import AsyncSink, HashingWriter, ImageStore
from lxd_daemon.projects.naming import query
from lxd_daemon.projects.service import making
from lxd_daemon.util.sizes import format_rate
from lxd_daemon.util.tasks import to_the_end
from lxd_daemon.util.timefmt import EPOCH_TIME, ZERO_TIME, parse_rfc3339, rfc3339

log = logging.getLogger("lxd.images")

SMALL_UPLOAD = 8 << 20  # uploads up to this size are gathered in memory before they are stored


def ts(value: float | None) -> str:
    """None (never set) is Go's zero time; 0 is the Unix epoch, as LXD stores a missing
    creation_date/expiry_date of an imported image (time.Unix(0, 0))."""
    if value is None:
        return ZERO_TIME
    return EPOCH_TIME if value == 0 else rfc3339(value)


def parse_time(value: str | None) -> float | None:
    if not value or value.startswith("0001-01-01"):
        return None
    try:
        return parse_rfc3339(value)
    except ValueError:
        raise BadRequest(f"Invalid timestamp {value!r}") from None


def check_alias_name(name: str) -> None:
    """Alias names may contain `/` (`a/b/` included), as in LXD: see lxd_daemon.names.alias."""
    try:
        names.alias(name)
    except names.InvalidName as e:
        raise BadRequest(e.message) from None


def render(row, aliases: list) -> dict:
    """An image document from its row and alias rows (anything with those attributes)."""
    out = {
        "auto_update": row.auto_update,
        "properties": json.loads(row.properties),
        "public": row.public,
        "expires_at": ts(row.expires_at),
        "profiles": json.loads(row.profiles),
        "aliases": [{"name": a.name, "description": a.description} for a in sorted(aliases, key=lambda a: a.name)],
        "architecture": row.architecture,
        "cached": row.cached,
        "filename": row.filename,
        "fingerprint": row.fingerprint,
        "size": row.size,
        "type": row.type,
        "created_at": ts(row.created_at),
        "last_used_at": ts(row.last_used_at),
        "uploaded_at": ts(row.uploaded_at),
    }
    if row.source_server:
        out["update_source"] = {
            "alias": row.source_alias or "", "certificate": row.source_certificate or "",
            "protocol": row.source_protocol or "", "server": row.source_server,
            "image_type": row.source_image_type or "",
        }
    return out


def image_etag(img: dict) -> str:
    return etag_of(img["public"], img["auto_update"], img["properties"])


def alias_etag(alias: dict) -> str:
    return etag_of(alias)


@dataclass
class Upload:
    """An upload received into a work directory, not yet checked or stored."""

    workdir: Path | None  # None: meta is a lone temp file in the store
    meta: Path
    rootfs: Path | None
    fingerprint: str
    size: int
    compression: str = ""
    rootfs_format: str = ""
    part_filename: str = ""
    scan: tarscan.ScanResult | None = None
    metadata: dict = field(default_factory=dict)
    # The scans that ran while the upload arrived, by kind ("unified", or "meta" and "rootfs").
    scans: dict[str, UploadScan] = field(default_factory=dict)

    def discard(self) -> None:
        for scan in self.scans.values():
            scan.abort()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            return
        for p in (self.meta, self.rootfs):
            if p is not None:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()


_I, _A = images.c, images_aliases.c
_IMAGE_BY_FP = select(_I.id).where(_I.fingerprint == bindparam("fp"), _I.project == bindparam("project"))
_ANY_BY_FP = select(_I.id).where(_I.fingerprint == bindparam("fp")).limit(1)
_ALIAS_BY_NAME = select(_A.id).where(_A.name == bindparam("name"), _A.project == bindparam("project"))
_INSERT_IMAGE = images.insert()
_INSERT_ALIAS = images_aliases.insert()
_DELETE_IMAGE = images.delete().where(_I.id == bindparam("id"))
# A fingerprint prefix as an index range: fingerprints are lower-case hex and "g" sorts after "f".
_LOCATED = (_I.id, _I.fingerprint, _I.public, _I.layout, _I.compression, _I.rootfs_format, _I.project)
_LOCATE_ALL = select(*_LOCATED)
_LOCATE_ANY = (_LOCATE_ALL.where(_I.fingerprint >= bindparam("lo"), _I.fingerprint < bindparam("hi"))
               .group_by(_I.fingerprint).limit(2))  # any project's row: where the shared files are
_LOCATE = (_LOCATE_ALL.where(_I.fingerprint >= bindparam("lo"), _I.fingerprint < bindparam("hi"),
                             _I.project == bindparam("project")).limit(2))
_LOCATE_PUBLIC = _LOCATE.where(_I.public.is_(True))
# An alias row with the columns of its image that alias documents and checks need.
_ALIAS_JOIN = (select(_A.id, _A.name, _A.description, _A.image_id, _I.fingerprint, _I.type, _I.public)
               .join_from(images_aliases, images, _A.image_id == _I.id))


def _prefix_query(prefix: str, public_only: bool, project: str):
    q = select(images).where(_I.fingerprint.startswith(prefix), _I.project == project)
    if public_only:
        q = q.where(_I.public.is_(True))
    return q.limit(2)


class ImageService:
    def __init__(self, *, lxd_dir: Path, db, events, ops, server, services=None):
        self.db = db
        self.events = events
        self.ops = ops
        self.server = server
        self.services = services
        self.store = ImageStore(Path(lxd_dir) / "images")
        self._finalize = asyncio.Lock()
        self._publish = asyncio.Lock()
        # Called with a fingerprint after an image is deleted (storage drops cached volumes).
        self.on_delete: list[Callable[[str], Awaitable[None]]] = []
        self._token_expiry: dict[str, asyncio.TimerHandle] = {}
        self._background: set[asyncio.Future] = set()
        self._index = ImageIndex()
        from lxd_daemon.images.remote.pull import Puller

        self.remote = Puller(self)  # pulls from image servers (images/remote/)
        self.updater = None  # images/updater.py, set by images/subsystem.py

    # -- projects --------------------------------------------------------------------------
    def effective(self, project: str) -> str:
        """The project whose images and aliases `project` uses (features.images), where its rows are."""
        projects = getattr(self.services, "projects", None)
        if projects is None:  # the service alone (unit tests): every project is its own
            return project
        return projects.effective(project, "images")

    @staticmethod
    def url(fingerprint: str, project: str) -> str:
        return f"/1.0/images/{fingerprint}{query(project)}"

    @staticmethod
    def alias_url(name: str, project: str) -> str:
        return "/1.0/images/aliases/" + quote(name, safe="/") + query(project)

    async def project_urls(self, project: str) -> list[str]:
        """The projects `providers` entry: the images a project with features.images holds."""
        if self.effective(project) != project:
            return []
        fps = await self.db.run(lambda s: list(s.scalars(
            select(_I.fingerprint).where(_I.project == project).order_by(_I.fingerprint))))
        return [self.url(fp, project) for fp in fps]

    # -- remote images ---------------------------------------------------------------------
    async def pull(self, source: dict, *, project: str, aliases=(), auto_update: bool | None = None,
                   public: bool = False, op=None, cached: bool = False, requestor: dict | None = None) -> str:
        """The image `source` (LXD's ImagesPostSource/InstanceSource: server, protocol, alias or
        fingerprint, certificate, secret, image_type) in the local store, downloaded unless present.
        Returns its fingerprint. `cached`: pulled for an instance (LXD's cached images)."""
        return await self.remote.pull(source, project=project, aliases=aliases, auto_update=auto_update,
                                      public=public, op=op, cached=cached, requestor=requestor)

    # -- files -----------------------------------------------------------------------------
    def path(self, fingerprint: str) -> Path:
        return self.store.path(fingerprint)

    async def files(self, fingerprint: str, *, project: str) -> tuple[str, bool, list[tuple[str, Path]]]:
        """(fingerprint, public, [(export file name, path)]): one file, or a split image's metadata
        and rootfs files, of the image `project` sees."""
        row = await self.locate(fingerprint, project=self.effective(project))
        fp, public, layout, compression, rootfs_format = (row.fingerprint, row.public, row.layout,
                                                          row.compression, row.rootfs_format)
        ext = formats.EXTENSIONS.get(compression, "")
        if layout != "split":
            return fp, public, [(fp + ext, self.store.path(fp))]
        return fp, public, [("meta-" + fp + ext, self.store.path(fp)),
                            (fp + formats.EXTENSIONS.get(rootfs_format, ""), self.store.rootfs_path(fp))]

    async def locate(self, fingerprint: str, *, public_only: bool = False, project: str | None) -> Located:
        """Where an image's files are, from the in-memory index (loaded on first use). `project`
        is the project the row is stored in (already effective); None: any project's row."""
        if not await self.load_index():  # a write raced with the load: ask the database directly
            return Located(*await self.db.run(self._locate, fingerprint, public_only, project))
        return self._index.resolve(fingerprint, public_only, project)

    async def load_index(self) -> bool:
        """Load the file index unless it is loaded; False when a write raced with the load."""
        if not self._index.loaded:
            generation = self._index.generation
            rows = await self.db.run(lambda session: session.execute(_LOCATE_ALL).all())
            self._index.install([Located(*r) for r in rows], generation)
        return self._index.loaded

    def rootfs_path(self, fingerprint: str) -> Path | None:
        p = self.store.rootfs_path(fingerprint)
        return p if p.exists() else None

    async def cleanup(self) -> list[str]:
        known = set(await self.db.run(lambda s: list(s.scalars(select(_I.fingerprint)))))
        return await asyncio.to_thread(self.store.cleanup, known)

    # -- reading ---------------------------------------------------------------------------
    async def _load(self, fn):
        return await self.db.run(fn)

    @staticmethod
    def _find(session, prefix: str, public_only: bool = False, *, project: str):
        """The image row (every column) of `project` (where it is stored) with this fingerprint or
        unique prefix."""
        prefix = check_prefix(prefix)
        return pick(prefix, session.execute(_prefix_query(prefix, public_only, project)).all())

    @staticmethod
    def _locate(session, prefix: str, public_only: bool = False, project: str | None = None):
        """_find's answer as a row of the columns that say where an image's files are (a prepared
        query: exports, deletes and launches need no other column). project None: any project."""
        prefix = check_prefix(prefix)
        if project is None:
            rows = session.execute(_LOCATE_ANY, {"lo": prefix, "hi": prefix + "g"}).all()
            if public_only:
                rows = [r for r in rows if r.public]
            return pick(prefix, rows)
        stmt = _LOCATE_PUBLIC if public_only else _LOCATE
        return pick(prefix, session.execute(stmt, {"lo": prefix, "hi": prefix + "g", "project": project}).all())

    @staticmethod
    def _aliases_of(session, image_id: int) -> list:
        return session.execute(select(images_aliases).where(_A.image_id == image_id)).all()

    async def get(self, fingerprint: str, *, project: str, public_only: bool = False) -> dict:
        """The image `project` sees with this fingerprint or unique prefix (NotFound, or BadRequest
        if ambiguous)."""
        eff = self.effective(project)

        def load(session):
            row = self._find(session, fingerprint, public_only, project=eff)
            return render(row, self._aliases_of(session, row.id))

        return await self.db.run(load)

    async def list(self, *, project: str, public_only: bool = False) -> list[dict]:
        eff = self.effective(project)

        def load(session):
            q = select(images).where(_I.project == eff).order_by(_I.fingerprint)
            if public_only:
                q = q.where(_I.public.is_(True))
            rows = session.execute(q).all()
            by_image: dict[int, list] = {}
            for a in session.execute(select(images_aliases).where(_A.project == eff)):
                by_image.setdefault(a.image_id, []).append(a)
            return [render(r, by_image.get(r.id, [])) for r in rows]

        return await self.db.run(load)

    async def resolve(self, name: str, *, project: str) -> dict:
        """An image `project` sees, by alias, full fingerprint or unique prefix (raises NotFound)."""
        eff = self.effective(project)

        def load(session):
            alias = session.execute(select(_A.image_id).where(_A.name == name, _A.project == eff)).first()
            if alias is not None:
                row = session.execute(select(images).where(_I.id == alias.image_id)).first()
            else:
                row = self._find(session, name, project=eff)
            return render(row, self._aliases_of(session, row.id))

        try:
            return await self.db.run(load)
        except BadRequest:
            raise
        except NotFound:
            raise NotFound(f"Image {name!r} not found") from None

    async def find_by_properties(self, properties: dict[str, str], *, project: str) -> dict:
        """The newest image `project` sees whose properties include all of these (an instance
        source by properties)."""
        if not properties:
            raise BadRequest("No image properties given")
        matches = [i for i in await self.list(project=project)
                   if all(i["properties"].get(k) == v for k, v in properties.items())]
        if not matches:
            raise NotFound("No image matches the given properties")
        return max(matches, key=lambda i: (i["created_at"], i["uploaded_at"]))

    async def mark_used(self, fingerprint: str, project: str | None = None) -> None:
        """Set last_used_at of the image `project` sees (None: the rows of every project)."""
        now = time.time()
        where = [_I.fingerprint == fingerprint]
        if project is not None:
            where.append(_I.project == self.effective(project))

        def write(session):
            if not session.execute(update(images).where(*where).values(last_used_at=now)).rowcount:
                raise NotFound("Image not found")

        await self.db.run(write)

    # -- receiving uploads --------------------------------------------------------------------
    async def receive(self, chunks: AsyncIterator[bytes], content_type: str) -> Upload:
        """Stream a request body to temp files under the store, hashing as it goes.

        Bodies up to SMALL_UPLOAD are gathered in memory and stored with one thread hop; bigger ones
        are written and hashed block by block while the rest arrives (AsyncSink). Either way the
        safety scan runs on its own thread as the chunks arrive (UploadScan)."""
        if content_type.split(";")[0].strip().lower() == "multipart/form-data":
            workdir = await asyncio.to_thread(self.store.new_workdir)
            try:
                return await self._receive_multipart(workdir, chunks, content_type)
            except BaseException:
                await asyncio.to_thread(shutil.rmtree, workdir, True)
                raise
        parts: list[bytes] = []  # a small upload, kept whole in memory
        size = 0
        temp: Path | None = None
        made: list[Path] = []
        sink: AsyncSink | None = None
        scanning = UploadScan("unified")

        def new_temp() -> Path:
            made.append(self.store.new_tempfile())
            return made[-1]

        try:
            async for chunk in chunks:
                await scanning.feed(chunk)
                if sink is not None:
                    await sink.write(chunk)
                    continue
                parts.append(chunk)
                size += len(chunk)
                if size > SMALL_UPLOAD:
                    # made to the end even if cancelled meanwhile, and kept in `made` for the undo
                    temp = await to_the_end(asyncio.to_thread(new_temp))
                    sink = AsyncSink(HashingWriter(temp))
                    for part in parts:
                        await sink.write(part)
                    parts = []
            if sink is None:
                if not size:
                    raise BadRequest("Empty image upload")
                # One join at most: a fresh megabyte costs more in page faults than in copying.
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                compression = formats.detect_compression(data[:512])
                path, fp = await asyncio.to_thread(self._store_small, data)
                return Upload(workdir=None, meta=path, rootfs=None, fingerprint=fp, size=len(data),
                              compression=compression, scans={"unified": scanning})
            await sink.finish()
            writer = sink.writer
            return Upload(workdir=None, meta=writer.path, rootfs=None,
                          fingerprint=writer.hasher.hexdigest(), size=writer.size,
                          compression=formats.detect_compression(writer.head), scans={"unified": scanning})
        except BaseException:
            scanning.abort()
            await to_the_end(self._drop_upload(sink, temp or (made[0] if made else None)))
            raise

    @staticmethod
    async def _drop_upload(sink: AsyncSink | None, temp: Path | None) -> None:
        """A failed upload's temp file goes (once its writes in flight are over)."""
        if sink is not None:
            await sink.abort()
        if temp is not None:
            await asyncio.to_thread(temp.unlink, True)

    def _store_small(self, data: bytes) -> tuple[Path, str]:
        path = self.store.new_tempfile()
        try:
            path.write_bytes(data)
            return path, hashlib.sha256(data).hexdigest()
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    async def _receive_multipart(self, workdir: Path, chunks: AsyncIterator[bytes], content_type: str) -> Upload:
        parser = MultipartParser(boundary_of(content_type))
        hasher = hashlib.sha256()
        writers: dict[str, HashingWriter] = {}
        sink: AsyncSink | None = None
        expected = ["metadata", "rootfs"]
        rootfs_name = ""
        scans: dict[str, UploadScan] = {}
        scan: UploadScan | None = None
        try:
            async for chunk in chunks:
                for ev in parser.feed(chunk):
                    if ev[0] == "begin":
                        name = ev[1]
                        if name == "rootfs.img":
                            raise BadRequest("Virtual-machine images are not supported by this server")
                        if not expected or name != expected[0]:
                            raise BadRequest("Invalid multipart image: expected the parts 'metadata' "
                                             f"then 'rootfs', got {name!r}")
                        expected.pop(0)
                        if name == "rootfs":
                            rootfs_name = ev[2]
                        writers[name] = HashingWriter(workdir / name, hasher)
                        sink = AsyncSink(writers[name])
                        kind = "meta" if name == "metadata" else "rootfs"
                        scan = scans[kind] = UploadScan(kind)
                    elif ev[0] == "data":
                        await scan.feed(ev[1])
                        await sink.write(ev[1])
                    else:
                        await sink.finish()
                        sink = None
            parser.finish()
            if expected:
                raise BadRequest(f"Invalid multipart image: missing the {expected[0]!r} part")
        except BaseException:
            for s in scans.values():
                s.abort()
            if sink is not None:
                await sink.abort()
            for w in writers.values():
                w.close()
            raise
        meta, rootfs = writers["metadata"], writers["rootfs"]
        try:
            if meta.size == 0 or rootfs.size == 0:
                raise BadRequest("Invalid multipart image: empty part")
            rootfs_format = formats.detect_compression(rootfs.head)
            meta_comp = formats.detect_compression(meta.head)
            if meta_comp == "squashfs":
                raise BadRequest("Invalid multipart image: the metadata part must be a tarball")
        except BaseException:
            for s in scans.values():
                s.abort()
            raise
        return Upload(workdir=workdir, meta=meta.path, rootfs=rootfs.path, fingerprint=hasher.hexdigest(),
                      size=meta.size + rootfs.size, compression=meta_comp, rootfs_format=rootfs_format,
                      part_filename=rootfs_name, scans=scans)

    async def check(self, upload: Upload, expected_fingerprint: str = "", *, project: str) -> None:
        """Verify fingerprint, uniqueness in `project`'s images and contents (raises, the caller
        discards)."""
        if expected_fingerprint and expected_fingerprint.lower() != upload.fingerprint:
            raise BadRequest(f"Fingerprint mismatch: got {upload.fingerprint}, expected {expected_fingerprint}")
        if upload.compression == "squashfs" and upload.rootfs is None:
            raise BadRequest("Unified squashfs images are not supported: upload a metadata tarball "
                             "and a squashfs root filesystem")
        # The duplicate check and the content scan run side by side; a duplicate is reported first.
        scans, upload.scans = upload.scans, {}
        scan = asyncio.ensure_future(self._scan_result(upload, dict(scans)))
        try:
            await self._check_new(upload.fingerprint, project)
        except BaseException:
            for s in scans.values():
                s.abort()
            with contextlib.suppress(Exception):
                await scan
            raise
        upload.scan = await scan
        upload.metadata = upload.scan.metadata or {}

    async def _scan_result(self, upload: Upload, scans: dict[str, UploadScan]) -> tarscan.ScanResult:
        """The scans that ran during the upload; a part they could not scan is read from its file."""
        async def one(kind: str, path: Path, compression: str) -> tarscan.ScanResult:
            scan = scans.pop(kind, None)
            if scan is not None and (result := await scan.finish()) is not None:
                return result
            if compression == "squashfs":
                return await asyncio.to_thread(tarscan.scan_squashfs, path)
            return await asyncio.to_thread(tarscan.scan_tarball, path, compression, kind)

        try:
            if upload.rootfs is None:
                return await one("unified", upload.meta, upload.compression)
            meta, _ = await asyncio.gather(one("meta", upload.meta, upload.compression),
                                           one("rootfs", upload.rootfs, upload.rootfs_format))
            return meta
        finally:
            for scan in scans.values():  # not reached when another part failed first
                scan.abort()

    def _check_profiles(self, names: list[str] | None, project: str) -> None:
        """An image's profiles are applied to instances launched from it: they must exist (in the
        profiles `project` uses)."""
        profiles = getattr(self.services, "profiles", None)
        if names is None or profiles is None:
            return
        in_project = getattr(profiles, "in_project", None)
        known = in_project(project) if in_project is not None else getattr(profiles, "profiles", None)
        if known is None:
            return
        for name in names:
            if name not in known:
                raise BadRequest(f"Profile {name!r} doesn't exist")
        if len(set(names)) != len(names):
            raise BadRequest("Duplicate profile found in request")

    async def _check_new(self, fingerprint: str, project: str) -> None:
        """Refuse a duplicate in the images `project` sees early (add() checks again inside its
        transaction)."""
        eff = self.effective(project)
        if await self.load_index():
            exists = self._index.has(fingerprint, eff)
        else:
            exists = await self.db.run(lambda session: session.execute(
                _IMAGE_BY_FP, {"fp": fingerprint, "project": eff}).first()) is not None
        if exists:
            raise Conflict(f"Image with same fingerprint already exists: {fingerprint}")

    async def add(self, upload: Upload, *, project: str, **kw) -> dict:
        """Store a checked upload and create its record and aliases in the images `project` sees,
        all or nothing (_add), never in a project being deleted."""
        with making(getattr(self.services, "projects", None), self.effective(project)):
            return await self._add(upload, project=project, **kw)

    async def share(self, fingerprint: str, *, project: str, **kw) -> None:
        with making(getattr(self.services, "projects", None), self.effective(project)):
            await self._share(fingerprint, project=project, **kw)

    async def _add(self, upload: Upload, *, project: str, filename: str = "", public: bool = False,
                  properties: dict[str, str] | None = None, aliases: list[dict] | None = None,
                  profiles: list[str] | None = None, expires_at: float | None = None,
                  auto_update: bool = False, cached: bool = False, source: dict | None = None,
                  requestor: dict | None = None) -> dict:
        """Store a checked upload and create its record and aliases in the images `project` sees,
        all or nothing. Files another project's row already has are shared, not stored twice."""
        eff = self.effective(project)
        meta = upload.metadata
        props = dict(meta.get("properties") or {})
        props.update(properties or {})
        for a in aliases or []:
            check_alias_name(a.get("name", ""))
        self._check_profiles(profiles, project)
        now = time.time()
        values = dict(
            fingerprint=upload.fingerprint, project=eff, filename=filename, size=upload.size,
            architecture=meta.get("architecture", ""), type="container",
            layout="unified" if upload.rootfs is None else "split", rootfs_format=upload.rootfs_format,
            compression=upload.compression,
            properties=json.dumps(props), profiles=json.dumps(profiles if profiles is not None else ["default"]),
            public=public, auto_update=auto_update, cached=cached,
            created_at=float(meta.get("creation_date") or 0),
            expires_at=expires_at if expires_at is not None else float(meta.get("expiry_date") or 0),
            uploaded_at=now, last_used_at=None,
            source_server=None, source_protocol=None, source_certificate=None, source_alias=None,
            source_image_type=None,
        )
        if source:
            values.update(source_server=source.get("server"), source_protocol=source.get("protocol"),
                          source_certificate=source.get("certificate"), source_alias=source.get("alias"),
                          source_image_type=source.get("image_type"))
        new_aliases = [SimpleNamespace(name=a["name"], description=a.get("description", "")) for a in aliases or []]

        def insert(conn):
            # On the database thread, which serialises every import: check, move the files into
            # place, write the rows. A failure removes the files again (the rows roll back).
            try:
                if conn.execute(_IMAGE_BY_FP, {"fp": upload.fingerprint, "project": eff}).first():
                    raise Conflict(f"Image with same fingerprint already exists: {upload.fingerprint}")
                shared = conn.execute(_ANY_BY_FP, {"fp": upload.fingerprint}).first() is not None
                if not shared:  # else another project's row has the same files: upload.discard()
                    self.store.install(upload.fingerprint, upload.meta, upload.rootfs)
                try:
                    image_id = conn.execute(_INSERT_IMAGE, values).inserted_primary_key[0]
                    for a in new_aliases:
                        if conn.execute(_ALIAS_BY_NAME, {"name": a.name, "project": eff}).first():
                            raise Conflict(f"Alias already exists: {a.name}")
                        conn.execute(_INSERT_ALIAS, {"project": eff, "name": a.name, "image_id": image_id,
                                                     "description": a.description})
                    located = Located(image_id, upload.fingerprint, public, values["layout"],
                                      upload.compression, upload.rootfs_format, eff)
                    return render(SimpleNamespace(**values), new_aliases), located
                except BaseException:
                    if not shared:
                        self.store.remove(upload.fingerprint)
                    raise
            finally:
                upload.discard()

        async with self._finalize:  # not between a delete's row removal and its file removal
            img, located = await self.db.run(insert)
            self._index.put(located)
        self.events.lifecycle("image-created", self.url(img["fingerprint"], project), {"type": img["type"]},
                              requestor=requestor, project=project)
        for a in aliases or []:
            self.events.lifecycle("image-alias-created", self.alias_url(a["name"], project),
                                  {"target": img["fingerprint"]}, requestor=requestor, project=project)
        log.info("image added", extra={"fingerprint": img["fingerprint"], "size": img["size"]})
        return img

    async def _share(self, fingerprint: str, *, project: str, public: bool = False, auto_update: bool = False,
                    cached: bool = False, source: dict | None = None, requestor: dict | None = None) -> None:
        """A row in the images `project` uses for an image whose files another project's row has
        (a pull of an image the store holds already): the files are not stored twice."""
        eff = self.effective(project)
        now = time.time()

        def insert(conn):
            if conn.execute(_IMAGE_BY_FP, {"fp": fingerprint, "project": eff}).first():
                raise Conflict(f"Image with same fingerprint already exists: {fingerprint}")
            src = conn.execute(select(images).where(_I.fingerprint == fingerprint).limit(1)).first()
            if src is None:
                raise NotFound("Image not found")
            values = {k: v for k, v in src._mapping.items() if k != "id"}
            values.update(project=eff, public=public, auto_update=auto_update, cached=cached, uploaded_at=now,
                          last_used_at=None, profiles=json.dumps(["default"]), source_server=None,
                          source_protocol=None, source_certificate=None, source_alias=None,
                          source_image_type=None)
            if source:
                values.update(source_server=source.get("server"), source_protocol=source.get("protocol"),
                              source_certificate=source.get("certificate"), source_alias=source.get("alias"),
                              source_image_type=source.get("image_type"))
            image_id = conn.execute(_INSERT_IMAGE, values).inserted_primary_key[0]
            return Located(image_id, fingerprint, public, values["layout"], values["compression"],
                           values["rootfs_format"], eff), values["type"]

        async with self._finalize:  # not between a delete's row removal and its file removal
            located, itype = await self.db.run(insert)
            self._index.put(located)
        self.events.lifecycle("image-created", self.url(fingerprint, project), {"type": itype},
                              requestor=requestor, project=project)

    # -- updates ---------------------------------------------------------------------------
    async def update(self, fingerprint: str, *, project: str, values: dict[str, Any], replace: bool,
                     if_match: Callable[[str], None] | None = None, requestor: dict | None = None) -> None:
        """PUT (replace=True: every field) or PATCH (only the given fields; properties merge)."""
        self._check_profiles(values.get("profiles"), project)
        eff = self.effective(project)

        def write(session):
            row = self._find(session, fingerprint, project=eff)
            current = render(row, [])
            if if_match is not None:
                if_match(image_etag(current))
            changes: dict[str, Any] = {}
            if replace or "public" in values:
                changes["public"] = bool(values.get("public", False))
            if replace or "auto_update" in values:
                changes["auto_update"] = bool(values.get("auto_update", False))
            if "properties" in values or replace:
                props = values.get("properties") or {}
                if not replace:
                    props = {**current["properties"], **props}
                changes["properties"] = json.dumps(props)
            expires = parse_time(values.get("expires_at"))
            if expires is not None:  # LXD keeps the current expiry when given the zero time
                changes["expires_at"] = expires
            if replace or "profiles" in values:
                profiles = values.get("profiles")
                changes["profiles"] = json.dumps(profiles if profiles is not None else ["default"])
            if changes:
                session.execute(update(images).where(_I.id == row.id).values(changes))
            return row.fingerprint

        try:
            fp = await self.db.run(write)
        finally:
            self._index.invalidate()  # the public flag may have changed
        self.events.lifecycle("image-updated", self.url(fp, project), requestor=requestor, project=project)

    async def delete(self, fingerprint: str, *, project: str, requestor: dict | None = None) -> None:
        """Delete the image `project` sees. Its files (and the storage's image volumes and caches,
        the on_delete hooks) go with the last project's row of that fingerprint."""
        eff = self.effective(project)

        def remove(session):
            row = self._locate(session, fingerprint, False, eff)
            session.execute(_DELETE_IMAGE, {"id": row.id})  # its aliases go by cascade
            return row.fingerprint, session.execute(_ANY_BY_FP, {"fp": row.fingerprint}).first() is None

        async with self._finalize:
            fp, last = await self.db.run(remove)
            self._index.drop(fp, eff)
            retired = await asyncio.to_thread(self.store.retire, fp) if last else []
        if last:
            # Unlinking happens in the background: the image is gone once its row and names are.
            task = asyncio.ensure_future(asyncio.to_thread(_unlink_all, retired))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            for hook in self.on_delete:
                try:
                    await hook(fp)
                except Exception:
                    log.exception("image delete hook failed", extra={"fingerprint": fp})
        self.events.lifecycle("image-deleted", self.url(fp, project), requestor=requestor, project=project)

    async def drain(self) -> None:
        """Wait for background file removals (at exit, and for tests)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # -- aliases ---------------------------------------------------------------------------
    @staticmethod
    def _alias_dict(name: str, description: str, image) -> dict:
        return {"name": name, "description": description, "target": image.fingerprint, "type": image.type}

    async def list_aliases(self, *, project: str, public_only: bool = False) -> list[dict]:
        eff = self.effective(project)

        def load(session):
            q = _ALIAS_JOIN.where(_A.project == eff).order_by(_A.name)
            if public_only:
                q = q.where(_I.public.is_(True))
            return [self._alias_dict(r.name, r.description, r) for r in session.execute(q)]

        return await self.db.run(load)

    @staticmethod
    def _get_alias(session, name: str, public_only: bool = False, *, project: str):
        """The alias row of `project` (where it is stored) joined with its image's columns (_ALIAS_JOIN)."""
        row = session.execute(_ALIAS_JOIN.where(_A.name == name, _A.project == project)).first()
        if row is None or (public_only and not row.public):
            raise NotFound("Image alias not found")
        return row

    async def get_alias(self, name: str, *, project: str, public_only: bool = False) -> dict:
        eff = self.effective(project)

        def load(session):
            a = self._get_alias(session, name, public_only, project=eff)
            return self._alias_dict(a.name, a.description, a)

        return await self.db.run(load)

    async def create_alias(self, name: str, target: str, description: str = "", *, project: str,
                           requestor: dict | None = None) -> dict:
        check_alias_name(name)
        if not target:
            raise BadRequest("name and target are required")
        eff = self.effective(project)

        def write(session):
            if session.execute(_ALIAS_BY_NAME, {"name": name, "project": eff}).first():
                raise Conflict(f"Alias {name!r} already exists")
            img = self._find(session, target, project=eff)
            session.execute(_INSERT_ALIAS, {"project": eff, "name": name, "image_id": img.id,
                                            "description": description})
            return self._alias_dict(name, description, img)

        alias = await self.db.run(write)
        self.events.lifecycle("image-alias-created", self.alias_url(name, project),
                              {"target": alias["target"]}, requestor=requestor, project=project)
        return alias

    async def update_alias(self, name: str, values: dict[str, Any], *, project: str, replace: bool,
                           if_match: Callable[[str], None] | None = None, requestor: dict | None = None) -> None:
        if replace and not values.get("target"):
            raise BadRequest("The target field is required")
        eff = self.effective(project)

        def write(session):
            a = self._get_alias(session, name, project=eff)
            if if_match is not None:
                if_match(alias_etag(self._alias_dict(a.name, a.description, a)))
            target = a.fingerprint
            changes: dict[str, Any] = {}
            if values.get("target") is not None and (replace or "target" in values):
                img = self._find(session, values["target"], project=eff)
                changes["image_id"], target = img.id, img.fingerprint
            if replace or "description" in values:
                changes["description"] = values.get("description") or ""
            if changes:
                session.execute(update(images_aliases).where(_A.id == a.id).values(changes))
            return target

        target = await self.db.run(write)
        self.events.lifecycle("image-alias-updated", self.alias_url(name, project), {"target": target},
                              requestor=requestor, project=project)

    async def rename_alias(self, name: str, new_name: str, *, project: str, requestor: dict | None = None) -> None:
        check_alias_name(new_name)
        eff = self.effective(project)

        def write(session):
            if session.execute(_ALIAS_BY_NAME, {"name": new_name, "project": eff}).first():
                raise Conflict(f"Alias {new_name!r} already exists")
            a = self._get_alias(session, name, project=eff)
            session.execute(update(images_aliases).where(_A.id == a.id).values(name=new_name))

        await self.db.run(write)
        self.events.lifecycle("image-alias-renamed", self.alias_url(new_name, project), {"old_name": name},
                              requestor=requestor, project=project)

    async def delete_alias(self, name: str, *, project: str, requestor: dict | None = None) -> None:
        eff = self.effective(project)

        def write(session):
            a = self._get_alias(session, name, project=eff)
            session.execute(delete(images_aliases).where(_A.id == a.id))

        await self.db.run(write)
        self.events.lifecycle("image-alias-deleted", self.alias_url(name, project), requestor=requestor,
                              project=project)

    # -- secrets (one-use download tokens) -----------------------------------------------------
    def create_secret(self, fingerprint: str, *, project: str, requestor: dict | None = None):
        import secrets as _secrets

        from lxd_daemon.ops.manager import CLASS_TOKEN

        secret = _secrets.token_hex(32)
        op = self.ops.create(cls=CLASS_TOKEN, description="Image download token",
                             resources={"images": [self.url(fingerprint, project)]},
                             metadata={"secret": secret, "fingerprint": fingerprint, "project": project},
                             may_cancel=True, project=project)
        self.events.lifecycle("image-secret-created", self.url(fingerprint, project), requestor=requestor,
                              project=project)
        return op

    def secret_project(self, secret: str | None) -> str | None:
        """The project of the request that made a live download token (an untrusted caller with
        it sees that project's image), or None."""
        if not secret:
            return None
        from lxd_daemon.ops.manager import CLASS_TOKEN

        op = self.ops.find(lambda o: o.cls == CLASS_TOKEN and not o.status.final and o.metadata
                           and o.metadata.get("secret") == secret and "fingerprint" in o.metadata)
        if op is None:
            return None
        return op.metadata.get("project") or "default"

    def use_secret(self, fingerprint: str, secret: str | None) -> bool:
        """True if secret is a live token for this image; it then expires 5 s after first use."""
        if not secret:
            return False
        from lxd_daemon.ops.manager import CLASS_TOKEN

        op = self.ops.find(lambda o: o.cls == CLASS_TOKEN and not o.status.final and o.metadata
                           and o.metadata.get("secret") == secret
                           and o.metadata.get("fingerprint") == fingerprint)
        if op is None:
            return False
        if op.id not in self._token_expiry:
            loop = asyncio.get_running_loop()

            def expire():
                self._token_expiry.pop(op.id, None)
                if not op.status.final:
                    from lxd_daemon.ops.manager import Status

                    op.set_status(Status.CANCELLED, "Token used")

            self._token_expiry[op.id] = loop.call_later(5.0, expire)
        return True

    # -- unpacking -------------------------------------------------------------------------
    async def unpack(self, fingerprint: str, dest: Path, *, uid_shift: int = 0, gid_shift: int = 0) -> dict:
        """Create dest/rootfs (ids shifted), dest/metadata.yaml and dest/templates from an image."""
        from lxd_daemon.images.unpack import unpack

        row = await self.locate(fingerprint, project=None)  # the files are shared by every project's row
        fp, layout, rootfs_format = row.fingerprint, row.layout, row.rootfs_format
        rootfs = self.store.rootfs_path(fp) if layout == "split" else None
        return await asyncio.to_thread(unpack, self.store.path(fp), rootfs, rootfs_format, Path(dest),
                                       uid_shift=uid_shift, gid_shift=gid_shift)

    # -- publishing ------------------------------------------------------------------------
    def compression_default(self) -> str:
        return self.server.config.get("images.compression_algorithm") or "gzip"

    async def publish(self, op, *, project: str, source_type: str, name: str, compression: str, filename: str,
                      public: bool, properties: dict[str, str] | None, aliases: list[dict],
                      expires_at: float | None, profiles: list[str] | None,
                      requestor: dict | None = None) -> dict:
        from lxd_daemon.images.publish import build_image

        instances = self.services.instances if self.services is not None else None
        if instances is None:
            raise BadRequest("instances are not available")
        for a in aliases:
            check_alias_name(a.get("name", ""))
        # The instance (or `instance/snapshot`) of the caller's project; the image lands in the
        # images that project uses.
        parent, sep, snap = name.partition("/")
        key = instances.lookup(project, parent).key + sep + snap
        async with self._publish:
            workdir = await asyncio.to_thread(self.store.new_workdir)
            try:
                async with instances.frozen_rootfs(key) as src:
                    def progress(done: int, total: int, speed: float) -> None:
                        pct = int(done * 100 / total) if total else 0
                        stage = "create_image_from_container_pack"
                        meta = {"progress": {"stage": stage, "percent": str(pct), "processed": str(done),
                                             "speed": str(int(speed))}}
                        meta[f"{stage}_progress"] = f"Image pack: {pct}% ({format_rate(speed)}/s)"
                        loop.call_soon_threadsafe(op.update_metadata, meta)

                    loop = asyncio.get_running_loop()
                    built = await asyncio.to_thread(build_image, src, workdir, compression=compression,
                                                    properties=properties, progress=progress)
                upload = Upload(workdir=workdir, meta=built.path, rootfs=None, fingerprint=built.fingerprint,
                                size=built.size, compression=compression, metadata=built.metadata)
                try:
                    await self._check_new(upload.fingerprint, project)
                except Conflict:
                    raise Conflict(f"The image already exists: {upload.fingerprint}") from None
                img = await self.add(upload, project=project, filename=filename, public=public, properties=None,
                                     aliases=aliases, profiles=profiles, expires_at=expires_at,
                                     requestor=requestor)
            except BaseException:
                await asyncio.to_thread(shutil.rmtree, workdir, True)
                raise
        return img


def _unlink_all(paths: list[Path]) -> None:
    for p in paths:
        try:
            p.unlink()
        except OSError:
            log.warning("could not remove a deleted image file", extra={"path": str(p)})


__all__ = ["ImageService", "Upload", "render", "image_etag", "alias_etag", "check_alias_name"]
