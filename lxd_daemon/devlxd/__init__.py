"""/dev/lxd: the guest API each container reaches on `/dev/lxd/sock` (docs/design/guest.md)."""
