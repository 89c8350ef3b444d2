"""Hypothesis strategies shared by the net tests: field sets for frames, and the frames built from
them with `shmfabric.net.build`."""
import ipaddress

from hypothesis import strategies as st

from shmfabric.net import build as b

v4_addr = st.integers(0, 2**32 - 1).map(lambda i: str(ipaddress.IPv4Address(i)))
v6_addr = st.binary(min_size=16, max_size=16).map(lambda p: str(ipaddress.IPv6Address(p)))
port = st.integers(0, 65535)
payload = st.binary(max_size=64)
vlan = st.none() | st.integers(0, 4095)


@st.composite
def flows(draw):
    """Fields of one TCP/UDP/ICMP-echo frame, IPv4 or IPv6, maybe VLAN-tagged."""
    v6 = draw(st.booleans())
    addr = v6_addr if v6 else v4_addr
    return {
        "v6": v6,
        "kind": draw(st.sampled_from(["tcp", "udp", "icmp"])),
        "src": draw(addr),
        "dst": draw(addr),
        "sport": draw(port),
        "dport": draw(port),
        "payload": draw(payload),
        "vlan": draw(vlan),
        "flags": draw(st.integers(0, 0x1FF)),
        "seq": draw(st.integers(0, 2**32 - 1)),
    }


def build_flow(f) -> bytes:
    if f["kind"] == "tcp":
        return b.tcp_frame(f["src"], f["dst"], f["sport"], f["dport"], f["payload"], flags=f["flags"],
                           seq=f["seq"], vlan=f["vlan"])
    if f["kind"] == "udp":
        return b.udp_frame(f["src"], f["dst"], f["sport"], f["dport"], f["payload"], vlan=f["vlan"])
    return b.icmp_echo_frame(f["src"], f["dst"], f["sport"], f["dport"], f["payload"], vlan=f["vlan"])
