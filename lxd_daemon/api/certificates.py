"""`/1.0/certificates`: the trust store (list, add, get, update, delete) and certificate add tokens.

`POST /1.0/certificates` is the one route an untrusted TLS client may call to become trusted: with
the trust password or a token (tokens.py) in `password`, it adds the client's own TLS
certificate (or the one in `certificate`). A trusted caller adds any certificate, or asks for a
token with `token: true` (an async reply: the token operation). A restricted certificate is no
administrator: it may not issue tokens, remove certificates or change anything but its own
certificate, as in LXD.
"""

from __future__ import annotations

import time

from fastapi import Request
from starlette.responses import Response

from lxd_daemon.api.access import Access, Routes, is_trusted
from lxd_daemon.api.envelope import async_, etag_of, sync
from lxd_daemon.api.request import check_etag, parse, recursion
from lxd_daemon.errors import BadRequest, Forbidden
from lxd_daemon.services import get_services, requestor
from lxd_daemon.trust import tokens
from lxd_daemon.trust.store import parse_certificate_field
from lxd_daemon.wire.certificates import CertificatePut, CertificatesPost

routes = Routes()



def render(rec: dict) -> dict:
    return {"name": rec["name"], "type": rec["type"], "restricted": rec["restricted"],
            "projects": list(rec["projects"]), "certificate": rec["certificate"],
            "fingerprint": rec["fingerprint"]}


def _etag(rec: dict) -> str:
    return etag_of(rec["fingerprint"], rec["name"], rec["type"], rec["restricted"], rec["projects"],
                   rec["certificate"])


def _url(fp: str) -> str:
    return f"/1.0/certificates/{fp}"


def _caller(request: Request) -> dict | None:
    """The trust record of a TLS caller (None on the unix socket)."""
    return request.scope.get("lxd_certificate")


def _is_admin(request: Request) -> bool:
    if not is_trusted(request):
        return False
    rec = _caller(request)
    return rec is None or not rec.get("restricted")


def _client_host(request: Request) -> str:
    client = request.scope.get("client")
    return client[0] if client else ""


@routes.get("/1.0/certificates", access=Access.TRUSTED)
async def list_certificates(request: Request) -> Response:
    records = get_services(request).trust.list()
    if recursion(request):
        return sync([render(r) for r in records])
    return sync([_url(r["fingerprint"]) for r in records])


@routes.post("/1.0/certificates", access=Access.GUARDED)
async def add_certificate(request: Request) -> Response:
    services = get_services(request)
    trust = services.trust
    body = await parse(request, CertificatesPost)
    kind = body.type or "client"
    https_address = services.server.config.get("core.https_address")
    if body.token and body.certificate:
        raise BadRequest("Can't use certificate if token is requested")
    if body.token:
        if kind != "client":
            raise BadRequest("Tokens can only be issued for client certificates")
        if not https_address:
            raise BadRequest("Can't issue token when server isn't listening on network")
    trusted = is_trusted(request)
    if trusted and not body.certificate and not body.token:
        raise BadRequest("Client is already trusted")
    name, restricted, projects = body.name, body.restricted, list(body.projects)
    if not _is_admin(request):
        if body.token or not body.password:
            raise Forbidden("not authorized")
        # Raises 403 for a wrong password or token, or when the address is throttled.
        granted = await trust.redeem(body.password, _client_host(request))
        if granted is not None:  # a token: what it was issued for, nothing the client asks
            name = granted.get("name") or ""
            kind = granted.get("type") or "client"
            restricted = bool(granted.get("restricted"))
            projects = list(granted.get("projects") or [])
    if body.certificate:
        der = parse_certificate_field(body.certificate)
    elif body.token:
        return await _issue_token(request, name=name, restricted=restricted, projects=projects)
    elif request.scope.get("lxd_protocol") == "tls":
        der = request.scope.get("lxd_peer_cert")
        if not der:
            raise BadRequest("No client certificate provided")
    else:
        raise BadRequest("Can't use TLS data on non-TLS link")
    rec = await trust.add(der, name=name, type=kind, restricted=restricted, projects=projects,
                          fallback_name=_client_host(request))
    url = _url(rec["fingerprint"])
    services.events.lifecycle("certificate-created", url, requestor=requestor(request),
                              project="default")
    return sync(None, status=201, location=url)


async def _issue_token(request: Request, *, name: str, restricted: bool, projects: list[str]) -> Response:
    services = get_services(request)
    if not name:
        raise BadRequest("A token needs the name of the client it is for")
    await services.trust.check_projects(projects)
    addresses = list(services.server.addresses)  # kept current by the listener (server/https.py)
    if not addresses:
        raise BadRequest("Can't issue token: the server has no network address to put in it")
    spec = services.server.config.get("core.remote_token_expiry")
    try:
        expires_at = tokens.expiry_after(spec, time.time()) if spec else None
    except ValueError as e:
        raise BadRequest(f"Invalid core.remote_token_expiry: {e}") from None
    req = {"name": name, "type": "client", "restricted": restricted, "projects": projects,
           "certificate": "", "password": "", "token": True}
    op = services.trust.tokens.issue(req, fingerprint=services.server.fingerprint, addresses=addresses,
                                     expires_at=expires_at)
    return async_(op.render())


@routes.get("/1.0/certificates/{fingerprint}", access=Access.TRUSTED)
async def get_certificate(request: Request, fingerprint: str) -> Response:
    rec = get_services(request).trust.get(fingerprint)
    return sync(render(rec), etag=_etag(rec))


async def _update(request: Request, fingerprint: str, replace: bool) -> Response:
    services = get_services(request)
    rec = services.trust.get(fingerprint)
    check_etag(request, _etag(rec))
    body = await parse(request, CertificatePut)
    given = body.model_fields_set
    if replace:
        name, restricted, projects = body.name, body.restricted, list(body.projects)
        kind = body.type or rec["type"]
    else:
        name = body.name if "name" in given else rec["name"]
        kind = (body.type or rec["type"]) if "type" in given else rec["type"]
        restricted = body.restricted if "restricted" in given else rec["restricted"]
        projects = list(body.projects) if "projects" in given else list(rec["projects"])
    certificate = body.certificate if "certificate" in given else ""
    if not _is_admin(request):
        caller = _caller(request) or {}
        if caller.get("fingerprint") != rec["fingerprint"]:
            raise Forbidden("Only an unrestricted client may change another client's certificate")
        if (name, kind, restricted, projects) != (rec["name"], rec["type"], rec["restricted"], rec["projects"]):
            raise Forbidden("Only the certificate can be changed")
    new = await services.trust.update(rec["fingerprint"], name=name, type=kind, restricted=restricted,
                                      projects=projects, certificate=certificate)
    services.events.lifecycle("certificate-updated", _url(rec["fingerprint"]), requestor=requestor(request),
                              project="default")
    if new["fingerprint"] != rec["fingerprint"]:
        return sync({}, location=_url(new["fingerprint"]))
    return sync({})


@routes.put("/1.0/certificates/{fingerprint}", access=Access.TRUSTED)
async def put_certificate(request: Request, fingerprint: str) -> Response:
    return await _update(request, fingerprint, True)


@routes.patch("/1.0/certificates/{fingerprint}", access=Access.TRUSTED)
async def patch_certificate(request: Request, fingerprint: str) -> Response:
    return await _update(request, fingerprint, False)


@routes.delete("/1.0/certificates/{fingerprint}", access=Access.TRUSTED)
async def delete_certificate(request: Request, fingerprint: str) -> Response:
    services = get_services(request)
    if not _is_admin(request):
        raise Forbidden("not authorized")
    rec = await services.trust.delete(fingerprint)
    services.events.lifecycle("certificate-deleted", _url(rec["fingerprint"]), requestor=requestor(request),
                              project="default")
    return sync({})
