"""Compatibility defects of issue 8 (item 11), through the real daemon and the stock client:
image tarballs with absolute member names, raw.lxc checked by liblxc when it is set,
security.syscalls.* taking effect in the container's seccomp policy, one policy file per
container that goes with it, and the stopped/never-started state fields LXD reports."""

from __future__ import annotations

import ctypes
import tarfile

import pytest

from tests.helpers import busybox_tarball, run_prefix

pytestmark = pytest.mark.integration


def seccomp_dir(d):
    return d.lxd_dir / "security" / "seccomp"


# -- image tarballs whose members start with "/" --------------------------------------------------


def test_image_with_absolute_member_names_imports_and_launches(ready, names, tmp_path):
    d = ready
    src = busybox_tarball()
    dst = tmp_path / "absolute.tar.gz"
    with tarfile.open(src) as tin, tarfile.open(dst, "w:gz", format=tarfile.PAX_FORMAT) as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m) if m.isreg() else None
            m.name = "/" + m.name.lstrip("./")
            if m.islnk():
                m.linkname = "/" + m.linkname.lstrip("./")
            tout.addfile(m, data)
    with tarfile.open(dst) as t:
        assert any(n.startswith("/rootfs/") for n in t.getnames()) and "/metadata.yaml" in t.getnames()
    alias = run_prefix() + "-abs"
    c = names("abs")
    try:
        d.lxc("image", "import", str(dst), "--alias", alias)
        d.lxc("launch", alias, c)
        out = d.lxc("exec", c, "--", "sh", "-c", "echo ok; test -x /bin/busybox && echo bb").stdout.split()
        assert out == ["ok", "bb"]
    finally:
        d.lxc("delete", "-f", c, check=False)
        d.lxc("image", "delete", alias, check=False)


def test_image_with_escaping_member_is_still_refused(ready, tmp_path):
    d = ready
    dst = tmp_path / "evil.tar.gz"
    with tarfile.open(busybox_tarball()) as tin, tarfile.open(dst, "w:gz") as tout:
        for m in tin.getmembers():
            tout.addfile(m, tin.extractfile(m) if m.isreg() else None)
        evil = tarfile.TarInfo("/rootfs/../../evil")
        tout.addfile(evil)
    before = {i["fingerprint"] for i in d.api("GET", "/1.0/images?recursion=1").json()["metadata"]}
    r = d.lxc("image", "import", str(dst), check=False)
    assert r.returncode != 0 and "outside" in r.stderr
    after = {i["fingerprint"] for i in d.api("GET", "/1.0/images?recursion=1").json()["metadata"]}
    assert before == after


# -- raw.lxc is checked when it is set ------------------------------------------------------------


def test_raw_lxc_checked_by_liblxc_when_set(ready, names):
    d = ready
    c = names("raw")
    d.lxc("init", "busybox", c)
    for text, word in [("lxc.notaconfigkey = 1", "lxc.notaconfigkey"),
                       ("lxc.aa_profile = unconfined", "lxc.aa_profile"),
                       ("lxc.cap.drop = notacapability", "lxc.cap.drop"),
                       ("lxc.environment = A=B\nnot a line", "not of the form"),
                       ("lxc.logfile = /tmp/x", "lxc.logfile"),
                       ("lxc.prlimit.nofile = 10", "limits.kernel"),
                       ("lxc.net.0.type = veth", "lxc.net.")]:
        r = d.lxc("config", "set", c, "raw.lxc", text, check=False)
        assert r.returncode != 0, text
        assert word in r.stderr, (text, r.stderr)
    assert "raw.lxc" not in d.api("GET", f"/1.0/instances/{c}").json()["metadata"]["config"]
    # PUT (lxc config edit) and PATCH take the same path
    r = d.api("PATCH", f"/1.0/instances/{c}", json={"config": {"raw.lxc": "lxc.notaconfigkey = 1"}})
    assert r.status_code == 400 and "lxc.notaconfigkey" in r.json()["error"]
    # a good key is accepted and the container starts with it
    d.lxc("config", "set", c, "raw.lxc", "lxc.environment = FROM_RAW_LXC=yes")
    d.lxc("start", c)
    env = d.lxc("exec", c, "--", "cat", "/proc/1/environ").stdout
    assert "FROM_RAW_LXC=yes" in env.split("\0")


def test_raw_lxc_checked_on_create_and_in_profiles(ready, names):
    d = ready
    c = names("rawc")
    r = d.lxc("init", "busybox", c, "-c", "raw.lxc=lxc.aa_profile = unconfined", check=False)
    assert r.returncode != 0 and "lxc.aa_profile" in r.stderr
    assert d.api("GET", f"/1.0/instances/{c}").status_code == 404
    p = names("rawp")
    d.lxc("profile", "create", p)
    r = d.lxc("profile", "set", p, "raw.lxc", "lxc.notaconfigkey = 1", check=False)
    assert r.returncode != 0 and "lxc.notaconfigkey" in r.stderr
    d.lxc("profile", "set", p, "raw.lxc", "lxc.environment = P=1")
    assert d.api("GET", f"/1.0/profiles/{p}").json()["metadata"]["config"]["raw.lxc"] == "lxc.environment = P=1"


# -- security.syscalls.* ----------------------------------------------------------------------------


def mknod(d, c):
    return d.lxc("exec", c, "--", "mknod", "/tmp/fifo-test", "p", check=False)


def test_syscalls_deny_takes_effect(ready, names):
    d = ready
    c = names("deny")
    d.lxc("launch", "busybox", c)
    assert mknod(d, c).returncode == 0  # a fifo: allowed in an unprivileged container
    d.lxc("exec", c, "--", "rm", "/tmp/fifo-test")
    d.lxc("stop", c, "-f")
    d.lxc("config", "set", c, "security.syscalls.deny", "mknod errno 1\nmknodat errno 1")
    d.lxc("start", c)
    r = mknod(d, c)
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r.stderr
    policy = (seccomp_dir(d) / c).read_text()
    assert "mknodat errno 1" in policy and "kexec_load errno 38" in policy  # the defaults stay
    # without an action, liblxc's deny list kills the caller
    d.lxc("stop", c, "-f")
    d.lxc("config", "set", c, "security.syscalls.deny", "mknod\nmknodat")
    d.lxc("start", c)
    r = mknod(d, c)
    assert r.returncode != 0
    assert d.lxc("exec", c, "--", "sh", "-c", "test -e /tmp/fifo-test || echo absent").stdout.strip() == "absent"


def _host_syscalls() -> list[str]:
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_syscall_resolve_num_arch.restype = ctypes.c_void_p
    lib.seccomp_syscall_resolve_num_arch.argtypes = [ctypes.c_uint32, ctypes.c_int]
    libc = ctypes.CDLL(None)
    libc.free.argtypes = [ctypes.c_void_p]
    out = []
    for nr in range(0, 512):
        p = lib.seccomp_syscall_resolve_num_arch(0, nr)  # 0: the native architecture
        if p:
            out.append(ctypes.string_at(p).decode())
            libc.free(p)
    return out


def test_syscalls_allow_list_takes_effect(ready, names):
    d = ready
    allowed = [s for s in _host_syscalls() if s not in ("mknod", "mknodat")]
    assert len(allowed) > 200
    c = names("allow")
    d.lxc("init", "busybox", c)
    # allow and deny* together are refused, as in LXD
    r = d.api("PATCH", f"/1.0/instances/{c}", json={"config": {
        "security.syscalls.allow": "read", "security.syscalls.deny": "mknod"}})
    assert r.status_code == 400 and "mutually exclusive" in r.json()["error"]
    d.lxc("config", "set", c, "security.syscalls.allow", "\n".join(allowed))
    d.lxc("start", c)
    assert (seccomp_dir(d) / c).read_text().startswith("2\nallowlist\n[all]\n")
    assert d.lxc("exec", c, "--", "echo", "hi").stdout.strip() == "hi"
    assert mknod(d, c).returncode != 0


def test_syscalls_older_names_and_compat(ready, names):
    d = ready
    c = names("compat")
    d.lxc("init", "busybox", c, "-c", "security.syscalls.deny_compat=true",
          "-c", "security.syscalls.blacklist=mknodat errno 1")
    d.lxc("start", c)
    policy = (seccomp_dir(d) / c).read_text()
    assert "compat_sys_" in policy and "mknodat errno 1" in policy
    assert d.lxc("exec", c, "--", "echo", "hi").stdout.strip() == "hi"
    r = d.lxc("config", "set", c, "security.syscalls.deny", "mknod", check=False)
    assert r.returncode != 0 and "Mutually exclusive" in r.stderr
    d.lxc("config", "set", c, "security.syscalls.deny_default", "false")
    r = d.lxc("config", "set", c, "security.syscalls.deny_default", "maybe", check=False)
    assert r.returncode != 0 and "security.syscalls.deny_default" in r.stderr


def test_syscall_interception_is_refused_clearly(ready, names):
    d = ready
    c = names("icpt")
    d.lxc("init", "busybox", c)
    for key in ("mknod", "setxattr", "mount", "bpf", "sched_setscheduler", "sysinfo"):
        r = d.lxc("config", "set", c, f"security.syscalls.intercept.{key}", "true", check=False)
        assert r.returncode != 0 and "not supported by this server yet" in r.stderr, r.stderr
        d.lxc("config", "set", c, f"security.syscalls.intercept.{key}", "false")
    d.lxc("config", "set", c, "security.syscalls.intercept.mount.allowed", "ext4,xfs")
    d.lxc("config", "set", c, "security.syscalls.intercept.mount.shift", "true")
    r = d.lxc("config", "set", c, "security.syscalls.intercept.mount.fuse", "ext4", check=False)
    assert r.returncode != 0 and "filesystem=fuse-binary" in r.stderr
    d.lxc("start", c)


# -- one seccomp policy per container, gone with it ----------------------------------------------


def test_seccomp_policy_goes_with_its_container(ready, names):
    d = ready
    c, c2 = names("pol"), names("pol2")
    d.lxc("launch", "busybox", c)
    assert (seccomp_dir(d) / c).is_file()
    d.lxc("stop", c, "-f")
    d.lxc("rename", c, c2)
    assert not (seccomp_dir(d) / c).exists()
    d.lxc("start", c2)
    assert (seccomp_dir(d) / c2).is_file()
    d.lxc("delete", "-f", c2)
    assert not (seccomp_dir(d) / c2).exists()
    existing = {i["name"] for i in d.api("GET", "/1.0/instances?recursion=1").json()["metadata"]}
    assert {p.name for p in seccomp_dir(d).iterdir()} <= existing
    # a new container of the same name gets its policy again
    d.lxc("launch", "busybox", c2)
    assert (seccomp_dir(d) / c2).is_file()


# -- state fields of stopped and never-started instances ------------------------------------------


def test_stopped_pid_and_never_used(ready, names):
    d = ready
    c = names("state")
    d.lxc("init", "busybox", c)
    inst = d.api("GET", f"/1.0/instances/{c}?recursion=1").json()["metadata"]
    assert inst["last_used_at"] == "1970-01-01T00:00:00Z"
    assert inst["state"]["pid"] == 0
    assert d.api("GET", f"/1.0/instances/{c}/state").json()["metadata"]["pid"] == 0
    d.lxc("start", c)
    d.lxc("stop", c, "-f")
    inst = d.api("GET", f"/1.0/instances/{c}?recursion=1").json()["metadata"]
    assert inst["state"]["pid"] == 0
    assert not inst["last_used_at"].startswith(("1970", "0001"))


def test_restart_of_a_stopped_instance_says_so(ready, names):
    """As LXD 5.0.2 (what Ansible's lxd_container module reports): "already stopped"."""
    c = names("rs")
    ready.lxc("init", "busybox", c)
    r = ready.api("PUT", f"/1.0/instances/{c}/state", json={"action": "restart", "timeout": 30})
    op = ready.api("GET", r.json()["operation"] + "/wait").json()["metadata"] if r.status_code == 202 else None
    err = op["err"] if op else r.json()["error"]
    assert err == "The instance is already stopped", (r.status_code, r.text, op)
