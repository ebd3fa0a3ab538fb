"""Small helpers that import nothing from the rest of lxd_daemon."""
