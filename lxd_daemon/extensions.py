"""The API extensions of the core daemon.

A client switches code paths on these names, so a name is advertised only when its whole
behaviour works (see shared/reference/CLIENT-PROTOCOL.md). Subsystems add theirs through
ServerService.advertise() when daemon.py wires them in.
"""

from __future__ import annotations

# ETags and If-Match, PATCH, operation descriptions, lifecycle events with requestor, the
# default project, and the server environment fields.
CORE = (
    "etag",
    "patch",
    "operation_description",
    "event_lifecycle",
    "event_location",
    "event_lifecycle_requestor_address",
    "projects",
    "project_usage",  # GET /1.0/projects/{name}/state (`lxc project info`); limits: projects/policy.py
    "kernel_features",
    "lxc_features",
    "api_os",
    "server_supported_storage_drivers",
)
