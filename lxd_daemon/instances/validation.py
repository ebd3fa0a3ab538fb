"""Validation and expansion of instance/profile config and devices, as the instances core uses
them: thin wrappers over instances.config and the devices package."""

from __future__ import annotations

from lxd_daemon import devices as devmod
from lxd_daemon.instances import config as cfgmod


def validate_config(config: dict[str, str], *, profile: bool = False) -> None:
    cfgmod.validate_config(config, profile=profile)


def validate_devices(devices: dict[str, dict[str, str]], *, profile: bool = False,
                     pools: set[str] | None = None) -> None:
    devmod.validate_devices(devices, profile=profile, pools=pools)


def expand(profiles: list[dict], config: dict, devices: dict) -> tuple[dict, dict]:
    """Profiles in order, then the instance's own keys; `none` devices mask inherited ones."""
    return cfgmod.expand(profiles, config, devices)


def root_disk(expanded_devices: dict) -> tuple[str, dict] | None:
    return devmod.root_disk(expanded_devices)
