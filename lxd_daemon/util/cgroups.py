"""Where a container's own cgroup is in a cgroup path.

liblxc puts a container's processes in `lxc.payload.<name>` (or `lxc.payload.<name>-<n>` when
that name is taken by a container of another lxcpath) in each hierarchy. Whatever touches a
container's cgroups resolves them through this, never from whatever cgroup a pid is in at the
moment: an exiting init has already been moved to the root cgroup by the kernel.
"""

from __future__ import annotations


def own_cgroup(path: str, name: str) -> str | None:
    """`path` (a cgroup path, relative to its hierarchy) cut right after its
    `lxc.payload.<name>[-N]` component, keeping a leading `/` if it had one; None without such
    a component (the path is not inside container `name`'s cgroup)."""
    want = f"lxc.payload.{name}"
    parts = path.split("/")
    for i, p in enumerate(parts):
        if p == want or (p.startswith(want + "-") and p[len(want) + 1:].isdigit()):
            return "/".join(parts[:i + 1])
    return None
