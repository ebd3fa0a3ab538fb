import os
from pathlib import Path

import pytest
import yaml

from lxd_daemon.errors import BadRequest
from lxd_daemon.instances import templates as T

CTX = {"instance": {"name": "c1", "architecture": "x86_64", "privileged": False, "ephemeral": False},
       "config": {"user.greeting": "hello", "image.os": "busybox"}, "devices": {}}
UID, GID = os.getuid(), os.getgid()


def setup_instance(tmp_path: Path, templates: dict, files: dict) -> tuple[Path, Path]:
    inst = tmp_path / "inst"
    (inst / "templates").mkdir(parents=True)
    rootfs = inst / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (inst / "metadata.yaml").write_text(yaml.safe_dump({"architecture": "x86_64", "templates": templates}))
    for name, text in files.items():
        (inst / "templates" / name).write_text(text)
    return inst, rootfs


def test_render_pongo_syntax():
    out = T.render_template('{{ container.name }} {{ config_get("user.greeting", "x") }} '
                            '{{ config_get("user.missing", "dflt") }} {{ nothing|default:"dd" }}',
                            T.build_context(CTX, "start", "/etc/x", {}))
    assert out == "c1 hello dflt dd"


def test_render_is_not_autoescaped_and_keeps_newline():
    out = T.render_template("{{ config_get('user.x') }}\n", T.build_context({"config": {"user.x": "<a&b>"}}, "start", "/x", {}))
    assert out == "<a&b>\n"


def test_sandbox_blocks_attribute_escapes():
    with pytest.raises(BadRequest):
        T.render_template("{{ ''.__class__.__mro__[1].__subclasses__() }}", T.build_context(CTX, "start", "/x", {}))
    # unsafe attributes of functions render as undefined: nothing leaks
    assert T.render_template("{{ config_get.__globals__ }}", T.build_context(CTX, "start", "/x", {})) == ""


def test_bad_template_syntax_is_400():
    with pytest.raises(BadRequest) as e:
        T.render_template("{% if %}", T.build_context(CTX, "start", "/x", {}))
    assert e.value.status == 400


def test_apply_triggers_and_properties(tmp_path):
    inst, rootfs = setup_instance(tmp_path, {
        "/etc/hostname": {"when": ["create", "copy", "rename"], "template": "hostname.tpl"},
        "/etc/motd": {"when": ["start"], "template": "motd.tpl", "properties": {"who": "world"}},
        "/etc/deep/new/file.conf": {"when": ["create"], "template": "hostname.tpl"},
    }, {"hostname.tpl": "{{ container.name }}\n", "motd.tpl": "hi {{ properties.who }} on {{ trigger }} {{ path }}\n"})
    T.apply_templates(inst, rootfs, "create", CTX, uid=UID, gid=GID)
    assert (rootfs / "etc/hostname").read_text() == "c1\n"
    assert (rootfs / "etc/deep/new/file.conf").read_text() == "c1\n"
    assert not (rootfs / "etc/motd").exists()
    T.apply_templates(inst, rootfs, "start", CTX, uid=UID, gid=GID)
    assert (rootfs / "etc/motd").read_text() == "hi world on start /etc/motd\n"
    assert oct((rootfs / "etc/motd").stat().st_mode & 0o777) == "0o644"


def test_create_only(tmp_path):
    inst, rootfs = setup_instance(tmp_path, {
        "/etc/keep": {"when": ["start"], "template": "t.tpl", "create_only": True},
        "/etc/over": {"when": ["start"], "template": "t.tpl"},
    }, {"t.tpl": "new\n"})
    (rootfs / "etc/keep").write_text("old\n")
    (rootfs / "etc/over").write_text("old old old\n")
    T.apply_templates(inst, rootfs, "start", CTX, uid=UID, gid=GID)
    assert (rootfs / "etc/keep").read_text() == "old\n"
    assert (rootfs / "etc/over").read_text() == "new\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_owner_is_container_root(tmp_path):
    inst, rootfs = setup_instance(tmp_path, {"/etc/hostname": {"when": ["start"], "template": "t.tpl"}}, {"t.tpl": "x"})
    T.apply_templates(inst, rootfs, "start", CTX, uid=1000000, gid=1000000)
    st = (rootfs / "etc/hostname").stat()
    assert (st.st_uid, st.st_gid) == (1000000, 1000000)


@pytest.mark.parametrize("target", ["/../../etc/x", "/etc/../../x", "etc/x", "/", ""])
def test_escaping_targets_refused(tmp_path, target):
    inst, rootfs = setup_instance(tmp_path, {target: {"when": ["start"], "template": "t.tpl"}}, {"t.tpl": "pwned"})
    with pytest.raises(BadRequest):
        T.apply_templates(inst, rootfs, "start", CTX, uid=UID, gid=GID)
    assert not (tmp_path / "etc").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["../metadata.yaml", "/etc/passwd", "a/../../x", ""])
def test_template_names_outside_templates_dir_refused(tmp_path, name):
    inst, rootfs = setup_instance(tmp_path, {"/etc/x": {"when": ["start"], "template": name}}, {})
    with pytest.raises(BadRequest):
        T.apply_templates(inst, rootfs, "start", CTX, uid=UID, gid=GID)


def test_template_symlink_out_of_templates_dir_refused(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    inst, rootfs = setup_instance(tmp_path, {"/etc/x": {"when": ["start"], "template": "t.tpl"}}, {})
    (inst / "templates" / "t.tpl").symlink_to(secret)
    with pytest.raises(BadRequest):
        T.apply_templates(inst, rootfs, "start", CTX, uid=UID, gid=GID)


def test_symlinks_in_rootfs_stay_inside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    inst, rootfs = setup_instance(tmp_path, {
        "/etc/abs": {"when": ["start"], "template": "t.tpl"},
        "/etc/rel": {"when": ["start"], "template": "t.tpl"},
        "/linkdir/f": {"when": ["start"], "template": "t.tpl"},
    }, {"t.tpl": "inside"})
    (rootfs / str(outside).lstrip("/")).mkdir(parents=True)
    (rootfs / "etc/abs").symlink_to(outside / "abs")          # absolute: resolves in the rootfs
    (rootfs / "outside").mkdir()
    (rootfs / "etc/rel").symlink_to("../../../outside/rel")   # .. stops at the rootfs
    (rootfs / "linkdir").symlink_to(str(outside))             # directory symlink
    T.apply_templates(inst, rootfs, "start", CTX, uid=UID, gid=GID)
    assert list(outside.iterdir()) == []
    assert (rootfs / str(outside).lstrip("/") / "abs").read_text() == "inside"
    assert (rootfs / "outside/rel").read_text() == "inside"


def test_no_metadata_is_a_noop(tmp_path):
    (tmp_path / "rootfs").mkdir()
    T.apply_templates(tmp_path, tmp_path / "rootfs", "start", CTX, uid=UID, gid=GID)


def test_invalid_trigger(tmp_path):
    with pytest.raises(BadRequest):
        T.apply_templates(tmp_path, tmp_path, "explode", CTX, uid=UID, gid=GID)


def test_pongo_to_jinja():
    assert T.pongo_to_jinja('{{ a|default:"x" }} |b:c') == '{{ a|default("x") }} |b:c'
    assert T.pongo_to_jinja("{% if a|default:'y' %}") == "{% if a|default('y') %}"


def test_dangling_symlink_to_missing_dir_is_400(tmp_path):
    inst, rootfs = setup_instance(tmp_path, {"/etc/x": {"when": ["start"], "template": "t.tpl"}}, {"t.tpl": "x"})
    (rootfs / "etc/x").symlink_to("/nowhere/at/all")
    with pytest.raises(BadRequest):
        T.apply_templates(inst, rootfs, "start", CTX, uid=UID, gid=GID)
    assert not Path("/nowhere").exists()


@pytest.mark.parametrize("source", [
    "{{ container.name }}\n", "127.0.1.1\t{{ instance.name }}\n\n::1 localhost\n", "{{ config_get('user.greeting') }}",
    '{{config_get("user.missing", "fallback")}}', "{{ nothing.at.all }}x", "{{ properties.who }}", "no tags",
    "{{ container.privileged }}", "{{ trigger }} {{ path }}",
])
def test_fast_path_matches_jinja(source):
    ctx = T.build_context({**CTX, "container": {**CTX["instance"], "privileged": "false"}}, "create", "/etc/h",
                          {"who": "me"})
    assert T._render_simple(source, ctx) == T._render_jinja(source, ctx)


@pytest.mark.parametrize("source", ["{{ container.name|upper }}", "{% if 1 %}x{% endif %}", "{{ a }}{{",
                                    "{{ config_get }}", "{# c #}", "{{ container.name.x }}"])
def test_fast_path_defers_to_jinja(source):
    with pytest.raises(T._NotSimple):
        T._render_simple(source, T.build_context(CTX, "create", "/x", {}))
