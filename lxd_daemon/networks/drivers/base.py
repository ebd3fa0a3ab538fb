"""The interface of a managed network type, and the value checks its config keys are made of.

A driver declares its keys as data (`keys`: key -> validator, each a function of the string
value that raises ValueError with LXD's wording), fills defaults on create (`fill_config`), checks
combinations of keys (`check`), and owns what the network puts on the host:

- `create()`   checks made before the record is written (e.g. a host interface by that name);
- `start()`    declarative and idempotent: brings the host to what the config says, at create, at
               every daemon start (adopting what already runs, never disturbing running
               containers) and after a change;
- `update(old)` applies a new `config` (the driver's attribute is already the new one);
- `stop()`     removes what start() made (used by delete and rename);
- `delete()`   stop() plus the network's state directory;
- `close()`    at daemon exit: stop supervising, leave everything running;
- `state()`, `leases()` and the values nic devices need (`nic_parent`, `mtu`, `subnet`).

Host calls block; drivers run them through asyncio.to_thread.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lxd_daemon.networks import subnets
from lxd_daemon.util.validate import is_any, is_bool, is_interface_name, is_mac, is_mtu, is_vlan, list_of  # noqa: F401 (the drivers. key tables)

Validator = Callable[[str], None]

TRUE = ("true", "1", "yes", "on")
FALSE = ("false", "0", "no", "off")


def truthy(value: str | None) -> bool:
    return (value or "").lower() in TRUE


def falsy_or_empty(value: str | None) -> bool:
    return (value or "").lower() in (*FALSE, "")


# -- value checks (LXD's shared/validate wording) -------------------------------------------------

def optional(*checks: Validator) -> Validator:
    def check(value: str) -> None:
        if value == "":
            return
        for c in checks:
            c(value)
    return check


def required(*checks: Validator) -> Validator:
    def check(value: str) -> None:
        if value == "":
            raise ValueError("Required value")
        for c in checks:
            c(value)
    return check


def one_of(*valid: str) -> Validator:
    def check(value: str) -> None:
        if value not in valid:
            raise ValueError(f"Invalid value {value!r} (not one of {list(valid)})")
    return check


def is_address(family: int) -> Validator:
    def check(value: str) -> None:
        subnets.address(value, family)
    return check


def is_cidr_address(family: int) -> Validator:
    """An address with its prefix (`10.0.0.1/24`), as a bridge's or gateway's address."""
    def check(value: str) -> None:
        subnets.interface(value, family)
    return check


def is_network(family: int) -> Validator:
    def check(value: str) -> None:
        subnets.network(value, family)
    return check


def is_range(family: int) -> Validator:
    def check(value: str) -> None:
        subnets.ranges(value, family)
    return check


def address_or(family: int, *words: str) -> Validator:
    cidr = is_cidr_address(family)

    def check(value: str) -> None:
        if value in words:
            return
        cidr(value)
    return check


def is_duration(value: str) -> None:
    """dnsmasq's lease time: `infinite` or a number with an optional s/m/h/d/w suffix."""
    if value != "infinite" and not re.fullmatch(r"[0-9]+[smhdw]?", value):
        raise ValueError(f"Invalid lease time {value!r} (a number with an optional s, m, h, d or w "
                         "suffix, or \"infinite\")")


# -- the driver interface -------------------------------------------------------------------------

@dataclass
class DriverContext:
    """What a driver may use of the daemon (given by the network service)."""

    lxd_dir: Path
    firewall: Any = None  # networks.firewall.Firewall (Part A), or None where nftables is missing
    # A stable per-daemon seed (the server certificate's fingerprint) for generated MAC addresses.
    seed: str = ""
    # Prefixes the host uses (routes and addresses) other than the network's own: `auto` and
    # the overlap checks read only these. Callable so tests can give their own.
    host_prefixes: Callable[[], list] = field(default=lambda: [])
    # Called when a supervised process or a host object of the network changed unexpectedly.
    debug: bool = False

    @property
    def networks_dir(self) -> Path:
        return self.lxd_dir / "networks"


class InvalidConfig(ValueError):
    """A config that fails validation; the message is LXD's, ready for a 400."""


class NetworkDriver:
    type: ClassVar[str] = ""
    # key -> validator of its value; keys starting with `user.` are always accepted.
    keys: ClassVar[dict[str, Validator]] = {}
    # Whether the network type makes an interface of the network's own name on the host.
    has_interface: ClassVar[bool] = False

    def __init__(self, name: str, config: dict[str, str], ctx: DriverContext, *, id: int = 0,
                 project: str = "default"):
        self.name = name
        self.config = dict(config)
        self.ctx = ctx
        self.id = id
        self.project = project

    # -- names and config ----------------------------------------------------------------------

    @classmethod
    def validate_name(cls, name: str) -> None:
        """LXD's common network name rules (URL-safe, no `:`); raises ValueError."""
        for c in ("/", "?", "&", "+"):
            if c in name:
                raise ValueError(f"Cannot contain {c!r}")
        if ":" in name:
            raise ValueError("Cannot contain ':'")

    def fill_config(self, config: dict[str, str]) -> dict[str, str]:
        """The config of a new network with the type's defaults filled in."""
        return dict(config)

    def populate_auto(self, config: dict[str, str], used: list) -> dict[str, str]:
        """`auto` addresses replaced by subnets not in `used` (types with addresses override)."""
        return config

    def validate(self, config: dict[str, str]) -> None:
        """Every key known and its value valid, then the type's cross-key checks."""
        for key in sorted(config):
            value = config[key]
            check = self.keys.get(key)
            if check is None:
                if key.startswith("user."):
                    continue
                raise InvalidConfig(f"Invalid option for network {self.name!r} option {key!r}")
            try:
                check(value)
            except ValueError as e:
                raise InvalidConfig(f"Invalid value for network {self.name!r} option {key!r}: {e}") from None
        # Required keys are checked even when absent (as LXD runs every rule).
        for key, check in self.keys.items():
            if key not in config:
                try:
                    check("")
                except ValueError as e:
                    raise InvalidConfig(f"Invalid value for network {self.name!r} option {key!r}: {e}") from None
        self.check(config)

    def check(self, config: dict[str, str]) -> None:
        """Checks across keys (raise InvalidConfig)."""

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.ctx.networks_dir / self.name

    async def create(self) -> None:
        """Checks before the network's record is written."""

    async def start(self) -> None:
        """Bring the host to what the config says (idempotent)."""

    async def update(self, old_config: dict[str, str]) -> None:
        await self.start()

    async def stop(self) -> None:
        """Remove what start() made on the host."""

    async def delete(self) -> None:
        await self.stop()
        path = self.state_dir
        await asyncio.to_thread(shutil.rmtree, path, True)

    async def rename(self, new_name: str) -> None:
        self.name = new_name

    async def close(self) -> None:
        """Daemon exit: stop watching; whatever runs keeps running."""

    # -- reads ---------------------------------------------------------------------------------

    async def state(self) -> dict:
        from lxd_daemon.networks import host

        name = self.nic_parent()
        if not await asyncio.to_thread(host.exists, name):
            from lxd_daemon.errors import NotFound

            raise NotFound(f"Network interface {name!r} not found")
        return await asyncio.to_thread(host.state, name)

    async def leases(self) -> list[dict]:
        return []

    def nic_parent(self) -> str:
        return self.config.get("parent", self.name)

    def mtu(self) -> int | None:
        value = self.config.get("mtu", "")
        return int(value) if value else None

    def subnet(self, family: int) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface | None:
        return None

    def subnets_used(self) -> list:
        """The prefixes this network puts on the host (left out of overlap checks on itself)."""
        return [s.network for s in (self.subnet(4), self.subnet(6)) if s is not None]

    async def nic_attach(self, key: str, *, hwaddr: str, hostname: str, ipv4: str | None = None,
                         ipv6: str | None = None) -> None:
        """A nic joined the network: DHCP host entry and static leases (bridges only)."""

    async def nic_detach(self, key: str) -> None:
        pass
