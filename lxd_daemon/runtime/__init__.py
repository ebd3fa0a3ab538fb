"""liblxc access. The only package that imports `lxc`, and only inside worker processes.

python-lxc holds the GIL through start/attach and liblxc forks, so the daemon never calls it
on its own threads: it talks to long-lived, single-threaded worker processes (worker.py) over
unix socket pairs through the async facade in pool.py.
"""
