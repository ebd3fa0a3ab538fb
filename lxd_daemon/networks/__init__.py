"""Networks: managed bridge, macvlan and physical networks (service.py, drivers/), host primitives
(netlink.py, firewall.py, dnsmasq.py), and the host's own interfaces listed read-only (host.py)."""
