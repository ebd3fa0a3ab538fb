"""Container methods run inside the liblxc worker (registered with @worker.method)."""
