"""Remote image sources: simplestreams and lxd-protocol clients, pulls, refreshes."""
