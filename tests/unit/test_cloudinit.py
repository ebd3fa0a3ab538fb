"""cloud-init: instance-id rotation rules, the keys' validation, and the NoCloud seed templates
rendered by the daemon's template engine (instances/cloudinit.py, instances/templates.py)."""

from __future__ import annotations

import os
import uuid

import pytest
import yaml

from lxd_daemon.errors import BadRequest
from lxd_daemon.instances import cloudinit as ci
from lxd_daemon.instances import config as cfg
from lxd_daemon.instances import templates

ID = ci.INSTANCE_ID


# -- rotation ------------------------------------------------------------------------------------


def test_create_sets_a_uuid_unless_given():
    new = ci.on_create({"user.x": "1"})
    assert uuid.UUID(new[ID])
    assert ci.on_create({ID: "11111111-2222-3333-4444-555555555555"}) == {}
    assert ci.on_create({})[ID] != ci.on_create({})[ID]


@pytest.mark.parametrize("key", ["cloud-init.user-data", "cloud-init.vendor-data", "cloud-init.network-config",
                                 "user.user-data", "user.vendor-data", "user.network-config"])
def test_cloud_init_keys_rotate_when_set_changed_or_unset(key):
    assert ci.needs_new_id({}, {key: "a"})
    assert ci.needs_new_id({key: "a"}, {key: "b"})
    assert ci.needs_new_id({key: "a"}, {})
    assert not ci.needs_new_id({key: "a"}, {key: "a"})
    rotated = ci.on_update(({key: "a"}, {}), ({key: "b"}, {}), {})
    assert uuid.UUID(rotated[ID])


@pytest.mark.parametrize("key", ["user.meta-data", "user.other", "limits.memory", "environment.X",
                                 "volatile.eth0.hwaddr", "cloud-init.unknown"])
def test_other_keys_do_not_rotate(key):
    assert not ci.needs_new_id({key: "a"}, {key: "b"})
    assert ci.on_update(({key: "a"}, {}), ({key: "b"}, {}), {}) == {}


def test_nic_name_changes_rotate_other_device_changes_do_not():
    eth0 = {"eth0": {"type": "nic", "nictype": "bridged", "parent": "br0"}}
    assert not ci.needs_new_id({}, {}, eth0, {"eth0": {**eth0["eth0"], "parent": "br1"}})  # same name
    assert ci.needs_new_id({}, {}, eth0, {})                                                # nic removed
    assert ci.needs_new_id({}, {}, {}, eth0)                                                # nic added
    assert ci.needs_new_id({}, {}, eth0, {"eth0": {**eth0["eth0"], "name": "eth5"}})        # renamed
    # the interface name comes from `name`, else volatile.<dev>.name, else the device name
    net = {"net": {"type": "nic", "nictype": "bridged", "parent": "br0"}}
    assert not ci.needs_new_id({}, {}, net, {"net": {**net["net"], "name": "eth1"}},
                               {"volatile.net.name": "eth1"})
    disk = {"d": {"type": "disk", "path": "/mnt", "source": "/srv"}}
    assert not ci.needs_new_id({}, {}, {}, disk)


def test_rename_always_rotates_and_the_id_falls_back_to_the_name():
    a, b = ci.on_rename()[ID], ci.on_rename()[ID]
    assert a != b and uuid.UUID(a)
    assert ci.instance_id("c1", {}) == "c1"
    assert ci.instance_id("c1", {ID: a}) == a


# -- validation ----------------------------------------------------------------------------------


def test_keys_are_in_the_config_table():
    cfg.validate_config({"cloud-init.user-data": "#cloud-config\npackages: [vim]\n",
                         "cloud-init.vendor-data": "#!/bin/sh\necho not yaml: [\n",  # scripts are fine
                         "cloud-init.network-config": "version: 2\n",
                         "user.user-data": "anything", "user.meta-data": "x: y",
                         ID: str(uuid.uuid4())})
    for key, value in (("cloud-init.user-data", "#cloud-config\nfoo: [unclosed"),
                       ("cloud-init.vendor-data", "#cloud-config\n: : :\n  - x\n y"),
                       ("cloud-init.network-config", "version: [1"),
                       (ID, "not-a-uuid")):
        with pytest.raises(BadRequest, match=key):
            cfg.validate_config({key: value})
    with pytest.raises(BadRequest, match="Volatile keys"):
        cfg.validate_config({ID: str(uuid.uuid4())}, profile=True)
    cfg.validate_config({"cloud-init.user-data": "#cloud-config"}, profile=True)
    # applied at the next start: no live update needed
    assert cfg.needs_restart({}, {"cloud-init.user-data": "#cloud-config"}) == set()


# -- the seed templates --------------------------------------------------------------------------


def render_all(config: dict, name: str = "c1") -> dict[str, str]:
    files, entries = ci.image_templates()
    out = {}
    for path, entry in entries.items():
        ctx = templates.build_context({"instance": {"name": name, "type": "container"}, "config": config},
                                      "start", path, entry.get("properties") or {})
        out[path.rsplit("/", 1)[1]] = templates.render_template(files[entry["template"]], ctx)
    return out


def test_templates_defaults_when_nothing_is_set():
    out = render_all({})
    assert out["user-data"] == "#cloud-config\n{}\n"
    assert out["vendor-data"] == "#cloud-config\n{}\n"
    assert yaml.safe_load(out["meta-data"]) == {"instance-id": "c1", "local-hostname": "c1"}
    net = yaml.safe_load(out["network-config"])
    assert net["version"] == 1 and net["config"][0]["name"] == "eth0"
    assert net["config"][0]["subnets"] == [{"type": "dhcp", "control": "auto"}]


def test_templates_use_the_old_user_keys():
    out = render_all({"user.user-data": "#cloud-config\nhostname: a\n", "user.vendor-data": "#cloud-config\nb: 1",
                      "user.network-config": "version: 2", "user.meta-data": "public-keys: k"})
    assert out["user-data"] == "#cloud-config\nhostname: a\n\n"
    assert out["vendor-data"] == "#cloud-config\nb: 1\n"
    assert out["network-config"] == "version: 2\n"
    assert yaml.safe_load(out["meta-data"]) == {"instance-id": "c1", "local-hostname": "c1", "public-keys": "k"}


def test_cloud_init_keys_win_over_user_keys_and_meta_data_carries_the_volatile_id():
    iid = str(uuid.uuid4())
    out = render_all({"cloud-init.user-data": "#cloud-config\nruncmd: [[touch, /x]]",
                      "user.user-data": "#cloud-config\nignored: 1",
                      "cloud-init.vendor-data": "#cloud-config\nv: 2", "user.vendor-data": "#cloud-config\nno: 1",
                      "cloud-init.network-config": "version: 2\nethernets: {}", "user.network-config": "version: 1",
                      ID: iid}, name="web")
    assert out["user-data"] == "#cloud-config\nruncmd: [[touch, /x]]\n"
    assert out["vendor-data"] == "#cloud-config\nv: 2\n"
    assert out["network-config"] == "version: 2\nethernets: {}\n"
    assert yaml.safe_load(out["meta-data"]) == {"instance-id": iid, "local-hostname": "web"}


def test_image_template_entries():
    files, entries = ci.image_templates()
    assert set(entries) == {f"/var/lib/cloud/seed/nocloud-net/{f}"
                            for f in ("meta-data", "user-data", "vendor-data", "network-config")}
    for entry in entries.values():
        assert entry["when"] == ["create", "copy", "start"]
        assert entry["template"] in files
    assert sorted(files) == ["cloud-init-meta.tpl", "cloud-init-network.tpl", "cloud-init-user.tpl",
                             "cloud-init-vendor.tpl"]
    assert entries["/var/lib/cloud/seed/nocloud-net/user-data"]["properties"] == {"default": "#cloud-config\n{}"}


def test_apply_templates_writes_the_seed_into_a_rootfs(tmp_path):
    """The four files through apply_templates (metadata.yaml + templates/), as a start does."""
    files, entries = ci.image_templates()
    idir = tmp_path / "inst"
    (idir / "templates").mkdir(parents=True)
    for n, src in files.items():
        (idir / "templates" / n).write_text(src)
    (idir / "metadata.yaml").write_text(yaml.safe_dump({"templates": entries}))
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    iid = str(uuid.uuid4())
    ctx = {"instance": {"name": "c9", "type": "container"},
           "config": {"cloud-init.user-data": "#cloud-config\nwrite_files: []", ID: iid}}
    for trigger in ("create", "start"):
        templates.apply_templates(idir, rootfs, trigger, dict(ctx, trigger=trigger), uid=os.getuid(),
                                  gid=os.getgid())
    seed = rootfs / "var/lib/cloud/seed/nocloud-net"
    assert (seed / "user-data").read_text() == "#cloud-config\nwrite_files: []\n"
    assert f"instance-id: {iid}\n" in (seed / "meta-data").read_text()
    assert sorted(os.listdir(seed)) == ["meta-data", "network-config", "user-data", "vendor-data"]


def test_imagebuilder_cloud_init_option_and_metadata(tmp_path):
    """`lxd-imagebuilder debian --cloud-init`: the option, the cloud.cfg drop-in, the templates and
    their metadata.yaml entries (the package install itself is the slow test's)."""
    from lxd_daemon.imagebuilder import cli, debian
    from lxd_daemon.imagebuilder.pack import DEFAULT_TEMPLATES, make_metadata

    assert cli._parser().parse_args(["debian", "--cloud-init"]).cloud_init is True
    assert cli._parser().parse_args(["debian"]).cloud_init is False
    with pytest.raises(debian.BuildError, match="cloud-init"):
        debian._cloud_init_setup(tmp_path)  # not installed
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/cloud-init").write_text("")
    tpls = debian._cloud_init_setup(tmp_path)
    cfgd = (tmp_path / "etc/cloud/cloud.cfg.d/99_lxd_imagebuilder.cfg").read_text()
    assert yaml.safe_load(cfgd) == {"datasource_list": ["NoCloud", "None"], "locale": "C.UTF-8"}
    meta = make_metadata(architecture="x86_64", creation_date=1, properties={},
                         templates=[*DEFAULT_TEMPLATES, *tpls])
    debian._cloud_init_properties(meta)
    t = meta["templates"]
    assert set(t) == {"/etc/hostname", "/etc/hosts"} | {f"{ci.SEED_DIR}/{f}" for f in ci.SEED_FILES}
    assert t[f"{ci.SEED_DIR}/meta-data"] == {"when": ["create", "copy", "start"], "create_only": False,
                                              "template": "cloud-init-meta.tpl", "properties": {}}
    assert t[f"{ci.SEED_DIR}/vendor-data"]["properties"] == {"default": "#cloud-config\n{}"}
    assert {x.name: x.content for x in tpls}["cloud-init-meta.tpl"] == ci.TEMPLATE_SOURCES["meta-data"]
