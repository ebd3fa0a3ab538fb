"""lxd_daemon.networks.host: how host interfaces are read (a fake /sys/class/net and /proc/net)."""

from __future__ import annotations

from lxd_daemon.networks import host


def fake_tree(tmp_path, monkeypatch):
    sys_net = tmp_path / "sys"
    proc_net = tmp_path / "proc"
    for name, index, flags, extra in (("lo", 1, "0x9", ()), ("eth0", 2, "0x1003", ("device",)),
                                      ("br0", 3, "0x1003", ("bridge",)), ("veth1", 4, "0x1003", ()),
                                      ("bond0", 5, "0x1403", ("bonding",)), ("tun0", 6, "0x10d1", ())):
        d = sys_net / name
        d.mkdir(parents=True)
        (d / "ifindex").write_text(f"{index}\n")
        (d / "flags").write_text(f"{flags}\n")
        (d / "mtu").write_text("1500\n")
        (d / "address").write_text("00:00:00:00:00:00\n" if name in ("lo", "tun0") else "02:00:00:00:00:01\n")
        for e in extra:
            (d / e).mkdir()
    (sys_net / "bonding_masters").write_text("bond0\n")
    (sys_net / "br0" / "bridge" / "stp_state").write_text("1\n")
    (sys_net / "br0" / "brif").mkdir()
    (sys_net / "br0" / "brif" / "eth0").mkdir()
    (sys_net / "bond0" / "bonding" / "mode").write_text("active-backup 1\n")
    (sys_net / "bond0" / "bonding" / "slaves").write_text("eth0 eth1\n")
    proc_net.mkdir()
    (proc_net / "dev").write_text(
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n"
        "    lo:     100       2    0    0    0     0          0         0      300       4    0    0    0     0       0          0\n"
        "  eth0: 5 6 0 0 0 0 0 0 7 8 0 0 0 0 0 0\n")
    monkeypatch.setattr(host, "SYS_NET", sys_net)
    monkeypatch.setattr(host, "PROC_NET", proc_net)


def test_names_types_and_details(tmp_path, monkeypatch):
    fake_tree(tmp_path, monkeypatch)
    # ifindex order; veth pairs and non-interface files left out, as LXD does
    assert host.interface_names() == ["lo", "eth0", "br0", "bond0", "tun0"]
    assert not host.exists("veth1") and not host.exists("bonding_masters") and not host.exists("..")
    assert [host.kind(n) for n in ("lo", "eth0", "br0", "bond0", "tun0")] == [
        "loopback", "physical", "bridge", "bond", "unknown"]
    assert host.hwaddr("lo") == "" and host.hwaddr("eth0") == "02:00:00:00:00:01"
    assert host.counters("lo") == {"bytes_received": 100, "packets_received": 2, "bytes_sent": 300,
                                   "packets_sent": 4}
    assert host.counters("eth0") == {"bytes_received": 5, "packets_received": 6, "bytes_sent": 7,
                                     "packets_sent": 8}
    assert host.counters("br0")["bytes_sent"] == 0
    assert host._bridge("br0")["stp"] is True and host._bridge("br0")["upper_devices"] == ["eth0"]
    bond = host._bond("bond0")
    assert bond["mode"] == "active-backup" and bond["lower_devices"] == ["eth0", "eth1"]
    assert host._bridge("eth0") is None and host._bond("eth0") is None and host._vlan("eth0") is None


def test_address_scopes_follow_lxd():
    assert host._scope("127.0.0.1") == "local" and host._scope("::1") == "local"
    assert host._scope("169.254.1.1") == "link" and host._scope("fe80::1") == "link"
    assert host._scope("192.0.2.1") == "global" and host._scope("2001:db8::1") == "global"
