"""Storage: pools (service.py, records and one driver per pool), the driver interface and its
backends (drivers/), volumes as values (volume.py), and the orchestration of instance root
volumes written once for every driver (volumes.py: image volumes or image caches with spare
copies, copies, renames, deletes through `.trash-*`, the start-up sweep)."""
