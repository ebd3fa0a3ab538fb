"""cloud-init: the instance keys, `volatile.cloud-init.instance-id`, and the NoCloud seed templates.

The guest gets its cloud-init data the way LXD serves it: the image's templates render the NoCloud
seed files (/var/lib/cloud/seed/nocloud-net/{meta-data,user-data,vendor-data,network-config})
from the instance's expanded config, and /dev/lxd serves the same keys. `cloud-init.*` keys win
over the older `user.*` ones.

cloud-init runs its per-instance modules again whenever the instance-id it finds in meta-data
changes; the meta-data carries `volatile.cloud-init.instance-id`, which is (as in LXD 5.0.2):
- set to a fresh UUID when an instance is created (a copy gets its own: volatile keys are not
  copied), unless the request gives one;
- replaced by a fresh UUID when a rename happens, and when an update (the instance's own config,
  or a profile it uses) changes the expanded value of one of ROTATING_KEYS, or changes the set of
  its nics' interface names. `user.meta-data` is not among them (LXD leaves it out too).
"""

from __future__ import annotations

import uuid

import yaml

INSTANCE_ID = "volatile.cloud-init.instance-id"

USER_DATA = "cloud-init.user-data"
VENDOR_DATA = "cloud-init.vendor-data"
NETWORK_CONFIG = "cloud-init.network-config"

# The keys whose change gives the instance a new cloud-init instance-id.
ROTATING_KEYS = (VENDOR_DATA, USER_DATA, NETWORK_CONFIG,
                 "user.vendor-data", "user.user-data", "user.network-config")

SEED_DIR = "/var/lib/cloud/seed/nocloud-net"
SEED_FILES = ("meta-data", "user-data", "vendor-data", "network-config")


# -- validation (config.py's table uses these) ---------------------------------------------------


def check_yaml(value: str) -> None:
    try:
        yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ValueError(f"Invalid YAML: {e}") from None


def check_user_data(value: str) -> None:
    """cloud-init.user-data / vendor-data: a `#cloud-config` document must be valid YAML; other
    user-data formats (scripts, MIME multipart, #include...) are accepted as they are."""
    if value == "#cloud-config" or value.startswith("#cloud-config\n"):
        check_yaml(value.partition("\n")[2])


def check_uuid(value: str) -> None:
    try:
        uuid.UUID(value)
    except ValueError:
        raise ValueError(f"Invalid UUID {value!r}") from None


# -- the instance-id -----------------------------------------------------------------------------


def new_id() -> str:
    return str(uuid.uuid4())


def instance_id(name: str, config: dict[str, str]) -> str:
    """The instance-id the guest sees: the volatile key, or the name (instances made before the
    key existed keep using their name, as in LXD)."""
    return config.get(INSTANCE_ID) or name


def on_create(config: dict[str, str]) -> dict[str, str]:
    """The volatile key a new instance (or copy) gets, unless the request set one."""
    if config.get(INSTANCE_ID):
        return {}
    return {INSTANCE_ID: new_id()}


def _nic_names(devices: dict[str, dict], config: dict[str, str]) -> set[str]:
    out = set()
    for dev_name, dev in devices.items():
        if dev.get("type") != "nic":
            continue
        out.add(dev.get("name") or config.get(f"volatile.{dev_name}.name") or dev_name)
    return out


def needs_new_id(old_config: dict[str, str], new_config: dict[str, str],
                 old_devices: dict[str, dict] | None = None, new_devices: dict[str, dict] | None = None,
                 local_config: dict[str, str] | None = None) -> bool:
    """Whether an update from (old expanded config, devices) to (new ...) rotates the
    instance-id: a changed cloud-init key, or a changed set of nic interface names.
    local_config: the instance's config after the change (its volatile nic names)."""
    for key in ROTATING_KEYS:
        if old_config.get(key, "") != new_config.get(key, ""):
            return True
    if old_devices is None or new_devices is None:
        return False
    local = new_config if local_config is None else local_config
    return _nic_names(old_devices, local) != _nic_names(new_devices, local)


def on_update(old: tuple[dict, dict], new: tuple[dict, dict], local_config: dict[str, str]) -> dict[str, str]:
    """The volatile key to store with an update from expanded (config, devices) `old` to `new`:
    a fresh id when the change needs one, else nothing."""
    if needs_new_id(old[0], new[0], old[1], new[1], local_config):
        return {INSTANCE_ID: new_id()}
    return {}


def on_rename() -> dict[str, str]:
    return {INSTANCE_ID: new_id()}


# -- what the seed files hold (the templates below render the same; /dev/lxd serves these) -------

EMPTY_CLOUD_CONFIG = "#cloud-config\n{}"


def _pick(config: dict[str, str], new_key: str, old_key: str, default: str) -> str:
    return config.get(new_key) or config.get(old_key) or default


def user_data(config: dict[str, str]) -> str:
    return _pick(config, USER_DATA, "user.user-data", EMPTY_CLOUD_CONFIG)


def vendor_data(config: dict[str, str]) -> str:
    return _pick(config, VENDOR_DATA, "user.vendor-data", EMPTY_CLOUD_CONFIG)


def network_config(config: dict[str, str]) -> str:
    return _pick(config, NETWORK_CONFIG, "user.network-config", "")


def meta_data(name: str, config: dict[str, str]) -> str:
    """LXD's /dev/lxd meta-data: instance-id, local-hostname, then user.meta-data."""
    return (f"#cloud-config\ninstance-id: {instance_id(name, config)}\nlocal-hostname: {name}\n"
            f"{config.get('user.meta-data', '')}")


# -- the image templates (lxd-imagebuilder --cloud-init writes them) -----------------------------
# The same shape as the cloud-init templates of LXD's images, except that meta-data's
# instance-id is volatile.cloud-init.instance-id (falling back to the name), so that cloud-init
# runs again when it rotates; they are rendered at create, copy and start.

_USER_DATA_TPL = """{%- if config_get("cloud-init.user-data", properties.default) == properties.default -%}
{{ config_get("user.user-data", properties.default) }}
{%- else -%}
{{- config_get("cloud-init.user-data", properties.default) }}
{%- endif %}
"""

_VENDOR_DATA_TPL = _USER_DATA_TPL.replace("user-data", "vendor-data")

_META_DATA_TPL = """instance-id: {{ config_get("volatile.cloud-init.instance-id", instance.name) }}
local-hostname: {{ instance.name }}
{{ config_get("user.meta-data", "") }}
"""

_NETWORK_DEFAULT = """version: 1
config:
  - type: physical
    name: eth0
    subnets:
      - type: dhcp
        control: auto"""

_NETWORK_CONFIG_TPL = """{%- if config_get("cloud-init.network-config", "") == "" -%}
{%- if config_get("user.network-config", "") == "" -%}
""" + _NETWORK_DEFAULT + """
{%- else -%}
{{- config_get("user.network-config", "") -}}
{%- endif -%}
{%- else -%}
{{- config_get("cloud-init.network-config", "") -}}
{%- endif %}
"""

TEMPLATE_SOURCES = {
    "meta-data": _META_DATA_TPL,
    "user-data": _USER_DATA_TPL,
    "vendor-data": _VENDOR_DATA_TPL,
    "network-config": _NETWORK_CONFIG_TPL,
}

TEMPLATE_WHEN = ["create", "copy", "start"]


def image_templates() -> tuple[dict[str, str], dict[str, dict]]:
    """(template file name -> source, metadata.yaml `templates` entries) of the four seed files."""
    files: dict[str, str] = {}
    entries: dict[str, dict] = {}
    for seed in SEED_FILES:
        tpl = f"cloud-init-{seed.partition('-')[0]}.tpl"  # cloud-init-meta.tpl, as LXD's images name them
        files[tpl] = TEMPLATE_SOURCES[seed]
        entry: dict = {"template": tpl, "when": list(TEMPLATE_WHEN)}
        if seed in ("user-data", "vendor-data"):
            entry["properties"] = {"default": EMPTY_CLOUD_CONFIG}
        entries[f"{SEED_DIR}/{seed}"] = entry
    return files, entries
