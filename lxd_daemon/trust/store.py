"""The trust store: which client certificates are trusted, and how an untrusted client becomes trusted.

`identify(der)` is what every TLS request asks (access.Gate): a dictionary lookup by the
certificate's sha256 for a certificate in the store, then PKI mode (pki.py) for one signed by
`server.ca`. The store's rows (migrations 0001/0006) are loaded once and kept in memory; every
change is written to the database first and then to memory, so a removed certificate is
untrusted from the next request on, and `on_revoke` callbacks (the TLS listener closes that
client's open websockets) run at once.

An untrusted client becomes trusted with `core.trust_password` or a token (tokens.py). Guessing
is throttled per client address: after THROTTLE_FAILURES failures within THROTTLE_WINDOW seconds
the address is refused without any check until the window has passed, and every failure is
logged with the address.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import json
import logging
import time
from collections.abc import Callable

from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from lxd_daemon.errors import BadRequest, Conflict, Forbidden, NotFound
from lxd_daemon.server.config import check_password
from lxd_daemon.trust import pki, tokens
from lxd_daemon.trust.models import certificates
from lxd_daemon.util.tasks import cancel_and_wait

log = logging.getLogger("lxd.trust")

TYPES = ("client", "metrics")
THROTTLE_FAILURES = 5
THROTTLE_WINDOW = 60.0
THROTTLE_MESSAGE = "Too many failed attempts, try again later"
PKI_POLL = 2.0  # seconds between looks at server.ca / server.crl


class Throttle:
    """Failed password or token attempts per client address, over a sliding window."""

    def __init__(self, failures: int = THROTTLE_FAILURES, window: float = THROTTLE_WINDOW,
                 max_addresses: int = 65536):
        self.failures = failures
        self.window = window
        self.max_addresses = max_addresses
        self._seen: dict[str, collections.deque] = {}

    def _recent(self, address: str, now: float) -> collections.deque | None:
        q = self._seen.get(address)
        if q is None:
            return None
        while q and q[0] <= now - self.window:
            q.popleft()
        if not q:
            del self._seen[address]
            return None
        return q

    def blocked(self, address: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        q = self._recent(address, now)
        return q is not None and len(q) >= self.failures

    def failed(self, address: str, now: float | None = None) -> int:
        """Record a failure; returns the failures now counted for the address."""
        now = time.monotonic() if now is None else now
        q = self._recent(address, now)
        if q is None:
            if len(self._seen) >= self.max_addresses:  # bounded: forget the oldest address
                self._seen.pop(next(iter(self._seen)))
            q = self._seen[address] = collections.deque(maxlen=self.failures)
        q.append(now)
        return len(q)

    def count(self, address: str) -> int:
        q = self._recent(address, time.monotonic())
        return len(q) if q is not None else 0

    def succeeded(self, address: str) -> None:
        self._seen.pop(address, None)


# -- certificate material ------------------------------------------------------------------------

def parse_certificate_field(value: str) -> bytes:
    """DER bytes of a certificate given as LXD's API takes it: base64 of the DER (line breaks
    allowed; pylxd strips the PEM header lines) or a whole PEM block."""
    body = value.strip()
    if "-----BEGIN" in body:
        lines = body.splitlines()
        try:
            start = next(i for i, line in enumerate(lines) if line.startswith("-----BEGIN CERTIFICATE"))
            end = next(i for i, line in enumerate(lines) if i > start and line.startswith("-----END"))
        except StopIteration:
            raise BadRequest("Invalid certificate material: no PEM CERTIFICATE block") from None
        body = "".join(lines[start + 1:end])
    try:
        return base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("Invalid certificate material: not base64") from None


def inspect_certificate(der: bytes) -> dict:
    """Parse and validate a certificate LXD's way (blocking: cryptography; run it in a thread).
    Returns {"der", "common_name"}."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import rsa

    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as e:
        raise BadRequest(f"Invalid certificate material: {e}") from None
    now = time.time()
    if now < cert.not_valid_before_utc.timestamp():
        raise BadRequest("The provided certificate isn't valid yet")
    if now > cert.not_valid_after_utc.timestamp():
        raise BadRequest("The provided certificate is expired")
    try:
        key = cert.public_key()
    except ValueError as e:
        raise BadRequest(f"Invalid certificate material: {e}") from None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise BadRequest("RSA key is too weak (minimum of 2048bit)")
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return {"der": der, "common_name": str(cn[0].value) if cn else ""}


def _record(row) -> dict:
    return {"fingerprint": row.fingerprint, "name": row.name, "type": row.type,
            "restricted": bool(row.restricted), "projects": json.loads(row.projects or "[]"),
            "certificate": row.certificate}


class TrustService:
    def __init__(self, *, db, lxd_dir, ops, server, projects=None):
        self.db = db
        self.projects = projects  # services.projects: what a restricted certificate may name
        self.lxd_dir = lxd_dir
        self.server = server
        self.on_revoke: list[Callable[[str], None]] = []
        self.tokens = tokens.Tokens(ops)
        self.throttle = Throttle()
        self.pki = pki.PKI(lxd_dir)
        self._by_fp: dict[str, dict] = {}  # fingerprint -> record
        self._validity: dict[str, tuple[float, float]] = {}
        self._lock = asyncio.Lock()  # one change at a time
        self._password_slots = asyncio.Semaphore(2)
        self._watcher: asyncio.Task | None = None

    # -- start-up --------------------------------------------------------------------------
    async def load(self) -> None:
        def read(session):
            return [_record(r) for r in session.execute(select(certificates))]

        for rec in await self.db.run(read):
            self._put(rec)
        await self.refresh_pki()

    def start(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch_pki(), name="trust-pki")

    async def stop(self) -> None:
        await cancel_and_wait(self._watcher)

    async def _watch_pki(self) -> None:
        while True:
            await asyncio.sleep(PKI_POLL)
            try:
                await self.refresh_pki()
            except Exception:
                log.exception("PKI: failed to reload server.ca / server.crl")

    async def refresh_pki(self) -> None:
        """Reload server.ca and the CRL if they changed; revoke what they no longer vouch for."""
        stamp = await asyncio.to_thread(pki.file_stamp, self.lxd_dir)
        if stamp == self.pki.state.stamp:
            return
        state = await asyncio.to_thread(pki.load_state, self.lxd_dir, stamp)
        if state.ca is not None or state.ca_error:
            log.info("PKI mode", extra={"ca": str(self.lxd_dir / pki.CA_FILE),
                                         "revoked": len(state.revoked)})
        for fp in self.pki.swap(state):
            self._revoked(fp)

    # -- who is this -----------------------------------------------------------------------
    def _put(self, rec: dict) -> None:
        try:
            self._validity[rec["fingerprint"]] = pki.der_validity(parse_certificate_field(rec["certificate"]))
        except (BadRequest, pki.DERError) as e:
            log.error("trusted certificate unreadable: never trusted",
                      extra={"fingerprint": rec["fingerprint"], "err": getattr(e, "message", str(e))})
            self._validity[rec["fingerprint"]] = (1.0, 0.0)
        self._by_fp[rec["fingerprint"]] = rec

    def _drop(self, fp: str) -> None:
        self._by_fp.pop(fp, None)
        self._validity.pop(fp, None)

    def identify(self, cert_der: bytes | None) -> tuple[str, dict | None]:
        """(sha256 of the certificate, its trust record or None when untrusted for the API)."""
        if not cert_der:
            return "", None
        fp = hashlib.sha256(cert_der).hexdigest()
        if self.pki.enabled:
            verdict = self.pki.check(cert_der, fp)
            if verdict is not None and verdict.status == pki.REVOKED:
                return fp, None  # revoked by the CA: not trusted, even if added (as LXD)
        else:
            verdict = None
        rec = self._by_fp.get(fp)
        if rec is not None:
            if rec["type"] != "client":
                return fp, None  # metrics certificates: /1.0/metrics only (see metrics())
            nb, na = self._validity[fp]
            return fp, rec if nb <= time.time() <= na else None
        if verdict is not None:
            if verdict.record is None:
                verdict.record = {"fingerprint": fp, "name": verdict.name, "type": "client", "restricted": False,
                                  "projects": [], "certificate": pki.der_to_pem(cert_der), "pki": True}
            return fp, verdict.record
        return fp, None

    def metrics(self, fingerprint: str) -> dict | None:
        """The record of a trusted metrics certificate (for /1.0/metrics), else None."""
        rec = self._by_fp.get(fingerprint)
        if rec is None or rec["type"] != "metrics":
            return None
        nb, na = self._validity[fingerprint]
        return rec if nb <= time.time() <= na else None

    def _revoked(self, fp: str) -> None:
        for fn in list(self.on_revoke):
            try:
                fn(fp)
            except Exception:
                log.exception("on_revoke callback failed", extra={"fingerprint": fp})

    # -- the records -----------------------------------------------------------------------
    def list(self) -> list[dict]:
        return [self._by_fp[fp] for fp in sorted(self._by_fp)]

    def get(self, prefix: str) -> dict:
        """The record whose fingerprint starts with `prefix` (LXD accepts a prefix)."""
        rec = self._by_fp.get(prefix)
        if rec is not None:
            return rec
        found = [fp for fp in self._by_fp if fp.startswith(prefix)] if prefix else []
        if len(found) > 1:
            raise BadRequest("More than one certificate matches")
        if not found:
            raise NotFound("Certificate not found")
        return self._by_fp[found[0]]

    async def check_projects(self, projects: list[str]) -> None:
        """Every project a certificate names must exist (404 naming the first that doesn't)."""
        if not projects:
            return
        if self.projects is not None:
            have = set(self.projects.names())
        else:  # a store without the projects service (unit tests): the table itself

            def known(session) -> set[str]:
                rows = session.execute(text("SELECT name FROM projects"))
                return {r.name for r in rows}

            have = await self.db.run(known)
        for p in projects:
            if p not in have:
                raise NotFound(f"Project {p!r} not found")

    # -- projects renamed or deleted (services.projects hooks) ------------------------------
    # As in LXD, where a certificate's projects are references to the projects: a renamed
    # project stays in the lists under its new name, a deleted one leaves them (a restricted
    # certificate whose every project went reaches nothing).
    async def project_renamed(self, old: str, new: str) -> None:
        await self._replace_project(old, [new])

    async def project_deleted(self, name: str) -> None:
        await self._replace_project(name, [])

    async def _replace_project(self, name: str, by: list[str]) -> None:
        def replaced(projects: list[str]) -> list[str]:
            out: list[str] = []
            for p in projects:
                for q in (by if p == name else [p]):
                    if q not in out:
                        out.append(q)
            return out

        for op in self.tokens.pending():  # what a pending token will grant
            req = (op.metadata or {}).get("request")
            if isinstance(req, dict) and name in (req.get("projects") or ()):
                req["projects"] = replaced(list(req["projects"]))
        async with self._lock:
            changed = [{**rec, "projects": replaced(rec["projects"])}
                       for rec in self._by_fp.values() if name in rec["projects"]]
            if not changed:
                return

            def write(session) -> None:
                for rec in changed:
                    session.execute(update(certificates).where(certificates.c.fingerprint == rec["fingerprint"])
                                    .values(projects=json.dumps(rec["projects"])))

            await self.db.run(write)
            for rec in changed:
                self._by_fp[rec["fingerprint"]] = rec
        log.info("certificates' projects updated", extra={"project": name, "now": ",".join(by) or "-",
                                                          "certificates": len(changed)})

    async def add(self, der: bytes, *, name: str, type: str, restricted: bool, projects: list[str],
                  fallback_name: str = "") -> dict:
        """Trust a certificate (validated as LXD does). Returns its record."""
        if type not in TYPES:
            raise BadRequest("Invalid certificate type")
        info = await asyncio.to_thread(inspect_certificate, der)
        fp = hashlib.sha256(der).hexdigest()
        rec = {"fingerprint": fp, "name": name or info["common_name"] or fallback_name, "type": type,
               "restricted": bool(restricted), "projects": list(projects),
               "certificate": pki.der_to_pem(der)}
        await self.check_projects(rec["projects"])

        def write(session) -> None:
            session.execute(insert(certificates).values(
                fingerprint=fp, type=rec["type"], name=rec["name"], certificate=rec["certificate"],
                restricted=rec["restricted"], projects=json.dumps(rec["projects"]), created_at=time.time()))

        async with self._lock:
            if fp in self._by_fp:
                raise Conflict("Certificate already in trust store")
            try:
                await self.db.run(write)
            except IntegrityError:
                raise Conflict("Certificate already in trust store") from None
            self._put(rec)
        log.info("certificate trusted", extra={"fingerprint": fp, "client_name": rec["name"], "type": type})
        return rec

    async def update(self, fp: str, *, name: str, type: str, restricted: bool, projects: list[str],
                     certificate: str = "") -> dict:
        """Replace a record's editable fields (and the certificate itself when `certificate`, a
        PEM or base64 DER, differs). Returns the new record."""
        if type not in TYPES:
            raise BadRequest("Invalid certificate type")
        old = self.get(fp)
        new = {**old, "name": name, "type": type, "restricted": bool(restricted), "projects": list(projects)}
        if certificate and certificate.strip() != old["certificate"].strip():
            der = parse_certificate_field(certificate)
            await asyncio.to_thread(inspect_certificate, der)
            new["fingerprint"] = hashlib.sha256(der).hexdigest()
            new["certificate"] = pki.der_to_pem(der)
        await self.check_projects(new["projects"])

        def write(session) -> None:
            session.execute(update(certificates).where(certificates.c.fingerprint == old["fingerprint"]).values(
                fingerprint=new["fingerprint"], type=new["type"], name=new["name"],
                certificate=new["certificate"], restricted=new["restricted"], projects=json.dumps(new["projects"])))

        async with self._lock:
            if old["fingerprint"] not in self._by_fp:
                raise NotFound("Certificate not found")
            if new["fingerprint"] != old["fingerprint"] and new["fingerprint"] in self._by_fp:
                raise Conflict("Certificate already in trust store")
            try:
                await self.db.run(write)
            except IntegrityError:
                raise Conflict("Certificate already in trust store") from None
            self._drop(old["fingerprint"])
            self._put(new)
        if new["fingerprint"] != old["fingerprint"] or (old["type"] == "client" and new["type"] != "client"):
            self._revoked(old["fingerprint"])  # that certificate no longer reaches the API
        return new

    async def delete(self, fp: str) -> dict:
        rec = self.get(fp)

        def write(session) -> None:
            session.execute(delete(certificates).where(certificates.c.fingerprint == rec["fingerprint"]))

        async with self._lock:
            if rec["fingerprint"] not in self._by_fp:
                raise NotFound("Certificate not found")
            await self.db.run(write)
            self._drop(rec["fingerprint"])
        log.info("certificate removed", extra={"fingerprint": rec["fingerprint"], "client_name": rec["name"]})
        self._revoked(rec["fingerprint"])
        return rec

    # -- becoming trusted ------------------------------------------------------------------
    async def redeem(self, password: str, address: str) -> dict | None:
        """Check what an untrusted client offers (`password`: the trust password or a token).
        Returns the token's request (name, type, restricted, projects) for a token, None for
        the trust password; raises Forbidden (throttled, or wrong)."""
        if self.throttle.blocked(address):
            log.warning("trust attempt refused: too many failures", extra={"address": address})
            raise Forbidden(THROTTLE_MESSAGE)
        # Counted before the check and forgiven on success: attempts still being checked count
        # too, so a burst of parallel guesses gets no more tries than a sequence would.
        self.throttle.failed(address)
        token = tokens.decode(password)
        if token is not None:
            op, why = self.tokens.take(token["secret"])
            if op is None:
                self._failed(address, f"bad certificate add token ({why})")
                raise Forbidden(why)
            self.throttle.succeeded(address)
            return dict((op.metadata or {}).get("request") or {})
        stored = self.server.config.get("core.trust_password")
        ok = False
        if stored:
            async with self._password_slots:  # scrypt takes 16 MiB and ~50 ms each
                ok = await asyncio.to_thread(check_password, stored, password)
        if not ok:
            self._failed(address, "bad trust password")
            raise Forbidden("not authorized")
        self.throttle.succeeded(address)
        return None

    def _failed(self, address: str, what: str) -> None:
        log.warning(what, extra={"address": address, "failures": self.throttle.count(address)})
