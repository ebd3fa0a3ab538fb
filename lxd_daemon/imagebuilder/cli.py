"""The `lxd-imagebuilder` command: build a busybox or Debian image for `lxc image import`.

    lxd-imagebuilder busybox [--output DIR|FILE] [--format unified|split] [--compression C]
    lxd-imagebuilder debian  [--release bookworm] [--variant minbase] [--mirror URL] [--cloud-init] [...]

It prints the output file(s) and the image's fingerprint as LXD computes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from lxd_daemon.imagebuilder.pack import (
    COMPRESSIONS,
    FORMATS,
    ROOTFS_FORMATS,
    SQUASHFS_COMPRESSIONS,
    BuildError,
    BuildResult,
)


def _common(p: argparse.ArgumentParser, default_name: str) -> None:
    p.add_argument("-o", "--output",
                   help="directory for the image (default: the current one), or the image's file "
                        "name (for a split image: the metadata tarball's; the rootfs goes next to it)")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="unified",
                   help="unified: one tarball; split: metadata tarball + rootfs (default: unified)")
    p.add_argument("--compression", choices=COMPRESSIONS, default="gzip",
                   help="tarball compression (default: gzip)")
    p.add_argument("--rootfs-format", choices=ROOTFS_FORMATS, default="squashfs",
                   help="split images: the rootfs as squashfs or tarball (default: squashfs)")
    p.add_argument("--squashfs-compression", choices=SQUASHFS_COMPRESSIONS,
                   help="split images: squashfs compression (default: xz with --compression xz, else gzip)")
    p.add_argument("--alias-hint", default=None, metavar="NAME",
                   help=f"name for the output files and the suggested alias (default: {default_name})")
    p.add_argument("--expiry-days", type=int, default=None, metavar="N",
                   help="set metadata.yaml expiry_date N days after the creation date")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lxd-imagebuilder",
        description="Build LXD container images (unified or split) for `lxc image import`.",
        epilog="SOURCE_DATE_EPOCH, if set, fixes the creation date and file times (reproducible builds).",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{busybox,debian,verify}")

    b = sub.add_parser("busybox", help="a busybox image from Debian's busybox-static (seconds)")
    _common(b, "busybox")
    b.add_argument("--busybox", default="/bin/busybox", help="the static busybox binary to use")

    d = sub.add_parser("debian", help="a Debian image with debootstrap (minutes)")
    _common(d, "debian-RELEASE")
    d.add_argument("--release", default="bookworm", help="Debian suite (default: bookworm)")
    d.add_argument("--variant", default="minbase", help="debootstrap variant (default: minbase)")
    d.add_argument("--mirror", default=None,
                   help="Debian mirror URL (default: the one in this machine's apt sources)")
    d.add_argument("--init", choices=("sysvinit", "systemd"), default="sysvinit",
                   help="init system (default: sysvinit; see lxd_daemon/imagebuilder/debian.py)")
    d.add_argument("--include", default="", help="extra packages, comma separated")
    d.add_argument("--cache-dir", type=Path, default=None,
                   help="keep downloaded .debs here between builds")
    d.add_argument("--cloud-init", action="store_true",
                   help="install cloud-init and the NoCloud seed templates (cloud-init.user-data "
                        "and the other cloud-init keys configure the instance)")

    v = sub.add_parser("verify", help="boot an image as a throwaway unprivileged liblxc container, "
                                      "run ps and hostname in it and stop it cleanly")
    v.add_argument("image", type=Path, help="unified image, or a split image's metadata tarball")
    v.add_argument("rootfs", type=Path, nargs="?", help="a split image's rootfs")
    v.add_argument("--timeout", type=float, default=60, help="seconds to wait for the init (default 60)")
    return p


def _verify(args) -> int:
    from lxd_daemon.imagebuilder.verify import verify_image

    if os.geteuid() != 0:
        print("lxd-imagebuilder: verify needs root (liblxc, id mapping)", file=sys.stderr)
        return 1
    paths = [args.image] + ([args.rootfs] if args.rootfs else [])
    for p in paths:
        if not p.is_file():
            print(f"lxd-imagebuilder: {p}: no such file", file=sys.stderr)
            return 1
    try:
        rep = verify_image(paths, ready_timeout=args.timeout, log=sys.stdout)
    except BuildError as e:
        print(f"lxd-imagebuilder: verify failed: {e}", file=sys.stderr)
        return 1
    print(f"running after {rep.start_seconds:.2f}s, ready after {rep.ready_seconds:.2f}s, "
          f"stopped cleanly in {rep.stop_seconds:.2f}s")
    return 0


def _report(kind: str, res: BuildResult, alias: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({
            "paths": [str(p) for p in res.paths],
            "fingerprint": res.fingerprint,
            "size": res.size,
            "seconds": round(res.seconds, 3),
            "alias_hint": alias,
            "type": "split" if len(res.paths) == 2 else "unified",
        }))
        return
    if len(res.paths) == 1:
        print(f"image: {res.paths[0]}")
    else:
        print(f"metadata: {res.paths[0]}")
        print(f"rootfs: {res.paths[1]}")
    print(f"fingerprint: {res.fingerprint}")
    print(f"size: {res.size}")
    files = " ".join(str(p) for p in res.paths)
    print(f"import with: lxc image import {files} --alias {alias}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "verify":
        return _verify(args)
    if os.geteuid() != 0 and args.cmd == "debian":
        print("lxd-imagebuilder: debian needs root (debootstrap)", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    try:
        if args.cmd == "busybox":
            from lxd_daemon.imagebuilder.busybox import build_busybox

            alias = args.alias_hint or "busybox"
            res = build_busybox(output=args.output, name=alias, fmt=args.fmt,
                                compression=args.compression, rootfs_format=args.rootfs_format,
                                squashfs_compression=args.squashfs_compression,
                                busybox=args.busybox, expiry_days=args.expiry_days)
        else:
            from lxd_daemon.imagebuilder.debian import build_debian

            alias = args.alias_hint or f"debian-{args.release}" + ("-cloud" if args.cloud_init else "")
            res = build_debian(output=args.output, name=alias, fmt=args.fmt,
                               compression=args.compression, rootfs_format=args.rootfs_format,
                               squashfs_compression=args.squashfs_compression,
                               release=args.release, variant=args.variant, mirror=args.mirror,
                               init=args.init,
                               include=[x for x in args.include.split(",") if x],
                               cache_dir=args.cache_dir, expiry_days=args.expiry_days,
                               cloud_init=args.cloud_init,
                               log=None if args.json else sys.stderr)
    except BuildError as e:
        print(f"lxd-imagebuilder: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lxd-imagebuilder: interrupted", file=sys.stderr)
        return 130
    res.seconds = time.monotonic() - t0
    _report(args.cmd, res, alias, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
