"""Endpoints of features that do not exist yet: each answers a clear error that names the feature.

Without these a client gets "not found" or "method not allowed" and cannot tell a missing feature
from a mistake of its own. Reads that have an honest answer today keep it (an instance has no
backups: `GET .../backups` is `[]` in api/instances.py). Whatever would create, change
or act on such an object answers 501 in LXD's error envelope, after the objects the URL names
(instance, storage pool) have been checked, so that a typo still gets its 404. An object of a
missing kind (a backup) cannot exist: asking for one is a 404 that
says why.

The API extensions of these features stay unadvertised, so the stock client refuses the commands
that depend on them (`lxc export`, `lxc cluster list`) on its own.
"""

from __future__ import annotations

from fastapi import Request
from starlette.responses import Response

from lxd_daemon.api.access import Access, Routes
from lxd_daemon.errors import NotImplementedYet
from lxd_daemon.services import get_services

router = Routes()

INSTANCE_PREFIXES = ("/1.0/instances", "/1.0/containers")
ALL = ["GET", "PUT", "PATCH", "POST", "DELETE"]
WRITES = ["PUT", "PATCH", "POST", "DELETE"]

SFTP = "SFTP access to instances is not implemented yet"
CLUSTER = "Clustering is not implemented yet"
NETWORK_ACLS = "Network ACLs are not implemented yet"
NETWORK_ZONES = "Network zones are not implemented yet"


def _add(path: str, methods: list[str], handler) -> None:
    for method in methods:
        router.add(path, handler, methods=[method], access=Access.TRUSTED, name=f"not_yet:{method}:{path}")


def _instance(request: Request, name: str) -> None:
    """404 for an instance that does not exist in the request's project (before saying what is missing)."""
    from lxd_daemon.api.request import project_of

    get_services(request).instances.lookup(project_of(request).name, name)


# -- instances: snapshots, backups, sftp ----------------------------------------------------------

async def sftp(request: Request, name: str) -> Response:
    _instance(request, name)
    raise NotImplementedYet(SFTP)


for _prefix in INSTANCE_PREFIXES:
    _add(f"{_prefix}/{{name}}/sftp", ["GET"], sftp)


# -- whole features -------------------------------------------------------------------------------

def _feature(message: str):
    async def handler(request: Request, rest: str = "") -> Response:
        raise NotImplementedYet(message)

    return handler


for _path, _message in (("/1.0/cluster", CLUSTER),
                        ("/1.0/network-acls", NETWORK_ACLS), ("/1.0/network-zones", NETWORK_ZONES)):
    _add(_path, ALL, _feature(_message))
    _add(_path + "/{rest:path}", ALL, _feature(_message))


async def setup(services) -> list:
    """Registered by daemon.py (SUBSYSTEMS) like the other routers."""
    return [router]
