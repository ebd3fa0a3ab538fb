from lxd_daemon.events.hub import EventHub, Listener, LoggingToEvents

__all__ = ["EventHub", "Listener", "LoggingToEvents"]
