"""The image service in process: real SQLite (migrated), real event hub and operations.

Publishing needs an instance; the instances service is replaced by the smallest object with its
`frozen_rootfs()` contract. The real end-to-end publish (`lxc publish`) is in the instances tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from lxd_daemon.db import Database, migrate
from lxd_daemon.errors import BadRequest, Conflict, NotFound
from lxd_daemon.events import EventHub
from lxd_daemon.images.service import ImageService
from lxd_daemon.ops import OperationManager
from lxd_daemon.server.config import ServerConfig
from tests.unit.test_images_formats import make_image

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown)")


class FakeInstances:
    def __init__(self, base: Path):
        self.base = base

    @staticmethod
    def lookup(project: str, name: str):
        if (project, name) != ("default", "c1"):
            raise NotFound("Instance not found")
        return SimpleNamespace(key=name)

    @contextlib.asynccontextmanager
    async def frozen_rootfs(self, name: str):
        if name != "c1":
            raise NotFound("Instance not found")
        yield SimpleNamespace(rootfs=self.base / "rootfs", metadata_dir=self.base, uid_shift=100000,
                              gid_shift=100000)


@pytest.fixture
def env(tmp_path):
    db_path = tmp_path / "lxd.db"
    migrate.upgrade(db_path)
    db = Database(db_path)
    events = EventHub()
    services = SimpleNamespace(instances=None)
    svc = ImageService(lxd_dir=tmp_path, db=db, events=events, ops=OperationManager(events),
                       server=SimpleNamespace(config=ServerConfig({"images.compression_algorithm": "xz"})),
                       services=services)
    yield SimpleNamespace(svc=svc, db=db, events=events, services=services, tmp=tmp_path)
    db.close()


async def _chunks(data: bytes, size: int = 65536):
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def _import(svc: ImageService, path: Path, **kw) -> dict:
    upload = await svc.receive(_chunks(path.read_bytes()), "application/octet-stream")
    try:
        await svc.check(upload, project=kw.get("project", "default"))
    except BaseException:
        upload.discard()
        raise
    return await svc.add(upload, **{"project": "default", **kw})


def test_import_resolve_unpack_and_delete(env):
    async def main():
        svc = env.svc
        listener = env.events.subscribe(["lifecycle"])
        env.events.bind_loop(asyncio.get_running_loop())
        path = make_image(env.tmp / "a.tar.gz")
        img = await _import(svc, path, aliases=[{"name": "x/y"}],
                            properties={"extra": "1"})
        fp = img["fingerprint"]
        assert img["properties"] == {"os": "busybox", "release": "1", "extra": "1"}
        assert (await svc.resolve("x/y", project="default"))["fingerprint"] == fp
        assert (await svc.resolve(fp[:10], project="default"))["fingerprint"] == fp
        assert (await svc.find_by_properties({"os": "busybox"}, project="default"))["fingerprint"] == fp
        with pytest.raises(NotFound):
            await svc.resolve("nope", project="default")
        with pytest.raises(NotFound):
            await svc.find_by_properties({"os": "other"}, project="default")
        await svc.mark_used(fp)
        assert (await svc.get(fp, project="default"))["last_used_at"] != "0001-01-01T00:00:00Z"
        dest = env.tmp / "inst"
        meta = await svc.unpack(fp, dest)
        assert meta["architecture"] == "x86_64" and (dest / "rootfs" / "bin" / "hello").is_file()
        with pytest.raises(Conflict, match=fp):
            await _import(svc, path)
        seen = []
        svc.on_delete.append(lambda f: asyncio.sleep(0, seen.append(f)))
        await svc.delete(fp[:12], project="default")
        assert seen == [fp]
        await svc.drain()
        assert sorted(os.listdir(env.tmp / "images")) == []
        with pytest.raises(NotFound):
            await svc.get_alias("x/y", project="default")
        actions = []
        while not listener.queue.empty():
            actions.append(__import__("json").loads(await listener.queue.get())["metadata"]["action"])
        assert actions == ["image-created", "image-alias-created", "image-deleted"]

    asyncio.run(main())


def test_the_file_index_follows_every_write(env):
    async def main():
        svc = env.svc
        one = await _import(svc, make_image(env.tmp / "a.tar.gz"))
        fp = one["fingerprint"]
        assert (await svc.locate(fp[:6], project="default")).public is False  # loads the index
        with pytest.raises(NotFound):
            await svc.locate(fp, public_only=True, project="default")
        await svc.update(fp, project="default", values={"public": True}, replace=False)
        assert (await svc.locate(fp, public_only=True, project="default")).fingerprint == fp
        two = await _import(svc, make_image(env.tmp / "b.tar.xz", compression="xz"))
        located = await svc.locate(two["fingerprint"], project="default")
        assert (located.compression, located.layout) == ("xz", "unified")
        _, _, files = await svc.files(two["fingerprint"], project="default")
        assert files[0][0].endswith(".tar.xz") and files[0][1].is_file()
        common = os.path.commonprefix([fp, two["fingerprint"]])
        with pytest.raises(BadRequest if common else NotFound):
            await svc.locate(common or "g", project="default")
        await svc.delete(fp, project="default")
        with pytest.raises(NotFound):
            await svc.files(fp, project="default")
        # A load that races with a write is not installed; the answer comes from the database.
        svc._index.invalidate()
        generation = svc._index.generation
        svc._index.put(located)
        svc._index.install([], generation)
        assert not svc._index.loaded
        assert (await svc.locate(two["fingerprint"][:8], project="default")).fingerprint == two["fingerprint"]

    asyncio.run(main())


def test_alias_rules(env):
    async def main():
        svc = env.svc
        img = await _import(svc, make_image(env.tmp / "b.tar.gz"))
        await svc.create_alias("one", img["fingerprint"][:8], project="default")
        with pytest.raises(Conflict):
            await svc.create_alias("one", img["fingerprint"], project="default")
        for bad in ("", "../x", "a:b", "x\n"):
            with pytest.raises(BadRequest):
                await svc.create_alias(bad, img["fingerprint"], project="default")
        for good in ("a//b", "a/b/"):  # empty components are fine, as in LXD (`lxc image alias create a/b/`)
            await svc.create_alias(good, img["fingerprint"], project="default")
            await svc.delete_alias(good, project="default")
        await svc.rename_alias("one", "two/three", project="default")
        with pytest.raises(NotFound):
            await svc.get_alias("one", project="default")
        await svc.update_alias("two/three", {"description": "d"}, project="default", replace=False)
        assert (await svc.get_alias("two/three", project="default"))["description"] == "d"
        with pytest.raises(BadRequest, match="target"):
            await svc.update_alias("two/three", {"description": "d"}, project="default", replace=True)

    asyncio.run(main())


@root_only
def test_publish_through_the_frozen_rootfs_contract(env):
    base = env.tmp / "c1"
    (base / "rootfs" / "etc").mkdir(parents=True)
    (base / "rootfs" / "etc" / "hostname").write_text("c1\n")
    for p in (base / "rootfs", base / "rootfs" / "etc", base / "rootfs" / "etc" / "hostname"):
        os.chown(p, 100000, 100000)

    async def main():
        svc = env.svc
        op = SimpleNamespace(update_metadata=lambda m: None)
        kw = dict(project="default", source_type="instance", name="c1", compression="gzip", filename="c1.tar.gz", public=True,
                  properties={"os": "published"}, aliases=[{"name": "pub"}], expires_at=None, profiles=None)
        with pytest.raises(BadRequest, match="instances are not available"):
            await svc.publish(op, **kw)
        env.services.instances = FakeInstances(base)
        img = await svc.publish(op, **kw)
        assert img["public"] and img["properties"] == {"os": "published"} and img["filename"] == "c1.tar.gz"
        assert [a["name"] for a in img["aliases"]] == ["pub"]
        with tarfile.open(svc.path(img["fingerprint"])) as tf:
            assert tf.getmember("rootfs/etc/hostname").uid == 0
        assert svc.compression_default() == "xz"
        with pytest.raises(NotFound):
            await svc.publish(op, **{**kw, "name": "c2", "aliases": []})
        assert [n for n in os.listdir(env.tmp / "images") if n.startswith("tmp-")] == []

    asyncio.run(main())


def test_migration_matches_the_models(tmp_path):
    """The migrations are the schema's source of truth; the Core tables must agree with them."""
    import sqlite3

    from lxd_daemon.db.models import certificates, config, projects
    from lxd_daemon.images.models import images, images_aliases

    db_path = tmp_path / "schema.db"
    migrate.upgrade(db_path)
    con = sqlite3.connect(db_path)
    try:
        for table in (config, certificates, projects, images, images_aliases):
            cols = {r[1]: (r[3], r[5]) for r in con.execute(f"PRAGMA table_info({table.name})")}
            assert set(cols) == {c.name for c in table.columns}, table.name
            for c in table.columns:
                assert bool(cols[c.name][0]) == (not c.nullable) or c.primary_key, (table.name, c.name)
                assert bool(cols[c.name][1]) == c.primary_key, (table.name, c.name)
    finally:
        con.close()


def test_failed_uploads_leave_no_scan_running(env):
    from lxd_daemon.images import pipeline

    async def broken(data: bytes):
        yield data[: len(data) // 2]
        raise ConnectionResetError("client went away")

    async def main():
        svc = env.svc
        data = make_image(env.tmp / "a.tar.gz", extra=[{"name": "rootfs/r", "data": os.urandom(200_000)}]).read_bytes()
        with pytest.raises(ConnectionResetError):
            await svc.receive(broken(data), "application/octet-stream")
        boundary = "b0undary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"metadata\"; filename=\"m\"\r\n\r\n".encode()
                + data + f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"rootfs\"; "
                "filename=\"r\"\r\n\r\n".encode() + b"\r\n--" + boundary.encode() + b"--\r\n")
        with pytest.raises(BadRequest, match="empty part"):
            await svc.receive(_chunks(body), f"multipart/form-data; boundary={boundary}")
        upload = await svc.receive(_chunks(data), "application/octet-stream")
        with pytest.raises(BadRequest, match="mismatch"):
            await svc.check(upload, "0" * 64, project="default")
        upload.discard()
        for _ in range(100):
            if not pipeline.running():
                break
            await asyncio.sleep(0.02)
        assert pipeline.running() == 0

    asyncio.run(main())


def test_one_image_in_two_projects_shares_its_files(env):
    """Rows per project (UNIQUE(project, fingerprint)); the files go with the last row."""
    async def main():
        svc = env.svc
        seen = []
        svc.on_delete.append(lambda f: asyncio.sleep(0, seen.append(f)))
        path = make_image(env.tmp / "a.tar.gz")
        one = await _import(svc, path, aliases=[{"name": "b"}])
        fp = one["fingerprint"]
        with pytest.raises(NotFound):
            await svc.get(fp, project="p1")
        with pytest.raises(NotFound):
            await svc.resolve("b", project="p1")
        two = await _import(svc, path, project="p1", aliases=[{"name": "b"}])
        assert two["fingerprint"] == fp
        with pytest.raises(Conflict):
            await _import(svc, path, project="p1")
        assert [i["fingerprint"] for i in await svc.list(project="p1")] == [fp]
        assert (await svc.resolve("b", project="p1"))["fingerprint"] == fp
        await svc.update(fp, project="p1", values={"public": True}, replace=False)
        assert (await svc.get(fp, project="p1"))["public"] and not (await svc.get(fp, project="default"))["public"]
        await svc.delete(fp, project="default")
        await svc.drain()
        assert seen == [] and svc.path(fp).is_file()
        with pytest.raises(NotFound):
            await svc.get(fp, project="default")
        assert (await svc.locate(fp, project=None)).project == "p1"
        assert (await svc.get_alias("b", project="p1"))["target"] == fp
        op = svc.create_secret(fp, project="p1")  # an untrusted caller with it sees p1's image
        assert svc.secret_project(op.metadata["secret"]) == "p1" and svc.secret_project("nope") is None
        assert op.project == "p1" and op.resources == {"images": [f"/1.0/images/{fp}?project=p1"]}
        await svc.delete(fp, project="p1")
        await svc.drain()
        assert seen == [fp] and not svc.path(fp).exists()

    asyncio.run(main())


def test_pulls_land_in_the_callers_project(env):
    """A pull into p1 of an image default has: a row of p1's own over the same files, no download;
    one default doesn't have: downloaded into p1 only."""
    import hashlib
    import shutil

    from lxd_daemon.images.remote.client import Fetched, RemoteInfo

    path = make_image(env.tmp / "a.tar.gz")
    other = make_image(env.tmp / "b.tar.xz", compression="xz")
    downloads = []

    class Remote:
        server, protocol = "https://example.invalid", "simplestreams"

        async def download(self, info, workdir, report):
            src = path if info.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest() else other
            downloads.append(info.fingerprint)
            dest = workdir / "image.tar"
            shutil.copy(src, dest)
            return Fetched(meta=dest, rootfs=None, fingerprint=info.fingerprint, size=dest.stat().st_size)

    async def main():
        svc = env.svc
        fp = (await _import(svc, path))["fingerprint"]
        got = await svc.remote.obtain(Remote(), RemoteInfo(fp), "bb", project="p1", aliases=[{"name": "bb"}])
        assert got == fp and downloads == []
        assert (await svc.resolve("bb", project="p1"))["update_source"]["alias"] == "bb"
        with pytest.raises(NotFound):
            await svc.resolve("bb", project="default")
        fp2 = hashlib.sha256(other.read_bytes()).hexdigest()
        assert await svc.remote.obtain(Remote(), RemoteInfo(fp2), fp2, project="p1", cached=True) == fp2
        assert downloads == [fp2] and (await svc.get(fp2, project="p1"))["cached"]
        with pytest.raises(NotFound):
            await svc.get(fp2, project="default")
        await svc.delete(fp, project="p1")
        await svc.drain()
        assert svc.path(fp).is_file()  # default's row keeps the files

    asyncio.run(main())
