"""The trust store in process (trust/store.py, pki.py, tokens.py): identify, add/update/delete with
on_revoke, PKI mode with a CA and a CRL made here with `cryptography`, password and token
redemption with throttling, and the certificate add token format the stock client reads."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from lxd_daemon.db import Database
from lxd_daemon.db.models import metadata
from lxd_daemon.errors import BadRequest, Conflict, Forbidden, NotFound
from lxd_daemon.events import EventHub
from lxd_daemon.ops import OperationManager
from lxd_daemon.ops.manager import Status
from lxd_daemon.server.config import ServerConfig, _hash_password
from lxd_daemon.trust import pki, tokens
from lxd_daemon.trust.store import THROTTLE_MESSAGE, Throttle, TrustService, parse_certificate_field
from lxd_daemon.util import schedule

NOW = dt.datetime.now(dt.UTC)


def make_cert(cn: str, *, issuer=None, issuer_key=None, ca: bool = False, key=None,
              not_before=None, not_after=None, serial: int | None = None):
    """(certificate, key): self-signed unless issuer/issuer_key are given."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    b = (x509.CertificateBuilder().subject_name(subject)
         .issuer_name(issuer.subject if issuer is not None else subject)
         .public_key(key.public_key()).serial_number(serial or x509.random_serial_number())
         .not_valid_before(not_before or NOW - dt.timedelta(hours=1))
         .not_valid_after(not_after or NOW + dt.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    cert = b.sign(issuer_key or key, hashes.SHA256())
    return cert, key


def der(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def write_crl(path: Path, ca, ca_key, serials: list[int]) -> None:
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
         .last_update(NOW - dt.timedelta(minutes=1)).next_update(NOW + dt.timedelta(days=1)))
    for s in serials:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(s)
                                      .revocation_date(NOW - dt.timedelta(minutes=1)).build())
    path.write_bytes(b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


class Env:
    def __init__(self, tmp: Path, password: str = ""):
        self.tmp = tmp
        self.db = Database(tmp / "lxd.db")
        metadata.create_all(self.db.engine)
        with self.db.engine.begin() as c:
            c.exec_driver_sql("INSERT INTO projects (name, description, config) VALUES ('default', '', '{}')")
        self.events = EventHub()
        self.events.bind_loop(asyncio.get_running_loop())
        self.ops = OperationManager(self.events, retain=0.1)
        config = {"core.trust_password": _hash_password(password)} if password else {}
        self.server = type("Server", (), {"config": ServerConfig(config)})()
        self.trust = TrustService(db=self.db, lxd_dir=tmp, ops=self.ops, server=self.server)
        self.revoked: list[str] = []
        self.trust.on_revoke.append(self.revoked.append)

    def close(self) -> None:
        self.db.close()


def run(tmp_path: Path, body, password: str = ""):
    async def main():
        env = Env(tmp_path, password)
        try:
            await env.trust.load()
            await body(env)
        finally:
            await env.ops.shutdown(1)
            env.close()

    asyncio.run(main())


# -- identify, add, update, delete -----------------------------------------------------------------

def test_identify_known_unknown_and_no_certificate(tmp_path):
    cert, _ = make_cert("alice")
    other, _ = make_cert("mallory")

    async def body(env: Env):
        t = env.trust
        assert t.identify(None) == ("", None)
        assert t.identify(b"") == ("", None)
        fp = hashlib.sha256(der(cert)).hexdigest()
        assert t.identify(der(cert)) == (fp, None)
        rec = await t.add(der(cert), name="", type="client", restricted=False, projects=[])
        assert rec["name"] == "alice"  # no name given: the certificate's CN
        assert rec["certificate"].startswith("-----BEGIN CERTIFICATE-----\n")
        got_fp, got = t.identify(der(cert))
        assert got_fp == fp and got is rec and got["type"] == "client"
        assert t.identify(der(other))[1] is None
        # A second load (a restart) knows it from the database.
        t2 = TrustService(db=env.db, lxd_dir=env.tmp, ops=env.ops, server=env.server)
        await t2.load()
        assert t2.identify(der(cert))[1]["fingerprint"] == fp
        with pytest.raises(Conflict):
            await t.add(der(cert), name="again", type="client", restricted=False, projects=[])

    run(tmp_path, body)


def test_metrics_certificates_are_not_trusted_for_the_api(tmp_path):
    cert, _ = make_cert("prom")

    async def body(env: Env):
        rec = await env.trust.add(der(cert), name="m", type="metrics", restricted=False, projects=[])
        assert env.trust.identify(der(cert)) == (rec["fingerprint"], None)
        assert env.trust.metrics(rec["fingerprint"]) is rec

    run(tmp_path, body)


def test_delete_and_retype_revoke_at_once(tmp_path):
    a, _ = make_cert("a")
    b, _ = make_cert("b")
    c, _ = make_cert("c")

    async def body(env: Env):
        t = env.trust
        ra = await t.add(der(a), name="a", type="client", restricted=False, projects=[])
        rb = await t.add(der(b), name="b", type="client", restricted=False, projects=[])
        # By prefix, as LXD looks certificates up.
        assert t.get(ra["fingerprint"][:12]) is ra
        with pytest.raises(NotFound):
            t.get("0" * 64)
        await t.delete(ra["fingerprint"][:12])
        assert env.revoked == [ra["fingerprint"]]
        assert t.identify(der(a))[1] is None
        # Renaming keeps trust; becoming a metrics certificate loses API access.
        new = await t.update(rb["fingerprint"], name="bee", type="client", restricted=True, projects=["default"])
        assert new["name"] == "bee" and new["restricted"] and env.revoked == [ra["fingerprint"]]
        await t.update(rb["fingerprint"], name="bee", type="metrics", restricted=True, projects=[])
        assert env.revoked[-1] == rb["fingerprint"] and t.identify(der(b))[1] is None
        # Replacing the certificate: the old one is revoked, the new one trusted.
        await t.update(rb["fingerprint"], name="bee", type="client", restricted=False, projects=[])
        pem = c.public_bytes(serialization.Encoding.PEM).decode()
        moved = await t.update(rb["fingerprint"], name="bee", type="client", restricted=False, projects=[],
                               certificate=pem)
        assert moved["fingerprint"] == hashlib.sha256(der(c)).hexdigest()
        assert env.revoked[-1] == rb["fingerprint"]
        assert t.identify(der(b))[1] is None and t.identify(der(c))[1]["name"] == "bee"
        with pytest.raises(NotFound):
            await t.update(moved["fingerprint"], name="x", type="client", restricted=True, projects=["nope"])
        with pytest.raises(BadRequest):
            await t.update(moved["fingerprint"], name="x", type="server", restricted=False, projects=[])

    run(tmp_path, body)


def test_invalid_certificates_are_refused(tmp_path):
    expired, _ = make_cert("old", not_before=NOW - dt.timedelta(days=10), not_after=NOW - dt.timedelta(days=1))
    future, _ = make_cert("new", not_before=NOW + dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=10))
    weak, _ = make_cert("weak", key=rsa.generate_private_key(public_exponent=65537, key_size=1024))

    async def body(env: Env):
        for cert, msg in ((expired, "expired"), (future, "isn't valid yet"), (weak, "too weak")):
            with pytest.raises(BadRequest, match=msg):
                await env.trust.add(der(cert), name="x", type="client", restricted=False, projects=[])
        with pytest.raises(BadRequest, match="Invalid certificate material"):
            await env.trust.add(b"not a certificate", name="x", type="client", restricted=False, projects=[])
        assert env.trust.list() == []

    run(tmp_path, body)


def test_certificate_field_forms():
    cert, _ = make_cert("x")
    raw = der(cert)
    b64 = base64.b64encode(raw).decode()
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    assert parse_certificate_field(b64) == raw
    assert parse_certificate_field("\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))) == raw
    assert parse_certificate_field(pem) == raw
    assert pki.der_to_pem(raw) == pem
    with pytest.raises(BadRequest):
        parse_certificate_field("@@@")


def test_der_validity_matches_cryptography():
    for nb, na in ((NOW - dt.timedelta(hours=2), NOW + dt.timedelta(days=3)),
                   (dt.datetime(1999, 1, 2, 3, 4, 5, tzinfo=dt.UTC), dt.datetime(2060, 6, 7, 8, 9, 10, tzinfo=dt.UTC))):
        cert, _ = make_cert("v", not_before=nb, not_after=na)
        assert pki.der_validity(der(cert)) == (cert.not_valid_before_utc.timestamp(),
                                               cert.not_valid_after_utc.timestamp())
    with pytest.raises(pki.DERError):
        pki.der_validity(b"\x30\x03\x02\x01")


# -- PKI mode ----------------------------------------------------------------------------------------

def test_pki_ca_signed_clients_are_trusted_unless_revoked(tmp_path):
    ca, ca_key = make_cert("Test CA", ca=True)
    signed, _ = make_cert("pki-client", issuer=ca, issuer_key=ca_key)
    listed, _ = make_cert("pki-listed", issuer=ca, issuer_key=ca_key)
    stranger, _ = make_cert("stranger")
    other_ca, other_key = make_cert("Other CA", ca=True)
    foreign, _ = make_cert("foreign", issuer=other_ca, issuer_key=other_key)

    async def body(env: Env):
        t = env.trust
        assert t.identify(der(signed))[1] is None  # no server.ca: no PKI mode
        (tmp_path / "server.ca").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        await t.refresh_pki()
        fp, rec = t.identify(der(signed))
        assert rec is not None and rec["name"] == "pki-client" and rec["type"] == "client"
        assert fp == hashlib.sha256(der(signed)).hexdigest()
        assert t.identify(der(stranger))[1] is None
        assert t.identify(der(foreign))[1] is None  # same subject shape, another CA's signature
        # A certificate in the store and CA-signed: trusted until the CRL lists it.
        await t.add(der(listed), name="listed", type="client", restricted=False, projects=[])
        assert t.identify(der(listed))[1]["name"] == "listed"
        write_crl(tmp_path / "server.crl", ca, ca_key, [signed.serial_number, listed.serial_number])
        await t.refresh_pki()
        assert t.identify(der(signed))[1] is None
        assert t.identify(der(listed))[1] is None  # revoked by the CA beats the store, as in LXD
        assert fp in env.revoked  # its open connections are told
        # A revocation list the CA did not sign fails closed.
        write_crl(tmp_path / "server.crl", other_ca, other_key, [])
        os.utime(tmp_path / "server.crl", ns=(time.time_ns(), time.time_ns() + 10**9))
        await t.refresh_pki()
        assert t.pki.state.crl_error and t.identify(der(signed))[1] is None
        # Without the CRL, trusted again; without server.ca, PKI mode ends.
        (tmp_path / "server.crl").unlink()
        await t.refresh_pki()
        assert t.identify(der(signed))[1] is not None
        (tmp_path / "server.ca").unlink()
        await t.refresh_pki()
        assert t.identify(der(signed))[1] is None and fp in env.revoked

    run(tmp_path, body)


def test_pki_a_non_ca_certificate_trusts_nobody(tmp_path):
    leaf, leaf_key = make_cert("not a CA", ca=False)
    child, _ = make_cert("child", issuer=leaf, issuer_key=leaf_key)

    async def body(env: Env):
        (tmp_path / "server.ca").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        await env.trust.refresh_pki()
        assert env.trust.pki.state.ca_error
        assert env.trust.identify(der(child))[1] is None

    run(tmp_path, body)


# -- throttling, passwords, tokens ------------------------------------------------------------------

def test_throttle_window():
    th = Throttle(failures=3, window=60)
    for i in range(3):
        assert not th.blocked("10.0.0.1", now=100 + i)
        th.failed("10.0.0.1", now=100 + i)
    assert th.blocked("10.0.0.1", now=103)
    assert not th.blocked("10.0.0.2", now=103)  # per address
    assert th.blocked("10.0.0.1", now=159)
    assert not th.blocked("10.0.0.1", now=161)  # the oldest failure left the window
    th.failed("10.0.0.1", now=162)
    th.succeeded("10.0.0.1")
    assert not th.blocked("10.0.0.1", now=162)
    small = Throttle(failures=1, window=60, max_addresses=2)
    for i, addr in enumerate(("a", "b", "c")):
        small.failed(addr, now=i)
    assert len(small._seen) == 2 and not small.blocked("a", now=3) and small.blocked("c", now=3)


def test_password_redeem_and_throttle(tmp_path, caplog):
    async def body(env: Env):
        t = env.trust
        assert await t.redeem("s3cret", "10.1.1.1") is None
        for _ in range(5):
            with pytest.raises(Forbidden) as e:
                await t.redeem("wrong", "10.1.1.1")
            assert e.value.message == "not authorized"
        # Throttled: the right password is refused too, without being checked.
        with pytest.raises(Forbidden) as e:
            await t.redeem("s3cret", "10.1.1.1")
        assert e.value.message == THROTTLE_MESSAGE
        # Another address is not affected.
        assert await t.redeem("s3cret", "10.1.1.2") is None
        # Parallel guesses count while they are checked: never more than the limit at once.
        results = await asyncio.gather(*(t.redeem("wrong", "10.1.1.3") for _ in range(8)),
                                       return_exceptions=True)
        messages = sorted(r.message for r in results)
        assert messages.count(THROTTLE_MESSAGE) == 3 and messages.count("not authorized") == 5

    with caplog.at_level("WARNING", logger="lxd.trust"):
        run(tmp_path, body, password="s3cret")
    failures = [r for r in caplog.records if r.getMessage() == "bad trust password"]
    assert len(failures) == 10 and {r.address for r in failures} == {"10.1.1.1", "10.1.1.3"}


def test_no_trust_password_refuses(tmp_path):
    async def body(env: Env):
        with pytest.raises(Forbidden):
            await env.trust.redeem("", "10.0.0.9")
        with pytest.raises(Forbidden):
            await env.trust.redeem("anything", "10.0.0.9")

    run(tmp_path, body)


def test_token_format_round_trip():
    s = tokens.encode("laptop", "ab" * 32, ["127.0.0.1:8443"], "cd" * 32)
    doc = json.loads(base64.b64decode(s))
    # The field names and order of LXD's api.CertificateAddToken; Go's zero time for "never".
    assert list(doc) == ["client_name", "fingerprint", "addresses", "secret", "expires_at"]
    assert doc["expires_at"] == "0001-01-01T00:00:00Z"
    assert tokens.decode(s) == doc
    for bad in ("", "s3cret", base64.b64encode(b"[]").decode(),
                base64.b64encode(json.dumps({**doc, "addresses": []}).encode()).decode(),
                base64.b64encode(json.dumps({**doc, "secret": ""}).encode()).decode()):
        assert tokens.decode(bad) is None


def test_token_expiry_expressions():
    start = dt.datetime(2024, 1, 31, 12, 0, tzinfo=dt.UTC).timestamp()
    assert tokens.expiry_after("", start) is None
    assert tokens.expiry_after("30S", start) == start + 30
    assert tokens.expiry_after("1d 2H 3M", start) == start + 86400 + 7200 + 180
    assert tokens.expiry_after("1w", start) == start + 7 * 86400
    # Go's AddDate: Jan 31 + 1 month is Mar 2 in a leap year (Feb 31 normalised).
    assert tokens.expiry_after("1m", start) == dt.datetime(2024, 3, 2, 12, 0, tzinfo=dt.UTC).timestamp()
    for bad in ("1h", "1H 2H", "H", "1 H", "1d,2H"):
        with pytest.raises(ValueError):
            schedule.validate_expiry(bad)


def test_token_single_use_revoke_and_expiry(tmp_path):
    async def body(env: Env):
        t = env.trust
        req = {"name": "laptop", "type": "client", "restricted": True, "projects": ["default"]}
        op = t.tokens.issue(req, fingerprint="ab" * 32, addresses=["127.0.0.1:8443"], expires_at=None)
        await asyncio.sleep(0)
        assert op.status is Status.RUNNING and op.cls == "token"
        meta = op.metadata
        assert set(meta) == {"secret", "fingerprint", "addresses", "request"} and len(meta["secret"]) == 64
        token = tokens.from_operation(op)
        assert tokens.decode(token)["client_name"] == "laptop"
        assert await t.redeem(token, "10.2.0.1") == req
        assert op.status is Status.CANCELLED
        with pytest.raises(Forbidden, match="No matching certificate add operation found"):
            await t.redeem(token, "10.2.0.1")  # single use
        # Revoked (DELETE /1.0/operations/{id}): refused.
        op2 = t.tokens.issue(req, fingerprint="ab" * 32, addresses=["127.0.0.1:8443"], expires_at=None)
        await asyncio.sleep(0)
        await op2.cancel()
        with pytest.raises(Forbidden, match="No matching"):
            await t.redeem(tokens.from_operation(op2), "10.2.0.2")
        # Expiring: cancelled when the time comes (listed no more), refused after.
        op3 = t.tokens.issue(req, fingerprint="ab" * 32, addresses=["127.0.0.1:8443"],
                             expires_at=time.time() + 0.2)
        assert "expiresAt" in op3.metadata and t.tokens.pending() == [op3]
        await asyncio.sleep(0.4)
        assert op3.status is Status.CANCELLED and t.tokens.pending() == []
        with pytest.raises(Forbidden):
            await t.redeem(tokens.from_operation(op3), "10.2.0.3")
        # A token whose timer has not fired yet but whose time is up: "Token has expired".
        op4 = t.tokens.issue(req, fingerprint="ab" * 32, addresses=["127.0.0.1:8443"],
                             expires_at=time.time() + 0.05)
        await asyncio.sleep(0)
        op4.metadata["expiresAt"] = tokens.rfc3339(time.time() - 1)
        with pytest.raises(Forbidden, match="Token has expired"):
            await t.redeem(tokens.from_operation(op4), "10.2.0.4")

    run(tmp_path, body)


def test_token_guesses_are_throttled(tmp_path):
    async def body(env: Env):
        t = env.trust
        op = t.tokens.issue({"name": "n", "type": "client"}, fingerprint="ab" * 32,
                            addresses=["127.0.0.1:8443"], expires_at=None)
        await asyncio.sleep(0)
        good = tokens.from_operation(op)
        guess = tokens.encode("n", "ab" * 32, ["127.0.0.1:8443"], "00" * 32)
        for _ in range(5):
            with pytest.raises(Forbidden, match="No matching"):
                await t.redeem(guess, "10.3.0.1")
        with pytest.raises(Forbidden, match="Too many failed attempts"):
            await t.redeem(good, "10.3.0.1")
        assert op.status is Status.RUNNING  # a throttled attempt uses nothing up
        assert await t.redeem(good, "10.3.0.2") == {"name": "n", "type": "client"}

    run(tmp_path, body)


def test_certificate_projects_follow_a_project_rename_and_leave_with_a_delete(tmp_path):
    cert, _ = make_cert("confined")
    other, _ = make_cert("free")

    async def body(env: Env):
        t = env.trust
        with env.db.engine.begin() as c:
            for name in ("p1", "p2"):
                c.exec_driver_sql(f"INSERT INTO projects (name, description, config) VALUES ('{name}', '', '{{}}')")
        with pytest.raises(NotFound):
            await t.add(der(cert), name="c", type="client", restricted=True, projects=["p1", "nope"])
        rec = await t.add(der(cert), name="c", type="client", restricted=True, projects=["p1", "p2"])
        free = await t.add(der(other), name="f", type="client", restricted=False, projects=[])
        await t.project_renamed("p1", "p3")
        assert t.identify(der(cert))[1]["projects"] == ["p3", "p2"]
        await t.project_deleted("p2")
        assert t.identify(der(cert))[1]["projects"] == ["p3"]
        assert t.identify(der(other))[1] is free
        # Written through: a restart reads the same.
        t2 = TrustService(db=env.db, lxd_dir=env.tmp, ops=env.ops, server=env.server)
        await t2.load()
        assert t2.identify(der(cert))[1]["projects"] == ["p3"]
        assert t2.get(rec["fingerprint"])["restricted"] is True

    run(tmp_path, body)
