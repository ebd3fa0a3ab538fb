"""Wire the projects into the daemon: `services.projects` (first, before anything that belongs to
a project), the `/1.0/projects` routes and their API extensions."""

from __future__ import annotations

from lxd_daemon.projects.service import ProjectService

# ("projects" and "project_usage" are core: extensions.py.)
EXTENSIONS = (
    "projects_limits", "projects_restrictions", "projects_limits_disk", "projects_limits_instances",
    "projects_restricted_backups_and_snapshots", "projects_restricted_intercept",
)


async def setup(services) -> list:
    svc = ProjectService(services.db, services.events)
    await svc.load()
    services.projects = svc
    services.server.advertise(*EXTENSIONS)
    return []
