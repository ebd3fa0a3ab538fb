"""Wires instances and profiles into the daemon: services, routes, hooks, API extensions."""

from __future__ import annotations

import asyncio

from lxd_daemon.api import instance_logs, instance_state, instances, profiles  # noqa: F401  (routes register)
from lxd_daemon.devices import disk as disks
from lxd_daemon.instances.service import InstanceService
from lxd_daemon.profiles.service import ProfileService
from lxd_daemon.projects.naming import query, split


async def setup(services) -> list:
    prof = ProfileService(services)
    await prof.load()
    services.profiles = prof
    svc = InstanceService(services)
    services.instances = svc
    await svc.load()
    from lxd_daemon.api import instance_snapshots
    from lxd_daemon.instances.snapshots import SnapshotService

    snaps = SnapshotService(services)
    await snaps.load()
    services.snapshots = snaps

    async def project_instances(project: str) -> list[str]:
        """What a project holds, for its used_by and emptiness: its instances, and those being
        created (a project isn't deleted from under a create in flight)."""
        pending = sorted(name for p, name in map(split, svc.reserved_keys()) if p == project)
        return [svc.url(k) for k in svc.keys_in(project)] + [f"/1.0/instances/{n}{query(project)}" for n in pending]

    services.projects.providers.append(project_instances)
    if services.storage is not None:
        async def pool_used_by(pool: str) -> list[str]:
            out = []
            for project in services.projects.names():
                if not services.projects.get(project).has("profiles"):
                    continue  # its instances use default's profiles
                for pname, p in prof.in_project(project).items():
                    if any(d.get("type") == "disk" and d.get("pool") == pool for d in p.devices.values()):
                        out.append(f"/1.0/profiles/{pname}{query(project)}")
            for n in list(svc.records):
                if any(d.get("type") == "disk" and d.get("pool") == pool for d in svc.expanded(n)[1].values()):
                    out.append(svc.url(n))
            return out

        services.storage.used_by_providers.append(pool_used_by)
        custom = services.storage.custom
        if custom is not None:  # custom volumes: instances and profiles whose disks attach one
            async def volume_used_by(pool: str, name: str, project: str) -> list[str]:
                return await disks.volume_used_by(svc, prof, pool, name, project)

            custom.used_by_providers.append(volume_used_by)
    if services.images is not None and services.storage is not None:
        # Unpacked, shifted copies (image caches, image volumes) of a deleted image go with it.
        services.images.on_delete.append(services.storage.volumes.drop_image)
    services.startup_hooks.append(svc.adopt_devices)  # before autostart: running containers first

    async def reconcile_proxies() -> None:
        from lxd_daemon.devices.proxy import reconcile_nat

        await reconcile_nat(svc)

    services.startup_hooks.append(reconcile_proxies)
    services.startup_hooks.append(svc.autostart)
    services.startup_hooks.append(snaps.start_scheduler)

    async def probe_criu() -> None:  # stateful features: advertised once CRIU answered (off the start-up path)
        from lxd_daemon.migration import criu, live

        await asyncio.to_thread(live.sweep, services)  # CRIU images a crashed live migration left
        await criu.startup(services)

    services.startup_hooks.append(probe_criu)
    services.shutdown_hooks.append(svc.shutdown_all)
    services.exit_hooks.append(snaps.close)
    services.exit_hooks.append(svc.close)
    services.server.advertise(
        "instances", "container_full", "instance_bulk_state_change", "profile_usedby",
        "container_last_used_at", "container_cpu_time", "id_map", "id_map_base", "instance_get_full",
        "api_filtering")
    services.server.advertise(  # nic devices (devices/nic/)
        "instance_nic_network", "container_nic_ipvlan", "container_nic_ipfilter", "container_nic_routed",
        "container_nic_routed_gateway", "container_nic_routed_host_address", "container_nic_ipvlan_gateway",
        "container_nic_ipvlan_mode", "container_nic_routed_limits")
    services.server.advertise(  # proxy devices (devices/proxy.py)
        "proxy", "proxy_unix", "proxy_udp", "proxy_unix_dac_properties", "proxy_tcp_udp_multi_port_handling",
        "proxy_haproxy_protocol", "proxy_nat")
    services.server.advertise(
        "snapshot_expiry", "snapshot_expiry_creation", "snapshot_scheduling", "snapshot_schedule_aliases",
        "container_only_migration", "container_incremental_copy", "instance_pool_move",
        "container_copy_project",  # `lxc copy --target-project`: source.project (api/instances.py)
        "instance_all_projects")  # `lxc list --all-projects` (api/instances.py)
    services.server.advertise(  # migration between servers (migration/source.py, sink.py): pull, push, relay
        "migration_progress", "container_push", "container_push_target", "container_stateless_copy")
    from lxd_daemon.backups import subsystem as backups_subsystem

    backup_routers = await backups_subsystem.setup(services)
    return [instance_snapshots.router, *backup_routers, instances.router, profiles.router]
