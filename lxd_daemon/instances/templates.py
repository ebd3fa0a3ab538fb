"""Image templates: render metadata.yaml's `templates` into a container's root filesystem.

LXD renders them with pongo2 (Django-like). Jinja2's sandboxed environment reads the same
templates: `{{ container.name }}`, `{% if config_get("user.x", "") %}`, and pongo2's filter
arguments (`|default:"x"`) are rewritten to Jinja's form (`|default("x")`). Autoescaping is off,
as in LXD.

Every target path is resolved inside the root filesystem with openat2(RESOLVE_IN_ROOT): `..`
and symlinks (absolute ones included) can never reach outside it. Paths with `..` components or
template names outside the templates directory are refused outright.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import stat
import struct
from pathlib import Path

import yaml

from lxd_daemon.errors import BadRequest

TRIGGERS = ("create", "copy", "start", "rename")
MAX_TEMPLATE = 1 << 20  # bytes of template source
MAX_OUTPUT = 16 << 20   # bytes of rendered output

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10


class TemplateError(BadRequest):
    pass


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = RESOLVE_IN_ROOT) -> int:
    how = struct.pack("QQQ", flags | os.O_CLOEXEC, mode, resolve | RESOLVE_NO_MAGICLINKS)
    buf = ctypes.create_string_buffer(how, len(how))
    fd = _libc.syscall(SYS_OPENAT2, dirfd, path.encode(), buf, len(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


# -- pongo2 -> jinja ------------------------------------------------------------------------------

_FILTER_ARG = re.compile(r'\|\s*(\w+):("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|[\w.]+)')


def pongo_to_jinja(source: str) -> str:
    """Rewrite pongo2's `|filter:arg` to Jinja's `|filter(arg)` inside {{ }} and {% %} tags."""

    def fix(m: re.Match) -> str:
        return _FILTER_ARG.sub(lambda f: f"|{f.group(1)}({f.group(2)})", m.group(0))

    return re.sub(r"\{\{.*?\}\}|\{%.*?%\}", fix, source, flags=re.S)


@functools.cache
def _environment():
    from jinja2 import ChainableUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # pongo2 renders a missing value (or an attribute of one) as nothing: so does ChainableUndefined
    env = ImmutableSandboxedEnvironment(autoescape=False, keep_trailing_newline=True,
                                        undefined=ChainableUndefined)
    # Filters pongo2 has under other names
    env.filters.setdefault("lower", str.lower)
    env.filters["capfirst"] = lambda s: str(s)[:1].upper() + str(s)[1:]
    env.filters["yesno"] = lambda v, arg="yes,no": arg.split(",")[0 if v else 1]
    return env


_STR = r"(?:\"[^\"\\\\{}]*\"|'[^'\\\\{}]*')"
_SIMPLE_EXPR = re.compile(r"\{\{\s*(?:(?P<name>[A-Za-z]\w*(?:\.[A-Za-z]\w*)*)"
                          rf"|config_get\(\s*(?P<k>{_STR})\s*(?:,\s*(?P<d>{_STR})\s*)?\))\s*\}}\}}")


class _NotSimple(Exception):
    pass


def _render_simple(source: str, context: dict) -> str:
    """Templates made only of `{{ a.b }}` and `{{ config_get("k", "d") }}` (the common case, e.g.
    /etc/hostname) render without loading Jinja, with Jinja's results; anything else raises
    _NotSimple and goes to Jinja."""
    rest = _SIMPLE_EXPR.sub("", source)
    if "{{" in rest or "{%" in rest or "{#" in rest:
        raise _NotSimple

    def expr(m: re.Match) -> str:
        if m.group("name"):
            val: object = context
            for part in m.group("name").split("."):
                if not isinstance(val, dict):
                    raise _NotSimple
                if part not in val:
                    return ""  # undefined renders empty
                val = val[part]
            if val is None or not isinstance(val, str | int | float | bool):
                raise _NotSimple
            return str(val)
        val = (context.get("config") or {}).get(m.group("k")[1:-1])
        if val not in (None, ""):
            return str(val)
        return m.group("d")[1:-1] if m.group("d") else ""

    return _SIMPLE_EXPR.sub(expr, source)


def render_template(source: str, context: dict) -> str:
    if len(source) > MAX_TEMPLATE:
        raise TemplateError("Template too large")
    try:
        return _render_simple(source, context)
    except _NotSimple:
        pass
    return _render_jinja(source, context)


def _render_jinja(source: str, context: dict) -> str:
    from jinja2 import TemplateError as JinjaError

    env = _environment()
    try:
        tpl = env.from_string(pongo_to_jinja(source))
        out = tpl.render(**context)
    except JinjaError as e:
        raise TemplateError(f"Failed to render template: {e}") from None
    if len(out) > MAX_OUTPUT:
        raise TemplateError("Rendered template too large")
    return out


# -- applying -------------------------------------------------------------------------------------


def _clean_target(path: object) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise TemplateError(f"Invalid template target {path!r}: must be an absolute path")
    parts = path.split("/")
    if ".." in parts or "\0" in path:
        raise TemplateError(f"Invalid template target {path!r}: '..' is not allowed")
    rel = "/".join(p for p in parts if p and p != ".")
    if not rel:
        raise TemplateError(f"Invalid template target {path!r}")
    return rel


def _template_file(templates_dir: Path, name: object) -> Path:
    if not isinstance(name, str) or not name or name.startswith("/") or ".." in name.split("/") or "\0" in name:
        raise TemplateError(f"Invalid template name {name!r}")
    return templates_dir / name


def _read_template(templates_dir: Path, name: str) -> str:
    """Read templates/<name> without following symlinks out of the templates directory."""
    _template_file(templates_dir, name)
    try:
        dfd = os.open(templates_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        raise TemplateError(f"Template {name!r} doesn't exist") from None
    try:
        fd = openat2(dfd, name, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        raise TemplateError(f"Template {name!r} doesn't exist") from None
    finally:
        os.close(dfd)
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_TEMPLATE + 1)
    if len(data) > MAX_TEMPLATE:
        raise TemplateError(f"Template {name!r} is too large")
    return data.decode("utf-8", errors="replace")


def _open_parent(rootfd: int, rel: str, uid: int, gid: int) -> int:
    """An O_PATH fd of the target's parent directory inside the root, creating missing ones."""
    parent = os.path.dirname(rel)
    if not parent:
        return os.dup(rootfd)
    try:
        return openat2(rootfd, parent, os.O_PATH | os.O_DIRECTORY)
    except FileNotFoundError:
        pass
    cur = os.dup(rootfd)
    done = ""
    try:
        for comp in parent.split("/"):
            done = f"{done}/{comp}" if done else comp
            try:
                nxt = openat2(rootfd, done, os.O_PATH | os.O_DIRECTORY)
            except FileNotFoundError:
                # create it in the directory we hold (resolved in the root), then reopen
                dfd = openat2(rootfd, os.path.dirname(done) or ".", os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.mkdir(comp, 0o755, dir_fd=dfd)
                    os.chown(comp, uid, gid, dir_fd=dfd, follow_symlinks=False)
                except FileExistsError:
                    pass
                finally:
                    os.close(dfd)
                nxt = openat2(rootfd, done, os.O_PATH | os.O_DIRECTORY)
            os.close(cur)
            cur = nxt
        return cur
    except BaseException:
        os.close(cur)
        raise


def write_in_root(rootfs: Path, path: str, data: bytes, *, uid: int, gid: int, mode: int = 0o644,
                  create_only: bool = False) -> bool:
    """Write a file at `path` inside rootfs (symlinks resolved within it). False when create_only
    and the file already exists."""
    rel = _clean_target(path)
    rootfd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            pfd = _open_parent(rootfd, rel, uid, gid)
        except OSError as e:
            raise TemplateError(f"Failed to create the directory of template target {path!r}: "
                                f"{e.strerror}") from None
        os.close(pfd)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if create_only else os.O_TRUNC)
        try:
            fd = openat2(rootfd, rel, flags, mode)
        except FileExistsError:
            if create_only:
                return False
            raise
        except OSError as e:
            if e.errno == errno.EISDIR:
                raise TemplateError(f"Invalid template target {path!r}: it is a directory") from None
            raise TemplateError(f"Failed to write template target {path!r}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise TemplateError(f"Invalid template target {path!r}: not a regular file")
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        finally:
            os.close(fd)
        return True
    finally:
        os.close(rootfd)


def load_templates(instance_dir: Path) -> dict:
    meta_path = Path(instance_dir) / "metadata.yaml"
    try:
        text = meta_path.read_text()
    except FileNotFoundError:
        return {}
    try:
        meta = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    except yaml.YAMLError as e:
        raise TemplateError(f"Invalid metadata.yaml: {e}") from None
    if not isinstance(meta, dict):
        raise TemplateError("Invalid metadata.yaml: not a mapping")
    templates = meta.get("templates") or {}
    if not isinstance(templates, dict):
        raise TemplateError("Invalid metadata.yaml: templates must be a mapping")
    return templates


def build_context(context: dict, trigger: str, path: str, properties: dict) -> dict:
    ctx = dict(context)
    inst = ctx.get("instance") or ctx.get("container") or {}
    ctx.setdefault("instance", inst)
    ctx.setdefault("container", inst)
    config = ctx.get("config") or {}
    ctx["config"] = config
    ctx.setdefault("devices", {})
    ctx["trigger"] = trigger
    ctx["path"] = path
    ctx["properties"] = properties or {}

    def config_get(key: str, default: object = "") -> object:
        val = config.get(key)
        return val if val not in (None, "") else default

    ctx["config_get"] = config_get
    return ctx


def apply_templates(instance_dir: Path, rootfs: Path, trigger: str, context: dict, *, uid: int,
                    gid: int) -> None:
    """Render the templates of metadata.yaml whose `when` holds `trigger` into rootfs.

    context: {"instance": {"name", "architecture", "privileged", "ephemeral"}, "config": expanded
    config, "devices": expanded devices}. Files are written 0644, owned by uid/gid (the host ids
    of container root). `create_only: true` templates leave existing files alone."""
    if trigger not in TRIGGERS:
        raise TemplateError(f"Invalid template trigger {trigger!r}")
    templates = load_templates(instance_dir)
    tdir = Path(instance_dir) / "templates"
    for path, tpl in sorted(templates.items()):
        if not isinstance(tpl, dict):
            raise TemplateError(f"Invalid template entry for {path!r}")
        when = tpl.get("when") or []
        if isinstance(when, str):
            when = [when]
        if trigger not in when:
            continue
        _clean_target(path)
        source = _read_template(tdir, tpl.get("template"))
        properties = tpl.get("properties") or {}
        if not isinstance(properties, dict):
            raise TemplateError(f"Invalid properties for template {path!r}")
        out = render_template(source, build_context(context, trigger, path, properties))
        write_in_root(Path(rootfs), path, out.encode(), uid=uid, gid=gid,
                      create_only=bool(tpl.get("create_only")))
