"""Open and configure a TAP device (Linux), optionally inside a named network namespace.

The device is opened non-persistent: it disappears when its file descriptor closes, so an
adapter that dies (even by SIGKILL) leaves no interface behind. Links and addresses are set with
pyroute2 (netlink), not by running `ip`.
"""
from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import struct
from dataclasses import dataclass

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000  # frames without the 4-byte packet-information prefix
IFF_VNET_HDR = 0x4000  # each frame behind a virtio_net_hdr (offloads)
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
IFNAMSIZ = 16
NETNS_DIR = "/var/run/netns"


class TapError(Exception):
    """A TAP device or namespace that cannot be set up; the message says what and how to fix it."""


class TapBusyError(TapError):
    """The TAP device is held open by another process: opening it again can work once that one ends."""


@dataclass(frozen=True)
class Tap:
    """An open TAP device: its file descriptor (non-blocking) and interface name."""

    fd: int
    ifname: str

    def close(self) -> None:
        """Close the device (it disappears with its last descriptor)."""
        os.close(self.fd)


def check_ifname(name: str) -> str:
    """`name` if the kernel would take it as an interface name, else TapError."""
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or any(c.isspace() for c in name) \
            or name in (".", ".."):
        raise TapError(f"interface name {name!r} is not valid: 1-15 bytes, no '/' or spaces (e.g. sf0)")
    return name


def parse_address(text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """An address with its prefix, e.g. 10.77.0.1/24 or fd00::1/64."""
    if "/" not in text:
        raise TapError(f"address {text!r} has no prefix length; give one, e.g. {text}/24")
    try:
        return ipaddress.ip_interface(text)
    except ValueError as exc:
        raise TapError(f"address {text!r} is not an IP address with a prefix ({exc})") from None


def parse_global(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A global address (`--global`): one unicast IP address, no prefix."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise TapError(f"global address {text!r} is not an IP address (no prefix: e.g. 10.77.0.100)") from None
    if ip.is_multicast or ip.is_unspecified or ip.is_loopback or ip.is_link_local:
        raise TapError(f"global address {ip} cannot be shared: give a unicast address of the fabric's subnet")
    return ip


def enter_netns(name: str) -> None:
    """Move this process into the named network namespace (`ip netns add NAME` made it)."""
    path = os.path.join(NETNS_DIR, name)
    if "/" in name or name in (".", "..") or not os.path.exists(path):
        raise TapError(f"network namespace {name!r} does not exist ({path}); create it with `ip netns add {name}`")
    from pyroute2 import netns  # only adapters need pyroute2's namespace switch

    try:
        netns.setns(name, flags=0)  # flags=0: never create it
    except OSError as exc:
        raise TapError(f"cannot enter network namespace {name!r}: {exc.strerror} (entering one needs root)") from None


def open_tap(ifname: str, segments: bool = False) -> Tap:
    """Create (or attach to) TAP device `ifname` in the current network namespace.

    The kernel leaves checksums to the device (each frame comes and goes behind a
    virtio_net_hdr); with `segments`, TCP segments up to the device's GSO size come uncut too,
    as one frame. Every adapter works so, so no peer ever gets a frame it cannot take."""
    check_ifname(ifname)
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TapError(f"cannot open /dev/net/tun: {exc.strerror} (TAP devices need root or CAP_NET_ADMIN, "
                       "and the tun module)") from None
    try:
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), flags))
    except OSError as exc:
        os.close(fd)
        why = {errno.EPERM: "needs root or CAP_NET_ADMIN",
               errno.EBUSY: "another process has it open",
               errno.EINVAL: "an interface of another kind has that name"}.get(exc.errno, exc.strerror)
        raise (TapBusyError if exc.errno == errno.EBUSY else TapError)(
            f"cannot create TAP device {ifname!r}: {why}") from None
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | (TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN if segments else 0))
    except OSError as exc:
        os.close(fd)
        raise TapError(f"TAP device {ifname!r} refused checksum offload: {exc.strerror} (a kernel older "
                       "than 2.6.27?)") from None
    return Tap(fd, ifname)


def configure(ifname: str, mac: bytes, mtu: int | None,
              addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
              gso_max_size: int | None = None, network_mtu: int = 65536, checked: bool = False) -> int:
    """Give the device the node's MAC, an MTU (None: the network's, or the device's largest)
    and `addresses`, and bring it up; returns the MTU. `gso_max_size` bounds the segments the
    kernel hands an offloading device (the network's slot size). `checked` (`--source-check`):
    the interface sends only what the check allows (CHECKED_SETTINGS), else TapError."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    from shmfabric.adapters.ethernet import format_mac

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise TapError(f"TAP device {ifname!r} vanished while being configured")
        index = found[0]
        largest = min(network_mtu, ipr.get_links(index)[0].get_attr("IFLA_MAX_MTU") or 65535)
        if mtu is None:
            mtu = largest
        elif not 68 <= mtu <= largest:
            raise TapError(f"MTU {mtu} is not possible here: 68..{largest} (the fabric network's MTU is "
                           f"{network_mtu}; create a network with a larger one for more)")
        try:
            ipr.link("set", index=index, address=format_mac(mac))
            ipr.link("set", index=index, mtu=mtu)
            if gso_max_size is not None:
                ipr.link("set", index=index, gso_max_size=gso_max_size)
        except NetlinkError as exc:
            raise TapError(f"cannot set MAC/MTU {mtu} on {ifname!r}: {exc.args[-1]}") from None
        for a in addresses:
            try:
                ipr.addr("add", index=index, address=str(a.ip), prefixlen=a.network.prefixlen)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise TapError(f"cannot add address {a} to {ifname!r}: {exc.args[-1]}") from None
        # Announce the address when the link comes up (gratuitous ARP, unsolicited neighbour
        # advertisement): an adapter restarted on another node id has another MAC, and its peers'
        # neighbour caches must not keep sending to the old one.
        _sysctl(f"net/ipv4/conf/{ifname}/arp_notify", "1")
        _sysctl(f"net/ipv6/conf/{ifname}/ndisc_notify", "1")
        if checked:
            _checked_settings(ifname)
        ipr.link("set", index=index, state="up")
    return mtu


# What a checked adapter's interface is set to (`--source-check`), so that its own kernel sends
# nothing the check drops: the link-local address the MAC gives (the one the check allows, whatever
# the namespace's default way of making one); no addresses or routes from router advertisements
# (a rogue RA's prefix would give it an address the adapter was not given) and no temporary
# addresses; ARP answered and asked only with the interface's own addresses (a router namespace's
# other addresses are not this adapter's to claim).
CHECKED_SETTINGS = (("ipv6", "addr_gen_mode", "0"), ("ipv6", "accept_ra", "0"), ("ipv6", "autoconf", "0"),
                    ("ipv6", "use_tempaddr", "0"), ("ipv4", "arp_ignore", "1"), ("ipv4", "arp_announce", "2"))


def _checked_settings(ifname: str) -> None:
    for family, key, value in CHECKED_SETTINGS:
        if not os.path.isdir(f"/proc/sys/net/{family}/conf/{ifname}"):
            continue  # IPv6 disabled in this namespace: nothing of it to set
        try:
            with open(f"/proc/sys/net/{family}/conf/{ifname}/{key}") as f:
                if f.read().strip() == value:
                    continue  # (set already: a read-only /proc/sys with these defaults is fine)
        except OSError:
            pass
        try:
            _sysctl(f"net/{family}/conf/{ifname}/{key}", value, required=True)
        except OSError as exc:
            raise TapError(f"cannot set net.{family}.conf.{ifname}.{key}={value} ({exc.strerror}): a checked "
                           "adapter's own kernel would send frames the check drops; run without --source-check, "
                           "or where /proc/sys is writable") from None


def hold_global_address(ifname: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Make this namespace a member of a global address (`shmfabric global`): the address goes on
    `lo` (/32 or /128), where the kernel accepts packets to it from any interface, and `ifname`
    stops answering ARP for addresses it does not carry itself (arp_ignore=1) and asks with its
    own address, never the global one (arp_announce=2): LVS direct-return servers' settings. So
    only the dispatcher answers for the address, and the member's replies go straight to the
    client. (IPv6 neighbour discovery answers only for the receiving interface's addresses
    already.)

    Returns whether this call put the address on `lo` (False: it was there already); give
    `release_global_address` the ones it put there when the member stops. If a setting fails
    after the address was added, the address is taken off again before TapError is raised."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    added = False
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")
        if not lo:
            raise TapError("this namespace has no loopback interface to hold the global address on")
        ipr.link("set", index=lo[0], state="up")
        try:
            if address.version == 4:
                ipr.addr("add", index=lo[0], address=str(address), prefixlen=32)
            else:
                ipr.addr("add", index=lo[0], address=str(address), prefixlen=128, flags=0x02)  # IFA_F_NODAD
            added = True
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise TapError(f"cannot put global address {address} on lo: {exc.args[-1]}") from None
    if address.version == 4:
        for key, value in (("arp_ignore", "1"), ("arp_announce", "2")):
            try:
                _sysctl(f"net/ipv4/conf/{ifname}/{key}", value, required=True)
            except OSError as exc:
                if added:
                    release_global_address(address)
                raise TapError(f"cannot set net.ipv4.conf.{ifname}.{key}={value} ({exc.strerror}): without it "
                               "this member would answer ARP for the global address") from None
    return added


def release_global_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    """Take a global address that `hold_global_address` put on this namespace's `lo` off again,
    so that a later adapter in the namespace that is no member does not take packets to it.
    Call it only for the addresses hold put there (it returned True): one that was there before
    stays. Errors are ignored (the namespace or the address may be gone already). A member
    killed by SIGKILL never gets here: its address stays on `lo` (`ip addr del ADDR dev lo`).
    (The interface's arp_ignore/arp_announce go with the interface, which goes with the process.)"""
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")
            if lo:
                ipr.addr("del", index=lo[0], address=str(address), prefixlen=32 if address.version == 4 else 128)
    except Exception:  # noqa: BLE001  (best effort on the way out: nothing a caller could do about it)
        pass


def _sysctl(key: str, value: str, required: bool = False) -> None:
    # /proc/sys/net shows the network namespace of the process that opens it: ours.
    try:
        with open(f"/proc/sys/{key}", "w") as f:
            f.write(value)
    except OSError:  # IPv6 disabled, or /proc/sys read-only (a container): a nicety, unless `required`
        if required:
            raise
