"""`compress` and `encrypt` tunnels: encap -> decap restores the exact inner packets (pure, no
processes), tampering/replay/wrong keys/malformed outer packets are refused and counted, config
errors are clear; and one chain with real processes:
generator -> encrypt(encap) -> encrypt(decap) -> sink with verification."""
from __future__ import annotations

import os
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmfabric.functions.api import FunctionConfigError, FunctionContext, NetworkFunction, Verdict, validate_config
from shmfabric.functions.builtin import tunnel as tunnel_mod
from shmfabric.functions.builtin.tunnel import Compress, Encrypt
from shmfabric.functions.registry import load
from shmfabric.net import build
from shmfabric.net import checksum as ck

from ._chain import Chain

NEXT, DROP, CONSUMED = Verdict.NEXT, Verdict.DROP, Verdict.CONSUMED
KEY = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
MALFORMED = [b"", b"\x45", b"\x45\x00\x00\x14" + b"\x00" * 8, b"\x60" + b"\x00" * 10, bytes(range(64))]


def udp(src="10.0.0.1", dst="10.0.0.2", sport=1000, dport=53, payload=b"hello") -> bytes:
    return build.ipv4(build.udp(sport, dport, payload, src=src, dst=dst), src=src, dst=dst, proto=17)


def tcp(payload=b"", sport=1000) -> bytes:
    return build.ipv4(build.tcp(sport, 80, payload, flags="PA", src="10.0.0.1", dst="10.0.0.2"),
                      src="10.0.0.1", dst="10.0.0.2", proto=6)


def udp6() -> bytes:
    return build.ipv6(build.udp(1, 2, b"six", src="fd00::1", dst="fd00::2"), src="fd00::1", dst="fd00::2", next_header=17)


INNER = [udp(), tcp(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 20), udp6(), udp(payload=os.urandom(1200)),
         udp(payload=b"A" * 1400)] + MALFORMED  # a tunnel carries any bytes, malformed ones too


RUNNING_MS = 60_000


def running_for(ms: int, make):
    """`make()` with the tunnel module's clocks `ms` behind: a decap built so has been running for
    `ms`. A decap that has just started refuses salts that start before its start + max_clock_skew
    (a previous run of it may have accepted them), so most tests use one that has run a while."""
    now, mono = tunnel_mod._now_ms, tunnel_mod._mono_ms
    tunnel_mod._now_ms, tunnel_mod._mono_ms = (lambda: now() - ms), (lambda: mono() - ms)
    try:
        return make()
    finally:
        tunnel_mod._now_ms, tunnel_mod._mono_ms = now, mono


def pair(cls, fresh=False, **cfg):
    """An encap and a decap; the decap has been running for a minute, or just (re)started if `fresh`."""
    enc = cls(validate_config(cls, {"mode": "encap", **cfg}), FunctionContext(node="enc", mtu=9000))
    make = lambda: cls(validate_config(cls, {"mode": "decap", **cfg}), FunctionContext(node="dec", mtu=9000))  # noqa: E731
    dec = make() if fresh else running_for(RUNNING_MS, make)
    return enc, dec


def through(fn, frames, now=1.0) -> tuple[list[int], list[bytes]]:
    out = bytearray(len(frames))
    fn.process(frames, now, out)
    em = fn.ctx.emitted
    assert all(v == NEXT for v, _ in em)
    res = [bytes(d) for _, d in em]
    em.clear()
    return list(out), res


def roundtrip(enc, dec, frames) -> list[bytes]:
    v1, outer = through(enc, frames)
    assert v1 == [CONSUMED] * len(frames)
    v2, inner = through(dec, outer)
    assert v2 == [CONSUMED] * len(outer)
    return inner


CASES = [(Compress, {"algorithm": "zstd"}), (Compress, {"algorithm": "lz4"}), (Compress, {"algorithm": "lz4", "level": 9}),
         (Compress, {"algorithm": "zstd", "level": -3, "checksum": True}), (Encrypt, {"key": KEY}),
         (Encrypt, {"key": KEY[:32], "key_id": 7, "outer_src": "172.16.0.1", "outer_dst": "172.16.0.2", "port": 4444})]


@pytest.mark.parametrize("cls, cfg", CASES)
def test_encap_then_decap_restores_the_exact_inner_packets(cls, cfg):
    enc, dec = pair(cls, **cfg)
    assert roundtrip(enc, dec, INNER) == INNER
    assert roundtrip(enc, dec, [memoryview(p) for p in INNER]) == INNER  # any buffer as a frame
    ce, cd = enc.counters(), dec.counters()
    assert ce["out_packets"] == cd["in_packets"] == 2 * len(INNER) and cd["out_bytes"] == ce["in_bytes"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=3000), min_size=1, max_size=8))
def test_roundtrip_of_arbitrary_bytes(packets):
    for cls, cfg in CASES[:2] + CASES[4:5]:
        enc, dec = pair(cls, **cfg)
        assert roundtrip(enc, dec, packets) == packets


def test_outer_packet_is_valid_ipv4_udp_with_flow_entropy():
    enc, _ = pair(Encrypt, key=KEY)
    _, outer = through(enc, [udp(sport=1), udp(sport=1), udp(sport=2), udp6()])
    for o in outer:
        assert o[0] == 0x45 and o[9] == 17 and ck.verify(o[:20])
        assert struct.unpack_from("!H", o, 2)[0] == len(o) and struct.unpack_from("!H", o, 24)[0] == len(o) - 20
        assert o[12:16] == bytes([192, 0, 2, 1]) and o[16:20] == bytes([192, 0, 2, 2])
        assert struct.unpack_from("!H", o, 22)[0] == 57400
    sports = [struct.unpack_from("!H", o, 20)[0] for o in outer]
    assert sports[0] == sports[1] != sports[2] and all(49152 <= p < 65536 for p in sports)
    nonces = {o[32:44] for o in outer}
    assert len(nonces) == 4  # never reused


def test_compress_stores_what_does_not_shrink_and_shrinks_what_does():
    enc, dec = pair(Compress)
    _, outer = through(enc, [udp(payload=os.urandom(1000)), udp(payload=b"z" * 1000), udp(payload=b"tiny")])
    assert len(outer[0]) == 28 + 4 + 1028 and len(outer[1]) < 200 and len(outer[2]) == 28 + 4 + 32
    assert enc.counters()["compressed"] == 1 and enc.counters()["stored"] == 2


# --- what decap refuses ----------------------------------------------------------------------------------

def refix_ip_checksum(p: bytearray) -> None:
    p[10:12] = b"\x00\x00"
    p[10:12] = ck.checksum(bytes(p[:20])).to_bytes(2, "big")


def test_encrypt_decap_refuses_tampering_anywhere_but_accepts_a_lower_ttl():
    enc, dec = pair(Encrypt, key=KEY)
    _, (outer,) = through(enc, [udp(payload=b"secret" * 10)])
    assert b"secret" not in outer
    for at in [20, 21, 28, 29, 31, 33, 45, 60, len(outer) - 1]:  # sport, header, nonce, ciphertext, tag
        bad = bytearray(outer)
        bad[at] ^= 0x40
        refix_ip_checksum(bad)
        v, got = through(dec, [bytes(bad)])
        assert v == [DROP] and got == [], f"byte {at}"
    c = dec.counters()
    assert c["auth_failed"] + c["bad_header"] + c["wrong_key_id"] + c["length_mismatch"] == 9
    ttl = bytearray(outer)
    ttl[8] -= 3  # routers decrement TTL: not authenticated, on purpose
    refix_ip_checksum(ttl)
    assert through(dec, [bytes(ttl)]) == ([CONSUMED], [udp(payload=b"secret" * 10)])


def test_encrypt_decap_rejects_replays_but_tolerates_reordering():
    enc, dec = pair(Encrypt, key=KEY, replay_window=64)
    _, outer = through(enc, [udp(payload=bytes([i])) for i in range(100)])
    order = sorted(range(50), key=lambda i: (i // 10, -i)) + list(range(50, 100))  # reversed within tens
    v, _ = through(dec, [outer[i] for i in order])
    assert v == [CONSUMED] * 100
    v, _ = through(dec, [outer[99], outer[50], outer[0]])  # a replay; older than the window; too
    assert v == [DROP] * 3 and dec.counters()["replayed"] == 3
    enc2, _ = pair(Encrypt, key=KEY)  # another sender (new salt) starts its own window
    assert through(dec, through(enc2, [udp()])[1])[0] == [CONSUMED]


def test_encrypt_wrong_key_or_key_id_is_refused():
    enc, _ = pair(Encrypt, key=KEY)
    _, dec_other_key = pair(Encrypt, key="ff" * 32)
    _, dec_other_id = pair(Encrypt, key=KEY, key_id=1)
    _, outer = through(enc, [udp()])
    assert through(dec_other_key, outer)[0] == [DROP] and dec_other_key.counters()["auth_failed"] == 1
    assert through(dec_other_id, outer)[0] == [DROP] and dec_other_id.counters()["wrong_key_id"] == 1


def test_non_tunnel_traffic_passes_compress_decap_and_is_dropped_by_encrypt_decap():
    other = [udp(dport=57400), udp(src="192.0.2.1", dst="192.0.2.2", dport=9)] + MALFORMED
    _, cdec = pair(Compress)
    assert through(cdec, other)[0] == [NEXT] * len(other)
    _, edec = pair(Encrypt, key=KEY)
    assert through(edec, other)[0] == [DROP] * len(other)
    assert edec.counters()["non_tunnel_dropped"] == len(other)
    _, edec = pair(Encrypt, key=KEY, non_tunnel="pass")
    assert through(edec, other)[0] == [NEXT] * len(other)


def test_malformed_tunnel_packets_are_dropped_and_counted():
    enc, dec = pair(Compress)
    _, (outer,) = through(enc, [udp(payload=b"q" * 300)])
    cases = []
    bad = bytearray(outer)
    bad[10] ^= 1  # IPv4 header checksum
    cases.append(("malformed", bad))
    bad = bytearray(outer)
    bad[6] |= 0x20  # more fragments
    refix_ip_checksum(bad)
    cases.append(("fragments", bad))
    cases.append(("malformed", bytearray(outer[:-10])))  # truncated: total length beyond the buffer
    bad = bytearray(outer)
    bad[28] = 0x11  # another version (1)
    cases.append(("bad_header", bad))
    bad = bytearray(outer)
    bad[29] = 9  # unknown algorithm
    cases.append(("bad_header", bad))
    bad = bytearray(outer)
    bad[40:50] = b"\xff" * 10  # compressed body garbled
    cases.append(("corrupt", bad))
    bad = bytearray(outer)
    bad[30:32] = (int.from_bytes(bad[30:32], "big") + 1).to_bytes(2, "big")  # wrong inner length
    cases.append(("length_mismatch", bad))
    for counter, b in cases:
        before = dec.counters()[counter]
        assert through(dec, [bytes(b)])[0] == [DROP], counter
        assert dec.counters()[counter] == before + 1, counter


def test_too_big_for_the_network_is_dropped_never_sent_in_the_clear():
    enc = Encrypt(validate_config(Encrypt, {"mode": "encap", "key": KEY}), FunctionContext(mtu=1500))
    v, outer = through(enc, [udp(payload=bytes(1400)), udp(payload=bytes(1460))])
    assert v == [CONSUMED, DROP] and len(outer) == 1 and len(outer[0]) <= 1500
    assert enc.counters()["too_big"] == 1


def test_compress_then_encrypt_nests():
    c_enc, c_dec = pair(Compress)
    e_enc, e_dec = pair(Encrypt, key=KEY, port=4500)
    inner = [tcp(b"abc" * 300, sport=s) for s in range(5)]
    assert roundtrip(c_enc, c_dec, roundtrip(e_dec, e_enc, [])) == []  # nothing in, nothing out
    outer = roundtrip(e_enc, e_dec, roundtrip(c_enc, c_dec, inner))
    assert outer == inner


# --- configuration --------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg, msg", [
    ({"mode": "encap"}, r"exactly one of key \(hex\) and key_file"),
    ({"mode": "encap", "key": KEY, "key_file": "/x"}, r"exactly one of key"),
    ({"mode": "encap", "key": "zz" * 16}, r"key is not hex"),
    ({"mode": "encap", "key": "ab" * 10}, r"key has 10 bytes; AES-GCM needs 16, 24 or 32"),
    ({"mode": "encap", "key_file": "/nonexistent/key"}, r"key_file '/nonexistent/key' cannot be read"),
    ({"mode": "sideways", "key": KEY}, r"config.mode: Input should be 'encap' or 'decap'"),
    ({"mode": "encap", "key": KEY, "outer_src": "fd00::1"}, r"config.outer_src: .*IPv4"),
    ({"mode": "encap", "key": KEY, "port": 0}, r"config.port: Input should be greater than or equal to 1"),
])
def test_encrypt_config_errors(cfg, msg):
    with pytest.raises(FunctionConfigError, match=msg) as e:
        validate_config(Encrypt, cfg)
    assert "0102030405" not in str(e.value)  # the key never shows up in an error


def test_compress_config_errors():
    with pytest.raises(FunctionConfigError, match=r"config.algorithm: Input should be 'zstd' or 'lz4'"):
        validate_config(Compress, {"mode": "encap", "algorithm": "gzip"})
    with pytest.raises(FunctionConfigError, match=r"config.mode: Field required"):
        validate_config(Compress, {})
    with pytest.raises(FunctionConfigError, match=r"level 20 is not an lz4 level"):
        validate_config(Compress, {"mode": "encap", "algorithm": "lz4", "level": 20})
    with pytest.raises(FunctionConfigError, match=r"checksum is a zstd option"):
        validate_config(Compress, {"mode": "encap", "algorithm": "lz4", "checksum": True})


def test_key_file_hex_or_raw(tmp_path):
    raw = os.urandom(32)
    (tmp_path / "raw.key").write_bytes(raw)
    (tmp_path / "hex.key").write_text(raw.hex() + "\n")
    a = Encrypt(validate_config(Encrypt, {"mode": "encap", "key_file": str(tmp_path / "raw.key")}), FunctionContext())
    b = running_for(RUNNING_MS, lambda: Encrypt(validate_config(Encrypt, {"mode": "decap", "key_file": str(tmp_path / "hex.key")}),
                                                 FunctionContext()))
    assert roundtrip(a, b, [udp()]) == [udp()]


def test_reconfigure_new_key_new_nonce_sequence():
    enc, dec = pair(Encrypt, key=KEY)
    roundtrip(enc, dec, [udp()] * 3)
    salt = enc.salt
    new = {"key": "ab" * 32}
    enc.reconfigure(validate_config(Encrypt, {"mode": "encap", **new}))
    dec.reconfigure(validate_config(Encrypt, {"mode": "decap", **new}))
    assert enc.salt != salt and enc.counter == 0
    assert roundtrip(enc, dec, [udp()]) == [udp()]


def test_registered_and_satisfy_the_protocol():
    assert load("compress") is Compress and load("encrypt") is Encrypt
    e, d = pair(Encrypt, key=KEY)
    assert isinstance(e, NetworkFunction) and isinstance(pair(Compress)[0], NetworkFunction)


# --- with processes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("function, cfg", [("encrypt", {"key": KEY, "max_clock_skew": 0.1}),
                                           ("compress", {"algorithm": "zstd"})])
def test_tunnel_chain_with_processes_delivers_every_frame_intact(tmp_path, function, cfg):
    """generator -> FUNCTION(encap) -> FUNCTION(decap) -> sink(verify): 0 corrupt, 0 missing.
    A decap that has just started refuses salts that start within max_clock_skew of its start,
    so the generator starts more than that after the decap did."""
    n = 3000
    ch = Chain(tmp_path, mtu=1600)
    try:
        ch.start("sink", "sink", {"verify": True})
        ch.start("dec", function, {"mode": "decap", **cfg}, "sink")
        ch.start("enc", function, {"mode": "encap", **cfg}, "dec")
        ch.wait_attached("sink", "dec", "enc")
        time.sleep(0.3)  # > max_clock_skew: the encap's first salt starts after the decap's floor
        ch.start("gen", "generator", {"count": n, "size": 1400, "flows": 64, "tcp_share": 0.5}, "enc")
        ch.wait_exit("gen")
        assert ch.wait_rx("sink", n) >= n, ch.logs()
        enc, dec, sink = ch.stop("enc"), ch.stop("dec"), ch.stop("sink")
        s = sink["function_counters"]
        assert s["frames"] == n and s["unique"] == n and s["corrupt"] == 0 and s["missing"] == 0 and s["duplicates"] == 0, s
        assert enc["counters"]["consumed"] == n and enc["counters"]["emitted"] == n and enc["counters"]["dropped"] == 0
        assert dec["function_counters"]["out_packets"] == n and dec["counters"]["dropped"] == 0
    finally:
        ch.close()


# --- hostile input: bombs, fuzz, replay state --------------------------------------------------------


def outer_packet(payload: bytes, sport=50000, dport=57400) -> bytes:
    """A valid outer IPv4/UDP packet of the default tunnel around `payload` (tunnel header + body)."""
    total = 28 + len(payload)
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, 64, 17, 0,
                                bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])))
    refix_ip_checksum(hdr)
    return bytes(hdr) + struct.pack("!HHHH", sport, dport, total - 20, 0) + payload


def zstd_rle_frame(blocks: int, declared: int | None = None, window_log: int = 16, block=65536) -> bytes:
    """A zstd frame of `blocks` RLE blocks of `block` bytes each: a few bytes that expand to
    blocks * block bytes. `declared`: the content size in the frame header (single segment), or
    none (a window descriptor of 2**window_log bytes)."""
    f = struct.pack("<I", 0xFD2FB528)
    if declared is not None:
        f += bytes([0xE0]) + struct.pack("<Q", declared)  # FCS 8 bytes, single segment
    else:
        f += bytes([0x00, (window_log - 10) << 3])
    for i in range(blocks):
        f += ((block << 3) | (1 << 1) | (i == blocks - 1)).to_bytes(3, "little") + b"A"
    return f


def test_compress_decap_drops_zstd_bombs_with_bounded_output():
    """The zstd frame is not authenticated: whatever it declares, decap decodes at most the inner
    length (header, <= 65535) and drops the rest as corrupt. zstandard's decompress() sized its
    output by the frame's declared content size and ignored max_output_size: one 1.4 kB packet made
    44 MB, and a frame declaring 2**50 bytes raised MemoryError out of process() (ending the node)."""
    _, dec = pair(Compress)
    hdr = struct.pack("!BBH", 0x21, 1, 1400)  # version 2, compress, zstd, inner length 1400
    bombs = [zstd_rle_frame(340, declared=340 * 131072, block=131072),  # declares (and holds) 44 MB
             zstd_rle_frame(3, declared=1 << 50), zstd_rle_frame(3, declared=1 << 34),
             zstd_rle_frame(3, declared=1401),  # one byte more than the header says
             zstd_rle_frame(300),  # no declared size, expands to 19 MB
             zstd_rle_frame(300, window_log=27),  # asks for a 128 MiB window
             zstd_rle_frame(300, window_log=31)]
    for b in bombs:
        assert len(b) < 1500
        v, got = through(dec, [outer_packet(hdr + b)])
        assert v == [DROP] and got == []
    assert dec.counters()["corrupt"] == len(bombs) and dec.counters()["out_packets"] == 0
    assert dec._zd.memory_size() < 1 << 20  # no buffer of what the frames asked for was kept
    # a frame that declares the right size (another zstd writer) still decodes; so do encap's own
    import zstandard
    inner = udp(payload=b"y" * 1372)
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(inner)
    assert through(dec, [outer_packet(struct.pack("!BBH", 0x21, 1, len(inner)) + frame)]) == ([CONSUMED], [inner])
    enc, _ = pair(Compress)
    assert roundtrip(enc, dec, [udp(payload=b"z" * 8000)]) == [udp(payload=b"z" * 8000)]


def test_compress_decap_lz4_output_is_bounded_by_the_inner_length():
    _, dec = pair(Compress, algorithm="lz4")
    import lz4.block
    body = lz4.block.compress(b"A" * 1_000_000, store_size=False)  # 4 kB that expand to 1 MB
    v, got = through(dec, [outer_packet(struct.pack("!BBH", 0x21, 2, 1400) + body)])
    assert v == [DROP] and got == [] and dec.counters()["corrupt"] == 1


ZSTD_HEADS = st.one_of(st.just(b""), st.builds(lambda fhd, rest: struct.pack("<I", 0xFD2FB528) + bytes([fhd]) + rest,
                                               st.integers(0, 255), st.binary(max_size=12)))


@settings(max_examples=300, deadline=None)
@given(which=st.integers(0, 3), pick=st.integers(0, 10), head=ZSTD_HEADS,
       edits=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 2000)), extra=st.binary(max_size=40), fix=st.booleans())
def test_mutated_tunnel_packets_never_raise(which, pick, head, edits, cut, extra, fix):
    """Decap of a mutated valid packet (bytes changed, a zstd frame header put in, truncated,
    extended) returns a verdict for it and never raises out of process()."""
    cls, cfg = [(Compress, {"algorithm": "zstd"}), (Compress, {"algorithm": "zstd", "checksum": True}),
                (Compress, {"algorithm": "lz4"}), (Encrypt, {"key": KEY})][which]
    enc, dec = pair(cls, **cfg)
    _, good = through(enc, INNER)
    p = bytearray(good[pick % len(good)])
    if head and cls is Compress:
        p[29] = 1  # a zstd body that starts with this frame header
        p[32:32 + len(head)] = head
    for at, b in edits:
        p[at % len(p)] = b
    if cut is not None:
        del p[cut % (len(p) + 1):]
    p += extra
    if fix and len(p) >= 20:
        refix_ip_checksum(p)
    out = bytearray(2)
    dec.process([bytes(p), good[0]], 1.0, out)
    assert out[0] in (NEXT, DROP, CONSUMED) and out[1] in (DROP, CONSUMED)
    assert all(len(d) <= 65535 for _, d in dec.ctx.emitted)


class _Clock:
    """The tunnel module's clocks (ms). `clock[0] += ms`: time passes (wall and monotonic clock);
    `clock.step(ms)`: the wall clock alone is set forward or back."""

    def __init__(self) -> None:
        self.wall, self.mono = 1_750_000_000_000, 5_000_000

    def __getitem__(self, i: int) -> int:
        return self.wall

    def __setitem__(self, i: int, v: int) -> None:
        self.mono += v - self.wall
        self.wall = v

    def step(self, ms: int) -> None:
        self.wall += ms


@pytest.fixture
def clock(monkeypatch):
    t = _Clock()
    monkeypatch.setattr(tunnel_mod, "_now_ms", lambda: t.wall, raising=False)
    monkeypatch.setattr(tunnel_mod, "_mono_ms", lambda: t.mono, raising=False)
    return t


def test_encrypt_replay_state_forgets_the_least_recently_used_salt_and_no_replay_gets_through(clock):
    """Replay state is kept for MAX_SENDERS salts. It forgot the first inserted one (FIFO): after 256
    other salts (e.g. replayed packets of old encap instances), a live sender's already delivered
    packets were accepted again. Now the least recently used is forgotten, and a salt without state
    must have started after every forgotten one, so even the forgotten sender's replays are refused."""
    enc, dec = pair(Encrypt, key=KEY)
    _, live = through(enc, [udp(payload=b"live %d" % i) for i in range(600)])
    assert through(dec, live[:5])[0] == [CONSUMED] * 5
    others = []
    for _ in range(Encrypt.MAX_SENDERS):
        clock[0] += 1
        others.append(through(pair(Encrypt, key=KEY)[0], [udp()])[1][0])
    for i, o in enumerate(others):  # the live sender stays active between the others
        assert through(dec, [o, live[5 + i]])[0] == [CONSUMED, CONSUMED]
    assert len(dec.replay) == Encrypt.MAX_SENDERS and enc.salt in dec.replay
    v, _ = through(dec, live[:5 + len(others)])
    assert v == [DROP] * (5 + len(others)) and dec.counters()["replayed"] == 5 + len(others)
    # idle now: 256 newer salts push it out; its old packets are still refused, not a fresh window
    for _ in range(Encrypt.MAX_SENDERS):
        clock[0] += 1
        assert through(dec, through(pair(Encrypt, key=KEY)[0], [udp()])[1])[0] == [CONSUMED]
    assert enc.salt not in dec.replay
    v, _ = through(dec, live[:300])
    assert v == [DROP] * 300 and dec.counters()["stale_sender"] == 300
    assert through(dec, live[300:301])[0] == [DROP]  # not yet sent, but of a forgotten salt
    clock[0] += 10_000  # resalt_after: its next salt is accepted
    assert through(dec, through(enc, [udp()])[1])[0] == [CONSUMED]


def test_encrypt_decap_restart_accepts_no_replay_and_senders_resume_with_their_next_salt(clock):
    """A restarted decap has no replay state: it accepted every packet captured before. Now it
    refuses salts that started before its start + max_clock_skew (`stale_sender`); the encap
    draws a new salt every `resalt_after` seconds and is accepted again from its first salt that
    starts after that (at most max_clock_skew + resalt_after after the restart)."""
    enc, dec = pair(Encrypt, key=KEY, resalt_after=5, max_clock_skew=5)
    _, cap = through(enc, [udp(payload=b"pay %d" % i) for i in range(100)])
    assert through(dec, cap)[0] == [CONSUMED] * 100
    clock[0] += 1
    _, dec2 = pair(Encrypt, fresh=True, key=KEY, resalt_after=5, max_clock_skew=5)  # the decap restarted
    assert through(dec2, cap)[0] == [DROP] * 100 and dec2.counters()["stale_sender"] == 100
    clock[0] += 500  # an encap's first salt lives a random 1-2 s (later ones 50-100 % of resalt_after)
    _, more = through(enc, [udp()] * 3)  # same salt: refused too until the next one
    assert through(dec2, more)[0] == [DROP] * 3
    clock[0] += 3_000
    salt = enc.salt
    _, early = through(enc, [udp(payload=b"early")] * 2)  # a new salt, but started within the skew
    assert enc.salt != salt and enc.counters()["salts"] == 2
    assert through(dec2, early)[0] == [DROP] * 2
    clock[0] += 5_000
    _, fresh = through(enc, [udp(payload=b"fresh")] * 2)
    assert enc.counters()["salts"] == 3
    assert through(dec2, fresh) == ([CONSUMED] * 2, [udp(payload=b"fresh")] * 2)
    assert through(dec2, fresh)[0] == [DROP] * 2  # and replays of the new salt are caught as before


def test_encrypt_nonces_never_repeat_across_salts_even_if_the_clock_goes_back(clock, monkeypatch):
    monkeypatch.setattr(tunnel_mod, "SEQ_MAX", 3)  # a new salt every 3 packets
    monkeypatch.setattr(os, "urandom", lambda n: b"\x00" * n)  # the worst case: every salt the same
    enc, dec = pair(Encrypt, key=KEY, max_clock_skew=10, resalt_after=0.01)
    nonces = []
    for step in (0, 20, -5000, 0, 20):
        if step < 0:
            clock.step(step)  # the wall clock is set back
        else:
            clock[0] += step
        _, outer = through(enc, [udp()] * 7)
        nonces += [o[32:44] for o in outer]
    assert len(set(nonces)) == len(nonces) == 35
    counters = [int.from_bytes(n[4:], "big") for n in nonces]
    assert counters == sorted(counters)
    v, _ = through(dec, [o for o in outer])
    assert v == [CONSUMED] * 7


def test_forged_packets_neither_create_nor_refresh_replay_state(clock):
    enc, dec = pair(Encrypt, key=KEY)
    _, (a, b) = through(enc, [udp(), udp()])
    through(dec, [a])
    other = through(pair(Encrypt, key=KEY)[0], [udp()])[1][0]
    through(dec, [other])
    order = list(dec.replay)
    for p in (b, bytes(other[:32]) + os.urandom(4) + other[36:]):  # known salt, unknown salt; bad tag
        bad = bytearray(p)
        bad[-1] ^= 1
        assert through(dec, [bytes(bad)])[0] == [DROP]
    assert list(dec.replay) == order and dec.counters()["auth_failed"] == 2
    assert through(dec, [b])[0] == [CONSUMED]  # the forgery of b did not mark it seen


def test_encrypt_resalt_time_is_random_so_instances_started_together_do_not_stay_in_step(clock, monkeypatch):
    """Two scaled-out encaps that drew their first salt in the same ms re-salted at exactly
    start + resalt_after under steady traffic, so every salt of one started in the same ms as one
    of the other: each re-salt was a new 2**-32 chance of the same random salt, i.e. a repeated
    nonce under one GCM key. A salt now lives a random 50-100 % of resalt_after."""
    a, b = pair(Encrypt, key=KEY)[0], pair(Encrypt, key=KEY)[0]
    starts: dict[int, list[int]] = {id(a): [], id(b): []}
    for _ in range(10_000):  # 100 s, a batch every 10 ms on each
        for e in (a, b):
            through(e, [udp()])
            if not starts[id(e)] or starts[id(e)][-1] != e.start:
                starts[id(e)].append(e.start)
        clock[0] += 10
    sa, sb = starts[id(a)], starts[id(b)]
    assert sa[0] == sb[0] and sa != sb
    for s in (sa, sb):
        assert 1_000 <= s[1] - s[0] <= 2_010, s  # the first salt lives 1-2 s (FIRST_SALT_MS)
        assert all(5_000 <= y - x <= 10_010 for x, y in zip(s[1:], s[2:])), s
        assert len(s) >= 10  # 100 s, at most 10 s each
    # the bounds exactly: a random draw of all zeros lives half of resalt_after, all ones all of it
    for fill, life in ((0x00, 5_000), (0xFF, 10_000)):
        monkeypatch.setattr(os, "urandom", lambda n, fill=fill: bytes([fill]) * n)
        enc = pair(Encrypt, key=KEY)[0]
        through(enc, [udp()])
        clock[0] += life // 5 - 1  # the first salt: 1-2 s (FIRST_SALT_MS), by the same draw
        through(enc, [udp()])
        assert enc.counters()["salts"] == 1
        clock[0] += 1
        through(enc, [udp()])
        assert enc.counters()["salts"] == 2
        clock[0] += life - 1  # the next ones: 50-100 % of resalt_after
        through(enc, [udp()])
        assert enc.counters()["salts"] == 2
        clock[0] += 1
        through(enc, [udp()])
        assert enc.counters()["salts"] == 3


def test_encrypt_encap_keeps_resalting_when_its_wall_clock_is_set_back(clock):
    """The re-salt timer compared wall-clock ms with the salt's start: a clock set back an hour
    stopped re-salting for an hour. It runs on the monotonic clock now; the starts in the nonces
    stay strictly increasing."""
    enc, _ = pair(Encrypt, key=KEY)
    through(enc, [udp()])
    first = enc.start
    clock.step(-3_600_000)
    clock[0] += 10_000
    through(enc, [udp()])
    assert enc.counters()["salts"] == 2 and enc.start == first + 1
    clock[0] += 10_000
    through(enc, [udp()])
    assert enc.counters()["salts"] == 3 and enc.start == first + 2


def test_encrypt_decap_restarted_with_its_clock_behind_accepts_no_replay(clock):
    """A decap restarted with its clock an hour behind took that time as its floor and accepted
    every packet captured in the last hour again, and still did once its clock was corrected.
    Now a salt that starts beyond the decap's now + skew is refused (`future_sender`), and the
    floor is the decap's start as its clock now sees it (wall now - monotonic time since)."""
    enc, dec = pair(Encrypt, key=KEY)
    _, cap = through(enc, [udp(payload=b"pay %d" % i) for i in range(5)])
    assert through(dec, cap)[0] == [CONSUMED] * 5
    clock[0] += 1
    clock.step(-3_600_000)
    _, dec2 = pair(Encrypt, fresh=True, key=KEY)  # restarted, its clock an hour behind
    clock[0] += 60_000
    assert through(dec2, cap)[0] == [DROP] * 5 and dec2.counters()["future_sender"] == 5
    assert not dec2.replay
    clock.step(3_600_000)  # corrected
    assert through(dec2, cap)[0] == [DROP] * 5 and dec2.counters()["stale_sender"] == 5
    clock[0] += 10_000
    assert through(dec2, through(enc, [udp(payload=b"new")])[1]) == ([CONSUMED], [udp(payload=b"new")])


def test_encrypt_decap_started_with_its_clock_ahead_recovers_once_it_is_corrected(clock):
    """A decap started with its clock a day ahead kept that as its floor: once the clock was
    corrected it refused every new salt for a day. The floor never exceeds now + skew + 1."""
    clock.step(86_400_000)
    _, dec = pair(Encrypt, fresh=True, key=KEY)
    clock.step(-86_400_000)
    enc, _ = pair(Encrypt, key=KEY)
    assert through(dec, through(enc, [udp()])[1])[0] == [DROP]  # a salt drawn within the skew
    assert dec.floor == clock[0] + 1_000 + 1  # skew: 1 s by default
    clock[0] += 11_001  # skew + resalt_after: the encap's next salt
    assert through(dec, through(enc, [udp(payload=b"ok")])[1]) == ([CONSUMED], [udp(payload=b"ok")])


def test_encrypt_decap_keeps_no_state_for_a_salt_from_the_future(clock):
    """An authentic salt stamped a day ahead (an encap whose clock was ahead) was accepted; once
    its window was forgotten, the floor rose past its start and every healthy sender was refused
    for a day. Beyond now + skew it is refused now, with no state; within the skew it is accepted,
    and forgetting it delays the others by at most the skew."""
    _, dec = pair(Encrypt, key=KEY, max_clock_skew=10)
    clock.step(86_400_000)
    fut, _ = pair(Encrypt, key=KEY, max_clock_skew=10)
    _, far = through(fut, [udp()])
    clock.step(-86_400_000 + 3_000)
    near, _ = pair(Encrypt, key=KEY, max_clock_skew=10)  # 3 s ahead: within the skew (10 s)
    _, close = through(near, [udp()])
    clock.step(-3_000)
    floor = dec.floor
    assert through(dec, far)[0] == [DROP] and dec.counters()["future_sender"] == 1
    assert fut.salt not in dec.replay and dec.floor == floor
    assert through(dec, close)[0] == [CONSUMED]
    _, strict = pair(Encrypt, key=KEY, max_clock_skew=1)
    assert through(strict, close)[0] == [DROP] and strict.counters()["future_sender"] == 1
    healthy = [pair(Encrypt, key=KEY, resalt_after=0.01)[0] for _ in range(4)]
    for i in range(Encrypt.MAX_SENDERS):  # push the near-future salt out
        clock[0] += 10
        assert through(dec, through(healthy[i % 4], [udp()])[1])[0] == [CONSUMED]
    assert near.salt not in dec.replay and dec.floor <= clock[0] + 10_000 + 1
    clock[0] += 3_000  # the near-future salt's start is passed: the healthy senders' next salts
    assert [through(dec, through(e, [udp()])[1])[0][0] for e in healthy] == [CONSUMED] * 4


# --- review of the tunnel functions: replay across restarts and reconfigures, outer header, config ---------

def test_encrypt_decap_restart_refuses_replays_of_a_sender_whose_clock_is_ahead(clock):
    """The floor of a decap that (re)started was its start, but a sender whose clock is d ahead
    (d < max_clock_skew: accepted) stamps its salts up to d in the decap's future: after a
    restart within d, such a salt got a fresh window and every packet captured before the
    restart was accepted again (50 of 50). The floor at a start is now + skew + 1 ms, so a sender
    is accepted again from its first salt that starts after that: within skew + resalt_after."""
    def on_enc(frames):  # the encap's clock is 3 s ahead of the decap's (default skew: 10 s)
        clock.step(3_000)
        try:
            return through(enc, frames)
        finally:
            clock.step(-3_000)

    enc, dec = pair(Encrypt, key=KEY, max_clock_skew=10)
    _, cap = on_enc([udp(payload=b"transfer %d" % i) for i in range(50)])  # a salt starts now (+3 s)
    assert through(dec, cap)[0] == [CONSUMED] * 50
    clock[0] += 1_000
    _, dec2 = pair(Encrypt, fresh=True, key=KEY, max_clock_skew=10)  # restarted 1 s later
    restart = clock[0]
    clock[0] += 10
    assert through(dec2, cap)[0] == [DROP] * 50 and dec2.counters()["stale_sender"] == 50
    assert dec2.counters()["out_packets"] == 0
    accepted_at = None
    while accepted_at is None:  # live traffic, a batch every 100 ms
        clock[0] += 100
        v, got = through(dec2, on_enc([udp(payload=b"live")])[1])
        if v == [CONSUMED]:
            accepted_at = clock[0]
            assert got == [udp(payload=b"live")] and enc.start > restart + 10_000
        assert clock[0] - restart <= 10_000 + 10_000 + 100  # skew + resalt_after (+ a batch)
    assert through(dec2, cap)[0] == [DROP] * 50  # still refused, with the sender's window in place


def test_encrypt_replay_window_changed_by_reconfigure_refuses_what_it_refused_before(clock):
    """Raising replay_window (same key) made the old windows' bits cover counters they had shifted
    out of: 30 replayed packets were accepted again; 0 -> N accepted again every packet delivered
    while the check was off. Now what the old window refused stays refused."""
    enc, dec = pair(Encrypt, key=KEY, replay_window=64)
    _, o = through(enc, [udp(payload=b"pay %d" % i) for i in range(100)])
    late = o[70]  # not delivered yet, inside the window
    assert through(dec, o[:70] + o[71:])[0] == [CONSUMED] * 99
    assert through(dec, o[:30])[0] == [DROP] * 30
    dec.reconfigure(validate_config(Encrypt, {"mode": "decap", "key": KEY, "replay_window": 1024}))
    assert through(dec, o[:70] + o[71:])[0] == [DROP] * 99
    assert through(dec, [late]) == ([CONSUMED], [udp(payload=b"pay 70")])  # reordering still tolerated
    _, more = through(enc, [udp(payload=b"more %d" % i) for i in range(3)])
    assert through(dec, more[2:] + more[:2])[0] == [CONSUMED] * 3  # and the wider window works
    dec.reconfigure(validate_config(Encrypt, {"mode": "decap", "key": KEY, "replay_window": 16}))
    assert through(dec, o + more)[0] == [DROP] * 103
    # 0 -> N: nothing was recorded while the check was off
    dec.reconfigure(validate_config(Encrypt, {"mode": "decap", "key": KEY, "replay_window": 0}))
    _, off = through(enc, [udp(payload=b"off %d" % i) for i in range(10)])
    assert through(dec, off)[0] == [CONSUMED] * 10
    dec.reconfigure(validate_config(Encrypt, {"mode": "decap", "key": KEY, "replay_window": 1024}))
    assert through(dec, off + o)[0] == [DROP] * 110 and not dec.replay
    clock[0] += 20_001  # as after a start: the sender's first salt after now + skew is accepted
    assert through(dec, through(enc, [udp(payload=b"on")])[1]) == ([CONSUMED], [udp(payload=b"on")])


def test_encrypt_key_rotation_encap_first_loses_nothing_once_both_have_the_new_key(clock):
    """A new key set the decap's floor to now, so an encap that switched first (its new salt
    started before the decap switched) was refused as stale_sender for up to resalt_after (9 s
    lost). A key change in a running decap sets the floor to now - resalt_after; a (re)start
    keeps the floor at now + skew + 1."""
    enc, dec = pair(Encrypt, key=KEY)
    assert through(dec, through(enc, [udp()])[1])[0] == [CONSUMED]
    clock[0] += 1_000
    new = "ab" * 32
    enc.reconfigure(validate_config(Encrypt, {"mode": "encap", "key": new}))
    _, inflight = through(enc, [udp(payload=b"early")])  # reaches the decap before its new key
    assert through(dec, inflight)[0] == [DROP] and dec.counters()["auth_failed"] == 1
    clock[0] += 200
    dec.reconfigure(validate_config(Encrypt, {"mode": "decap", "key": new}))
    assert through(dec, through(enc, [udp(payload=b"new")])[1]) == ([CONSUMED], [udp(payload=b"new")])
    assert through(dec, inflight)[0] == [CONSUMED]  # refused under the old key, never accepted
    assert through(dec, inflight)[0] == [DROP] and dec.counters()["stale_sender"] == 0
    # an encap that switched up to resalt_after before the decap: its salt is accepted too
    newer = "cd" * 32
    enc.reconfigure(validate_config(Encrypt, {"mode": "encap", "key": newer}))
    through(enc, [udp()])
    clock[0] += 9_000
    dec.reconfigure(validate_config(Encrypt, {"mode": "decap", "key": newer}))
    assert through(dec, through(enc, [udp()])[1])[0] == [CONSUMED]
    # a decap that restarts with the key is no running decap: no grace
    _, dec2 = pair(Encrypt, fresh=True, key=newer)
    assert through(dec2, through(enc, [udp()])[1])[0] == [DROP] and dec2.counters()["stale_sender"] == 1


def with_options(p: bytes) -> bytes:
    """`p` with 4 bytes of IPv4 options (NOP NOP NOP EOL): IHL 6."""
    h = bytearray(p[:20])
    h[0] = 0x46
    h[2:4] = (len(p) + 4).to_bytes(2, "big")
    refix_ip_checksum(h)
    return bytes(h) + b"\x01\x01\x01\x00" + p[20:]


def fragment(p: bytes, data: bytes, offset: int, more: bool) -> bytes:
    """A fragment with `p`'s IPv4 header (no options) and `data` at `offset` bytes."""
    h = bytearray(p[:20])
    h[2:4] = (20 + len(data)).to_bytes(2, "big")
    h[6:8] = ((0x2000 if more else 0) | offset // 8).to_bytes(2, "big")
    refix_ip_checksum(h)
    return bytes(h) + data


@pytest.mark.parametrize("cls, cfg", [(Compress, {}), (Encrypt, {"key": KEY, "non_tunnel": "pass"})])
def test_tunnel_addressed_packets_with_options_fragments_or_cut_short_are_dropped_and_counted(cls, cfg):
    """The ports were read at offset 20 before IHL was looked at, and packets shorter than the
    headers took the non-tunnel path: a tunnel packet with IP options, a non-first fragment and a
    truncated tunnel header were passed on as non_tunnel. Whose a packet is is now decided on
    version, protocol and outer addresses (and the port where it can be read at the real IHL)."""
    enc, dec = pair(cls, **cfg)
    _, (good,) = through(enc, [udp(payload=b"q" * 300)])
    ours = [("malformed", with_options(good)), ("malformed", good[:29]), ("malformed", good[:31]),
            ("malformed", outer_packet(b"\x21\x01")), ("malformed", good[:22]),
            ("fragments", fragment(good, good[28:100], 1480, True)),  # no UDP header: no port to read
            ("fragments", fragment(good, good[28:], 1480, False)),
            ("fragments", fragment(good, good[20:200], 0, True)),
            ("fragments", with_options(fragment(good, good[20:200], 0, True)))]
    for counter, p in ours:
        before = dec.counters()[counter]
        assert through(dec, [p]) == ([DROP], []), (counter, p[:32].hex())
        assert dec.counters()[counter] == before + 1, counter
    assert dec.counters()["non_tunnel_passed"] == 0
    other_port = outer_packet(b"\x00" * 40, dport=9)  # the same hosts, another UDP port
    other_hosts = udp(src="10.0.0.1", dst="192.0.2.2", dport=57400, payload=b"\x21" * 40)
    others = [with_options(other_port), fragment(other_port, other_port[20:40], 0, True),
              with_options(other_hosts), fragment(other_hosts, b"\x00" * 64, 1480, False), other_port[:25],
              b"\x46" + bytes(10), udp6()]
    assert through(dec, others)[0] == [NEXT] * len(others)
    assert dec.counters()["non_tunnel_passed"] == len(others)
    assert through(dec, [good])[0] == [CONSUMED]  # the fast path still takes a plain one


def test_key_file_must_be_a_small_regular_file(tmp_path):
    """key_file was read whole, whatever it was: /dev/zero ended in a MemoryError traceback and a
    FIFO hung the start. Only a regular file of at most 4 KiB is read."""
    big = tmp_path / "big.key"
    big.write_bytes(b"0" * 4097)
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo)
    for path, msg in [("/dev/zero", "is not a regular file"), (str(fifo), "is not a regular file"),
                      (str(tmp_path), "is not a regular file"), (str(big), "is larger than 4 KiB: not a key file")]:
        with pytest.raises(FunctionConfigError, match=f"config: key_file '{path}' {msg}") as e:
            validate_config(Encrypt, {"mode": "encap", "key_file": path})
        assert "\n" not in str(e.value)
    at_most = tmp_path / "padded.key"
    at_most.write_text(KEY + "\n" + " " * (4096 - 65))  # 4096 bytes: still read
    assert validate_config(Encrypt, {"mode": "encap", "key_file": str(at_most)})


def test_a_key_file_others_can_read_is_reported_without_the_key(tmp_path):
    """A group- or other-accessible key file was accepted silently; now a config_warning names the
    file and its mode (as ssh does for a private key), never the key."""
    raw = os.urandom(32)
    files = {"hex": (tmp_path / "hex.key", (KEY + "\n").encode()), "raw": (tmp_path / "raw.key", raw)}
    for name, (path, content) in files.items():
        path.write_bytes(content)
        for mode, warned in [(0o600, False), (0o400, False), (0o640, True), (0o604, True), (0o660, True)]:
            os.chmod(path, mode)
            logged: list = []
            ctx = FunctionContext(log=lambda event, fields: logged.append((event, fields)))
            Encrypt(validate_config(Encrypt, {"mode": "decap", "key_file": str(path)}), ctx)
            if not warned:
                assert logged == [], (name, oct(mode))
                continue
            assert [e for e, _ in logged] == ["config_warning"], (name, oct(mode))
            text = " ".join(str(v) for v in logged[0][1].values())
            assert str(path) in text and f"{mode:04o}" in text and "chmod 600" in text
            assert KEY[:16] not in text and raw.hex()[:16] not in text and raw.decode("latin-1") not in text


@pytest.mark.parametrize("text", ["{mode: encap, key: 0x" + KEY + "}", "{mode: encap, key: " + "1234567890" * 6 + "1234}"])
def test_a_key_yaml_read_as_a_number_asks_for_quotes(text):
    import yaml

    cfg = yaml.safe_load(text)
    assert isinstance(cfg["key"], int)
    with pytest.raises(FunctionConfigError, match=r"config.key: quote the key: YAML read it as a number") as e:
        validate_config(Encrypt, cfg)
    assert "0102030405" not in str(e.value) and "12345678" not in str(e.value) and str(cfg["key"])[:12] not in str(e.value)
    assert validate_config(Encrypt, yaml.safe_load(text.replace("key: ", 'key: "').replace("}", '"}')))


def test_max_packet_above_the_network_mtu_is_limited_to_it():
    """max_packet 9000 on a 1500-byte network was taken as is: every bigger outer packet was
    counted as sent and then lost at the runtime (emit_too_large). It is limited to the MTU (with
    a config warning), and a packet over it is dropped as too_big like any other."""
    logged: list = []
    ctx = FunctionContext(mtu=1500, log=lambda event, fields: logged.append((event, fields)))
    enc = Encrypt(validate_config(Encrypt, {"mode": "encap", "key": KEY, "max_packet": 9000}), ctx)
    v, outer = through(enc, [udp(payload=bytes(3000)), udp(payload=bytes(1400))])
    assert v == [DROP, CONSUMED] and [len(o) for o in outer] == [28 + 1400 + 60]
    c = enc.counters()
    assert c["too_big"] == 1 and c["out_packets"] == 1
    assert [e for e, _ in logged] == ["config_warning"] and "9000" in logged[0][1]["problem"]
    assert "1500" in logged[0][1]["problem"]
    logged.clear()
    small = Compress(validate_config(Compress, {"mode": "encap", "max_packet": 1000}), ctx)  # below the MTU: as given
    v, _ = through(small, [udp(payload=os.urandom(1000))])
    assert v == [DROP] and small.counters()["too_big"] == 1 and logged == []


def test_inner_fragments_of_one_datagram_get_the_same_outer_source_port():
    """The first fragment was hashed on its 5-tuple and the later ones (no ports) got 49152, so a
    scaled-out decap could reorder a datagram's fragments. A fragment hashes (src, dst, proto)."""
    from shmfabric.net.flow import flow_hash

    enc, _ = pair(Encrypt, key=KEY)
    l4 = build.udp(1000, 53, b"x" * 3000, src="10.0.0.1", dst="10.0.0.2")
    v4 = [build.ipv4(l4[a:b], src="10.0.0.1", dst="10.0.0.2", proto=17, ident=7, mf=b < len(l4), frag_offset=a)
          for a, b in ((0, 1480), (1480, 2960), (2960, len(l4)))]
    other = build.ipv4(l4[1480:2960], src="10.0.0.3", dst="10.0.0.2", proto=17, ident=7, mf=True, frag_offset=1480)
    l6 = build.udp(1, 2, b"y" * 3000, src="fd00::1", dst="fd00::2")
    v6 = [build.ipv6(l6[a:b], src="fd00::1", dst="fd00::2", next_header=17,
                     ext=[build.ipv6_fragment(a, b < len(l6), 9)]) for a, b in ((0, 1448), (1448, len(l6)))]
    _, outer = through(enc, v4 + [other] + v6 + [udp(sport=1000), udp6()])
    sp = [struct.unpack_from("!H", o, 20)[0] for o in outer]
    assert sp[0] == sp[1] == sp[2] != sp[3] and sp[4] == sp[5] != sp[0]
    a, b = int.from_bytes(bytes([10, 0, 0, 1]), "big"), int.from_bytes(bytes([10, 0, 0, 2]), "big")
    assert sp[0] == 49152 + flow_hash((a, b, 17, 0, 0)) % 16384
    assert sp[6] == 49152 + flow_hash((a, b, 17, 1000, 53)) % 16384  # unfragmented: the 5-tuple, as before
    assert sp[7] not in (49152, sp[4])


def test_encrypt_decap_going_back_to_the_previous_key_keeps_refusing_its_replays(clock):
    """The manager rolls a failed key push back (A -> B -> A within milliseconds): a new key used
    to start a fresh replay state with the floor at now - resalt_after, so every packet sealed
    under A in the last seconds was accepted once more after the rollback."""
    enc, dec = pair(Encrypt, key=KEY)
    _, cap = through(enc, [udp(payload=b"pay %d" % i) for i in range(5)])
    assert through(dec, cap)[0] == [CONSUMED] * 5
    other = "11" * 32
    dec.reconfigure(dec.cfg.model_copy(update={"key": other}))
    dec.reconfigure(dec.cfg.model_copy(update={"key": KEY}))  # rolled back
    assert through(dec, cap)[0] == [DROP] * 5 and dec.counters()["replayed"] == 5
    _, fresh = through(enc, [udp(payload=b"after")])
    assert through(dec, fresh)[0] == [CONSUMED]


def test_encrypt_a_sender_too_far_ahead_is_logged_not_only_counted(clock):
    """With max_clock_skew 1 s by default, a sender whose clock leads by more is refused for good:
    a counter alone left that unexplained. One log line, at most once a minute."""
    logs: list[tuple[str, dict]] = []
    _, dec = pair(Encrypt, key=KEY)
    dec.ctx.log = lambda kind, fields: logs.append((kind, fields))
    clock.step(5_000)
    enc, _ = pair(Encrypt, key=KEY)
    _, ahead = through(enc, [udp()] * 3)
    clock.step(-5_000)
    assert through(dec, ahead)[0] == [DROP] * 3 and dec.counters()["future_sender"] == 3
    assert [k for k, _ in logs] == ["future_sender"]
    assert logs[0][1]["lead_ms"] >= 4_000 and "max_clock_skew" in logs[0][1]["fix"]
