"""Endpoints of features that do not exist yet: each answers a clear error that names the feature.

Without these a client gets "not found" or "method not allowed" and cannot tell a missing feature
from a mistake of its own. Reads that have an honest answer today keep it (an instance has no
backups: `GET .../backups` is `[]` in api/instances.py; no certificate is trusted,
there being no TLS listener: `GET /1.0/certificates` is `[]` here). Whatever would create, change
or act on such an object answers 501 in LXD's error envelope, after the objects the URL names
(instance, storage pool) have been checked, so that a typo still gets its 404. An object of a
missing kind (a backup, a certificate) cannot exist: asking for one is a 404 that
says why.

The API extensions of these features stay unadvertised, so the stock client refuses the commands
that depend on them (`lxc export`, `lxc cluster list`, `lxc warning list`) on its own.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from lxd_daemon.api.envelope import sync
from lxd_daemon.api.request import recursion
from lxd_daemon.errors import NotFound, NotImplementedYet
from lxd_daemon.services import get_services

router = APIRouter()

INSTANCE_PREFIXES = ("/1.0/instances", "/1.0/containers")
ALL = ["GET", "PUT", "PATCH", "POST", "DELETE"]
WRITES = ["PUT", "PATCH", "POST", "DELETE"]

SFTP = "SFTP access to instances is not implemented yet"
CERTIFICATES = ("Trusted client certificates are not implemented yet (the daemon has no TLS "
                "listener; only the local unix socket is served)")
CLUSTER = "Clustering is not implemented yet"
WARNINGS = "Warnings are not implemented yet"
NETWORK_ACLS = "Network ACLs are not implemented yet"
NETWORK_ZONES = "Network zones are not implemented yet"
RESOURCES = "Server resources (lxc info --resources) are not implemented yet"
METRICS = "Metrics are not implemented yet"
IMAGE_REFRESH = "Refreshing images from a remote server is not implemented yet"


def _add(path: str, methods: list[str], handler) -> None:
    for method in methods:
        router.add_api_route(path, handler, methods=[method], name=f"not_yet:{method}:{path}")


def _instance(request: Request, name: str) -> None:
    """404 for an instance that does not exist (before saying what is missing)."""
    get_services(request).instances.record(name)


# -- instances: snapshots, backups, sftp ----------------------------------------------------------

async def sftp(request: Request, name: str) -> Response:
    _instance(request, name)
    raise NotImplementedYet(SFTP)


for _prefix in INSTANCE_PREFIXES:
    _add(f"{_prefix}/{{name}}/sftp", ["GET"], sftp)


# -- certificates ---------------------------------------------------------------------------------

async def list_certificates(request: Request) -> Response:
    recursion(request)  # a malformed value is still refused
    return sync([])


async def add_certificate(request: Request) -> Response:
    raise NotImplementedYet(CERTIFICATES)


async def certificate(request: Request, fingerprint: str) -> Response:
    raise NotFound("Certificate not found (no certificate is trusted: " + CERTIFICATES[0].lower()
                   + CERTIFICATES[1:] + ")")


_add("/1.0/certificates", ["GET"], list_certificates)
_add("/1.0/certificates", ["POST"], add_certificate)
_add("/1.0/certificates/{fingerprint}", ALL, certificate)


# -- whole features -------------------------------------------------------------------------------

def _feature(message: str):
    async def handler(request: Request, rest: str = "") -> Response:
        raise NotImplementedYet(message)

    return handler


for _path, _message in (("/1.0/cluster", CLUSTER), ("/1.0/warnings", WARNINGS),
                        ("/1.0/network-acls", NETWORK_ACLS), ("/1.0/network-zones", NETWORK_ZONES)):
    _add(_path, ALL, _feature(_message))
    _add(_path + "/{rest:path}", ALL, _feature(_message))
_add("/1.0/resources", ["GET"], _feature(RESOURCES))
_add("/1.0/metrics", ["GET"], _feature(METRICS))


async def refresh_image(request: Request, fingerprint: str) -> Response:
    await get_services(request).images.resolve(fingerprint)  # 404 for an unknown image first
    raise NotImplementedYet(IMAGE_REFRESH)


_add("/1.0/images/{fingerprint}/refresh", ["POST"], refresh_image)


async def setup(services) -> list:
    """Registered by daemon.py (SUBSYSTEMS) like the other routers."""
    return [router]
