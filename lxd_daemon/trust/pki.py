"""PKI mode: client certificates signed by `$LXD_DIR/server.ca` are trusted without being added,
unless the CA's revocation list (`server.crl`, or LXD's own name for it, `ca.crl`) lists them.

The files are read off the event loop (`load_state`, run in a thread by the trust service's
watcher) and swapped in whole; `PKI.check` is then a dictionary lookup for a certificate seen
before, and one signature check (then cached) for a new one. Anything wrong with the files fails
closed: a CA that can't be read trusts nobody, a revocation list that can't be read or isn't
signed by the CA makes every CA-signed certificate untrusted, and both are logged.

`cryptography` is imported only here and only when a CA exists (it costs ~15 MiB).
The validity dates of a trusted certificate are read by `der_validity`, a few lines of DER,
so that checking a known certificate on every request needs no parser at all.
"""

from __future__ import annotations

import base64
import calendar
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("lxd.trust")

CA_FILE = "server.ca"
CRL_FILES = ("server.crl", "ca.crl")
CACHE_LIMIT = 4096  # certificates whose verdict is remembered (a client can present any number)

TRUSTED = "trusted"
REVOKED = "revoked"


# -- DER -----------------------------------------------------------------------------------------

class DERError(ValueError):
    pass


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of contents) of the DER element at pos."""
    if pos + 2 > len(data):
        raise DERError("truncated element")
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise DERError("bad length")
        length = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    end = pos + length
    if end > len(data):
        raise DERError("truncated contents")
    return tag, pos, end


def _time(tag: int, raw: bytes) -> float:
    text = raw.decode("ascii")
    if not text.endswith("Z"):
        raise DERError("time is not UTC")
    text = text[:-1].split(".", 1)[0]
    if tag == 0x17:  # UTCTime: YYMMDDHHMM[SS]
        year = int(text[:2])
        text = str(1900 + year if year >= 50 else 2000 + year) + text[2:]
    elif tag != 0x18:  # GeneralizedTime: YYYYMMDDHHMM[SS]
        raise DERError("not a time")
    if len(text) == 12:
        text += "00"
    if len(text) != 14 or not text.isdigit():
        raise DERError("bad time")
    parts = (int(text[:4]), int(text[4:6]), int(text[6:8]), int(text[8:10]), int(text[10:12]), int(text[12:14]))
    return float(calendar.timegm((*parts, 0, 0, 0)))


def der_validity(der: bytes) -> tuple[float, float]:
    """(notBefore, notAfter) of an X.509 certificate in DER, as unix times."""
    tag, start, _ = _tlv(der, 0)  # Certificate SEQUENCE
    if tag != 0x30:
        raise DERError("not a certificate")
    tag, pos, _ = _tlv(der, start)  # TBSCertificate SEQUENCE
    if tag != 0x30:
        raise DERError("not a certificate")
    tag, _, end = _tlv(der, pos)
    if tag == 0xA0:  # [0] version
        pos = end
        tag, _, end = _tlv(der, pos)
    pos = end  # serialNumber
    for _ in range(2):  # signature AlgorithmIdentifier, issuer Name
        _, _, pos = _tlv(der, pos)
    tag, vpos, _ = _tlv(der, pos)  # Validity SEQUENCE
    if tag != 0x30:
        raise DERError("no validity")
    t1, s1, e1 = _tlv(der, vpos)
    t2, s2, e2 = _tlv(der, e1)
    return _time(t1, der[s1:e1]), _time(t2, der[s2:e2])


def der_to_pem(der: bytes) -> str:
    b64 = base64.b64encode(der).decode()
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"


# -- the CA and its revocation list ----------------------------------------------------------

@dataclass
class PKIState:
    """What server.ca and the CRL held when they were last read."""

    stamp: tuple = ()  # (path, mtime_ns, size) of each file present: a change means reload
    ca: object = None  # cryptography x509.Certificate, or None (no PKI mode)
    ca_error: str = ""  # server.ca exists but is unusable: nobody is trusted through it
    revoked: frozenset[int] = frozenset()  # serial numbers in the CRL
    crl_error: str = ""  # the CRL exists but is unusable: no CA-signed certificate is trusted

    @property
    def enabled(self) -> bool:
        return bool(self.stamp) and any(p.endswith(CA_FILE) for p, _, _ in self.stamp)


def file_stamp(lxd_dir: Path) -> tuple:
    out = []
    for name in (CA_FILE, *CRL_FILES):
        p = lxd_dir / name
        try:
            st = os.stat(p)
        except OSError:
            continue
        out.append((str(p), st.st_mtime_ns, st.st_size))
    return tuple(out)


def _load_cert(data: bytes):
    from cryptography import x509

    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def load_state(lxd_dir: Path, stamp: tuple | None = None) -> PKIState:
    """Read server.ca and the CRL (blocking: run it in a thread)."""
    stamp = file_stamp(lxd_dir) if stamp is None else stamp
    state = PKIState(stamp=stamp)
    ca_path = lxd_dir / CA_FILE
    if not ca_path.exists():
        return state
    from cryptography import x509

    try:
        ca = _load_cert(ca_path.read_bytes())
        try:
            bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
            if not bc.ca:
                raise ValueError("it is not a CA certificate (basicConstraints CA:FALSE)")
        except x509.ExtensionNotFound:
            if ca.version == x509.Version.v3:
                raise ValueError("it is not a CA certificate (no basicConstraints)") from None
        state.ca = ca
    except (OSError, ValueError) as e:
        state.ca_error = f"{ca_path}: {e}"
        log.error("PKI: unusable CA certificate, no client is trusted through it", extra={"err": state.ca_error})
        return state
    for name in CRL_FILES:
        crl_path = lxd_dir / name
        if not crl_path.exists():
            continue
        try:
            data = crl_path.read_bytes()
            if b"-----BEGIN" in data:
                crl = x509.load_pem_x509_crl(data)
            else:
                crl = x509.load_der_x509_crl(data)
            if not crl.is_signature_valid(ca.public_key()):
                raise ValueError("it is not signed by server.ca")
            state.revoked = frozenset(r.serial_number for r in crl)
        except (OSError, ValueError, TypeError) as e:
            state.crl_error = f"{crl_path}: {e}"
            log.error("PKI: unusable revocation list, no CA-signed client is trusted",
                      extra={"err": state.crl_error})
        break  # server.crl wins over ca.crl
    return state


def _sha256():
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


@dataclass
class Verdict:
    status: str | None  # TRUSTED, REVOKED, or None (not signed by the CA)
    not_before: float = 0.0
    not_after: float = 0.0
    name: str = ""
    serial: int = 0
    record: dict | None = None  # the trust record made for it (store.identify), once


@dataclass
class PKI:
    lxd_dir: Path
    state: PKIState = field(default_factory=PKIState)
    _cache: dict[str, Verdict] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.state.ca is not None or bool(self.state.ca_error)

    def swap(self, state: PKIState) -> list[str]:
        """Put a freshly read state in place. Returns the fingerprints that were trusted through
        the CA and no longer are (revoked, or the CA went away or changed)."""
        old_ca = self.state.ca
        before = {fp: v for fp, v in self._cache.items() if v.status == TRUSTED}
        self.state = state
        same_ca = (old_ca is not None and state.ca is not None
                   and old_ca.fingerprint(_sha256()) == state.ca.fingerprint(_sha256()))
        if same_ca and not state.crl_error:
            # Only the revocation list changed: keep the verdicts, mark the newly revoked.
            for fp, v in list(self._cache.items()):
                if v.status == REVOKED and v.serial not in state.revoked:
                    del self._cache[fp]  # no longer revoked: judged afresh when next seen
                elif v.status == TRUSTED and v.serial in state.revoked:
                    v.status = REVOKED
            return [fp for fp, v in before.items() if v.status == REVOKED]
        self._cache = {}
        return list(before)  # another CA (or none): nothing it vouched for stands

    def verdict(self, der: bytes, fp: str) -> Verdict:
        """How the CA judges this certificate (cached per fingerprint)."""
        v = self._cache.get(fp)
        if v is not None:
            return v
        v = self._judge(der)
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        self._cache[fp] = v
        return v

    def _judge(self, der: bytes) -> Verdict:
        ca = self.state.ca
        if ca is None:
            return Verdict(None)
        from cryptography import x509
        from cryptography.exceptions import InvalidSignature

        try:
            cert = x509.load_der_x509_certificate(der)
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            return Verdict(None)
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        v = Verdict(TRUSTED, cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp(),
                    str(cn[0].value) if cn else "", cert.serial_number)
        if self.state.crl_error or cert.serial_number in self.state.revoked:
            v.status = REVOKED
        return v

    def check(self, der: bytes, fp: str) -> Verdict | None:
        """The verdict for a CA-signed certificate valid now; None when the CA does not vouch for it."""
        v = self.verdict(der, fp)
        if v.status is None:
            return None
        if v.status == TRUSTED and not (v.not_before <= time.time() <= v.not_after):
            return None
        return v
