"""The IDS pattern engines (hyperscan, pyahocorasick) give identical alerts: property tests on random
rules and batches (nocase, offset/depth, negation, hex bytes, patterns across payload boundaries),
both checked against a brute-force reference; engine selection and its errors."""
import pickle

import pytest
from hypothesis import given, settings, strategies as st

from shmfabric.functions import snort
from shmfabric.functions.api import FunctionConfigError, validate_config
from shmfabric.functions.registry import load as load_function
from shmfabric.functions.snort import SignatureSet, default_engine, load, parse_rule

needs_hs = pytest.mark.skipif(snort.hyperscan is None, reason="hyperscan not installed")
KEY = (1, 2, 6, 3, 4)

# A small alphabet so that patterns occur often: letters in both cases, NUL, and latin-1 bytes
# whose case Snort's nocase does not fold (0xC0/0xE0), so ASCII-only folding is checked too.
ALPHABET = b"aAbB\x00\xc0\xe0"
pattern = st.binary(min_size=1, max_size=4).map(lambda b: bytes(ALPHABET[x % len(ALPHABET)] for x in b))
text = st.binary(max_size=120).map(lambda b: bytes(ALPHABET[x % len(ALPHABET)] for x in b))
content = st.tuples(pattern, st.booleans(), st.integers(0, 6), st.none() | st.integers(0, 8), st.booleans())


def rule_text(sid: int, contents) -> str:
    opts = []
    for pat, nocase, offset, depth, neg in contents:
        opts.append(f'content:{"!" if neg else ""}"|{pat.hex(" ")}|"; ' + ("nocase; " if nocase else "")
                    + f"offset:{offset}; " + (f"depth:{len(pat) + depth}; " if depth is not None else ""))
    return f"alert ip any any -> any any ({''.join(opts)}sid:{sid};)"


def ref_fires(rule, payload: bytes) -> bool:
    for c in rule.contents:
        hay = payload.lower() if c.nocase else payload
        needle = c.pattern.lower() if c.nocase else c.pattern
        stop = len(hay) if c.depth is None else c.offset + c.depth
        if (hay.find(needle, c.offset, stop) >= 0) == c.negated:
            return False
    return True


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """data cut at the given points: a pattern in data often straddles two payloads."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]


@needs_hs
@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(content, min_size=1, max_size=3), min_size=1, max_size=6), text,
       st.lists(st.integers(0, 200), max_size=12))
def test_engines_agree_on_batches(rules, data, cuts):
    texts = "\n".join(rule_text(i + 1, cs) for i, cs in enumerate(rules))
    hs, ac = load([("r", texts)], engine="hyperscan"), load([("r", texts)], engine="pyahocorasick")
    assert (hs.engine, ac.engine) == ("hyperscan", "pyahocorasick")
    payloads = split(data, cuts)
    keys = [KEY] * len(payloads)
    got_hs = [(p, [r.sid for r in fired]) for p, fired in hs.match_batch(payloads, keys)]
    got_ac = [(p, [r.sid for r in fired]) for p, fired in ac.match_batch(payloads, keys)]
    expect = [(p, sids) for p, pl in enumerate(payloads)
              if (sids := [r.sid for r in hs.rules if ref_fires(r, pl)])]
    assert got_hs == got_ac == expect
    for p, pl in enumerate(payloads):  # the per-packet path too
        assert [r.sid for r in hs.match(pl, KEY)] == [r.sid for r in ac.match(pl, KEY)] == dict(expect).get(p, [])


@needs_hs
def test_hit_spanning_two_payloads_does_not_hide_a_later_one():
    # "abab" spans payloads 0/1 at offset 2 and then lies wholly in payload 1: the spanning hit is
    # discarded, the real one reported (every match is reported, not the first per expression).
    s = SignatureSet([parse_rule('alert ip any any -> any any (content:"abab"; sid:1;)')], "hyperscan")
    hits = s.match_batch([b"xxab", b"ababzz"], [KEY, KEY])
    assert [(p, [r.sid for r in f]) for p, f in hits] == [(1, [1])]
    assert s.match_batch([b"xxab", b"abzz"], [KEY, KEY]) == []


@needs_hs
def test_hyperscan_exact_bytes_and_ascii_only_nocase():
    rules = ('alert ip any any -> any any (content:"a|00|b"; sid:1;)\n'            # a NUL inside
             'alert ip any any -> any any (content:"|c0|X"; nocase; sid:2;)\n'      # 0xC0 is not folded
             'alert ip any any -> any any (content:"Ab"; sid:3;)\n'                 # case-sensitive
             'alert ip any any -> any any (content:"ab"; nocase; sid:4;)\n')        # same bytes, nocase
    for engine in ("hyperscan", "pyahocorasick"):
        s = load([("r", rules)], engine=engine)
        assert s.patterns == 4
        assert [r.sid for r in s.match(b"a\x00", KEY)] == []
        assert [r.sid for r in s.match(b"-a\x00b-", KEY)] == [1]
        assert [r.sid for r in s.match(b"\xe0x", KEY)] == []
        assert [r.sid for r in s.match(b"\xc0x", KEY)] == [2]
        assert [r.sid for r in s.match(b"ab", KEY)] == [4]
        assert [r.sid for r in s.match(b"AB", KEY)] == [4]
        assert [r.sid for r in s.match(b"Ab", KEY)] == [3, 4]


def test_engine_selection_and_errors(monkeypatch):
    rule = 'alert ip any any -> any any (content:"x"; sid:1;)'
    cls = load_function("ids")
    for engine in ("pyahocorasick", "auto"):
        assert validate_config(cls, {"rules": rule, "engine": engine}).signatures.engine == \
            (default_engine() if engine == "auto" else engine)
    with pytest.raises(FunctionConfigError, match="engine"):
        validate_config(cls, {"rules": rule, "engine": "re2"})
    with pytest.raises(ValueError, match="unknown pattern engine 're2'"):
        SignatureSet([], "re2")
    monkeypatch.setattr(snort, "hyperscan", None)  # as if it were not installed
    assert default_engine() == "pyahocorasick"
    assert validate_config(cls, {"rules": rule}).signatures.engine == "pyahocorasick"
    with pytest.raises(FunctionConfigError, match=r"needs the hyperscan package \(pip install hyperscan\)"):
        validate_config(cls, {"rules": rule, "engine": "hyperscan"})


@pytest.mark.parametrize("engine", ["pyahocorasick", pytest.param("hyperscan", marks=needs_hs)])
def test_signature_set_pickles(engine):
    # A Hyperscan database does not pickle; the set rebuilds it from its rules.
    s = load([("r", 'alert ip any any -> any any (content:"needle"; nocase; sid:7;)')], engine=engine)
    t = pickle.loads(pickle.dumps(s))
    assert t.engine == engine and [r.sid for r in t.match(b"a NEEDLE", KEY)] == [7]


# --- IP fragments: not reassembled, so dropped in drop mode (by default) -----------------------------

def _fragmented():
    from shmfabric.net import build
    payload = b"x" * 8 + b"EVILPAYLOAD" + b"y" * 13
    seg = build.udp(1234, 53, payload, src="10.0.0.1", dst="10.0.0.2")              # 40 bytes
    whole = build.ipv4(seg, src="10.0.0.1", dst="10.0.0.2", proto=17)
    f1 = build.ipv4(seg[:16], src="10.0.0.1", dst="10.0.0.2", proto=17, ident=7, mf=True, total_length=36)
    f2 = build.ipv4(seg[16:], src="10.0.0.1", dst="10.0.0.2", proto=17, ident=7, frag_offset=16)
    # a first fragment that carries the whole UDP header and length: it has a 5-tuple
    f1_full = build.ipv4(seg, src="10.0.0.1", dst="10.0.0.2", proto=17, ident=8, mf=True)
    seg6 = build.udp(1234, 53, payload, src="fd00::1", dst="fd00::2")
    v6_1 = build.ipv6(seg6[:16], src="fd00::1", dst="fd00::2", next_header=17, ext=[build.ipv6_fragment(0, True, 9)])
    v6_2 = build.ipv6(seg6[16:], src="fd00::1", dst="fd00::2", next_header=17, ext=[build.ipv6_fragment(16, False, 9)])
    return whole, [f1, f2, f1_full, v6_1, v6_2]


@pytest.mark.parametrize("flow_rule", [False, True])  # the lazy path and the every-key path
@pytest.mark.parametrize("mode,fragments,want", [("drop", None, 1), ("drop", "pass", 0), ("alert", None, 0),
                                                 ("alert", "drop", 1)])
def test_fragments_policy(mode, fragments, want, flow_rule):
    from shmfabric.functions.api import FunctionContext
    ids = load_function("ids")
    flow = " flow:to_server;" if flow_rule else ""
    cfg = {"mode": mode, "rules": f'drop udp any any -> any 53 (msg:"evil"; content:"EVILPAYLOAD";{flow} sid:1;)'}
    if fragments:
        cfg["fragments"] = fragments
    fn = ids(validate_config(ids, cfg), FunctionContext(node="ids", log=lambda e, d: None))
    whole, frags = _fragmented()
    out = bytearray(1)
    fn.process([whole], 1.0, out)
    assert list(out) == [1 if mode == "drop" else 0]
    out = bytearray(len(frags))
    fn.process(frags, 1.0, out)
    # before: every fragment but the full first one passed uninspected in drop mode too
    expect = [want] * len(frags)
    if mode == "drop" and not want:
        expect[2] = 1  # passed fragments are still inspected where they can be: this one holds it all
    assert list(out) == expect
    c = fn.counters()
    assert c["fragments"] == len(frags) and c["fragments_dropped"] == want * len(frags) and c["no_5tuple"] == 0
    # reconfigure follows the mode's default
    fn.reconfigure(validate_config(ids, {**cfg, "mode": "drop", "fragments": None}))
    out = bytearray(len(frags))
    fn.process(frags, 2.0, out)
    assert list(out) == [1] * len(frags)


class _GatheredBatch(list):
    """IP packets with the fabric FrameBatch's `gather` (per record: the length as 4 bytes, then
    the bytes zero-padded to `width`), so the ids function takes its gathered-batch paths."""

    def gather(self, width=None):
        import struct
        w = max(map(len, self), default=0) if width is None else width
        return b"".join(struct.pack("!I", len(f)) + (bytes(f[:w]) + bytes(w))[:w] for f in self)


def _first_fragments_with_the_signature():
    """A UDP and a TCP datagram, IPv4 and IPv6, each cut at a 1,500-byte MTU with the signature in
    the first fragment (whose UDP length covers the whole datagram); the later fragments follow."""
    from shmfabric.net import build
    data = b"hello ATTACK-SIGNATURE " + b"A" * 3000
    frames, first = [], []
    for src, dst in (("10.1.0.1", "10.2.0.1"), ("fd00::1", "fd00::2")):
        v6 = ":" in src
        for seg, proto in ((build.udp(5000, 53, data, src=src, dst=dst), 17),
                           (build.tcp(5000, 53, data, flags="PA", src=src, dst=dst), 6)):
            step = 1448 if v6 else 1480
            for off in range(0, len(seg), step):
                more = off + step < len(seg)
                if v6:
                    frames.append(build.ipv6(seg[off:off + step], src=src, dst=dst, next_header=proto,
                                             ext=[build.ipv6_fragment(off, more, 5)]))
                else:
                    frames.append(build.ipv4(seg[off:off + step], src=src, dst=dst, proto=proto, ident=5,
                                             mf=more, frag_offset=off))
                first.append(off == 0)
    return frames, first


@pytest.mark.parametrize("engine", ["pyahocorasick", pytest.param("hyperscan", marks=needs_hs)])
@pytest.mark.parametrize("flow_rule", [False, True])  # the lazy path and the every-key path
@pytest.mark.parametrize("gathered", [False, True])  # a list of buffers, a fabric-like batch
@pytest.mark.parametrize("mode", ["alert", "drop"])
def test_first_fragment_payload_is_inspected(engine, flow_rule, gathered, mode):
    """With `fragments: pass` a first fragment is inspected on its own payload: UDP (whose length
    runs past the fragment) as well as TCP, IPv4 and IPv6. Later fragments pass uninspected."""
    from shmfabric.functions.api import FunctionContext
    ids = load_function("ids")
    flow = " flow:to_server;" if flow_rule else ""
    alerts: list = []
    cfg = {"mode": mode, "engine": engine, "fragments": "pass",
           "rules": f'drop ip any any -> any any (msg:"sig"; content:"ATTACK-SIGNATURE";{flow} sid:1;)'}
    fn = ids(validate_config(ids, cfg), FunctionContext(node="ids", log=lambda e, d: alerts.append(d)))
    assert fn.ids.signatures.needs_every_key is flow_rule
    frames, first = _first_fragments_with_the_signature()
    batch = _GatheredBatch(frames) if gathered else frames
    out = bytearray(len(frames))
    fn.process(batch, 1.0, out)
    # before: the UDP first fragments were neither alerted nor dropped (TRUNCATED_UDP, no 5-tuple)
    assert [a["sid"] for a in alerts] == [1] * 4, alerts
    assert list(out) == [1 if mode == "drop" and f else 0 for f in first]
    c = fn.counters()
    assert (c["alerts"], c["fragments"], c["fragments_dropped"], c["no_5tuple"]) == (4, len(frames), 0, 0)


@pytest.mark.parametrize("ext_type", [0, 43, 60, 135, 139, 140])
def test_fragment_behind_any_walked_extension_header_is_a_fragment(ext_type):
    """The fragment policy sees a Fragment header behind every extension header the IPv6 view
    walks (before: not behind mobility, HIP or shim6, so `fragments: drop` let those through)."""
    from shmfabric.functions.api import FunctionContext
    from shmfabric.net import build
    ids = load_function("ids")
    fn = ids(validate_config(ids, {"mode": "drop", "rules": 'alert udp any any -> any any (content:"zz"; sid:1;)'}),
             FunctionContext(node="ids", log=lambda e, d: None))
    seg = build.udp(5000, 53, b"q" * 40, src="fd00::1", dst="fd00::2")
    ext = build.ipv6_ext(ext_type, b"\0" * 4 if ext_type == 43 else b"")  # routing: segments left 0
    frags = [build.ipv6(seg[o:o + 16], src="fd00::1", dst="fd00::2", next_header=17,
                        ext=[ext, build.ipv6_fragment(o, o + 16 < len(seg), 3)]) for o in range(0, len(seg), 16)]
    out = bytearray(len(frags))
    fn.process(frags, 1.0, out)
    assert list(out) == [1] * len(frags)
    c = fn.counters()
    assert (c["fragments"], c["fragments_dropped"], c["no_5tuple"]) == (len(frags), len(frags), 0)
