"""Instance and custom volume backups in LXD's tarball layout, and backup.yaml."""
