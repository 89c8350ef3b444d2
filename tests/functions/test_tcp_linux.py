"""The firewall's TCP tracking against the running kernel's: the same segments, in the same order,
through a Linux router (network namespaces, nftables `ct state invalid drop`, window tracking
strict: nf_conntrack_tcp_be_liberal=0, loose=1) and through `Firewall`; the verdict of every
segment and the connection's final state (Linux's state name, ASSURED) must agree.

The cases are the ones that matter to a stateful firewall: handshakes, data in and out of window,
blind spoofing (ACK, RST, SYN+RST), RST variants, retransmissions, zero windows, window scaling,
sequence wrap, port reuse, simultaneous open, mid-stream pickup, FIN/RST teardown and reopening.
"""
from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import time

import pytest

from shmfabric import programs
from shmfabric.functions.rules import ConntrackTable, Firewall, RuleSet, Verdict
from shmfabric.functions.tcp_track import STATE_NAMES, BatchSegments, segment
from shmfabric.net import build
from shmfabric.net.flow import classify_batch

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and nftables need root"),
    pytest.mark.skipif(bool(programs.missing("nft", "conntrack")),
                       reason=programs.not_found("nft", "conntrack",
                                                 fix="Debian nftables, conntrack: `make setup` installs them as root")),
]

C, S = "10.77.1.2", "10.77.2.2"
RULES = "policy drop\ntcp dport 80 accept\n"
WS7 = b"\x01\x03\x03\x07"  # NOP, window scale 7
CLONE_NEWNET = 0x40000000


def W(**kw):
    return kw


def HS(ws: bool = True, ci: int = 1000, si: int = 5000, cw: int = 502):
    o = {"options": WS7} if ws else {}
    return [("c", "S", ci, 0, dict(o)), ("s", "SA", si, ci + 1, dict(o, window=65160)),
            ("c", "A", ci + 1, si + 1, W(window=cw if ws else 64240))]


H = HS()        # client next 1001, server next 5001, windows scaled by 2^7
H0 = HS(False)  # no scaling
d = b"x" * 100
SRV = [("s", "PA", 5001 + i * 1000, 1001, W(payload=b"z" * 1000, window=65160)) for i in range(120)]

CASES = {
    "handshake_data_fin_both_ways": H + [("c", "PA", 1001, 5001, W(payload=d, window=502)), ("s", "A", 5001, 1101, W(window=509)),
                                         ("c", "FA", 1101, 5001, W(window=502)), ("s", "FA", 5001, 1102, W(window=509)),
                                         ("c", "A", 1102, 5002, W(window=502))],
    "data_far_ahead": H + [("c", "PA", 1001 + 10_000_000, 5001, W(payload=d, window=502))],
    "data_just_beyond_window": H + [("c", "PA", 1001 + 65160, 5001, W(payload=d, window=502))],
    "data_overshoot_window_by_50": H0 + [("c", "PA", 1001 + 65160 - 50, 5001, W(payload=d, window=64240))],
    "sender_overshoots_window": H0 + [("c", "PA", 1001 + i * 1000, 5001, W(payload=b"y" * 1000, window=64240)) for i in range(71)]
    + [("s", "A", 5001, 72001, W(window=65160)), ("c", "PA", 1001, 5001, W(payload=b"y" * 1000, window=64240))],
    "overly_delayed_ack": H0 + [("s", "PA", 5001 + i * 1000, 1001, W(payload=b"z" * 1000, window=65160)) for i in range(70)]
    + [("c", "A", 1001, 75001, W(window=64240)), ("c", "A", 1001, 5001, W(window=64240))],
    "old_ack_really_old": H0 + SRV[:60] + [("c", "A", 1001, 65001, W(window=64240))] + SRV[60:]
    + [("c", "A", 1001, 125001, W(window=64240)), ("c", "A", 1001, 5001, W(window=64240))],
    "old_retransmit_really_old": H0 + SRV[:60] + [("c", "A", 1001, 65001, W(window=64240))] + SRV[60:]
    + [("c", "A", 1001, 125001, W(window=64240)), ("s", "PA", 5001, 1001, W(payload=b"z" * 1000, window=65160))],
    "blind_ack_after_synack": [("c", "S", 1000, 0), ("s", "SA", 5000, 1001), ("c", "A", 1001, 123456789)],
    "ack_over_upper_bound": H + [("c", "A", 1001, 5001 + 5000, W(window=502))],
    "blind_synrst_on_established": H + [("c", "SR", 3_000_000_000, 0), ("c", "PA", 1001, 5001, W(payload=d, window=502))],
    "blind_synfin_on_established": H + [("c", "SF", 3_000_000_000, 0)],
    "rst_exact": H + [("c", "R", 1001, 0)],
    "rst_exact_from_server": H + [("s", "R", 5001, 0)],
    "rst_in_window_not_exact": H + [("c", "R", 1001 + 1000, 0)],
    "rst_below_maxack": H + [("c", "PA", 1001, 5001, W(payload=d, window=502)), ("s", "A", 5001, 1101, W(window=509)),
                             ("c", "R", 1050, 0)],
    "rst_far_away": H + [("c", "R", 1001 + 50_000_000, 0)],
    "rstack_ack0_exact": H + [("c", "RA", 1001, 0)],
    "rstack_ack0_in_window": H + [("c", "RA", 1500, 0)],
    "rst_answering_syn_rstack": [("c", "S", 1000, 0), ("s", "RA", 0, 1001)],
    "rst_answering_syn_rst": [("c", "S", 1000, 0), ("s", "R", 0, 0)],
    "rst_train_after_data": H + [("s", "PA", 5001, 1001, W(payload=d, window=509)), ("s", "R", 5101, 0)],
    "rst_train_after_data_rstack": H + [("s", "PA", 5001, 1001, W(payload=d, window=509)), ("s", "RA", 5101, 1001)],
    "rst_in_syn_recv_not_exact": [("c", "S", 1000, 0), ("s", "SA", 5000, 1001), ("c", "R", 1500, 0)],
    "rst_after_fin_not_exact": H + [("c", "FA", 1001, 5001, W(window=502)), ("s", "A", 5001, 1002, W(window=509)),
                                    ("s", "R", 5001 + 3000, 0)],
    "data_retransmit": H + [("c", "PA", 1001, 5001, W(payload=d, window=502))] * 4 + [("s", "A", 5001, 1101, W(window=509))],
    "syn_retransmit_new_isn": [("c", "S", 1000, 0), ("c", "S", 90000, 0), ("s", "SA", 5000, 90001), ("c", "A", 90001, 5001)],
    "syn_retransmit_new_isn_old_synack": [("c", "S", 1000, 0), ("c", "S", 90000, 0), ("s", "SA", 5000, 1001),
                                          ("c", "A", 1001, 5001)],
    "synack_retransmit": [("c", "S", 1000, 0), ("s", "SA", 5000, 1001), ("s", "SA", 5000, 1001), ("c", "A", 1001, 5001)],
    "synack_wrong_ack": [("c", "S", 1000, 0), ("s", "SA", 5000, 77777)],
    "zero_window_probe": H0 + [("s", "A", 5001, 1001, W(window=0)), ("c", "PA", 1001, 5001, W(payload=b"p", window=64240)),
                               ("c", "PA", 1001, 5001, W(payload=b"p", window=64240)), ("s", "A", 5001, 1001, W(window=0)),
                               ("c", "PA", 1002, 5001, W(payload=d, window=64240))],
    "zero_window_data_past": H0 + [("s", "A", 5001, 1001, W(window=0)), ("c", "PA", 1002, 5001, W(payload=d * 10, window=64240))],
    "wscale_one_side": [("c", "S", 1000, 0, W(options=WS7)), ("s", "SA", 5000, 1001, W(window=65160)),
                        ("c", "A", 1001, 5001, W(window=502)), ("s", "PA", 5001 + 1000, 1001, W(payload=d, window=65160))],
    "wscale_14_big_window": [("c", "S", 1000, 0, W(options=b"\x01\x03\x03\x0e")),
                             ("s", "SA", 5000, 1001, W(options=b"\x01\x03\x03\x0e", window=65535)),
                             ("c", "A", 1001, 5001, W(window=65535)), ("s", "PA", 5001 + 500_000_000, 1001, W(payload=d))],
    "seq_wrap": [("c", "S", 0xFFFFFF00, 0, W(options=WS7)), ("s", "SA", 0xFFFFFFF0, 0xFFFFFF01, W(options=WS7)),
                 ("c", "A", 0xFFFFFF01, 0xFFFFFFF1, W(window=502)),
                 ("c", "PA", 0xFFFFFF01, 0xFFFFFFF1, W(payload=b"a" * 1000, window=502)),
                 ("s", "PA", 0xFFFFFFF1, 0xFFFFFF01 + 1000, W(payload=b"b" * 1000, window=509)),
                 ("c", "A", 0xFFFFFF01 + 1000, 0xFFFFFFF1 + 1000, W(window=502))],
    "syn_on_established": H + [("c", "S", 777777, 0), ("s", "A", 5001, 1001, W(window=509)),
                               ("c", "PA", 1001, 5001, W(payload=d, window=502))],
    "port_reuse_after_unseen_close": H + [("s", "PA", 5001, 1001, W(payload=d, window=509)), ("c", "S", 2_000_000_000, 0, W(options=WS7)),
                                          ("s", "SA", 3_000_000_000, 2_000_000_001, W(options=WS7)),
                                          ("c", "A", 2_000_000_001, 3_000_000_001, W(window=502)),
                                          ("c", "PA", 2_000_000_001, 3_000_000_001, W(payload=d, window=502))],
    "simultaneous_open": [("c", "S", 1000, 0), ("s", "S", 5000, 0), ("c", "SA", 1000, 5001), ("s", "SA", 5000, 1001),
                          ("c", "A", 1001, 5001)],
    "midstream_ack_first": [("c", "A", 1001, 5001), ("s", "PA", 5001, 1001, W(payload=d)), ("c", "A", 1001, 5101),
                            ("c", "PA", 1001 + 10_000_000, 5101, W(payload=d))],
    "midstream_data_first": [("c", "PA", 1001, 5001, W(payload=d)), ("s", "A", 5001, 1101), ("s", "PA", 5001 + 10_000_000, 1101, W(payload=d))],
    "midstream_fin_first": [("c", "FA", 1001, 5001)],
    "midstream_rst_first": [("c", "R", 1001, 5001)],
    "midstream_synack_first": [("c", "SA", 1001, 5001)],
    "data_after_fin": H + [("c", "FA", 1001, 5001, W(window=502)), ("c", "PA", 1002, 5001, W(payload=d, window=502)),
                           ("s", "A", 5001, 1002, W(window=509))],
    "keepalive": H + [("c", "A", 1000, 5001, W(window=502)), ("c", "A", 1000, 5001, W(window=502, payload=b"\x00")),
                      ("s", "A", 5001, 1001, W(window=509))],
    "fin_without_ack": H + [("c", "F", 1001, 0)],
    "no_flags": H + [("c", "", 1001, 0)],
    "fin_rst_ack": H + [("c", "FRA", 1001, 5001, W(window=502))],
    "ack_from_client_in_syn_sent": [("c", "S", 1000, 0), ("c", "A", 1001, 0)],
    "ack_from_server_in_syn_sent": [("c", "S", 1000, 0), ("s", "A", 5000, 1001)],
    "fin_from_server_in_syn_sent": [("c", "S", 1000, 0), ("s", "FA", 5000, 1001)],
    "urg_ack": H + [("c", "UA", 1001, 5001, W(window=502))],
    "syn_push": [("c", "SP", 1000, 0)],
    "reopen_after_rst": H + [("c", "R", 1001, 0), ("c", "S", 9000, 0), ("s", "SA", 3000, 9001), ("c", "A", 9001, 3001)],
    "reopen_after_fin_time_wait": H + [("c", "FA", 1001, 5001, W(window=502)), ("s", "FA", 5001, 1002, W(window=509)),
                                       ("c", "A", 1002, 5002, W(window=502)), ("c", "S", 90000, 0), ("s", "SA", 3000, 90001),
                                       ("c", "A", 90001, 3001)],
}


libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Router:
    """client ns -- router ns (nftables, conntrack) -- server ns, over veth pairs."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.ns = {k: f"sft{k}{tag}" for k in ("c", "r", "s")}
        self.dev = {k: f"sft{k}{tag}" for k in ("c", "rc", "s", "rs")}
        c, r, s = self.ns["c"], self.ns["r"], self.ns["s"]
        for n in (c, r, s):
            _ip("netns", "add", n)
        try:
            _ip("link", "add", self.dev["c"], "netns", c, "type", "veth", "peer", "name", self.dev["rc"], "netns", r)
            _ip("link", "add", self.dev["s"], "netns", s, "type", "veth", "peer", "name", self.dev["rs"], "netns", r)
            for n, dev, addr in ((c, self.dev["c"], "10.77.1.2/24"), (r, self.dev["rc"], "10.77.1.1/24"),
                                 (r, self.dev["rs"], "10.77.2.1/24"), (s, self.dev["s"], "10.77.2.2/24")):
                _ip("-n", n, "addr", "add", addr, "dev", dev)
                _ip("-n", n, "link", "set", dev, "up")
            _ip("-n", c, "route", "add", "default", "via", "10.77.1.1")
            _ip("-n", s, "route", "add", "default", "via", "10.77.2.1")
            self.run(r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            self.run(r, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_be_liberal=0")
            self.run(r, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=1")
            self.run(r, "nft", "add table inet f; add chain inet f fw1 { type filter hook forward priority 0; policy drop; }; "
                     "add rule inet f fw1 ct state invalid drop; add rule inet f fw1 ct state established,related accept; "
                     "add rule inet f fw1 tcp dport 80 ct state new accept")
            for n in (c, s):  # the end hosts must not answer the crafted segments themselves
                self.run(n, "nft", "add table inet h; add chain inet h inp { type filter hook input priority 0; }; "
                         "add rule inet h inp ip protocol tcp drop")
            self.socks = {}
            home = os.open("/proc/self/ns/net", os.O_RDONLY)
            try:
                for k in ("c", "s"):
                    fd = os.open(f"/var/run/netns/{self.ns[k]}", os.O_RDONLY)
                    assert libc.setns(fd, CLONE_NEWNET) == 0, "setns"
                    os.close(fd)
                    tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
                    rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
                    rx.bind((self.dev[k], 0x0800))
                    rx.setblocking(False)
                    self.socks[k] = (tx, rx)
            finally:
                libc.setns(home, CLONE_NEWNET)
                os.close(home)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def run(ns: str, *cmd: str) -> str:
        return subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True, capture_output=True, text=True).stdout

    def send(self, side: str, frame: bytes) -> bool:
        """Send `frame` from `side`; whether the router forwarded it to the other side."""
        tx, _ = self.socks[side]
        _, rx = self.socks["s" if side == "c" else "c"]
        while True:  # drain
            try:
                rx.recv(65535)
            except BlockingIOError:
                break
        tx.sendto(frame, (S if side == "c" else C, 0))
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            try:
                g = rx.recv(65535)[14:]
            except BlockingIOError:
                time.sleep(0.002)
                if time.monotonic() > deadline - 0.47:  # forwarding is immediate: 30 ms of nothing is a drop
                    return False
                continue
            if g[12:20] == frame[12:20] and g[20:36] == frame[20:36]:
                return True
        return False

    def state(self, sport: int) -> tuple[str, bool] | None:
        out = self.run(self.ns["r"], "conntrack", "-L", "-p", "tcp", "--orig-port-src", str(sport))
        out += self.run(self.ns["r"], "conntrack", "-L", "-p", "tcp", "--reply-port-src", str(sport))
        for line in out.splitlines():
            if line.startswith("tcp") and "dport=" in line:
                return line.split()[3], "ASSURED" in line
        return None

    def close(self) -> None:
        for tx, rx in getattr(self, "socks", {}).values():
            tx.close()
            rx.close()
        for n in self.ns.values():
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


@pytest.fixture(scope="module")
def router():
    r = Router()
    try:
        yield r
    finally:
        r.close()


def _frame(side: str, flags: str, seq: int, ack: int, sport: int, payload: bytes = b"", window: int = 65535,
           options: bytes = b"") -> bytes:
    src, dst, sp, dp = (C, S, sport, 80) if side == "c" else (S, C, 80, sport)
    seg = build.tcp(sp, dp, payload, flags=flags, seq=seq & 0xFFFFFFFF, ack=ack & 0xFFFFFFFF, window=window,
                    options=options, src=src, dst=dst)
    return build.ipv4(seg, src=src, dst=dst, proto=6)


def _ours(fw: Firewall, sport: int) -> tuple[str, bool] | None:
    e = fw.conntrack._by_key.get((0x0A4D0102, 0x0A4D0202, 6, sport, 80))
    return None if e is None else (STATE_NAMES[e.tcp.state], e.assured)


@pytest.mark.parametrize("name", list(CASES))
def test_segments_and_states_match_linux_conntrack(router: Router, name: str) -> None:
    sport = 20000 + list(CASES).index(name)
    router.run(router.ns["r"], "conntrack", "-F")
    batch = Firewall(RuleSet.parse(RULES), ConntrackTable())   # check_many with BatchSegments
    single = Firewall(RuleSet.parse(RULES), ConntrackTable())  # check() with tcp_track.segment
    now = 1.0
    log = []
    for side, flags, seq, ack, *kw in CASES[name]:
        frame = _frame(side, flags, seq, ack, sport, **(kw[0] if kw else {}))
        linux = router.send(side, frame)
        fl: list[int] = []
        keys = classify_batch([frame], None, "ip", flags=fl)
        ours = not batch.check_many(keys, now, fl, [frame], BatchSegments([frame]))
        one = single.check(keys[0], now, fl[0], len(frame), segment(frame)) is Verdict.ACCEPT
        log.append(f"{side} {flags or '-':3} seq={seq & 0xFFFFFFFF} ack={ack & 0xFFFFFFFF}: linux {linux} ours {ours}/{one}")
        assert linux == ours == one, "\n".join(log)
        now += 0.01
    assert _ours(batch, sport) == _ours(single, sport) == router.state(sport), "\n".join(log)
