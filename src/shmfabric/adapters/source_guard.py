"""Which frames a TAP adapter may put on the fabric when its sources are checked (pure: no I/O).

Without a check, a program in an adapter's namespace with CAP_NET_RAW can send frames from any
MAC and IP address: take over another node's address in its peers' ARP and neighbour caches, or
send traffic that the other nodes' firewalls take for someone else's. `shmfabric adapter
--source-check` drops, before they reach the fabric, the frames that name another sender (what a
switch's port security, or a cloud's anti-spoofing rule on a VM's port, does):

- a source MAC other than the node's fabric MAC (and an ARP sender, or an IPv6 neighbour
  discovery link-layer address option, naming another MAC);
- an IPv4 or IPv6 source address other than the adapter's own (its `--address` hosts, its
  `--global` addresses, the IPv6 link-local address its MAC gives, and the prefixes of
  `--allow-source`, e.g. a network routed behind the namespace). The unspecified address is
  allowed where the protocols need it: ARP probes (RFC 5227), and ICMPv6 from `::` (duplicate
  address detection, MLD);
- an ARP packet or an IPv6 neighbour advertisement claiming an address the adapter does not own
  (a sender address, a target address);
- any other EtherType (VLAN tags, LLDP, ...): nothing the check could vouch for.

Written in Python, called once per frame by the adapter's device thread: a frame costs a few
slices and set lookups (the README's adapter rows give the price). Frames the check passes are
sent exactly as before.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Iterable

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
# where each neighbour discovery message's options start (RFC 4861, 4.1-4.5), past the ICMPv6 type
_ND_OPTIONS = {ND_RS: 8, ND_RA: 16, ND_NS: 24, ND_NA: 24, ND_REDIRECT: 40}
_LLA_OPTIONS = (1, 2)  # source / target link-layer address
V4_ANY = bytes(4)
V6_ANY = bytes(16)

# the counters a dropped frame adds to (the adapter's `drop_*` counters)
SPOOFED_MAC = "drop_spoofed_mac"
SPOOFED_IP = "drop_spoofed_ip"
SPOOFED_CLAIM = "drop_spoofed_claim"
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

    `mac`: the node's fabric MAC; `addresses`: the host addresses the adapter owns (its own,
    its global ones); `prefixes`: further source prefixes allowed (`--allow-source`). The IPv6
    link-local address of `mac` is added. Use `verdict`."""

    def __init__(self, mac: bytes, addresses: Iterable[IPAddress] = (), prefixes: Iterable[IPNetwork] = ()):
        self.mac = bytes(mac)
        owned = [ipaddress.ip_address(a) for a in addresses] + [link_local(self.mac)]
        self._v4 = frozenset(a.packed for a in owned if a.version == 4)
        self._v6 = frozenset(a.packed for a in owned if a.version == 6)
        nets = [ipaddress.ip_network(p) for p in prefixes]
        # (value, mask) pairs as integers: a frame's source is one int.from_bytes and a few ands
        self._nets4 = [(int(n.network_address), int(n.netmask)) for n in nets if n.version == 4]
        self._nets6 = [(int(n.network_address), int(n.netmask)) for n in nets if n.version == 6]

    def allowed(self, address: IPAddress) -> bool:
        """Whether `address` may be a source of this adapter's frames."""
        return self._owns(address.packed)

    def _owns(self, src: bytes) -> bool:
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

    def verdict(self, header: bytes | bytearray, payload: Any, size: int) -> str | None:
        """None if the frame (Ethernet `header`, then `payload[:size]`, any buffer) may go on;
        else the counter its drop adds to (SPOOFED_MAC, SPOOFED_IP, SPOOFED_CLAIM, UNCHECKED,
        MALFORMED)."""
        if header[6:12] != self.mac:
            return SPOOFED_MAC
        et = (header[12] << 8) | header[13]
        with memoryview(payload) as v:
            if et == ETH_P_IP:  # (the common case first, without a view bounded by `size`)
                if size < 20:
                    return MALFORMED
                src = v[12:16].tobytes()
                return None if src in self._v4 or src == V4_ANY or self._owns(src) else SPOOFED_IP
            with v[:size] as frame:
                if et == ETH_P_IPV6:
                    return self._ipv6(frame, size)
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
        if spa == V4_ANY:  # a probe (RFC 5227): claims nothing
            return None
        return None if self._owns(spa) else SPOOFED_CLAIM

    def _ipv6(self, v: memoryview, size: int) -> str | None:
        if size < 40:
            return MALFORMED
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
                if (v[at + 2] << 8 | v[at + 3]) & 0xFFF8:  # not the first fragment: no ICMPv6 header
                    nh = -1               # in it (and Linux drops fragmented neighbour discovery, RFC 6980)
                    break
                nh, at = v[at], at + 8
            else:
                break
        else:
            return MALFORMED
        if src == V6_ANY:
            # duplicate address detection and MLD reports come from :: (RFC 4862, 3810); nothing else may
            return self._icmpv6(v, size, at, from_any=True) if nh == ICMPV6 else SPOOFED_IP
        if not (src in self._v6 or self._owns(src)):
            return SPOOFED_IP
        return self._icmpv6(v, size, at, from_any=False) if nh == ICMPV6 else None

    def _icmpv6(self, v: memoryview, size: int, at: int, from_any: bool) -> str | None:
        """Neighbour discovery's own claims: a link-layer address option must be the node's MAC,
        and an advertisement's target an address the adapter owns (an unsolicited one from any
        source would move its peers' caches); other ICMPv6 passes."""
        if size <= at:
            return MALFORMED
        kind = v[at]
        start = _ND_OPTIONS.get(kind)
        if start is None:
            return None
        if from_any and kind not in (ND_RS, ND_NS):  # advertisements and redirects name their sender
            return SPOOFED_IP
        if size < at + start:
            return MALFORMED
        if kind == ND_NA and not self._owns(v[at + 8:at + 24].tobytes()):
            return SPOOFED_CLAIM
        opt = at + start
        while opt + 2 <= size:
            length = v[opt + 1] * 8
            if length == 0 or opt + length > size:  # a zero length is invalid (RFC 4861, 4.6): the host drops it
                return MALFORMED
            if v[opt] in _LLA_OPTIONS and length >= 8 and v[opt + 2:opt + 8] != self.mac:
                return SPOOFED_MAC
            opt += length
        return None
