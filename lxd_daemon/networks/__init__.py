"""Networks: today the host's own interfaces, listed read-only as LXD's unmanaged networks."""
