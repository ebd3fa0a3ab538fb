"""Wire models for the trust store (LXD's api.CertificatesPost / CertificatePut)."""

from __future__ import annotations

from pydantic import StrictBool, StrictStr

from lxd_daemon.wire import Request


class CertificatePut(Request):
    name: StrictStr = ""
    type: StrictStr = ""  # "client" or "metrics"; "" means client
    restricted: StrictBool = False
    projects: list[StrictStr] = []
    # PEM (GET shows it so); POST also takes base64 of the DER, as LXD does.
    certificate: StrictStr = ""


class CertificatesPost(CertificatePut):
    # The trust password, or a certificate add token (what `lxc remote add NAME TOKEN` sends).
    password: StrictStr = ""
    token: StrictBool = False  # issue a certificate add token instead of adding a certificate
