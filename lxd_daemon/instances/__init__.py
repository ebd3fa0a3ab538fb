"""Instances: the service, config and device schemas, LXC configuration, id maps."""
