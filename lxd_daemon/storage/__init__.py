"""Storage: pools (service.py, records and one driver per pool), the driver interface and its
backends (drivers/), volumes as values (volume.py), and the orchestration of instance root
volumes written once for every driver (volumes.py: image volumes, unpacks into each volume or
reflinked image caches, copies, renames, deletes through `.trash-*`, the start-up sweep)."""
