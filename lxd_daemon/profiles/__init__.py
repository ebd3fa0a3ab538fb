"""Profiles: named sets of config and devices that instances apply in order."""
