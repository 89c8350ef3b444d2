"""Cross-check against an independent decoder: frames built (and rewritten in place) by
shmfabric.net are written to a pcap and decoded by tshark, which must agree on every field and
find every checksum good. Skipped when tshark is not installed."""
import ipaddress
import random
import struct
import subprocess

import pytest

from shmfabric import programs
from shmfabric.net import build as b
from shmfabric.net.packet import decode

pytestmark = pytest.mark.skipif(programs.find("tshark") is None, reason=programs.not_found("tshark"))

FIELDS = ["vlan.id", "ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "tcp.srcport", "tcp.dstport", "udp.srcport",
          "udp.dstport", "tcp.flags", "icmp.ident", "icmpv6.echo.identifier", "ip.checksum.status",
          "tcp.checksum.status", "udp.checksum.status", "icmp.checksum.status", "icmpv6.checksum.status",
          "_ws.expert.message"]


def write_pcap(path, frames):
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))  # LINKTYPE_ETHERNET
        for i, fr in enumerate(frames):
            f.write(struct.pack("<IIII", i, 0, len(fr), len(fr)) + bytes(fr))


def tshark(path):
    cmd = ["tshark", "-r", str(path), "-o", "ip.check_checksum:TRUE", "-o", "tcp.check_checksum:TRUE",
           "-o", "udp.check_checksum:TRUE", "-T", "fields", "-E", "separator=|", "-E", "occurrence=f"]
    for f in FIELDS:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    return [dict(zip(FIELDS, line.split("|"))) for line in out.splitlines()]


def make_frames():
    rng = random.Random(4)
    frames = []
    for i in range(60):
        v6 = i % 2 == 1
        src = str(ipaddress.ip_address(rng.getrandbits(128 if v6 else 32) | (1 << (127 if v6 else 31))))
        dst = str(ipaddress.ip_address(rng.getrandbits(128 if v6 else 32) | (1 << (127 if v6 else 31))))
        # Ports above 40000 keep tshark from handing the payload to an application dissector.
        sp, dp = rng.randint(40000, 65535), rng.randint(40000, 65535)
        payload = rng.randbytes(rng.randint(0, 99))
        vlan = rng.choice([None, rng.randint(1, 4094)])
        kind = i % 3
        if kind == 0:
            frames.append(b.tcp_frame(src, dst, sp, dp, payload, flags=rng.randint(0, 0xFF), seq=rng.getrandbits(32), vlan=vlan))
        elif kind == 1:
            frames.append(b.udp_frame(src, dst, sp, dp, payload, vlan=vlan))
        else:
            frames.append(b.icmp_echo_frame(src, dst, sp, rng.randint(0, 65535), payload, vlan=vlan))
    frames.append(b.ip_frame(b.udp(40001, 40002, b"opts", src="10.0.0.1", dst="10.0.0.2"), src="10.0.0.1",
                             dst="10.0.0.2", proto=17, options=bytes([7, 7, 4, 0, 0, 0, 0])))
    frames.append(b.ip_frame(b.tcp(40001, 40002, b"ext", src="fd00::1", dst="fd00::2"), src="fd00::1", dst="fd00::2",
                             proto=6, ext=[b.ipv6_ext(0, b"\x01\x02\x00\x00"), b.ipv6_ext(60)]))
    # Rewritten in place with incremental checksum updates (what NAT and the load balancer do).
    for fr in list(frames[:30]):
        buf = bytearray(fr)
        p = decode(buf)
        if p.ip.version == 4:
            p.ip.set_src(rng.getrandbits(32) | 1 << 31)
            p.ip.set_dst(rng.getrandbits(32) | 1 << 31)
            p.ip.set_ttl(rng.randint(1, 255))
        else:
            p.ip.set_src((rng.getrandbits(128) | 1 << 127).to_bytes(16, "big"))
            p.ip.set_dst((rng.getrandbits(128) | 1 << 127).to_bytes(16, "big"))
        if hasattr(p.l4, "set_sport"):
            p.l4.set_sport(rng.randint(40000, 65535))
            p.l4.set_dport(rng.randint(40000, 65535))
        frames.append(buf)
    return frames


def test_tshark_agrees(tmp_path):
    frames = make_frames()
    write_pcap(tmp_path / "t.pcap", frames)
    rows = tshark(tmp_path / "t.pcap")
    assert len(rows) == len(frames)
    for fr, row in zip(frames, rows):
        p = decode(fr)
        assert p.reason is None
        assert "Malformed" not in row["_ws.expert.message"] and "incorrect" not in row["_ws.expert.message"].lower(), row
        assert row["vlan.id"] == ("" if p.eth.vlan is None else str(p.eth.vlan))
        fam = "ip" if p.ip.version == 4 else "ipv6"
        assert ipaddress.ip_address(row[f"{fam}.src"]) == ipaddress.ip_address(p.ip.src)
        assert ipaddress.ip_address(row[f"{fam}.dst"]) == ipaddress.ip_address(p.ip.dst)
        if fam == "ip":
            assert row["ip.checksum.status"] == "1", row  # 1 = good
        name = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}[p.ip.proto]
        assert row[f"{name}.checksum.status"] == "1", row
        if name in ("tcp", "udp"):
            assert (int(row[f"{name}.srcport"]), int(row[f"{name}.dstport"])) == (p.l4.sport, p.l4.dport)
        if name == "tcp":
            assert int(row["tcp.flags"], 16) == p.l4.flags
        if name == "icmp":
            assert int(row["icmp.ident"], 0) == p.l4.identifier
        if name == "icmpv6":
            assert int(row["icmpv6.echo.identifier"], 0) == p.l4.identifier



def test_tshark_agrees_on_routing_header_checksums(tmp_path):
    """IPv6 Routing headers (types 0, 2, 3, 4): the L4 checksum is over the final destination
    (RFC 8200 section 8.1). Our checksum_ok and tshark's status agree on frames built with the
    checksum over the final destination, over the Destination Address field (wrong when segments
    left > 0), and after set_dst/set_src rewrites, which must leave the checksum right."""
    from .test_routing import CASES, CUR, frame

    frames, expect = [], []
    for name, (rh, final) in CASES.items():
        if name.startswith(("unknown", "type 4, no segment")):
            continue  # a node discards these (RFC 8200 section 4.4); nothing to agree on
        for kind in ("udp", "tcp", "icmpv6"):
            frames.append(frame(kind, rh, final))
            expect.append(True)
            frames.append(frame(kind, rh, CUR))
            expect.append(final == CUR)
            buf = bytearray(frame(kind, rh, final))
            p = decode(buf)
            p.ip.set_dst(ipaddress.IPv6Address("2001:db8:77::42").packed)
            p.ip.set_src(ipaddress.IPv6Address("2001:db8:77::1").packed)
            frames.append(buf)
            expect.append(True)
    write_pcap(tmp_path / "rt.pcap", frames)
    rows = tshark(tmp_path / "rt.pcap")
    assert len(rows) == len(frames)
    for fr, row, want in zip(frames, rows, expect):
        p = decode(fr)
        name = {6: "tcp", 17: "udp", 58: "icmpv6"}[p.ip.proto]
        assert p.l4.checksum_ok(p.ip) is want, p
        assert row[f"{name}.checksum.status"] == ("1" if want else "0"), (row, p)
