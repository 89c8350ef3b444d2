"""Which frames a TAP adapter may put on the fabric when its sources are checked (pure: no I/O).

Without a check, a program in an adapter's namespace with CAP_NET_RAW can send frames from any
MAC and IP address: take over another node's address in its peers' ARP and neighbour caches, or
send traffic that the other nodes' firewalls take for someone else's. `shmfabric adapter
--source-check` drops, before they reach the fabric, the frames that name another sender (what a
switch's port security, or a cloud's anti-spoofing rule on a VM's port, does):

- a source MAC other than the node's fabric MAC (and an ARP sender, or an IPv6 neighbour
  discovery link-layer address option, naming another MAC);
- an IPv4 or IPv6 source address other than the adapter's (its `--address` hosts, its
  `--global` addresses, the IPv6 link-local address its MAC gives, and the prefixes of
  `--allow-source`, e.g. a network routed behind the namespace). The unspecified address is
  allowed where the protocols need it: IPv4 `0.0.0.0` (DHCP), ARP probes (RFC 5227), and from
  `::` router and neighbour solicitations and MLD reports (duplicate address detection);
- a claim on an address the adapter does not own: an ARP sender address, an IPv6 neighbour
  advertisement's target, a neighbour or router solicitation's source with its link-layer
  address, and the target of an ARP probe or a duplicate address detection solicitation (which
  would make its owner give the address up). Only the `--address` hosts and
  the link-local address are owned: a `--global` address is the dispatcher's to answer for, and
  `--allow-source` prefixes are sources only;
- router advertisements and redirects (RA guard, RFC 6105): they would give the peers a route
  through this node or move a neighbour entry;
- DHCP and DHCPv6 server messages, i.e. UDP to a client's port (68, 546), unless the adapter runs
  a DHCP server (`--dhcp-server`): a rogue server's offer gives its clients a gateway and a name
  server of its choosing (DHCP snooping's untrusted port). Clients take these on their port
  whatever the source port (dhclient's and systemd-networkd's filters look at the destination);
- an offload request (the TAP's virtio-net header) other than a TCP or UDP checksum at the
  packet's own L4 header, or a segmentation of another protocol: a checksum "completed" anywhere
  else would rewrite the frame after this check;
- any other EtherType (VLAN tags, LLDP, ...): nothing the check could vouch for.

Written in Python, called once per frame by the adapter's device thread: a frame costs a few
slices and set lookups (the README's adapter rows give the price). Frames the check passes are
sent exactly as before.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Iterable

from shmfabric.adapters.ethernet import F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, GSO_UDP, GSO_UDP_L4, META_VNET

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD
ICMPV6 = 58
# IPv6 extension headers walked to find an ICMPv6 message behind them (hop-by-hop, routing,
# destination options; a fragment header is handled apart): Linux takes neighbour discovery
# behind them, so a check that stopped at the first header could be bypassed
_EXT_HEADERS = frozenset((0, 43, 60))
_FRAGMENT = 44
_MAX_EXT = 8  # extension headers walked at most (a longer chain is dropped: no host sends one)
ND_RS, ND_RA, ND_NS, ND_NA, ND_REDIRECT = 133, 134, 135, 136, 137
MLD_REPORT, MLD2_REPORT = 131, 143
# where each neighbour discovery message's options start (RFC 4861, 4.1-4.5), past the ICMPv6 type
_ND_OPTIONS = {ND_RS: 8, ND_NS: 24, ND_NA: 24}
_FROM_ANY = frozenset((ND_RS, ND_NS, MLD_REPORT, MLD2_REPORT))  # what may come from ::
_LLA_OPTIONS = (1, 2)  # source / target link-layer address
V4_ANY = bytes(4)
V6_ANY = bytes(16)
UDP = 17
DHCP_CLIENT_PORT = b"\x00\x44"  # 68
DHCP6_CLIENT_PORT = b"\x02\x22"  # 546

# the offload bits of a frame's `meta` (`ethernet.vnet_to_meta`)
_NEEDS_CSUM = F_NEEDS_CSUM << 29

# the counters a dropped frame adds to (the adapter's `drop_*` counters)
SPOOFED_MAC = "drop_spoofed_mac"
SPOOFED_IP = "drop_spoofed_ip"
SPOOFED_CLAIM = "drop_spoofed_claim"
ROUTER = "drop_router_message"
DHCP_SERVER = "drop_dhcp_server"
BAD_OFFLOAD = "drop_bad_offload"
UNCHECKED = "drop_unchecked_ethertype"
MALFORMED = "drop_malformed"


def link_local(mac: bytes) -> ipaddress.IPv6Address:
    """The IPv6 link-local address the kernel gives an interface with MAC `mac` (modified EUI-64,
    RFC 4291 appendix A; the interface's `addr_gen_mode` 0)."""
    eui = bytes((mac[0] ^ 2,)) + mac[1:3] + b"\xff\xfe" + mac[3:6]
    return ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + eui)


def allowed_prefix(text: str) -> IPNetwork:
    """A source prefix to allow (`--allow-source`, `allow_source:`): `10.9.0.0/16`, `fd00:9::/64`,
    or one address (`10.9.0.1`: that host); ValueError saying what is wrong otherwise."""
    try:
        return ipaddress.ip_network(text.strip())
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 or IPv6 prefix (e.g. 10.9.0.0/16, fd00:9::/64, or one "
                         "address)") from None
    raise ValueError(f"{text!r} has bits set past its prefix length: give the network, {loose}")


class SourceGuard:
    """Decides, frame by frame, whether a frame from the device names this adapter as its sender.

    `mac`: the node's fabric MAC; `addresses`: the host addresses the adapter owns (`--address`;
    it may send from them and claim them); `shared`: addresses it may send from but never claim
    (`--global`); `prefixes`: further source prefixes (`--allow-source`); `dhcp_server`: the
    adapter's namespace runs a DHCP or DHCPv6 server, whose replies pass (`--dhcp-server`). The
    IPv6 link-local address of `mac` is owned too. Use `verdict`."""

    def __init__(self, mac: bytes, addresses: Iterable[IPAddress] = (), prefixes: Iterable[IPNetwork] = (),
                 shared: Iterable[IPAddress] = (), dhcp_server: bool = False):
        self.mac = bytes(mac)
        self.dhcp_server = dhcp_server
        owned = [ipaddress.ip_address(a) for a in addresses] + [link_local(self.mac)]
        sources = owned + [ipaddress.ip_address(a) for a in shared]
        self._v4 = frozenset(a.packed for a in sources if a.version == 4)
        self._v6 = frozenset(a.packed for a in sources if a.version == 6)
        self._claims = frozenset(a.packed for a in owned)
        nets = [ipaddress.ip_network(p) for p in prefixes]
        # (value, mask) pairs as integers: a frame's source is one int.from_bytes and a few ands
        self._nets4 = [(int(n.network_address), int(n.netmask)) for n in nets if n.version == 4]
        self._nets6 = [(int(n.network_address), int(n.netmask)) for n in nets if n.version == 6]

    def allowed(self, address: IPAddress) -> bool:
        """Whether `address` may be a source of this adapter's frames."""
        return self._source(address.packed)

    def owns(self, address: IPAddress) -> bool:
        """Whether the adapter may claim `address` (in ARP, neighbour advertisements, probes)."""
        return address.packed in self._claims

    def _source(self, src: bytes) -> bool:
        if len(src) == 4:
            if src in self._v4:
                return True
            nets = self._nets4
        else:
            if src in self._v6:
                return True
            nets = self._nets6
        if not nets:
            return False
        value = int.from_bytes(src, "big")
        return any(value & mask == net for net, mask in nets)

    def verdict(self, header: bytes | bytearray, payload: Any, size: int, meta: int = 0) -> str | None:
        """None if the frame (Ethernet `header`, then `payload[:size]`, any buffer; `meta`: its
        offload request, as `ethernet.vnet_to_meta` gives it) may go on; else the counter its
        drop adds to (SPOOFED_MAC, SPOOFED_IP, SPOOFED_CLAIM, ROUTER, DHCP_SERVER, BAD_OFFLOAD,
        UNCHECKED, MALFORMED)."""
        if header[6:12] != self.mac:
            return SPOOFED_MAC
        et = (header[12] << 8) | header[13]
        with memoryview(payload) as v:
            if et == ETH_P_IP:  # (the common case first, without a view bounded by `size`)
                if size < 20 or v[0] >> 4 != 4 or v[0] & 0xF < 5:  # (Linux drops these too)
                    return MALFORMED
                src = v[12:16].tobytes()
                if not (src in self._v4 or src == V4_ANY or self._source(src)):
                    return SPOOFED_IP
                l4 = (v[0] & 0xF) * 4
                if meta & META_VNET and not _offload_ok(meta, l4, v[9], 4, size):
                    return BAD_OFFLOAD
                # (a fragment past the first has no UDP header; a first one too short to show the
                # destination port is a "tiny fragment", RFC 1858, which no host sends: it would
                # hide an offer's port from the check)
                if v[9] == UDP and not self.dhcp_server and not (v[6] & 0x1F or v[7]):
                    # (the kernel reads the packet to its total length: bytes past it are not the port)
                    if min(size, v[2] << 8 | v[3]) < l4 + 4:
                        return MALFORMED
                    if v[l4 + 2:l4 + 4] == DHCP_CLIENT_PORT:
                        return DHCP_SERVER
                return None
            with v[:size] as frame:
                if et == ETH_P_IPV6:
                    return self._ipv6(frame, size, meta)
                if meta & META_VNET:  # (a checksum or segmentation asked for a frame that is not IP)
                    return BAD_OFFLOAD
                if et == ETH_P_ARP:
                    return self._arp(frame, size)
        return UNCHECKED

    def _arp(self, v: memoryview, size: int) -> str | None:
        # htype 1 (Ethernet), ptype IPv4, hlen 6, plen 4: the only ARP the fabric's hosts speak
        if size < 28 or v[0:6].tobytes() != b"\x00\x01\x08\x00\x06\x04":
            return MALFORMED
        if v[8:14] != self.mac:
            return SPOOFED_MAC
        spa = v[14:18].tobytes()
        if spa == V4_ANY:  # a probe (RFC 5227): for an address of its own only (it makes its owner give it up)
            return None if v[24:28].tobytes() in self._claims else SPOOFED_CLAIM
        return None if spa in self._claims else SPOOFED_CLAIM

    def _ipv6(self, v: memoryview, size: int, meta: int) -> str | None:
        if size < 40:
            return MALFORMED
        # The kernel cuts the packet to its payload length before it reads a header: bytes past it
        # (sent with the frame) must not count, or a header chain could end in them here while the
        # kernel finds it cut short and reassembles it with a later fragment (a way around the
        # DHCP and neighbour discovery checks). A length past the frame: truncated, dropped.
        end = 40 + (v[4] << 8 | v[5])
        if end > size:
            return MALFORMED
        size = end
        src = v[8:24].tobytes()
        nh, at = v[6], 40
        for _ in range(_MAX_EXT):
            if nh in _EXT_HEADERS:
                if size < at + 8:
                    return MALFORMED
                nh, at = v[at], at + (v[at + 1] + 1) * 8
            elif nh == _FRAGMENT:
                if size < at + 8:
                    return MALFORMED
                if (v[at + 2] << 8 | v[at + 3]) & 0xFFF8:  # not the first fragment: no L4 header in it
                    nh = -1
                    break
                nh, at = v[at], at + 8
            else:
                break
        else:
            return MALFORMED
        if src == V6_ANY:
            # duplicate address detection, router solicitations and MLD reports come from :: (RFC
            # 4862, 4861, 3810); nothing else may
            why = self._icmpv6(v, size, at, from_any=True) if nh == ICMPV6 else SPOOFED_IP
        elif not (src in self._v6 or self._source(src)):
            return SPOOFED_IP
        elif nh == ICMPV6:
            why = self._icmpv6(v, size, at, from_any=False, owned=src in self._claims)
        else:
            why = None
        if why is None and meta & META_VNET and not _offload_ok(meta, at, nh, 6, size):
            return BAD_OFFLOAD
        if why is None and nh == UDP and not self.dhcp_server:
            if size < at + 4:  # a header chain cut before the port (RFC 7112: no host sends one)
                return MALFORMED
            if v[at + 2:at + 4] == DHCP6_CLIENT_PORT:
                return DHCP_SERVER
        return why

    def _icmpv6(self, v: memoryview, size: int, at: int, from_any: bool, owned: bool = True) -> str | None:
        """Neighbour discovery's own claims: a link-layer address option must be the node's MAC,
        an advertisement's target (and a duplicate address detection solicitation's) an address
        the adapter owns; router advertisements and redirects are not a host's to send; other
        ICMPv6 passes."""
        if size <= at:
            return MALFORMED
        kind = v[at]
        if from_any and kind not in _FROM_ANY:
            return SPOOFED_IP
        if kind == ND_RA or kind == ND_REDIRECT:
            return ROUTER
        start = _ND_OPTIONS.get(kind)
        if start is None:
            return None
        if size < at + start:
            return MALFORMED
        if (kind == ND_NA or (kind == ND_NS and from_any)) and v[at + 8:at + 24].tobytes() not in self._claims:
            return SPOOFED_CLAIM
        opt = at + start
        while opt + 2 <= size:
            length = v[opt + 1] * 8
            if length == 0 or opt + length > size:  # a zero length is invalid (RFC 4861, 4.6): the host drops it
                return MALFORMED
            if v[opt] in _LLA_OPTIONS and length >= 8 and v[opt + 2:opt + 8] != self.mac:
                return SPOOFED_MAC
            if v[opt] == 1 and not owned:
                # a solicitation's source with a source link-layer option: the receiver's entry for
                # that source moves to this MAC, a claim (a --global address, an allowed prefix:
                # sources, not the adapter's to claim; its kernel sends these from its own address)
                return SPOOFED_CLAIM
            opt += length
        return None


def _offload_ok(meta: int, l4: int, proto: int, version: int, size: int) -> bool:
    """Whether an offload request (`meta`) fits the IP packet whose L4 header starts `l4` bytes in
    and carries `proto`: a checksum only in a TCP or UDP header's own checksum field, a
    segmentation only of the protocol it names. A device writes where the request says: anywhere
    else (an address, an ARP field) it would change the frame after the check."""
    if meta & _NEEDS_CSUM:
        start, offset = (meta >> 16) & 0xFF, (6 if meta >> 24 & 1 else 16)
        if start != l4 or l4 + offset + 2 > size:  # (the field inside the frame: a device writes there)
            return False
        if not ((proto == 6 and offset == 16) or (proto == 17 and offset == 6)):
            return False
    gso = (meta >> 25) & 7
    if gso:
        if gso == GSO_TCPV4:
            return version == 4 and proto == 6
        if gso == GSO_TCPV6:
            return version == 6 and proto == 6
        return (gso == GSO_UDP or gso == GSO_UDP_L4) and proto == 17
    return True
