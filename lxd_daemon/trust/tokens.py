"""Certificate add tokens (`lxc config trust add` without a certificate), as LXD 5.0 makes them.

A token is a running operation of class `token` in the default project, kept in memory only (as
LXD keeps its pending operations: a restart drops every token). Its metadata is what the stock
client turns into the printed token (shared/api ToCertificateAddToken):

    {"secret": <64 hex>, "fingerprint": <server certificate sha256>, "addresses": ["host:port"],
     "request": {<the CertificatesPost: name, type, restricted, projects, ...>},
     "expiresAt": <RFC 3339, only with core.remote_token_expiry>}

The printed token is base64 (standard alphabet, padded) of the JSON
`{"client_name", "fingerprint", "addresses", "secret", "expires_at"}`; `lxc remote add NAME TOKEN`
decodes it, dials the addresses, checks the server certificate against `fingerprint`, and sends
the whole token string as `password` in an untrusted `POST /1.0/certificates`. A token is used
once: the operation is cancelled when it is redeemed, revoked (`DELETE /1.0/operations/{id}`,
`lxc config trust revoke-token`) or expired.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import secrets
import time
from datetime import UTC, datetime

from lxd_daemon.ops.manager import CLASS_TOKEN, Operation, OperationManager, Status
from lxd_daemon.util import schedule
from lxd_daemon.util.timefmt import ZERO_TIME, parse_rfc3339, rfc3339

DESCRIPTION = "Certificate add token"

# core.remote_token_expiry is LXD's expiry expression ("1d 12H", "30S"): util/schedule.py.


def expiry_after(spec: str, start: float) -> float | None:
    """The unix time a token made at `start` expires under `spec`; None for no expiry."""
    at = schedule.expiry_at(spec, datetime.fromtimestamp(start, UTC))
    return at.timestamp() if at is not None else None


# -- the printed token ---------------------------------------------------------------------------

def encode(client_name: str, fingerprint: str, addresses: list[str], secret: str,
           expires_at: str | None = None) -> str:
    """The token string `lxc config trust add` prints (field order as Go marshals the struct)."""
    doc = {"client_name": client_name, "fingerprint": fingerprint, "addresses": list(addresses),
           "secret": secret, "expires_at": expires_at or ZERO_TIME}
    return base64.b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode()


def decode(value: str) -> dict | None:
    """The fields of a token string; None when `value` is not one (a plain password)."""
    if not value or len(value) > 65536:
        return None
    try:
        raw = base64.b64decode(value.replace("\r", "").replace("\n", ""), validate=True)
        doc = json.loads(raw)
    except (binascii.Error, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    name, secret, fp, addrs = (doc.get(k) for k in ("client_name", "secret", "fingerprint", "addresses"))
    if not (isinstance(name, str) and name and isinstance(secret, str) and secret and isinstance(fp, str)
            and fp and isinstance(addrs, list) and addrs and all(isinstance(a, str) for a in addrs)):
        return None
    return doc


def from_operation(op: Operation) -> str:
    """The token string of a token operation (as the client builds it from the metadata)."""
    meta = op.metadata or {}
    return encode(meta["request"]["name"], meta["fingerprint"], meta["addresses"], meta["secret"],
                  meta.get("expiresAt"))


# -- the operations ------------------------------------------------------------------------------

class Tokens:
    """Issues token operations and redeems them, once."""

    def __init__(self, ops: OperationManager):
        self.ops = ops
        self._issued: dict[str, Operation] = {}  # op id -> token operation, while it runs

    def issue(self, request: dict, *, fingerprint: str, addresses: list[str],
              expires_at: float | None) -> Operation:
        meta: dict = {"secret": secrets.token_hex(32), "fingerprint": fingerprint,
                      "addresses": list(addresses), "request": request}
        run = None
        if expires_at is not None:
            meta["expiresAt"] = rfc3339(expires_at)

            async def run(op: Operation) -> None:  # cancelled at expiry, as LXD's expired-token task does
                await asyncio.sleep(max(0.0, expires_at - time.time()))
                op.set_status(Status.CANCELLED, "Token expired")

        # A token belongs to the server: its operation is in `default`, as LXD's is.
        op = self.ops.create(cls=CLASS_TOKEN, description=DESCRIPTION, metadata=meta, run=run, project="default")
        self._issued[op.id] = op
        return op

    def pending(self) -> list[Operation]:
        live = {}
        for op_id, op in self._issued.items():
            if not op.status.final:
                live[op_id] = op
        self._issued = live
        return list(live.values())

    def take(self, secret: str) -> tuple[Operation | None, str]:
        """The running token operation whose secret this is, now used up (cancelled); or None
        and why. Single use holds without a lock: finding it and marking it used happen with no
        await in between."""
        found = None
        for op in self.pending():
            mine = (op.metadata or {}).get("secret", "")
            if op.status is Status.RUNNING and hmac.compare_digest(mine.encode(), secret.encode()):
                found = op
                break
        if found is None:
            return None, "No matching certificate add operation found"
        expires = (found.metadata or {}).get("expiresAt")
        expired = bool(expires) and parse_rfc3339(expires) < time.time()
        found.set_status(Status.CANCELLED, "Token expired" if expired else "Token used")
        if found.task is not None and not found.task.done():
            found.task.cancel()  # its expiry timer
        self._issued.pop(found.id, None)
        if expired:
            return None, "Token has expired"
        return found, ""
