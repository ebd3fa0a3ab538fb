"""Image file formats: compression by magic bytes, and metadata.yaml.

Pure functions over files; they block, so callers run them in a thread. The safety scan of image
tarballs is in tarscan.py.
"""

from __future__ import annotations

import os

import yaml

from lxd_daemon.errors import BadRequest

# Kernel architecture names LXD accepts in metadata.yaml (shared/osarch), and their aliases.
ARCHITECTURES = {
    "i686", "x86_64", "armv6l", "armv7l", "armv8l", "aarch64", "ppc", "ppc64", "ppc64le", "s390x",
    "mips", "mips64", "riscv32", "riscv64", "loongarch64",
}
ARCH_ALIASES = {
    "amd64": "x86_64", "x86-64": "x86_64", "i386": "i686", "i586": "i686", "386": "i686",
    "arm64": "aarch64", "armhf": "armv7l", "armel": "armv6l", "arm": "armv7l", "ppc64el": "ppc64le",
    "powerpc": "ppc", "powerpc64": "ppc64",
}

# compression name -> (file extension for exports, tar extension)
EXTENSIONS = {
    "gzip": ".tar.gz", "bzip2": ".tar.bz2", "xz": ".tar.xz", "lzma": ".tar.lzma", "zstd": ".tar.zst",
    "none": ".tar", "squashfs": ".squashfs",
}

MAX_METADATA = 4 << 20  # metadata.yaml bigger than this is not an image
READ_SIZE = 1 << 20

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def detect_compression(head: bytes) -> str:
    """The compression of a file from its first bytes (at least 512 for a bare tarball)."""
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"BZh"):
        return "bzip2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if head.startswith(b"hsqs"):
        return "squashfs"
    if head.startswith(b"\x5d\x00\x00"):
        return "lzma"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "none"
    if head.startswith(b"QFI\xfb"):
        raise BadRequest("Virtual-machine images (qcow2) are not supported by this server")
    raise BadRequest("Unsupported image format: not a tarball (gzip, bzip2, xz, lzma, zstd or plain) "
                     "or a squashfs")


def detect_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return detect_compression(f.read(512))


# -- metadata.yaml -------------------------------------------------------------------------

def normalise_architecture(name: str) -> str:
    arch = ARCH_ALIASES.get(name, name)
    if arch not in ARCHITECTURES:
        raise BadRequest(f"Invalid image metadata: unknown architecture {name!r}")
    return arch


def parse_metadata(raw: bytes) -> dict:
    """Parse and check metadata.yaml (architecture, creation_date, expiry_date, properties, templates)."""
    try:
        doc = yaml.load(raw.decode("utf-8"), Loader=_YAML_LOADER)
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise BadRequest(f"Invalid image metadata: metadata.yaml is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise BadRequest("Invalid image metadata: metadata.yaml must be a mapping")
    arch = doc.get("architecture")
    if not isinstance(arch, str) or not arch:
        raise BadRequest("Invalid image metadata: missing architecture")
    arch = normalise_architecture(arch)

    def as_int(key: str) -> int:
        v = doc.get(key) or 0
        if isinstance(v, bool) or not isinstance(v, int | float | str):
            raise BadRequest(f"Invalid image metadata: {key} must be a unix time")
        try:
            return int(v)
        except ValueError:
            raise BadRequest(f"Invalid image metadata: {key} must be a unix time") from None

    created = as_int("creation_date")
    if created <= 0:
        raise BadRequest("Invalid image metadata: missing creation date")
    expiry = as_int("expiry_date")
    props = doc.get("properties") or {}
    if not isinstance(props, dict):
        raise BadRequest("Invalid image metadata: properties must be a mapping")
    templates = doc.get("templates") or {}
    if not isinstance(templates, dict):
        raise BadRequest("Invalid image metadata: templates must be a mapping")
    clean_templates = {}
    for path, spec in templates.items():
        if not isinstance(spec, dict):
            raise BadRequest(f"Invalid image metadata: template {path!r} must be a mapping")
        when = spec.get("when") or []
        if not isinstance(when, list):
            raise BadRequest(f"Invalid image metadata: template {path!r}: 'when' must be a list")
        tpl = spec.get("template", "")
        if not isinstance(tpl, str) or _unsafe(tpl):
            raise BadRequest(f"Invalid image metadata: template {path!r} names an unsafe file")
        clean_templates[str(path)] = {
            "when": [str(w) for w in when],
            "create_only": bool(spec.get("create_only", False)),
            "template": tpl,
            "properties": {str(k): "" if v is None else str(v) for k, v in (spec.get("properties") or {}).items()},
        }
    return {
        "architecture": arch,
        "creation_date": created,
        "expiry_date": expiry,
        "properties": {str(k): "" if v is None else str(v) for k, v in props.items()},
        "templates": clean_templates,
    }


def _unsafe(name: str) -> bool:
    return name.startswith("/") or ".." in name.split("/")


