"""The trust store (`/1.0/certificates`, trust password, certificate add tokens, PKI mode) driven
with the stock client, curl and pylxd: over the unix socket of daemon B of the `tls_pair`
fixture, and over TLS from clients of their own (LXD_CONF) inside the pair's namespace.

Every client connects from 127.0.0.1 except the throttling test's curl, which binds addresses of
its own (127.0.0.0/8 is all local), so that its failures throttle nobody else."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.helpers import SYSTEM_PYTHON, envelope_ok, run_prefix, wait_for

pytestmark = pytest.mark.integration

NOW = dt.datetime.now(dt.UTC)


# -- helpers -------------------------------------------------------------------------------------

class Client:
    """A stock `lxc` with a configuration (and client certificate) of its own, run inside the
    pair's namespace."""

    def __init__(self, pair, base: Path, tag: str):
        self.pair = pair
        self.conf = base / f"client-{tag}"
        self.conf.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "LXD_CONF": str(self.conf), "LXD_DIR": str(base / "no-local-daemon")}

    def lxc(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        r = subprocess.run(["nsenter", f"--net={self.pair.ns.path}", "lxc", *args], env=self.env,
                           capture_output=True, text=True, input=input, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"lxc {' '.join(args)} failed ({r.returncode}): {r.stderr}{r.stdout}")
        return r

    @property
    def fingerprint(self) -> str:
        return pem_fingerprint((self.conf / "client.crt").read_text())


def pem_fingerprint(pem: str) -> str:
    body = "".join(x for x in pem.strip().splitlines() if not x.startswith("-----"))
    return hashlib.sha256(base64.b64decode(body)).hexdigest()


def make_cert(path: Path, cn: str, *, issuer=None, issuer_key=None, ca: bool = False):
    """Write path.crt and path.key (PEM); returns (certificate, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (x509.CertificateBuilder().subject_name(subject)
            .issuer_name(issuer.subject if issuer is not None else subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(hours=1)).not_valid_after(NOW + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(issuer_key or key, hashes.SHA256()))
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    return cert, key


def curl(pair, *args: str, cert: Path | None = None, source: str | None = None) -> tuple[int, dict]:
    """(HTTP status, JSON body) of a curl request over TLS inside the pair's namespace, with the
    client certificate cert.crt/cert.key if given, from the local address `source` if given."""
    argv = ["nsenter", f"--net={pair.ns.path}", "curl", "-sk", "--max-time", "20", "-w", "\n%{http_code}"]
    if cert is not None:
        argv += ["--cert", str(cert.with_suffix(".crt")), "--key", str(cert.with_suffix(".key"))]
    if source is not None:
        argv += ["--interface", source]
    r = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60)
    body, _, status = r.stdout.rpartition("\n")
    assert status.isdigit(), (r.returncode, r.stdout, r.stderr)
    return int(status), (json.loads(body) if body.strip() else {})


def auth(pair, cert: Path) -> str:
    return curl(pair, f"{pair.url_b}/1.0", cert=cert)[1]["metadata"]["auth"]


def records(d) -> dict[str, dict]:
    return {c["fingerprint"]: c for c in d.api("GET", "/1.0/certificates?recursion=1").json()["metadata"]}


def token_of(output: str) -> str:
    return output.strip().splitlines()[-1].strip()


class Monitor:
    """`lxc monitor --type=lifecycle` on a daemon's unix socket, for the events a test causes."""

    def __init__(self, d):
        self.proc = subprocess.Popen(d.lxc_argv("monitor", "--type=lifecycle", "--format=json"), env=d.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(0.5)  # subscribed before the test acts

    def events(self) -> list[dict]:
        time.sleep(0.3)
        self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return [json.loads(line)["metadata"] for line in out.splitlines() if line.strip()]


# -- the unix socket: lxc config trust, curl, pylxd ---------------------------------------------

def test_trust_commands_over_the_unix_socket(tls_pair, tmp_path):
    b = tls_pair.b
    make_cert(tmp_path / "admin", "admin-cn")
    make_cert(tmp_path / "other", "other-cn")
    crt = tmp_path / "admin.crt"
    fp = pem_fingerprint(crt.read_text())
    mon = Monitor(b)
    b.lxc("config", "trust", "add", str(crt), "--name", "admin-x", "--restricted", "--projects", "default")
    listing = b.lxc("config", "trust", "list").stdout
    assert "admin-x" in listing and "admin-cn" in listing and fp[:12] in listing
    shown = yaml.safe_load(b.lxc("config", "trust", "show", fp[:12]).stdout)
    assert shown == {"name": "admin-x", "type": "client", "restricted": True, "projects": ["default"],
                     "certificate": crt.read_text(), "fingerprint": fp}
    # edit (non-interactive: YAML on stdin), then PATCH and PUT with ETags through curl.
    shown.update(name="edited", restricted=False, projects=[])
    b.lxc("config", "trust", "edit", fp, input=yaml.safe_dump(shown))
    r = b.api("GET", f"/1.0/certificates/{fp[:20]}")
    assert r.status_code == 200 and r.json()["metadata"]["name"] == "edited"
    assert r.json()["metadata"]["restricted"] is False
    etag = r.headers["ETag"]
    r = b.curl("-X", "PATCH", "-H", 'If-Match: "nope"', "-d", '{"name": "x"}', f"http://lxd/1.0/certificates/{fp}")
    assert json.loads(r.stdout)["error_code"] == 412
    r = b.curl("-X", "PATCH", "-H", f"If-Match: {etag}", "-d", '{"name": "patched"}',
               f"http://lxd/1.0/certificates/{fp}")
    assert json.loads(r.stdout)["status_code"] == 200, r.stdout
    got = b.api("GET", f"/1.0/certificates/{fp}").json()["metadata"]
    assert got["name"] == "patched" and got["projects"] == [] and got["type"] == "client"
    r = b.api("PUT", f"/1.0/certificates/{fp}", json={"name": "put", "type": "client", "restricted": True,
                                                      "projects": ["default"]})
    assert r.status_code == 200, r.text
    assert records(b)[fp]["name"] == "put" and records(b)[fp]["restricted"] is True
    # Mistakes, each in LXD's envelope.
    for body, status, text in (
        ({"type": "client", "certificate": "@@@"}, 400, "Invalid certificate material"),
        ({"type": "server", "certificate": crt.read_text()}, 400, "Invalid certificate type"),
        ({"type": "client", "certificate": crt.read_text()}, 409, "already in trust store"),
        ({"type": "client"}, 400, "Client is already trusted"),
        ({"type": "client", "certificate": "x", "token": True}, 400, "Can't use certificate if token"),
        ({"type": "client", "certificate": (tmp_path / "other.crt").read_text(), "projects": ["nope"]}, 404,
         "Project"),
    ):
        r = b.api("POST", "/1.0/certificates", json=body)
        envelope_ok(r.json())
        assert r.status_code == status and text in r.json()["error"], (body, r.text)
    assert b.api("GET", "/1.0/certificates/" + "0" * 64).status_code == 404
    assert b.api("GET", "/1.0/certificates/zz").status_code == 404
    assert b.api("PUT", f"/1.0/certificates/{fp}", json={"type": "bogus"}).status_code == 400
    b.lxc("config", "trust", "remove", fp[:12])
    assert b.api("GET", f"/1.0/certificates/{fp}").status_code == 404
    assert fp not in records(b)
    events = [(e["action"], e["source"]) for e in mon.events() if e["action"].startswith("certificate-")]
    url = f"/1.0/certificates/{fp}"
    assert events == [("certificate-created", url), ("certificate-updated", url), ("certificate-updated", url),
                      ("certificate-updated", url), ("certificate-deleted", url)], events


def test_pylxd_certificates(tls_pair, tmp_path):
    b = tls_pair.b
    make_cert(tmp_path / "py", "pylxd-cn")
    fp = pem_fingerprint((tmp_path / "py.crt").read_text())
    r = b.pylxd(f"""
cert = client.certificates.create("", open({str(tmp_path / 'py.crt')!r}, "rb").read())
print(json.dumps({{"fp": cert.fingerprint, "name": cert.name, "type": cert.type,
                  "all": [c.fingerprint for c in client.certificates.all()]}}))
client.certificates.get(cert.fingerprint).delete()
print(json.dumps([c.fingerprint for c in client.certificates.all()]))
""")
    assert r.returncode == 0, r.stderr
    first, after = (json.loads(x) for x in r.stdout.strip().splitlines())
    assert first["fp"] == fp and first["name"] == "pylxd-cn" and first["type"] == "client"
    assert fp in first["all"] and fp not in after


# -- over TLS: password, tokens, throttling, revocation -------------------------------------------

def test_remote_add_with_password(tls_pair, tmp_path):
    pair = tls_pair
    wrong = Client(pair, tmp_path, "wrong")
    r = wrong.lxc("remote", "add", "bw", pair.url_b, "--password=not-it", "--accept-certificate", check=False)
    assert r.returncode != 0 and "not authorized" in r.stderr, r.stderr
    assert "bw" not in wrong.lxc("remote", "list").stdout
    assert wrong.fingerprint not in records(pair.b)
    r = wrong.lxc("remote", "add", "bw", pair.url_b, f"--password={pair.password}", "--accept-certificate")
    assert "Client certificate now trusted by server: bw" in r.stdout
    assert "NAME" in wrong.lxc("list", "bw:").stdout
    rec = records(pair.b)[wrong.fingerprint]
    assert rec["type"] == "client" and rec["restricted"] is False
    # The daemon's log names every failure with the client's address.
    assert "bad trust password" in pair.b.read_log() and "127.0.0.1" in pair.b.read_log()
    pair.b.lxc("config", "trust", "remove", wrong.fingerprint)


def test_pylxd_authenticates_over_tls(tls_pair, tmp_path):
    pair = tls_pair
    make_cert(tmp_path / "pyt", "pylxd-tls")
    code = f"""
import json, warnings
warnings.simplefilter("ignore")
import pylxd
c = pylxd.Client(endpoint={pair.url_b!r}, cert=({str(tmp_path / 'pyt.crt')!r}, {str(tmp_path / 'pyt.key')!r}),
                 verify=False)
before = c.trusted
c.authenticate({pair.password!r})
print(json.dumps({{"before": before, "after": c.trusted, "n": isinstance(c.containers.all(), list)}}))
"""
    # requests lets these override a session's verify=False (pylxd sets that, not the request).
    env = {k: v for k, v in os.environ.items() if k not in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")}
    r = subprocess.run(["nsenter", f"--net={pair.ns.path}", SYSTEM_PYTHON, "-c", code], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"before": False, "after": True, "n": True}
    fp = pem_fingerprint((tmp_path / "pyt.crt").read_text())
    assert records(pair.b)[fp]["name"] == "pylxd-tls"
    assert pair.b.api("DELETE", f"/1.0/certificates/{fp}").status_code == 200


def test_token_flow(tls_pair, tmp_path):
    pair = tls_pair
    b = pair.b
    name = run_prefix() + "-laptop"
    out = b.lxc("config", "trust", "add", "--name", name, "--restricted", "--projects", "default").stdout
    assert f"Client {name} certificate add token:" in out
    token = token_of(out)
    doc = json.loads(base64.b64decode(token))
    server_fp = b.api("GET", "/1.0").json()["metadata"]["environment"]["certificate_fingerprint"]
    assert doc["client_name"] == name and doc["fingerprint"] == server_fp
    assert doc["addresses"] == [f"127.0.0.1:{pair.port_b}"] and len(doc["secret"]) == 64
    assert doc["expires_at"] == "0001-01-01T00:00:00Z"
    assert token in b.lxc("config", "trust", "list-tokens").stdout
    # The token is the URL argument; the client dials the addresses in it.
    laptop = Client(pair, tmp_path, "laptop")
    laptop.lxc("remote", "add", "bt", token)
    assert json.loads(laptop.lxc("query", "bt:/1.0").stdout)["auth"] == "trusted"
    # Added with what the token was issued for.
    rec = records(b)[laptop.fingerprint]
    assert (rec["name"], rec["restricted"], rec["projects"]) == (name, True, ["default"])
    assert token not in b.lxc("config", "trust", "list-tokens").stdout
    # Single use.
    thief = Client(pair, tmp_path, "thief")
    r = thief.lxc("remote", "add", "bt", token, check=False)
    assert r.returncode != 0 and "No matching certificate add operation found" in r.stderr, r.stderr
    assert thief.lxc("remote", "list").stdout.count("bt ") == 0
    # A restricted client is no administrator.
    # (5.0.2's `config trust add REMOTE:` reads REMOTE: as a certificate file: ask the API.)
    r = laptop.lxc("query", "-X", "POST", "bt:/1.0/certificates", "--data",
                   json.dumps({"type": "client", "token": True, "name": "more"}), check=False)
    assert r.returncode != 0 and "not authorized" in r.stderr, r.stderr
    a_fp = pem_fingerprint((Path(pair.a.conf_dir) / "client.crt").read_text())  # the fixture's remote
    assert a_fp in records(b)
    r = laptop.lxc("config", "trust", "remove", f"bt:{a_fp}", check=False)
    assert r.returncode != 0 and "not authorized" in r.stderr
    # Revoked token.
    out = b.lxc("config", "trust", "add", "--name", name + "-rev").stdout
    revoked = token_of(out)
    assert "deleted" in b.lxc("config", "trust", "revoke-token", name + "-rev").stdout
    assert revoked not in b.lxc("config", "trust", "list-tokens").stdout
    late = Client(pair, tmp_path, "late")
    r = late.lxc("remote", "add", "bt", revoked, check=False)
    assert r.returncode != 0 and "No matching certificate add operation found" in r.stderr, r.stderr
    # A token also works where the client asks for the password.
    other = token_of(b.lxc("config", "trust", "add", "--name", name + "-pw").stdout)
    viapw = Client(pair, tmp_path, "viapw")
    r = viapw.lxc("remote", "add", "bp", pair.url_b, f"--password={other}", "--accept-certificate")
    assert "Client certificate now trusted by server: bp" in r.stdout
    assert records(b)[viapw.fingerprint]["name"] == name + "-pw"
    b.lxc("config", "trust", "remove", viapw.fingerprint)
    # Removing the certificate takes effect at once.
    assert "NAME" in laptop.lxc("list", "bt:").stdout
    b.lxc("config", "trust", "remove", laptop.fingerprint)
    r = laptop.lxc("list", "bt:", check=False)
    assert r.returncode != 0 and "not authorized" in r.stderr
    assert json.loads(laptop.lxc("query", "bt:/1.0").stdout)["auth"] == "untrusted"


def test_token_expiry(tls_pair, tmp_path):
    b = tls_pair.b
    r = b.api("PATCH", "/1.0", json={"config": {"core.remote_token_expiry": "2S"}})
    assert r.status_code == 200, r.text
    try:
        assert b.api("PATCH", "/1.0", json={"config": {"core.remote_token_expiry": "2x"}}).status_code == 400
        name = run_prefix() + "-exp"
        token = token_of(b.lxc("config", "trust", "add", "--name", name).stdout)
        expires = json.loads(base64.b64decode(token))["expires_at"]
        assert expires != "0001-01-01T00:00:00Z"
        assert name in b.lxc("config", "trust", "list-tokens").stdout
        wait_for(lambda: name not in b.lxc("config", "trust", "list-tokens").stdout, timeout=10, interval=0.5)
        r = Client(tls_pair, tmp_path, "slow").lxc("remote", "add", "bx", token, check=False)
        assert r.returncode != 0 and "No matching certificate add operation found" in r.stderr, r.stderr
    finally:
        b.api("PATCH", "/1.0", json={"config": {"core.remote_token_expiry": ""}})


def test_wrong_password_and_token_are_throttled(tls_pair, tmp_path):
    pair = tls_pair
    make_cert(tmp_path / "guess", "guesser")
    url = f"{pair.url_b}/1.0/certificates"
    source = "127.0.0.77"
    fake = base64.b64encode(json.dumps({"client_name": "x", "fingerprint": "ab" * 32, "addresses": ["127.0.0.1:1"],
                                        "secret": "00" * 32, "expires_at": "0001-01-01T00:00:00Z"}).encode())
    for pw in ("a", "b", fake.decode(), "c", "d"):
        status, body = curl(pair, "-X", "POST", "-d", json.dumps({"type": "client", "password": pw}), url,
                            cert=tmp_path / "guess", source=source)
        assert status == 403 and body["error"] in ("not authorized", "No matching certificate add operation found")
    # Throttled: even the right password is refused now, unchecked.
    good = json.dumps({"type": "client", "password": pair.password})
    status, body = curl(pair, "-X", "POST", "-d", good, url, cert=tmp_path / "guess", source=source)
    assert (status, body["error"]) == (403, "Too many failed attempts, try again later")
    assert auth(pair, tmp_path / "guess") == "untrusted"
    # Per address: from another one the password works.
    status, _ = curl(pair, "-X", "POST", "-d", good, url, cert=tmp_path / "guess", source="127.0.0.78")
    assert status == 201
    assert auth(pair, tmp_path / "guess") == "trusted"
    log = pair.b.read_log()
    assert log.count("address=127.0.0.77") >= 5 and "bad certificate add token" in log
    fp = pem_fingerprint((tmp_path / "guess.crt").read_text())
    assert pair.b.api("DELETE", f"/1.0/certificates/{fp}").status_code == 200


def test_curl_password_flow_and_removal(tls_pair, tmp_path):
    pair = tls_pair
    make_cert(tmp_path / "k", "curl-client")
    fp = pem_fingerprint((tmp_path / "k.crt").read_text())
    assert auth(pair, tmp_path / "k") == "untrusted"
    status, _ = curl(pair, f"{pair.url_b}/1.0/certificates", cert=tmp_path / "k")
    assert status == 403
    # Untrusted: no token issuing, no password-less add.
    for body in ({"type": "client"}, {"type": "client", "token": True, "name": "x"},
                 {"type": "client", "token": True, "name": "x", "password": pair.password}):
        status, _ = curl(pair, "-X", "POST", "-d", json.dumps(body), f"{pair.url_b}/1.0/certificates",
                         cert=tmp_path / "k")
        assert status == 403, body
    status, body = curl(pair, "-X", "POST", "-d", json.dumps({"type": "client", "password": pair.password}),
                        f"{pair.url_b}/1.0/certificates", cert=tmp_path / "k")
    assert status == 201, body
    assert auth(pair, tmp_path / "k") == "trusted"
    assert records(pair.b)[fp]["name"] == "curl-client"  # no name given: the CN
    status, body = curl(pair, f"{pair.url_b}/1.0/certificates", cert=tmp_path / "k")
    assert status == 200 and f"/1.0/certificates/{fp}" in body["metadata"]
    # Trusted now: adding itself again is refused as LXD does.
    status, body = curl(pair, "-X", "POST", "-d", '{"type": "client"}', f"{pair.url_b}/1.0/certificates",
                        cert=tmp_path / "k")
    assert (status, body["error"]) == (400, "Client is already trusted")
    assert pair.b.api("DELETE", f"/1.0/certificates/{fp[:16]}").status_code == 200
    assert auth(pair, tmp_path / "k") == "untrusted"
    assert curl(pair, f"{pair.url_b}/1.0/instances", cert=tmp_path / "k")[0] == 403


def test_pki_mode(tls_pair, tmp_path):
    pair = tls_pair
    lxd_dir = Path(pair.b.lxd_dir)
    ca, ca_key = make_cert(tmp_path / "ca", "Test CA", ca=True)
    signed, _ = make_cert(tmp_path / "signed", "pki-client", issuer=ca, issuer_key=ca_key)
    make_cert(tmp_path / "stranger", "stranger")
    assert auth(pair, tmp_path / "signed") == "untrusted"
    try:
        (lxd_dir / "server.ca").write_bytes((tmp_path / "ca.crt").read_bytes())
        wait_for(lambda: auth(pair, tmp_path / "signed") == "trusted", timeout=10, interval=0.3)
        assert curl(pair, f"{pair.url_b}/1.0/instances", cert=tmp_path / "signed")[0] == 200
        assert auth(pair, tmp_path / "stranger") == "untrusted"
        fp = pem_fingerprint((tmp_path / "signed.crt").read_text())
        assert fp not in records(pair.b)  # trusted without being added
        crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
               .last_update(NOW - dt.timedelta(minutes=1)).next_update(NOW + dt.timedelta(days=1))
               .add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(signed.serial_number)
                                        .revocation_date(NOW - dt.timedelta(minutes=1)).build())
               .sign(ca_key, hashes.SHA256()))
        (lxd_dir / "server.crl").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        wait_for(lambda: auth(pair, tmp_path / "signed") == "untrusted", timeout=10, interval=0.3)
        assert curl(pair, f"{pair.url_b}/1.0/instances", cert=tmp_path / "signed")[0] == 403
    finally:
        for name in ("server.ca", "server.crl"):
            (lxd_dir / name).unlink(missing_ok=True)


def test_restricted_client_renews_only_its_own_certificate(tls_pair, tmp_path):
    pair = tls_pair
    b = pair.b
    make_cert(tmp_path / "old", "renewer")
    make_cert(tmp_path / "new", "renewer")
    make_cert(tmp_path / "bystander", "bystander")
    old_fp = pem_fingerprint((tmp_path / "old.crt").read_text())
    new_fp = pem_fingerprint((tmp_path / "new.crt").read_text())
    by_fp = pem_fingerprint((tmp_path / "bystander.crt").read_text())
    b.lxc("config", "trust", "add", str(tmp_path / "old.crt"), "--name", "renewer", "--restricted",
          "--projects", "default")
    b.lxc("config", "trust", "add", str(tmp_path / "bystander.crt"), "--name", "bystander")
    try:
        url = f"{pair.url_b}/1.0/certificates"
        mine = {"name": "renewer", "type": "client", "restricted": True, "projects": ["default"]}
        # Anything but the certificate, or anyone else's record: refused.
        for target, body in ((old_fp, {**mine, "restricted": False}), (old_fp, {**mine, "name": "boss"}),
                             (by_fp, {"name": "bystander", "type": "client", "restricted": False, "projects": []})):
            status, doc = curl(pair, "-X", "PUT", "-d", json.dumps(body), f"{url}/{target}", cert=tmp_path / "old")
            assert status == 403, (target, body, doc)
        status, _ = curl(pair, "-X", "DELETE", f"{url}/{by_fp}", cert=tmp_path / "old")
        assert status == 403 and by_fp in records(b)
        # Its own certificate: replaced; the old one stops working at once.
        body = {**mine, "certificate": (tmp_path / "new.crt").read_text()}
        status, doc = curl(pair, "-X", "PUT", "-d", json.dumps(body), f"{url}/{old_fp}", cert=tmp_path / "old")
        assert status == 200, doc
        assert auth(pair, tmp_path / "old") == "untrusted" and auth(pair, tmp_path / "new") == "trusted"
        rec = records(b)[new_fp]
        assert (rec["name"], rec["restricted"], rec["projects"]) == ("renewer", True, ["default"])
        assert old_fp not in records(b)
    finally:
        for fp in (old_fp, new_fp, by_fp):
            b.api("DELETE", f"/1.0/certificates/{fp}")
