"""HTTP routers: one module per API resource. Parse, call a service, render the envelope."""

from lxd_daemon.api import fastapi_compat

fastapi_compat.apply()
