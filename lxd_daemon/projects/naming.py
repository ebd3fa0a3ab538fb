"""The name an instance has on the host: LXD's `PROJECT_NAME`, the bare name in `default`.

Project and instance names can't hold `_` (lxd_daemon.names), so the first `_` of a storage name
separates them. Everything that names an instance outside the API (the liblxc container and its
directory, its root volume and snapshot volumes, its cgroups, log directory and worker lane) uses
this name; the API only ever shows the instance's own name and its project.
"""

from __future__ import annotations

DEFAULT = "default"


def storage_name(project: str, name: str) -> str:
    return name if project == DEFAULT else f"{project}_{name}"


def split(storage: str) -> tuple[str, str]:
    """(project, name) of a storage name."""
    project, sep, name = storage.partition("_")
    return (project, name) if sep else (DEFAULT, storage)


def query(project: str) -> str:
    """The `?project=` suffix of an API URL for an object of `project` (none for default)."""
    return "" if project == DEFAULT else f"?project={project}"
