"""The text of GET /1.0/metrics (lxd_daemon/metrics/render.py): LXD 5.0.2's families, their
HELP and TYPE lines, label order and escaping, Go's number format and the closing `# EOF`."""

from __future__ import annotations

import pytest

from lxd_daemon.metrics.render import FAMILIES, Metrics, format_value, metric_type, render


@pytest.mark.parametrize(("value", "text"), [
    (0, "0"), (1, "1"), (100, "100"), (999999, "999999"), (1e6, "1e+06"), (1234567, "1.234567e+06"),
    (123456789, "1.23456789e+08"), (8253792256, "8.253792256e+09"), (1.5, "1.5"), (0.25, "0.25"),
    (0.000123, "0.000123"), (0.00001, "1e-05"), (12.345678, "12.345678"), (-3, "-3"),
    (2.5e-07, "2.5e-07"), (1.2e21, "1.2e+21"),
])
def test_values_are_written_as_go_writes_them(value, text):
    assert format_value(value) == text


def test_types_follow_lxd_rules():
    assert metric_type("lxd_procs_total") == "gauge"
    assert metric_type("lxd_cpu_seconds_total") == "counter"
    assert metric_type("lxd_network_receive_bytes_total") == "counter"
    assert metric_type("lxd_memory_RSS_bytes") == "gauge"
    assert metric_type("lxd_filesystem_size_bytes") == "gauge"
    assert len(FAMILIES) == 36 and len({n for n, _ in FAMILIES}) == 36


def test_families_in_lxd_order_with_help_type_and_sorted_labels():
    m = Metrics()
    base = {"name": "c1", "project": "default", "type": "container"}
    m.add("lxd_procs_total", 3, dict(base))
    m.add("lxd_memory_RSS_bytes", 4096, dict(base))
    m.add("lxd_cpu_seconds_total", 1.25, {"mode": "system", "cpu": "0", **base})
    m.add("lxd_cpu_seconds_total", 2.5, {"mode": "user", "cpu": "0", **base})
    text = render(m)
    assert text == (
        "# HELP lxd_cpu_seconds_total The total number of CPU time used in seconds.\n"
        "# TYPE lxd_cpu_seconds_total counter\n"
        'lxd_cpu_seconds_total{cpu="0",mode="system",name="c1",project="default",type="container"} 1.25\n'
        'lxd_cpu_seconds_total{cpu="0",mode="user",name="c1",project="default",type="container"} 2.5\n'
        "# HELP lxd_memory_RSS_bytes The amount of anonymous and swap cache memory.\n"
        "# TYPE lxd_memory_RSS_bytes gauge\n"
        'lxd_memory_RSS_bytes{name="c1",project="default",type="container"} 4096\n'
        "# HELP lxd_procs_total The number of running processes.\n"
        "# TYPE lxd_procs_total gauge\n"
        'lxd_procs_total{name="c1",project="default",type="container"} 3\n'
        "# EOF\n")


def test_label_values_are_escaped():
    m = Metrics()
    m.add("lxd_filesystem_size_bytes", 10,
          {"device": 'a"b', "mountpoint": "/mnt/x\\y", "fstype": "ext4", "name": "c\n1", "project": "p"})
    line = render(m).splitlines()[2]
    assert line == ('lxd_filesystem_size_bytes{device="a\\"b",fstype="ext4",mountpoint="/mnt/x\\\\y",'
                    'name="c\\n1",project="p"} 10')


def test_unlabelled_sample_and_empty_scrape():
    m = Metrics()
    assert render(m) == "# EOF\n"
    m.add("lxd_procs_total", 1, {})
    assert render(m).splitlines()[2] == "lxd_procs_total 1"
    with pytest.raises(KeyError):
        m.add("lxd_nope_total", 1, {})


def test_merge_keeps_each_family_once():
    a, b = Metrics(), Metrics()
    a.add("lxd_procs_total", 1, {"name": "a"})
    b.add("lxd_procs_total", 2, {"name": "b"})
    b.add("lxd_memory_Swap_bytes", 0, {"name": "b"})
    a.merge(b)
    text = render(a)
    assert text.count("# TYPE lxd_procs_total gauge") == 1
    assert 'lxd_procs_total{name="a"} 1\nlxd_procs_total{name="b"} 2\n' in text
    assert text.index("lxd_memory_Swap_bytes") < text.index("lxd_procs_total")
    assert text.endswith("\n# EOF\n")
