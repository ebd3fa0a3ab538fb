"""`GET /1.0/metrics`: the running containers' metrics in LXD 5.0.2's OpenMetrics text.

render.py has LXD's metric families and text layout; collect.py reads each container's
cgroups, disks and interfaces. `scrape()` is the whole of one request's work: run it in a thread.
"""

from __future__ import annotations

from lxd_daemon.metrics.collect import Target, collect
from lxd_daemon.metrics.render import CONTENT_TYPE, Metrics, render

__all__ = ["CONTENT_TYPE", "Metrics", "Target", "collect", "render", "scrape", "targets"]


def targets(instances, projects: set[str] | None) -> list[Target]:
    """The running (or frozen) containers of `projects` (None: every project), by project and
    name, from the instance service's records and its runtime tracker."""
    out = []
    for rec in sorted(instances.records.values(), key=lambda r: (r.project, r.name)):
        if rec.type != "container" or (projects is not None and rec.project not in projects):
            continue
        key = rec.key
        rt = instances.runtime.get(key)
        if rt is None:
            continue
        status, pid = instances.status_of(key)
        if status == "Stopped" or pid <= 0:
            continue
        try:
            devices = instances.expanded(key)[1]
        except Exception:
            devices = {}
        out.append(Target(project=rec.project, name=rec.name, pid=pid, cgroups=dict(rt.cgroups or {}),
                          links=rt.links, rootfs=str(instances.lxcpath / key),
                          disks=sorted(devices.items())))
    return out


def scrape(instances, projects: set[str] | None) -> str:
    """The metrics text of one request (blocking: file reads of every running container)."""
    return render(collect(targets(instances, projects)))
