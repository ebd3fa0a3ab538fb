"""The two kinds of image servers: simplestreams trees and LXD's own API (`lxd` protocol).

Each resolves a name (alias, fingerprint or prefix) to a `RemoteInfo` and downloads its files into
a work directory the caller owns, checking every sha256 before it returns. Nothing here touches
the image store: the caller turns a `Fetched` into an image (remote/pull.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from lxd_daemon.errors import BadRequest, NotFound
from lxd_daemon.images.multipart import MultipartParser, boundary_of
from lxd_daemon.images.remote import http
from lxd_daemon.images.remote.simplestreams import Catalogue, RemoteImage, catalogue, product_paths
from lxd_daemon.util.timefmt import parse_rfc3339

Report = Callable[[str], None]


@dataclass
class RemoteInfo:
    fingerprint: str
    properties: dict[str, str] = field(default_factory=dict)
    filename: str = ""
    architecture: str = ""
    aliases: list[dict] = field(default_factory=list)
    public: bool = True
    type: str = "container"
    created_at: float | None = None
    expires_at: float | None = None
    size: int = 0
    ss: RemoteImage | None = None  # the simplestreams entry


@dataclass
class Fetched:
    """Downloaded and verified files in a work directory."""

    meta: Path
    rootfs: Path | None
    fingerprint: str
    size: int
    rootfs_name: str = ""
    # The content scans that ran during the download, by kind ("unified", or "meta" and "rootfs").
    scans: dict = field(default_factory=dict)


def _abort(scans: dict) -> None:
    for scan in scans.values():
        scan.abort()


class TamperedImage(BadRequest):
    pass


def _check(what: str, got: str, expected: str) -> None:
    if got != expected:
        raise TamperedImage(f"Image download failed: sha256 mismatch for {what} (got {got}, expected {expected})")


def _time(value) -> float | None:
    if not value or not isinstance(value, str) or value.startswith("0001-01-01"):
        return None
    try:
        return parse_rfc3339(value)
    except ValueError:
        return None


class SimpleStreamsRemote:
    protocol = "simplestreams"

    def __init__(self, server: str, certificate: str = ""):
        self.server = http.base_url(server)
        self.certificate = certificate

    async def catalogue(self) -> Catalogue:
        async with http.client(self.server, self.certificate) as c:
            index = await http.get_json(c, "/streams/v1/index.json")
            products = {}
            for path in product_paths(index):
                products[path] = await http.get_json(c, "/" + path.lstrip("/"))
        return catalogue(index, products)

    async def resolve(self, name: str, image_type: str = "") -> RemoteInfo:
        if image_type not in ("", "container"):
            raise BadRequest(f"Image type {image_type!r} is not supported by this server")
        img = (await self.catalogue()).resolve(name)
        return RemoteInfo(fingerprint=img.fingerprint, properties=dict(img.properties), filename=img.filename,
                          architecture=img.architecture, aliases=[{"name": a, "description": ""} for a in img.aliases],
                          created_at=img.created_at, expires_at=img.expires_at, size=img.size, ss=img)

    async def download(self, info: RemoteInfo, workdir: Path, report: Report | None) -> Fetched:
        img = info.ss
        assert img is not None
        scans: dict = {}
        try:
            return await self._download(img, workdir, report, scans)
        except BaseException:
            _abort(scans)
            raise

    async def _download(self, img: RemoteImage, workdir: Path, report: Report | None, scans: dict) -> Fetched:
        from lxd_daemon.images.pipeline import UploadScan

        combined = hashlib.sha256()
        paths: list[Path] = []
        sizes = 0
        for f in img.files:
            label = "metadata" if f.kind == "meta" else "rootfs"
            target = workdir / label
            kind = "unified" if len(img.files) == 1 else ("meta" if f.kind == "meta" else "rootfs")
            scans[kind] = UploadScan(kind)
            # A unified image is one file: its own sha256 is the fingerprint.
            sink = http.FileSink(target, combined if len(img.files) > 1 else None, scans[kind])
            progress = http.Progress(report, f.size, label) if report else None
            try:
                async with await http.Body.get(self.server, self.certificate, "/" + f.path.lstrip("/")) as r:
                    if r.status_code != 200:
                        raise http.RemoteError(f"Unable to fetch {self.server}/{f.path}: {r.status_code}")
                    if progress is not None and progress.total <= 0:
                        progress.total = int(r.headers.get("content-length") or 0)
                    await http.stream_to(r, sink, progress, f.size)
            finally:
                await sink.close()
            if f.size >= 0 and sink.size != f.size:
                raise TamperedImage(f"Image download failed: {f.path} is {sink.size} bytes, expected {f.size}")
            _check(f.path, sink.hash.hexdigest(), f.sha256)
            paths.append(target)
            sizes += sink.size
        if len(paths) == 1:  # a unified image: its own sha256 is the fingerprint
            _check("the image", sink.hash.hexdigest(), img.fingerprint)
            return Fetched(paths[0], None, img.fingerprint, sizes, scans=scans)
        _check("the image (combined)", combined.hexdigest(), img.fingerprint)
        return Fetched(paths[0], paths[1], img.fingerprint, sizes, img.files[1].path.rsplit("/", 1)[-1], scans)


class LXDRemote:
    """Another daemon's public images, or a private one with a download secret."""

    protocol = "lxd"

    def __init__(self, server: str, certificate: str = "", secret: str = ""):
        self.server = http.base_url(server)
        self.certificate = certificate
        self.secret = secret

    def _params(self) -> dict:
        return {"secret": self.secret} if self.secret else {}

    async def resolve(self, name: str, image_type: str = "") -> RemoteInfo:
        if not name:
            raise BadRequest("No image alias or fingerprint given")
        async with http.client(self.server, self.certificate) as c:
            fp = name
            if not self.secret:  # an alias, as LXD tries first; a fingerprint otherwise
                try:
                    alias = await http.get_json(c, f"/1.0/images/aliases/{quote(name, safe='/')}")
                    meta = alias.get("metadata") if isinstance(alias, dict) else None
                    if isinstance(meta, dict) and meta.get("target"):
                        if image_type and meta.get("type") not in ("", None, image_type):
                            raise NotFound(f"Alias {name!r} is not of type {image_type!r}")
                        fp = meta["target"]
                except NotFound:
                    pass
            try:
                doc = await http.get_json(c, f"/1.0/images/{quote(fp, safe='')}", self._params())
            except NotFound:
                raise NotFound(f"Image {name!r} not found on {self.server}") from None
        img = doc.get("metadata") if isinstance(doc, dict) else None
        if not isinstance(img, dict) or not isinstance(img.get("fingerprint"), str):
            raise http.RemoteError(f"Invalid image document from {self.server}")
        if img.get("type", "container") != "container":
            raise BadRequest("Virtual-machine images are not supported by this server")
        props = img.get("properties") or {}
        return RemoteInfo(
            fingerprint=img["fingerprint"].lower(), properties={str(k): str(v) for k, v in props.items()},
            filename=str(img.get("filename") or ""), architecture=str(img.get("architecture") or ""),
            aliases=[{"name": a.get("name", ""), "description": a.get("description", "")}
                     for a in img.get("aliases") or [] if isinstance(a, dict)],
            public=bool(img.get("public")), created_at=_time(img.get("created_at")),
            expires_at=_time(img.get("expires_at")), size=int(img.get("size") or 0))

    async def download(self, info: RemoteInfo, workdir: Path, report: Report | None) -> Fetched:
        scans: dict = {}
        try:
            return await self._download(info, workdir, report, scans)
        except BaseException:
            _abort(scans)
            raise

    async def _download(self, info: RemoteInfo, workdir: Path, report: Report | None, scans: dict) -> Fetched:
        from lxd_daemon.images.pipeline import UploadScan

        fp = info.fingerprint
        combined = hashlib.sha256()
        async with await http.Body.get(self.server, self.certificate, f"/1.0/images/{fp}/export",
                                       self._params()) as r:
            if r.status_code != 200:
                await r.aread()
                raise http.RemoteError(f"Unable to fetch image {fp} from {self.server}: "
                                       f"{r.status_code} {_error(r)}")
            total = int(r.headers.get("content-length") or info.size or 0)
            progress = http.Progress(report, total) if report else None
            ctype = r.headers.get("content-type", "")
            if ctype.split(";")[0].strip().lower() == "multipart/form-data":
                return await self._multipart(r, ctype, workdir, combined, progress, fp, scans)
            scans["unified"] = UploadScan("unified")
            # One file: its own sha256 is the fingerprint (no second, combined hash of it).
            sink = http.FileSink(workdir / "image", None, scans["unified"])
            length = r.headers.get("content-length", "")
            try:
                await http.stream_to(r, sink, progress, int(length) if length.isdigit() else -1)
            finally:
                await sink.close()
        _check("the image", sink.hash.hexdigest(), fp)
        return Fetched(sink.path, None, fp, sink.size, scans=scans)

    async def _multipart(self, r: http.Body, ctype: str, workdir: Path, combined, progress,
                         fp: str, scans: dict) -> Fetched:
        from lxd_daemon.images.pipeline import UploadScan

        parser = MultipartParser(boundary_of(ctype))
        sinks: dict[str, http.FileSink] = {}
        names: dict[str, str] = {}
        order = ["metadata", "rootfs"]
        current: http.FileSink | None = None
        try:
            async for chunk in r.aiter_bytes():
                if progress is not None:
                    progress.add(len(chunk))
                for ev in parser.feed(chunk):
                    if ev[0] == "begin":
                        if not order or ev[1] != order[0]:
                            raise http.RemoteError("Invalid multipart image from the image server")
                        order.pop(0)
                        kind = "meta" if ev[1] == "metadata" else "rootfs"
                        scans[kind] = UploadScan(kind)
                        current = sinks[ev[1]] = http.FileSink(workdir / ev[1], combined, scans[kind])
                        names[ev[1]] = ev[2]
                    elif ev[0] == "data":
                        await current.write(ev[1])
                    else:
                        await current.close()
                        current = None
            parser.finish()
        finally:
            for s in sinks.values():
                await s.close()
        if order:
            raise http.RemoteError("Invalid multipart image from the image server: a part is missing")
        _check("the image", combined.hexdigest(), fp)
        meta, rootfs = sinks["metadata"], sinks["rootfs"]
        return Fetched(meta.path, rootfs.path, fp, meta.size + rootfs.size, names.get("rootfs", ""), scans)


def _error(r: http.Body) -> str:
    try:
        body = json.loads(r.content)
        if isinstance(body, dict) and body.get("error"):
            return str(body["error"])
    except ValueError:
        pass
    return r.reason_phrase


def remote_for(source: dict):
    protocol = source.get("protocol") or "lxd"
    server = source.get("server") or ""
    if not server:
        raise BadRequest("No image server given (source.server)")
    if protocol == "simplestreams":
        return SimpleStreamsRemote(server, source.get("certificate") or "")
    if protocol == "lxd":
        return LXDRemote(server, source.get("certificate") or "", source.get("secret") or "")
    raise BadRequest(f"Unsupported image server protocol {protocol!r} (lxd or simplestreams)")


__all__ = ["Fetched", "LXDRemote", "RemoteInfo", "SimpleStreamsRemote", "TamperedImage", "remote_for"]
