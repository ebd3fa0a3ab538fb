"""Simulated host tools for the drivers this kernel can't run (no device-mapper, no zfs module).

`LvmSim` and `ZfsSim` are runners for `tools.use_runner()`: they record every call (`calls`) and
answer as the real tools do, from a small model kept in memory (volume groups and logical
volumes; zpools, datasets, snapshots and clones), with the real tools' output formats, exit
codes and error messages. Rules added with `on()`/`fail()` answer before the model (to inject a
failure: "Insufficient free space", "dataset is busy", ...). Mounts are tracked in `mounted`,
and `installed()` points blockutil's mount check at it. Nothing lands on the host except the
directories the drivers make themselves.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from unittest import mock

from lxd_daemon.storage.drivers import blockutil, tools
from lxd_daemon.storage.drivers.tools import Result

Argv = tuple[str, ...]


@dataclass
class Rule:
    prefix: Argv
    returncode: int
    stdout: str
    stderr: str
    times: int | None  # None: always

    def matches(self, argv: Argv) -> bool:
        return argv[:len(self.prefix)] == self.prefix


class FakeTools:
    """The common part: recording, injected answers, loop devices, mounts, no-op tools."""

    noop_tools = {"mkfs.ext4", "mkfs.xfs", "resize2fs", "xfs_growfs", "xfs_admin", "xfs_repair", "rsync"}

    def __init__(self) -> None:
        self.calls: list[Argv] = []
        self.rules: list[Rule] = []
        self.mounted: set[str] = set()
        self.loops: dict[str, str] = {}  # file -> /dev/loopN
        self._next_loop = 7

    # -- scripting -----------------------------------------------------------------------------
    def on(self, *prefix: str, returncode: int = 0, stdout: str = "", stderr: str = "", times: int | None = 1) -> None:
        self.rules.insert(0, Rule(tuple(prefix), returncode, stdout, stderr, times))

    def fail(self, *prefix: str, stderr: str, returncode: int = 5, times: int | None = 1) -> None:
        self.on(*prefix, returncode=returncode, stderr=stderr, times=times)

    def clear(self) -> None:
        self.calls.clear()

    def commands(self, *names: str) -> list[Argv]:
        return [c for c in self.calls if not names or c[0] in names]

    def mutating(self) -> list[Argv]:
        """The calls that change something (no queries): what a sequence test compares."""
        queries = {("lvs",), ("vgs",), ("pvs",), ("lvm", "version"), ("zfs", "get"), ("zfs", "list"),
                   ("losetup", "-j")}
        return [c for c in self.calls if not any(c[:len(q)] == q for q in queries)]

    @contextlib.contextmanager
    def installed(self) -> Iterator[FakeTools]:
        with tools.use_runner(self), mock.patch.object(blockutil, "is_mountpoint", lambda p: str(p) in self.mounted):
            yield self

    # -- the runner ----------------------------------------------------------------------------
    async def __call__(self, argv: Argv, stdin: bytes | None) -> Result:
        self.calls.append(argv)
        for rule in self.rules:
            if rule.matches(argv):
                if rule.times is not None:
                    rule.times -= 1
                    if rule.times <= 0:
                        self.rules.remove(rule)
                return Result(argv, rule.returncode, rule.stdout, rule.stderr)
        try:
            out = self.handle(argv, stdin)
        except ToolFail as e:
            return Result(argv, e.returncode, "", e.stderr)
        return Result(argv, 0, out or "", "")

    def handle(self, argv: Argv, stdin: bytes | None) -> str:
        tool = argv[0]
        if tool in self.noop_tools:
            return ""
        if tool == "e2fsck":
            return ""
        if tool == "losetup":
            return self._losetup(argv)
        if tool == "mount":
            path = argv[-1]
            if path in self.mounted:
                raise ToolFail(f"mount: {path}: already mounted.\n", 32)
            self.mounted.add(path)
            return ""
        if tool == "umount":
            path = argv[-1]
            if path not in self.mounted:
                raise ToolFail(f"umount: {path}: not mounted.\n", 32)
            self.mounted.discard(path)
            return ""
        raise ToolFail(f"{tool}: command not simulated: {' '.join(argv)}\n", 127)

    def _losetup(self, argv: Argv) -> str:
        if argv[1] == "-j":
            f = argv[2]
            dev = self.loops.get(f)
            return f"{dev}: [2049]:1234 ({f})\n" if dev else ""
        if argv[1:3] == ("--find", "--show"):
            f = argv[3]
            dev = f"/dev/loop{self._next_loop}"
            self._next_loop += 1
            self.loops[f] = dev
            return dev + "\n"
        if argv[1] == "-d":
            dev = argv[2]
            for f, d in list(self.loops.items()):
                if d == dev:
                    del self.loops[f]
                    return ""
            raise ToolFail(f"losetup: {dev}: detach failed: No such device or address\n", 1)
        raise ToolFail("losetup: unsupported\n", 1)


class ToolFail(Exception):
    def __init__(self, stderr: str, returncode: int = 1):
        super().__init__(stderr)
        self.stderr = stderr
        self.returncode = returncode


def _split(argv: Argv, value_flags: set[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Flags (with their values) and positional arguments of an argv (after the tool name)."""
    flags: dict[str, list[str]] = {}
    pos: list[str] = []
    i = 1
    while i < len(argv):
        a = argv[i]
        if a in value_flags and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            flags.setdefault(a, []).append(argv[i + 1])
            i += 2
            continue
        if a.startswith("-") and len(a) > 1:
            flags.setdefault(a, []).append("")
        else:
            pos.append(a)
        i += 1
    return flags, pos


# -- lvm ------------------------------------------------------------------------------------------
@dataclass
class LV:
    size: int
    thin: bool = False
    pool: bool = False
    origin: str = ""
    writable: bool = True
    time: int = 0
    active: bool = False


@dataclass
class VG:
    pv: str
    size: int
    tags: set[str] = field(default_factory=set)
    extent: int = 4 * 1024 * 1024
    lvs: dict[str, LV] = field(default_factory=dict)


LVM_VALUE_FLAGS = {"-o", "--units", "--separator", "--sort", "-n", "--name", "--virtualsize", "--size", "-L",
                   "--thinpool", "--extents", "--poolmetadatasize", "--wipesignatures", "--setactivationskip",
                   "--activate", "--addtag", "--deltag", "--stripes", "--stripesize", "-l", "--alloc"}


class LvmSim(FakeTools):
    def __init__(self, pv_size: int = 1 << 30) -> None:
        super().__init__()
        self.pvs: set[str] = set()
        self.vgs: dict[str, VG] = {}
        self.pv_size = pv_size
        self._clock = 0
        self._mounted_dev: dict[str, str] = {}

    # helpers
    def _nf_vg(self, vg: str) -> ToolFail:
        return ToolFail(f'  Volume group "{vg}" not found\n  Cannot process volume group {vg}\n', 5)

    def _lv_ref(self, ref: str) -> tuple[VG, str, str]:
        """`/dev/vg/lv` or `vg/lv` -> (VG, vg name, lv name); raises not found."""
        parts = ref.removeprefix("/dev/").split("/")
        if len(parts) != 2:
            raise ToolFail(f'  "{ref}": Invalid path for Logical Volume.\n', 3)
        vgname, lv = parts
        vg = self.vgs.get(vgname)
        if vg is None:
            raise self._nf_vg(vgname)
        if lv not in vg.lvs:
            raise ToolFail(f'  Failed to find logical volume "{vgname}/{lv}"\n', 5)
        return vg, vgname, lv

    def used(self, vg: VG) -> int:
        return sum(lv.size for lv in vg.lvs.values() if not lv.thin)

    def lv_names(self, vgname: str) -> list[str]:
        return list(self.vgs[vgname].lvs)

    def handle(self, argv: Argv, stdin: bytes | None) -> str:
        tool = argv[0]
        flags, pos = _split(argv, LVM_VALUE_FLAGS)
        if tool == "lvm" and argv[1:2] == ("version",):
            return ("  LVM version:     2.03.16(2) (2022-05-18)\n  Library version: 1.02.185 (2022-05-18)\n"
                    "  Driver version:  4.47.0\n")
        if tool == "pvs":
            pv = pos[0]
            if pv not in self.pvs:
                raise ToolFail(f'  Failed to find physical volume "{pv}".\n', 5)
            return f"  {pv}\n"
        if tool == "pvcreate":
            self.pvs.add(pos[0])
            return f'  Physical volume "{pos[0]}" successfully created.\n'
        if tool == "pvremove":
            self.pvs.discard(pos[0])
            return ""
        if tool == "vgcreate":
            vgname, pv = pos
            if vgname in self.vgs:
                raise ToolFail(f'  A volume group called {vgname} already exists.\n', 5)
            self.vgs[vgname] = VG(pv=pv, size=self.pv_size)
            return f'  Volume group "{vgname}" successfully created\n'
        if tool == "vgremove":
            vgname = pos[0]
            vg = self.vgs.get(vgname)
            if vg is None:
                raise self._nf_vg(vgname)
            for lvname in vg.lvs:
                path = f"/dev/{vgname}/{lvname}"
                if any(m for m in self.mounted if self._mounted_dev.get(m) == path):
                    raise ToolFail(f"  Logical volume {vgname}/{lvname} in use.\n", 5)
            del self.vgs[vgname]
            return ""
        if tool == "vgchange":
            vgname = pos[0]
            vg = self.vgs.get(vgname)
            if vg is None:
                raise self._nf_vg(vgname)
            if "--addtag" in flags:
                vg.tags.add(flags["--addtag"][0])
            if "--deltag" in flags:
                vg.tags.discard(flags["--deltag"][0])
            if "-an" in flags:
                for lv in vg.lvs.values():
                    lv.active = False
            return ""
        if tool == "vgrename":
            old, new = pos
            self.vgs[new] = self.vgs.pop(old)
            return ""
        if tool == "vgs":
            return self._vgs(flags, pos)
        if tool == "lvs":
            return self._lvs(flags, pos)
        if tool == "lvcreate":
            return self._lvcreate(flags, pos)
        if tool == "lvremove":
            vg, vgname, lv = self._lv_ref(pos[0])
            if any(x.origin == lv for x in vg.lvs.values()) and not vg.lvs[lv].thin:
                pass  # thick origins: lvm removes their snapshots too; not needed here
            if vg.lvs[lv].pool and any(x.thin for x in vg.lvs.values()):
                raise ToolFail(f"  Removing pool {lv} will remove thin volumes.\n", 5)
            del vg.lvs[lv]
            return f'  Logical volume "{lv}" successfully removed.\n'
        if tool == "lvrename":
            if len(pos) == 3:
                vgname, old, new = pos
                vg = self.vgs[vgname]
                if old not in vg.lvs:
                    raise ToolFail(f'  Existing logical volume "{old}" not found in volume group "{vgname}"\n', 5)
            else:
                vg, vgname, old = self._lv_ref(pos[0])
                new = pos[1].removeprefix("/dev/").split("/")[-1]
            if new in vg.lvs:
                raise ToolFail(f'  Logical Volume "{new}" already exists in volume group "{vgname}"\n', 5)
            vg.lvs[new] = vg.lvs.pop(old)
            for x in vg.lvs.values():
                if x.origin == old:
                    x.origin = new
            return f'  Renamed "{old}" to "{new}" in volume group "{vgname}"\n'
        if tool == "lvchange":
            vg, _, lv = self._lv_ref(pos[0])
            if "--activate" in flags:
                vg.lvs[lv].active = flags["--activate"][0] == "y"
            return ""
        if tool == "lvresize":
            vg, _, lv = self._lv_ref(pos[0])
            size = int(flags["-L"][0].rstrip("b"))
            grow = size - vg.lvs[lv].size
            if not vg.lvs[lv].thin and grow > vg.size - self.used(vg):
                raise ToolFail(f'  Insufficient free space: {grow // vg.extent} extents needed, but only '
                               f'{(vg.size - self.used(vg)) // vg.extent} available\n', 5)
            vg.lvs[lv].size = size
            return ""
        if tool == "mount":
            out = super().handle(argv, stdin)
            self._mounted_dev[argv[-1]] = argv[-2]
            return out
        return super().handle(argv, stdin)

    def _vgs(self, flags: dict, pos: list[str]) -> str:
        vgname = pos[0]
        vg = self.vgs.get(vgname)
        if vg is None:
            raise self._nf_vg(vgname)
        fields = flags["-o"][0].split(",")
        sep = flags.get("--separator", [" "])[0]
        values = {"vg_tags": ",".join(sorted(vg.tags)), "lv_count": str(len(vg.lvs)),
                  "vg_extent_size": str(vg.extent), "vg_size": str(vg.size),
                  "vg_free": str(vg.size - self.used(vg))}
        return "  " + sep.join(values[f] for f in fields) + "\n"

    def _lvs(self, flags: dict, pos: list[str]) -> str:
        fields = flags["-o"][0].split(",")
        sep = flags.get("--separator", [" "])[0]
        target = pos[0]
        if "/" in target:
            vg, vgname, lv = self._lv_ref(target)
            rows = [(lv, vg.lvs[lv])]
        else:
            vg = self.vgs.get(target)
            if vg is None:
                raise self._nf_vg(target)
            rows = list(vg.lvs.items())
            if flags.get("--sort") == ["lv_time"]:
                rows.sort(key=lambda r: r[1].time)
        out = []
        for name, lv in rows:
            thin_count = sum(1 for x in vg.lvs.values() if x.thin)
            values = {"lv_name": name, "lv_attr": ("twi-a-tz--" if lv.pool else ("Vwi---tz-k" if lv.thin else "-wi-a-----")),
                      "thin_count": str(thin_count) if lv.pool else "", "lv_size": str(lv.size),
                      "data_percent": "12.50" if (lv.pool or lv.thin) else "", "metadata_percent": "3.00" if lv.pool else "",
                      "lv_time": f"2026-12-04 21:{lv.time // 60:02d}:{lv.time % 60:02d} +0000"}
            out.append("  " + sep.join(values[f] for f in fields))
        return "\n".join(out) + "\n"

    def _lvcreate(self, flags: dict, pos: list[str]) -> str:
        name = (flags.get("--name") or flags.get("-n") or [""])[0]
        self._clock += 1
        if "--thinpool" in flags:
            vgname, pool = flags["--thinpool"][0].split("/")
            vg = self.vgs.get(vgname)
            if vg is None:
                raise self._nf_vg(vgname)
            if pool in vg.lvs:
                raise ToolFail(f'  Logical Volume "{pool}" already exists in volume group "{vgname}"\n', 5)
            free = vg.size - self.used(vg)
            if free <= 1 << 20:
                raise ToolFail('  Insufficient free space: 1 extents needed, but only 0 available\n', 5)
            vg.lvs[pool] = LV(size=free, pool=True, time=self._clock)
            return f'  Logical volume "{pool}" created.\n'
        if "-s" in flags:
            origin = pos[0]
            vg, vgname, src = self._lv_ref(origin)
            if name in vg.lvs:
                raise ToolFail(f'  Logical Volume "{name}" already exists in volume group "{vgname}"\n', 5)
            srclv = vg.lvs[src]
            size = int(flags["--size"][0].rstrip("b")) if "--size" in flags else srclv.size
            if not srclv.thin and size > vg.size - self.used(vg):
                raise ToolFail(f'  Volume group "{vgname}" has insufficient free space (0 extents): 1 required.\n', 5)
            vg.lvs[name] = LV(size=srclv.size, thin=srclv.thin, origin=src, writable="-prw" in flags,
                              time=self._clock)
            return f'  Logical volume "{name}" created.\n'
        target = pos[0]
        if "/" in target:
            vgname, pool = target.split("/")
        else:
            vgname, pool = target, ""
        vg = self.vgs.get(vgname)
        if vg is None:
            raise self._nf_vg(vgname)
        if name in vg.lvs:
            raise ToolFail(f'  Logical Volume "{name}" already exists in volume group "{vgname}"\n', 5)
        if pool:
            if pool not in vg.lvs:
                raise ToolFail(f'  Failed to find logical volume "{vgname}/{pool}"\n', 5)
            size = int(flags["--virtualsize"][0].rstrip("b"))
            vg.lvs[name] = LV(size=size, thin=True, time=self._clock)
        else:
            size = int(flags["--size"][0].rstrip("b"))
            if size > vg.size - self.used(vg):
                raise ToolFail(f'  Volume group "{vgname}" has insufficient free space '
                               f'({(vg.size - self.used(vg)) // vg.extent} extents): {size // vg.extent} required.\n', 5)
            vg.lvs[name] = LV(size=size, time=self._clock)
        return f'  Logical volume "{name}" created.\n'


# -- zfs ------------------------------------------------------------------------------------------
@dataclass
class DS:
    type: str  # filesystem, volume, snapshot
    props: dict[str, str] = field(default_factory=dict)
    origin: str = "-"
    txg: int = 0


ZFS_VALUE_FLAGS = {"-o", "-O", "-t", "-s", "-d", "-x", "-i", "-V", "-m"}


class ZfsSim(FakeTools):
    def __init__(self) -> None:
        super().__init__()
        self.pools: dict[str, dict] = {}  # name -> {"vdev", "imported"}
        self.objs: dict[str, DS] = {}
        self._txg = 0

    def visible(self, name: str) -> bool:
        pool = self.pools.get(name.split("/")[0].split("@")[0])
        return name in self.objs and pool is not None and pool["imported"]

    def _missing(self, name: str) -> ToolFail:
        return ToolFail(f"cannot open '{name}': dataset does not exist\n", 1)

    def _need(self, name: str) -> DS:
        if not self.visible(name):
            raise self._missing(name)
        return self.objs[name]

    def snapshots_of(self, ds: str) -> list[str]:
        snaps = [n for n in self.objs if n.startswith(ds + "@")]
        return sorted(snaps, key=lambda n: self.objs[n].txg)

    def children_of(self, ds: str) -> list[str]:
        return sorted(n for n in self.objs if n.startswith(ds + "/") and "@" not in n)

    def clones_of(self, snap: str) -> list[str]:
        return sorted(n for n, o in self.objs.items() if o.origin == snap)

    def tree(self, ds: str) -> list[str]:
        """ds, its snapshots, then its descendants the same way (zfs's -r order)."""
        out = [ds] + self.snapshots_of(ds)
        for child in [c for c in self.children_of(ds) if c.count("/") == ds.count("/") + 1]:
            out += self.tree(child)
        return out

    def _new(self, name: str, type: str, origin: str = "-", **props: str) -> None:
        self._txg += 1
        self.objs[name] = DS(type, dict(props), origin, self._txg)

    def handle(self, argv: Argv, stdin: bytes | None) -> str:
        tool = argv[0]
        if tool == "zpool":
            return self._zpool(argv)
        if tool == "zfs":
            return self._zfs(argv, stdin)
        return super().handle(argv, stdin)

    def _zpool(self, argv: Argv) -> str:
        sub = argv[1]
        flags, pos = _split(argv[1:], ZFS_VALUE_FLAGS)
        if sub == "create":
            name, vdev = pos
            if name in self.pools:
                raise ToolFail(f"cannot create '{name}': pool already exists\n", 1)
            self.pools[name] = {"vdev": vdev, "imported": True}
            self._new(name, "filesystem", mountpoint="none")
            return ""
        name = pos[0]
        pool = self.pools.get(name)
        if sub == "destroy":
            if pool is None or not pool["imported"]:
                raise ToolFail(f"cannot open '{name}': no such pool\n", 1)
            if any(self.objs[n].props.get("mountpoint") in self.mounted for n in self.objs if n.split("/")[0].split("@")[0] == name):
                raise ToolFail(f"cannot unmount '{name}': pool or dataset is busy\n", 1)
            del self.pools[name]
            for n in [n for n in self.objs if n.split("/")[0].split("@")[0] == name]:
                del self.objs[n]
            return ""
        if sub == "export":
            if pool is None or not pool["imported"]:
                raise ToolFail(f"cannot open '{name}': no such pool\n", 1)
            pool["imported"] = False
            return ""
        if sub == "import":
            if pool is None or pool["imported"]:
                raise ToolFail(f"cannot import '{name}': no such pool available\n", 1)
            pool["imported"] = True
            return ""
        raise ToolFail(f"zpool {sub}: not simulated\n", 2)

    def _zfs(self, argv: Argv, stdin: bytes | None) -> str:
        sub = argv[1]
        flags, pos = _split(argv[1:], ZFS_VALUE_FLAGS)
        if sub == "get":
            return self._get(flags, pos)
        if sub == "list":
            types = flags.get("-t", ["filesystem"])[0].split(",")
            root = pos[0]
            self._need(root)
            names = self.tree(root) if "-r" in flags else ([root] + self.snapshots_of(root) if "-d" in flags else [root])
            names = [n for n in names if self.objs[n].type in types]
            if "-d" in flags and flags["-d"][0] == "1":
                names = [n for n in names if n == root or n.startswith(root + "@") or
                         (n.startswith(root + "/") and n.count("/") == root.count("/") + 1)]
            if flags.get("-s") == ["createtxg"]:
                names.sort(key=lambda n: self.objs[n].txg)
            return "".join(n + "\n" for n in names)
        if sub == "set":
            ds = pos[-1]
            obj = self._need(ds)
            for kv in pos[:-1]:
                k, v = kv.split("=", 1)
                obj.props[k] = v
            return ""
        if sub == "create":
            ds = pos[0]
            if self.visible(ds):
                raise ToolFail(f"cannot create '{ds}': dataset already exists\n", 1)
            parent = ds.rsplit("/", 1)[0]
            if not self.visible(parent):
                raise ToolFail(f"cannot create '{ds}': parent does not exist\n", 1)
            props = dict(kv.split("=", 1) for kv in flags.get("-o", []))
            if "-V" in flags:
                props["volsize"] = flags["-V"][0]
                self._new(ds, "volume", **props)
            else:
                self._new(ds, "filesystem", **props)
            return ""
        if sub == "snapshot":
            name = pos[0]
            ds = name.split("@")[0]
            self._need(ds)
            if name in self.objs:
                raise ToolFail(f"cannot create snapshot '{name}': dataset already exists\n", 1)
            self._new(name, "snapshot")
            return ""
        if sub == "clone":
            snap, ds = pos
            self._need(snap)
            if self.visible(ds):
                raise ToolFail(f"cannot create '{ds}': dataset already exists\n", 1)
            props = dict(kv.split("=", 1) for kv in flags.get("-o", []))
            self._new(ds, "filesystem", origin=snap, **props)
            return ""
        if sub == "destroy":
            return self._destroy(pos[0], "-r" in flags)
        if sub == "rename":
            return self._rename(*pos)
        if sub == "rollback":
            snap = pos[0]
            self._need(snap)
            ds = snap.split("@")[0]
            later = self.snapshots_of(ds)
            later = later[later.index(snap) + 1:]
            if later and "-r" not in flags:
                raise ToolFail(f"cannot rollback to '{snap}': more recent snapshots or bookmarks exist\n"
                               f"use '-r' to force deletion of the following snapshots and bookmarks:\n"
                               + "".join(n + "\n" for n in later), 1)
            return ""
        if sub == "mount":
            obj = self._need(pos[0])
            mp = obj.props.get("mountpoint", "")
            if mp in self.mounted:
                raise ToolFail(f"cannot mount '{pos[0]}': filesystem already mounted\n", 1)
            self.mounted.add(mp)
            return ""
        if sub == "send":
            return self._send(flags, pos)
        if sub == "receive":
            return self._receive(flags, pos, stdin or b"")
        raise ToolFail(f"zfs {sub}: not simulated\n", 2)

    def _get(self, flags: dict, pos: list[str]) -> str:
        props, ds = pos[0].split(","), pos[1]
        self._need(ds)
        names = self.tree(ds) if "-r" in flags else [ds]
        col = flags["-o"][0]
        out = []
        for n in names:
            obj = self.objs[n]
            for p in props:
                if col == "name":
                    out.append(n)
                    continue
                if p == "origin":
                    v = obj.origin
                elif p == "clones":
                    v = ",".join(self.clones_of(n)) if obj.type == "snapshot" else "-"
                    v = v or ""
                    if obj.type != "snapshot":
                        v = "-"
                elif p in ("used", "referenced"):
                    v = "1048576"
                elif p == "available":
                    v = str(900 * 1024 * 1024)
                else:
                    v = obj.props.get(p, "-")
                out.append(v)
        return "".join(v + "\n" for v in out)

    def _destroy(self, name: str, recursive: bool) -> str:
        obj = self._need(name)
        if obj.type == "snapshot":
            if self.clones_of(name):
                raise ToolFail(f"cannot destroy '{name}': snapshot has dependent clones\n"
                               "use '-R' to destroy the following datasets:\n", 1)
            if obj.props.get("mountpoint") in self.mounted:
                raise ToolFail(f"cannot destroy snapshot {name}: dataset is busy\n", 1)
            del self.objs[name]
            return ""
        victims = self.tree(name)
        if not recursive and len(victims) > 1:
            raise ToolFail(f"cannot destroy '{name}': filesystem has children\n"
                           "use '-r' to destroy the following datasets:\n", 1)
        for v in victims:
            for c in self.clones_of(v):
                if c not in victims:
                    raise ToolFail(f"cannot destroy '{name}': filesystem has dependent clones\n"
                                   "use '-R' to destroy the following datasets:\n", 1)
            mp = self.objs[v].props.get("mountpoint")
            if mp and mp in self.mounted:
                raise ToolFail(f"cannot unmount '{mp}': pool or dataset is busy\n", 1)
        for v in victims:
            del self.objs[v]
        return ""

    def _rename(self, old: str, new: str) -> str:
        self._need(old)
        if "@" in old:
            new = new if "@" in new else old.split("@")[0] + "@" + new
            if new in self.objs:
                raise ToolFail(f"cannot rename to '{new}': dataset already exists\n", 1)
            self.objs[new] = self.objs.pop(old)
            for o in self.objs.values():
                if o.origin == old:
                    o.origin = new
            return ""
        if self.visible(new):
            raise ToolFail(f"cannot rename to '{new}': dataset already exists\n", 1)
        if not self.visible(new.rsplit("/", 1)[0]):
            raise ToolFail(f"cannot rename to '{new}': parent does not exist\n", 1)
        moves = {n: new + n[len(old):] for n in self.objs if n == old or n.startswith(old + "/") or n.startswith(old + "@")}
        for a, b in moves.items():
            self.objs[b] = self.objs.pop(a)
        for o in self.objs.values():
            if o.origin in moves:
                o.origin = moves[o.origin]
        return ""

    def _send(self, flags: dict, pos: list[str]) -> str:
        snap = pos[0]
        self._need(snap)
        ds, snapname = snap.split("@")
        snaps = [s.split("@")[1] for s in self.snapshots_of(ds)]
        base = flags.get("-i", [""])[0]
        stream = {"snap": snapname, "from": base.split("@")[1] if "@" in base else "", "from_full": base,
                  "replicate": snaps[:snaps.index(snapname) + 1] if "-R" in flags else [snapname]}
        return "ZSTREAM " + json.dumps(stream) + " END\n"

    def _receive(self, flags: dict, pos: list[str], data: bytes) -> str:
        m = re.fullmatch(rb"ZSTREAM (\{.*\}) END\n", data, re.S)
        if not m:
            raise ToolFail("cannot receive: invalid backup stream\n", 1)
        stream = json.loads(m.group(1))
        target = pos[0]
        ds, _, tsnap = target.partition("@")
        if stream["from"]:
            if stream["from_full"] and "/images/" in stream["from_full"] and not self.visible(ds):
                self._new(ds, "filesystem", origin=stream["from_full"])  # an incremental on an image: a clone
            else:
                self._need(ds)
                if f"{ds}@{stream['from']}" not in self.objs:
                    raise ToolFail(f"cannot receive incremental stream: most recent snapshot of {ds} does not\n"
                                   "match incremental source\n", 1)
        else:
            if self.visible(ds):
                if "-F" not in flags or self.snapshots_of(ds):
                    raise ToolFail(f"cannot receive new filesystem stream: destination '{ds}' exists\n", 1)
            else:
                parent = ds.rsplit("/", 1)[0]
                if not self.visible(parent):
                    raise ToolFail(f"cannot receive: parent of '{ds}' does not exist\n", 1)
                self._new(ds, "filesystem")
        names = stream["replicate"]
        if tsnap:
            names = names[:-1] + [tsnap]
        for s in names:
            if f"{ds}@{s}" not in self.objs:
                self._new(f"{ds}@{s}", "snapshot")
        return ""
