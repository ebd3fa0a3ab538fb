"""Instance devices: one class per device type, one module per type.

The interface (devices/base.py `Device`), for a device `name` with config dict `config`:

    validate(profile=, pools=)  pure check of the config (BadRequest naming the device); the
                                option table is the class attribute `options` (option -> check),
                                type-specific rules go in check()
    claimed_path()              the container path it occupies (two devices may not share one)
    hotpluggable                whether a change applies to a running container
    run_config(ctx)             sync, read-only on the host: the RunConfig the container needs,
                                from the config and ctx.prepared (what start() prepared)
    async start(ctx)            prepare the host (mount a volume, a block device...) and return the
                                RunConfig; transient host state is released by its post_start hooks
    async stop(ctx)             RunConfig of what to take back from a running container (mount
                                targets, cgroup rules) + post_stop hooks undoing start()'s host work;
                                after the container stopped only the hooks run
    async remove(ctx)           the device left the instance (unplugged, instance deleted): drop
                                what it keeps on the host between starts (a unix node)
    async adopt(ctx)            the daemon started and found the container running (ctx.init_pid):
                                take back what start() left running (a proxy's forwarder)

`DeviceContext` (base.py) carries the instance name, id map, privileged flag, devices directory,
project, the instance service (for volumes; None in raw-container tests), the runtime client
(probes that fork run in a worker) and `prepared`.

`RunConfig` (runconfig.py) is the declarative description: mounts (MountEntry), nodes (UnixNode),
cgroup_rules (DeviceRule), interfaces (NetInterface, for nics), items (raw liblxc items),
post_start / post_stop hooks. Two appliers consume it:
- the start path: InstanceService.start calls lifecycle.start_devices (each device's start, with
  its undo on a util.revert.Revert), instances/lxcconf.render turns the RunConfigs into liblxc
  config items (and makes the nodes), and lifecycle.post_start runs after liblxc started;
  InstanceService's stop paths call lifecycle.stop_devices; delete, and an update of a stopped
  instance that drops or changes devices, call lifecycle.remove_devices;
- the hotplug path: instances/live.py plug_device / unplug_device apply a RunConfig to a running
  container through the runtime workers (runtime/hotplug.py: hotplug_mount, hotplug_unmount,
  set_cgroup_files); nothing here calls liblxc or forks the daemon: the idmapped-mount probe
  runs in a worker through ctx.runtime (in this process only without a runtime: tests).

For nic/proxy: lxcconf.render already renders RunConfig.interfaces as lxc.net.N.* (and the
`lxc.net.0.type = empty` fallback only when no device gives one); live.apply_run_config refuses
items on a running container.
nic (devices/nic/, one module per nictype): live.apply_run_config moves RunConfig.interfaces into
a running container through a worker (runtime/nics.py), unplug_device takes them out again.
proxy (devices/proxy.py): a supervised forwarder process per device (networks/forwarder.py),
spawned by a post_start hook (ctx.init_pid), adopted after a daemon restart (Device.adopt,
lifecycle.adopt_devices); nat=true: DNAT rules through services.networks.firewall.

Types are registered in registry.DEVICE_TYPES (type name -> class); registry.load(name, config)
makes the object, registry.validate_devices checks a whole devices dict. To add a type: a module
with a Device subclass, an entry in DEVICE_TYPES (and out of NOT_YET), and a case in
tests/unit/test_devices_conformance.py. Devices import nothing from the HTTP layer.
"""

from lxd_daemon.devices.base import Device, DeviceContext, container_path, dev_bool
from lxd_daemon.devices.disk import Disk, DiskSource, disk_required, is_root_disk, root_disk, volume_source
from lxd_daemon.devices.registry import (
           DEVICE_TYPES,
           NOT_YET,
           load,
           load_all,
           validate_device,
           validate_devices,
)
from lxd_daemon.devices.runconfig import DeviceRule, MountEntry, NetInterface, RunConfig, UnixNode, run_hooks
from lxd_daemon.devices.unix import unix_required

__all__ = ["DEVICE_TYPES", "NOT_YET", "Device", "DeviceContext", "DeviceRule", "Disk", "DiskSource", "MountEntry",
           "NetInterface", "RunConfig", "UnixNode", "container_path", "dev_bool", "disk_required", "is_root_disk",
           "load", "load_all", "root_disk", "run_hooks", "unix_required", "validate_device", "validate_devices",
           "volume_source"]
