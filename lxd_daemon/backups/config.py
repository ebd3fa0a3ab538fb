"""backup.yaml and index.yaml as LXD 5.0 writes and reads them.

`backup.yaml` sits at the top of every instance volume (next to `rootfs/`): the instance as
`GET /1.0/instances/NAME` renders it (`container`), its snapshots (`snapshots`), the pool
(`pool`), the profiles it uses (`profiles`), and its root volume and the volume's snapshots
(`volume`, `volume_snapshots`). It is rewritten whenever one of these changes, so that
`lxd recover` (and an import) can rebuild the records from the volume alone.

`backup/index.yaml` is the first member of a backup tarball: `name`, `backend` (the pool's
driver), `pool`, `snapshots` (names), `optimized`, `optimized_header`, `type` (`container`,
`virtual-machine`, `custom`) and `config` (the backup.yaml content, embedded).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import yaml

from lxd_daemon import names
from lxd_daemon.util.atomic import atomic_write

BACKUP_YAML = "backup.yaml"
TYPES = ("container", "virtual-machine", "custom")
# What GET /1.0/instances/NAME?recursion=1 adds to an instance; not part of backup.yaml.
_RUNTIME_KEYS = ("state", "snapshots", "backups")


@dataclass
class BackupConfig:
    instance: dict | None = None
    snapshots: list[dict] = field(default_factory=list)
    pool: dict | None = None
    profiles: list[dict] = field(default_factory=list)
    volume: dict | None = None
    volume_snapshots: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        out: dict = {}
        if self.instance is not None:
            out["container"] = self.instance
        if self.snapshots:
            out["snapshots"] = self.snapshots
        if self.pool is not None:
            out["pool"] = self.pool
        if self.profiles:
            out["profiles"] = self.profiles
        if self.volume is not None:
            out["volume"] = self.volume
        if self.volume_snapshots:
            out["volume_snapshots"] = self.volume_snapshots
        return out


@dataclass
class BackupIndex:
    name: str
    backend: str
    pool: str
    snapshots: list[str] = field(default_factory=list)
    optimized: bool = False
    optimized_header: bool = False
    type: str = "container"
    config: BackupConfig | None = None

    def to_dict(self) -> dict:
        out: dict = {"name": self.name, "backend": self.backend, "pool": self.pool}
        if self.snapshots:
            out["snapshots"] = list(self.snapshots)
        out["optimized"] = self.optimized
        out["optimized_header"] = self.optimized_header
        out["type"] = self.type
        if self.config is not None:
            out["config"] = self.config.to_dict()
        return out


_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's: much faster than the pure-Python one
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _dump(data: dict) -> str:
    return yaml.dump(data, Dumper=_DUMPER, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _short_snapshot_name(name: str) -> str:
    return name.split("/", 1)[1] if "/" in name else name


def _clean_instance(instance: dict) -> dict:
    return {k: v for k, v in instance.items() if k not in _RUNTIME_KEYS}


def _clean_snapshot(snap: dict) -> dict:
    out = dict(snap)
    out["name"] = _short_snapshot_name(str(out.get("name", "")))
    return out


def build_config(instance: dict | None, snapshots: list[dict] | None, pool: dict | None,
                 volume: dict | None, volume_snapshots: list[dict] | None = None,
                 profiles: list[dict] | None = None) -> BackupConfig:
    pool_out = None
    if pool is not None:
        pool_out = dict(pool)
        pool_out["used_by"] = []  # LXD leaves it empty: it is the target's business
    return BackupConfig(
        instance=_clean_instance(instance) if instance is not None else None,
        snapshots=[_clean_snapshot(s) for s in (snapshots or [])],
        pool=pool_out,
        profiles=[dict(p) for p in (profiles or [])],
        volume=dict(volume) if volume is not None else None,
        volume_snapshots=[_clean_snapshot(s) for s in (volume_snapshots or [])])


def render_backup_yaml(instance: dict | None, snapshots: list[dict] | None, pool: dict | None,
                       volume: dict | None, volume_snapshots: list[dict] | None = None, *,
                       profiles: list[dict] | None = None) -> str:
    """backup.yaml's text for an instance (or, with `instance` None, a custom volume)."""
    return _dump(build_config(instance, snapshots, pool, volume, volume_snapshots, profiles).to_dict())


def _dict_of_str(value, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a map")
    return {str(k): "" if v is None else (str(v).lower() if isinstance(v, bool) else str(v))
            for k, v in value.items()}


def _devices(value, what: str) -> dict[str, dict[str, str]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a map of devices")
    return {str(k): _dict_of_str(v, f"{what}.{k}") for k, v in value.items()}


def _check_instance(inst, where: str) -> dict:
    if not isinstance(inst, dict):
        raise ValueError(f"{where}: 'container' must be a map")
    name = inst.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: the instance has no name")
    try:
        names.instance(name)
    except names.InvalidName as e:
        raise ValueError(f"{where}: invalid instance name {name!r}: {e.message}") from None
    out = dict(inst)
    out["config"] = _dict_of_str(inst.get("config"), "container.config")
    out["devices"] = _devices(inst.get("devices"), "container.devices")
    if "expanded_config" in inst:
        out["expanded_config"] = _dict_of_str(inst.get("expanded_config"), "container.expanded_config")
    if "expanded_devices" in inst:
        out["expanded_devices"] = _devices(inst.get("expanded_devices"), "container.expanded_devices")
    profiles = inst.get("profiles") or []
    if not isinstance(profiles, list) or not all(isinstance(p, str) for p in profiles):
        raise ValueError(f"{where}: container.profiles must be a list of names")
    out["profiles"] = list(profiles)
    itype = inst.get("type") or "container"
    if itype not in ("container", "virtual-machine"):
        raise ValueError(f"{where}: unknown instance type {itype!r}")
    out["type"] = itype
    return out


def _check_snapshots(snaps, where: str, key: str) -> list[dict]:
    if snaps is None:
        return []
    if not isinstance(snaps, list):
        raise ValueError(f"{where}: {key!r} must be a list")
    out = []
    seen = set()
    for s in snaps:
        if not isinstance(s, dict):
            raise ValueError(f"{where}: each of {key!r} must be a map")
        name = _short_snapshot_name(str(s.get("name") or ""))
        if not name or "/" in name or name in (".", "..") or "\x00" in name:
            raise ValueError(f"{where}: invalid snapshot name {s.get('name')!r} in {key!r}")
        if name in seen:
            raise ValueError(f"{where}: snapshot {name!r} appears twice in {key!r}")
        seen.add(name)
        snap = dict(s)
        snap["name"] = name
        if key == "snapshots":
            snap["config"] = _dict_of_str(s.get("config"), f"snapshots.{name}.config")
            snap["devices"] = _devices(s.get("devices"), f"snapshots.{name}.devices")
        out.append(snap)
    return out


def config_from_dict(data, where: str = "backup.yaml") -> BackupConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where} is not a map")
    inst = data.get("container")
    instance = _check_instance(inst, where) if inst is not None else None
    pool = data.get("pool")
    if pool is not None and not (isinstance(pool, dict) and isinstance(pool.get("name", ""), str)):
        raise ValueError(f"{where}: 'pool' must be a map")
    volume = data.get("volume")
    if volume is not None and not isinstance(volume, dict):
        raise ValueError(f"{where}: 'volume' must be a map")
    if volume is not None:
        volume = dict(volume)
        volume["config"] = _dict_of_str(volume.get("config"), "volume.config")
        vname = volume.get("name")
        if vname is not None and (not isinstance(vname, str) or "/" in vname or vname in ("", ".", "..")):
            raise ValueError(f"{where}: invalid volume name {vname!r}")
    profiles = data.get("profiles") or []
    if not isinstance(profiles, list) or not all(isinstance(p, dict) for p in profiles):
        raise ValueError(f"{where}: 'profiles' must be a list of maps")
    return BackupConfig(instance=instance,
                        snapshots=_check_snapshots(data.get("snapshots"), where, "snapshots"),
                        pool=dict(pool) if pool is not None else None,
                        profiles=[dict(p) for p in profiles],
                        volume=volume,
                        volume_snapshots=_check_snapshots(data.get("volume_snapshots"), where, "volume_snapshots"))


def _load(text: str | bytes, where: str):
    try:
        return yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as e:
        raise ValueError(f"{where} is not valid YAML: {e}") from None


def parse_backup_yaml(text: str | bytes) -> BackupConfig:
    """backup.yaml's content, validated; ValueError says what is wrong."""
    return config_from_dict(_load(text, "backup.yaml"), "backup.yaml")


def render_index_yaml(index: BackupIndex) -> str:
    return _dump(index.to_dict())


def parse_index_yaml(text: str | bytes) -> BackupIndex:
    """backup/index.yaml, validated (LXD's defaults for fields older versions leave out)."""
    data = _load(text, "index.yaml")
    if not isinstance(data, dict):
        raise ValueError("index.yaml is not a map")
    name = data.get("name")
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise ValueError(f"index.yaml: invalid name {name!r}")
    btype = data.get("type") or "container"
    if btype not in TYPES:
        raise ValueError(f"index.yaml: unknown backup type {btype!r}")
    snaps = data.get("snapshots") or []
    if not isinstance(snaps, list):
        raise ValueError("index.yaml: 'snapshots' must be a list")
    snapshots = []
    for s in snaps:
        s = _short_snapshot_name(str(s))
        if not s or "/" in s or s in (".", "..") or "\x00" in s:
            raise ValueError(f"index.yaml: invalid snapshot name {s!r}")
        snapshots.append(s)
    if len(set(snapshots)) != len(snapshots):
        raise ValueError("index.yaml: a snapshot is listed twice")
    cfg = data.get("config")
    return BackupIndex(name=name, backend=str(data.get("backend") or ""), pool=str(data.get("pool") or ""),
                       snapshots=snapshots, optimized=bool(data.get("optimized") or False),
                       optimized_header=bool(data.get("optimized_header") or False), type=btype,
                       config=config_from_dict(cfg, "index.yaml config") if cfg is not None else None)


# -- backup.yaml in instance volumes ---------------------------------------------------------
def instance_volume_dict(name: str, created_at: str, config: dict | None = None, project: str = "default") -> dict:
    """The instance root volume as GET /1.0/storage-pools/P/volumes/container/NAME renders it."""
    return {"config": dict(config or {}), "description": "", "name": name, "type": "container",
            "used_by": [], "location": "none", "content_type": "filesystem", "project": project,
            "created_at": created_at}


async def instance_backup_config(services, name: str) -> BackupConfig:
    """backup.yaml's content for instance `name`, from its records."""
    svc = services.instances
    rec = svc.record(name)
    inst = svc.render(rec)
    pool = svc._root_pool(svc.expanded(name)[1], name)
    pool_dict = services.storage.describe(pool)
    snapshots = services.snapshots.render_all(name) if services.snapshots is not None else []
    vol = instance_volume_dict(rec.name, rec.created_at, project=rec.project)  # the API name, not the key
    vol_snaps = [{"config": {}, "description": "", "name": s.get("name", ""), "content_type": "filesystem",
                  "created_at": s.get("created_at", ""), "expires_at": s.get("expires_at", "")}
                 for s in snapshots]
    profiles = []
    in_project = services.profiles.in_project(rec.project)
    for p in rec.profiles:
        prof = in_project.get(p)
        if prof is not None:
            rendered = dict(services.profiles.render(prof))
            rendered.pop("used_by", None)
            profiles.append(rendered)
    return build_config(inst, snapshots, pool_dict, vol, vol_snaps, profiles)


async def write_instance_backup_yaml(services, name: str) -> None:
    """Write $volume/backup.yaml for instance `name` (only once its record is committed)."""
    svc = services.instances
    if name not in svc.records or services.storage is None:
        return
    cfg = await instance_backup_config(services, name)
    path = svc.volume_dir(name) / BACKUP_YAML
    data = cfg.to_dict()
    await asyncio.to_thread(lambda: atomic_write(path, _dump(data).encode(), 0o600, durable=False))


async def update_instance_backup_yaml(services, name: str) -> None:
    """write_instance_backup_yaml that logs instead of failing (called after a change is done)."""
    import logging

    try:
        await write_instance_backup_yaml(services, name)
    except Exception as e:  # the change itself succeeded; backup.yaml is refreshed at the next one
        logging.getLogger("lxd.backups").warning("couldn't write backup.yaml",
                                                 extra={"instance": name, "err": str(e)})
