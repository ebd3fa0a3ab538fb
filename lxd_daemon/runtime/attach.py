"""Exec, console and file helpers that run inside the liblxc worker (registered with @worker.method)."""
