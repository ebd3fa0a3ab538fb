"""An instance's image metadata (metadata.yaml) and its template files (templates/).

Both live in the instance directory, next to rootfs/. Writes are atomic (temporary file, fsync,
rename); template names are plain file names, never paths.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from lxd_daemon.errors import BadRequest, NotFound
from lxd_daemon.util.atomic import atomic_write

EMPTY = {"architecture": "", "creation_date": 0, "expiry_date": 0, "properties": {}, "templates": {}}


def metadata_path(inst) -> Path:
    return Path(inst.instance_dir) / "metadata.yaml"


def templates_dir(inst) -> Path:
    return Path(inst.instance_dir) / "templates"


def read_metadata(inst) -> dict:
    try:
        text = metadata_path(inst).read_text()
    except FileNotFoundError:
        return dict(EMPTY)
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise BadRequest(f"The instance's metadata.yaml is invalid: {e}") from None
    if not isinstance(doc, dict):
        raise BadRequest("The instance's metadata.yaml is invalid: not a mapping")
    out = dict(EMPTY)
    out.update(doc)
    for key in ("properties", "templates"):
        if out.get(key) is None:
            out[key] = {}
    return out


def write_metadata(inst, doc: dict) -> None:
    text = yaml.safe_dump(doc, default_flow_style=False, sort_keys=True)
    atomic_write(metadata_path(inst), text.encode(), 0o644)


def template_file(inst, name: str | None) -> Path:
    if not name:
        raise BadRequest("Missing path argument")
    if "/" in name or name in (".", "..") or "\x00" in name:
        raise BadRequest("Invalid template filename")
    return templates_dir(inst) / name


def list_templates(inst) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(templates_dir(inst)) if e.is_file(follow_symlinks=False))
    except FileNotFoundError:
        return []


def read_template(inst, name: str | None) -> bytes:
    path = template_file(inst, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, OSError):
        raise NotFound(f"Template {name!r} not found") from None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def write_template(inst, name: str | None, data: bytes) -> None:
    path = template_file(inst, name)
    path.parent.mkdir(mode=0o755, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    atomic_write(path, data, 0o644)


def delete_template(inst, name: str | None) -> None:
    path = template_file(inst, name)
    try:
        path.unlink()
    except FileNotFoundError:
        raise NotFound(f"Template {name!r} not found") from None
