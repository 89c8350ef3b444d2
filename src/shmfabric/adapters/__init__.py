"""Adapters: the fabric as an ordinary network interface for unmodified programs.

A TAP adapter is a fabric node that owns a TAP device (optionally inside a network namespace).
The device's MAC address is the node's fabric MAC, so the kernel's own ARP and IPv6 neighbour
discovery find peers over the fabric's broadcast tape, and unicast frames go straight into the
ring of the node whose id is in the destination MAC. `curl`, `nginx`, `redis-server` or `ping`
on one adapter reach those on another as if over a switch.

Layers: `ethernet` is pure (where a frame goes), `tap` opens and configures the device (Linux
I/O), `bridge` moves frames between a device and a node.
"""
from shmfabric.adapters.ethernet import FLOOD, Verdict, classify, fabric_mac_node, format_mac

__all__ = ["FLOOD", "Verdict", "classify", "fabric_mac_node", "format_mac"]
