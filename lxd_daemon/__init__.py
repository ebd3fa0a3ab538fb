"""An LXD-compatible system-container daemon on liblxc."""

__version__ = "0.1.0"

# The LXD release whose REST API and client behaviour this daemon follows.
# Reported as environment.server_version so stock clients take their 5.0 code paths.
LXD_COMPAT_VERSION = "5.0.2"
