"""Wire the trust store into the daemon: `services.trust`, the PKI watcher, the
`/1.0/certificates` routes and their API extensions."""

from __future__ import annotations

from lxd_daemon.trust.store import TrustService

EXTENSIONS = (
    "certificate_update",  # ETag, PUT and PATCH of a certificate
    "certificate_project",  # `restricted` and `projects`
    "certificate_self_renewal",  # a (restricted) client replaces its own certificate
    "certificate_token",  # POST with `token: true`; tokens redeemed as `password`
    "remote_token_expiry",  # core.remote_token_expiry
)


async def setup(services) -> list:
    from lxd_daemon.api import certificates

    projects = getattr(services, "projects", None)
    trust = TrustService(db=services.db, lxd_dir=services.lxd_dir, ops=services.ops, server=services.server,
                         projects=projects)
    await trust.load()
    if projects is not None:  # a certificate's projects follow a rename and leave with a delete
        projects.on_rename.append(trust.project_renamed)
        projects.on_delete.append(trust.project_deleted)
    services.trust = trust
    trust.start()
    services.exit_hooks.append(trust.stop)
    services.server.advertise(*EXTENSIONS)
    return [certificates.routes.router]
