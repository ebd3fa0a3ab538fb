"""lxd-imagebuilder: build LXD images (busybox in seconds, Debian with debootstrap) for `lxc image import`."""

from lxd_daemon.imagebuilder.pack import BuildError, BuildResult

__all__ = ["BuildError", "BuildResult"]
