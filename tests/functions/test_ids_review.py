"""Findings of the IDS review, one test (or a few) each; every one failed before its fix.

1. fast patterns: per-packet work no longer grows with the rules sharing a content, nor with how
   often a pattern occurs (work counted as Python calls, not timed); same alerts as a brute-force
   reference with `fast_pattern` marks and with the batch's single-match fallback;
2. `ip` rules see every IP protocol (GRE, ESP, IP in IP, SCTP, IPv6 ESP), on the IP payload;
   `not_inspected` counts (and drop mode drops) the rest;
3. flow tracking: SYN sender is the client, forged first packets and RSTs do not turn
   `flow:to_server,established` off, a reverse SYN does not turn a connection around;
4. `\\|` in content is a literal pipe, unknown escapes are errors;
5. `!any` is an error everywhere, naming the variables it came through;
6. rules files: not UTF-8 names the path and line; a sid in two files names both;
7. contradictory flow options are errors;
8. lines end at \\n only;
9. option splitting is linear (line events counted, not timed);
10. gid: rules keyed on (gid, sid), shown as [gid:sid:rev]; on_timer always returns a time.
"""
from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings, strategies as st

from shmfabric.functions import snort
from shmfabric.functions.api import FunctionConfigError, FunctionContext, Verdict, validate_config
from shmfabric.functions.registry import load as load_function
from shmfabric.functions.snort import FlowTracker, Ids, SignatureSet, SnortSyntaxError, load, parse_rule, parse_rules
from shmfabric.net import build
from shmfabric.net.flow import FlowKey
from .test_ids_engines import ref_fires  # the brute-force reference both files check against

ENGINES = ["pyahocorasick",
           pytest.param("hyperscan", marks=pytest.mark.skipif(snort.hyperscan is None, reason="hyperscan not installed"))]
K = FlowKey.of("192.0.2.1", "10.0.0.2", "tcp", 5555, 80)
GET = (b"GET /index.html HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl/8.0\r\nAccept: */*\r\n"
       b"Accept-Language: en\r\nCookie: a=b\r\nConnection: keep-alive\r\n\r\n")


def calls(fn) -> int:
    """Python and C function calls made while fn() runs: a work count that does not depend on
    the machine's speed."""
    n = 0

    def prof(frame, event, arg):
        nonlocal n
        if event in ("call", "c_call"):
            n += 1
    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return n


def ids_fn(cfg: dict, log=None):
    cls = load_function("ids")
    return cls(validate_config(cls, cfg), FunctionContext(node="ids", log=log or (lambda e, d: None)))


def run(fn, frames, now=1.0) -> list[int]:
    out = bytearray(len(frames))
    fn.process(frames, now, out)
    return list(out)


# --- 1. fast patterns ---------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_rules_sharing_a_content_cost_nothing_when_their_fast_pattern_is_absent(engine):
    # p14: 1,000 rules of content:"/cgi-NNNNN.pl"; content:"HTTP/1.1|0d 0a|". Before, every content
    # was in the matcher and each hit of the shared one looked at all 1,000 rules (450 us a GET).
    text = "\n".join(f'alert tcp any any -> any 80 (msg:"r{i}"; content:"/cgi-{i:05d}.pl"; '
                     f'content:"HTTP/1.1|0d 0a|"; sid:{i + 1};)' for i in range(1000))
    s = SignatureSet(parse_rules(text), engine)
    s.match_batch([GET] * 32, [K] * 32)  # warm up
    assert calls(lambda: s.match_batch([GET] * 32, [K] * 32)) < 400  # a few per packet (before: 32,000+)
    assert calls(lambda: s.match(GET, K)) < 30
    assert s.patterns == 2000 and s.fast_patterns == 1000  # the longer content of each rule
    hit = GET.replace(b"/index.html", b"/cgi-00777.pl")
    assert [r.sid for r in s.match(hit, K)] == [778]
    assert [(p, [r.sid for r in f]) for p, f in s.match_batch([GET, hit, GET], [K] * 3)] == [(1, [778])]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_payload_of_one_short_pattern_repeated_costs_little(engine):
    # p9: 1,000 rules with a 12-letter content and |0d 0a|, a payload of 729 CRLFs: 148 ms a packet
    # before (729 hits x 1,000 rules); the 12-letter contents are the fast patterns now.
    text = "\n".join(f'alert tcp any any -> any any (content:"{i:012d}"; content:"|0d 0a|"; sid:{i + 1};)'
                     for i in range(1000))
    s = SignatureSet(parse_rules(text), engine)
    crlf = b"\r\n" * 729
    assert calls(lambda: s.match(crlf, K)) < 30
    assert calls(lambda: s.match_batch([crlf] * 8, [K] * 8)) < 60
    # a fast pattern that does occur 729 times: handled once per packet
    one = SignatureSet(parse_rules('alert tcp any any -> any any (content:"|0d 0a|"; fast_pattern; '
                                   'content:"nothere"; sid:1;)'), engine)
    assert one.fast_patterns == 1
    assert one.match(crlf, K) == [] and one.match_batch([crlf] * 8, [K] * 8) == []
    if engine == "hyperscan":  # one callback a pattern (single-match), however often it occurs
        assert calls(lambda: one.match(crlf, K)) < 30
        assert calls(lambda: one.match_batch([crlf] * 8, [K] * 8)) < 250
    assert [r.sid for r in one.match(crlf + b"nothere", K)] == [1]


def test_fast_pattern_choice_and_errors():
    r = parse_rule('alert tcp any any -> any any (content:"ab"; content:"abcd"; content:!"abcdefgh"; sid:1;)')
    assert r.fast_pattern == 1  # the longest positive content
    r = parse_rule('alert tcp any any -> any any (content:"ab"; fast_pattern; content:"abcd"; sid:1;)')
    assert r.fast_pattern == 0 and r.contents[0].fast_pattern
    assert parse_rule('alert tcp any any -> any any (content:"x"; fast_pattern:only; sid:1;)').fast_pattern == 0
    assert parse_rule('alert tcp any any -> any any (content:!"x"; sid:1;)').fast_pattern is None
    for opts, where in [('content:!"a"; fast_pattern;', "negated"),
                        ('content:"a"; fast_pattern; content:"b"; fast_pattern;', "more than one"),
                        ('content:"a"; fast_pattern:1,2;', "fast_pattern:1,2 is not supported"),
                        ('content:"abc"; fast_pattern:only; offset:1;', "only with offset"),
                        ('fast_pattern; content:"a";', "before any content")]:
        with pytest.raises(SnortSyntaxError, match=where):
            parse_rule(f"alert tcp any any -> any any ({opts} sid:1;)")


ALPHABET = b"aAbB\x00\xc0\xe0"
pattern = st.binary(min_size=1, max_size=4).map(lambda b: bytes(ALPHABET[x % len(ALPHABET)] for x in b))
text = st.binary(max_size=160).map(lambda b: bytes(ALPHABET[x % len(ALPHABET)] for x in b))
content = st.tuples(pattern, st.booleans(), st.integers(0, 6), st.none() | st.integers(0, 8), st.booleans(),
                    st.booleans())


def rule_text(sid: int, contents) -> str:
    opts = []
    marked = False
    for pat, nocase, offset, depth, neg, fast in contents:
        fp = fast and not neg and not marked
        marked |= fp
        opts.append(f'content:{"!" if neg else ""}"|{pat.hex(" ")}|"; ' + ("nocase; " if nocase else "")
                    + ("fast_pattern; " if fp else "")
                    + f"offset:{offset}; " + (f"depth:{len(pat) + depth}; " if depth is not None else ""))
    return f"alert ip any any -> any any ({''.join(opts)}sid:{sid};)"




@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fallback", [False, True])  # True: every batch rescanned payload by payload
@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(content, min_size=1, max_size=4), min_size=1, max_size=8), text,
       st.lists(st.integers(0, 200), max_size=12))
def test_fast_patterns_match_the_brute_force_reference(engine, fallback, rules, data, cuts):
    with pytest.MonkeyPatch.context() as mp:
        if fallback:
            mp.setattr(snort, "_HITS_PER_PAYLOAD", 0)
            mp.setattr(snort, "_HITS_EXTRA", 0)
        s = load([("r", "\n".join(rule_text(i + 1, cs) for i, cs in enumerate(rules)))], engine=engine)
        points = sorted({c % (len(data) + 1) for c in cuts})
        payloads = [data[a:b] for a, b in zip([0] + points, points + [len(data)])]
        expect = [(p, sids) for p, pl in enumerate(payloads) if (sids := [r.sid for r in s.rules if ref_fires(r, pl)])]
        assert [(p, [r.sid for r in f]) for p, f in s.match_batch(payloads, [K] * len(payloads))] == expect
        for p, pl in enumerate(payloads):
            assert [r.sid for r in s.match(pl, K)] == dict(expect).get(p, [])


# --- 2. every IP protocol ------------------------------------------------------------------------------

S, D = "10.66.0.1", "10.0.0.2"
S6, D6 = "fd00::1", "fd00::2"


def _other_protocols(payload: bytes = b"xx EVIL yy") -> dict[str, bytes]:
    inner = build.ipv4(build.udp(1, 53, payload, src=S, dst=D), src=S, dst=D, proto=17)
    return {
        "gre": build.ipv4(b"\x00\x00\x08\x00" + inner, src=S, dst=D, proto=47),
        "esp": build.ipv4(b"\x00\x00\x10\x01" + b"\x00" * 4 + payload, src=S, dst=D, proto=50),
        "ipip": build.ipv4(inner, src=S, dst=D, proto=4),
        "sctp": build.ipv4(b"\x00" * 12 + payload, src=S, dst=D, proto=132),
        "ipopts gre": build.ipv4(b"\x00\x00\x08\x00" + payload, src=S, dst=D, proto=47, options=b"\x01" * 4),
        "v6 esp": build.ipv6(b"\x00" * 8 + payload, src=S6, dst=D6, next_header=50),
        "v6 hbh gre": build.ipv6(b"\x00\x00\x86\xdd" + payload, src=S6, dst=D6, next_header=47, ext=[build.ipv6_ext(0)]),
    }


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("flow", ["", " flow:to_server;"])  # the lazy path and the every-key path
def test_ip_rules_see_every_protocol_on_its_ip_payload(engine, flow):
    frames = _other_protocols()
    rules = (f'drop ip any any -> any any (msg:"c"; content:"EVIL";{flow} sid:1;)\n'
             f'drop tcp any any -> any any (msg:"t"; content:"EVIL"; sid:2;)\n'
             f'drop udp any any -> any any (msg:"u"; content:"EVIL"; sid:3;)\n'
             f'drop icmp any any -> any any (msg:"i"; content:"EVIL"; sid:4;)\n')
    logged = []
    fn = ids_fn({"rules": rules, "mode": "drop", "engine": engine}, log=lambda e, d: logged.append(d["sid"]))
    # before: l4_payload_span gave None for them and they passed uninspected, uncounted
    assert run(fn, list(frames.values())) == [Verdict.DROP] * len(frames)
    assert logged == [1] * len(frames)  # never a tcp, udp or icmp rule
    c = fn.counters()
    assert (c["not_inspected"], c["no_5tuple"], c["dropped"]) == (0, 0, len(frames))
    # offsets count from the start of the IP payload
    at0 = ids_fn({"rules": 'alert ip any any -> any any (content:"|00 00 08 00|"; depth:4; sid:9;)', "engine": engine})
    run(at0, [frames["gre"], frames["ipopts gre"], frames["esp"]])
    assert at0.counters()["sid9"] == 2


def test_a_header_only_ip_rule_drops_gre_esp_and_ipip():
    # p7: before, `drop ip 10.66.0.0/16 any -> any any` dropped UDP only
    fn = ids_fn({"rules": 'drop ip 10.66.0.0/16 any -> any any (msg:"blocklisted"; sid:1;)', "mode": "drop"})
    frames = _other_protocols()
    assert run(fn, [f for k, f in frames.items() if not k.startswith("v6")]) == [Verdict.DROP] * 5
    fn6 = ids_fn({"rules": 'drop ip fd00::/64 any -> any any (msg:"blocklisted"; sid:1;)', "mode": "drop"})
    assert run(fn6, [frames["v6 esp"], frames["v6 hbh gre"]]) == [Verdict.DROP] * 2


@pytest.mark.parametrize("flow", ["", " flow:to_server;"])
@pytest.mark.parametrize("mode", ["alert", "drop"])
def test_packets_not_inspected_are_counted_and_dropped_in_drop_mode(monkeypatch, flow, mode):
    from shmfabric.functions.builtin import ids as ids_mod
    monkeypatch.setattr(ids_mod, "ip_payload_span", lambda f, link="ip": None)  # as for a header no parser can place
    fn = ids_fn({"rules": f'alert ip any any -> any any (content:"zz";{flow} sid:1;)', "mode": mode})
    frames = [build.ipv4(build.udp(1, 53, b"hi", src=S, dst=D), src=S, dst=D, proto=17, options=b"\x01" * 4),
              _other_protocols()["gre"]]
    assert run(fn, frames) == [Verdict.DROP if mode == "drop" else Verdict.NEXT] * 2
    assert fn.counters()["not_inspected"] == 2


# --- 3. flow tracking -------------------------------------------------------------------------------

C2S, S2C = K, K.reversed()
SYN, SYNACK, ACK, PA, RST, FA = 0x02, 0x12, 0x10, 0x18, 0x04, 0x11
FLOW_RULE = 'alert tcp any any -> any 80 (msg:"attack"; flow:to_server,established; content:"EVIL"; sid:1;)'


def alerts(seq) -> list[int]:
    ids = Ids(SignatureSet.parse(FLOW_RULE, "t.rules"))
    return [len(ids.inspect(pl, key, float(t), flags)[1]) for t, (key, flags, pl) in enumerate(seq)]


HANDSHAKE = [(C2S, SYN, b""), (S2C, SYNACK, b""), (C2S, ACK, b"")]


def test_a_forged_first_packet_does_not_turn_the_connection_around():
    # p4: before, whoever sent the first packet seen was the client for 300 s
    assert alerts(HANDSHAKE + [(C2S, PA, b"EVIL")]) == [0, 0, 0, 1]
    assert alerts([(S2C, RST, b"")] + HANDSHAKE + [(C2S, PA, b"EVIL")])[-1] == 1
    assert alerts([(S2C, ACK, b"")] + HANDSHAKE + [(C2S, PA, b"EVIL")])[-1] == 1
    assert alerts([(S2C, SYN, b"")] + HANDSHAKE + [(C2S, PA, b"EVIL")])[-1] == 1  # a forged reverse SYN first
    # a SYN from the server's side after the handshake (forged) changes nothing
    assert alerts(HANDSHAKE + [(S2C, SYN, b""), (C2S, PA, b"EVIL")])[-1] == 1


def test_established_needs_the_handshake_or_traffic_both_ways():
    assert alerts([(C2S, SYN, b""), (S2C, SYNACK, b""), (C2S, PA, b"EVIL")]) == [0, 0, 1]  # ACK with data
    assert alerts([(C2S, SYN, b""), (S2C, RST, b""), (C2S, PA, b"EVIL")]) == [0, 0, 0]     # refused
    assert alerts([(C2S, PA, b"x"), (S2C, RST, b""), (C2S, PA, b"EVIL")]) == [0, 0, 0]     # a bare RST reply
    assert alerts([(C2S, PA, b"x"), (S2C, ACK, b""), (C2S, PA, b"EVIL")]) == [0, 0, 1]     # midstream both ways
    assert alerts([(C2S, SYN, b""), (C2S, PA, b"EVIL")]) == [0, 0]                         # one way only


def test_rst_and_fins_close_the_flow_a_new_syn_starts_over():
    ft = FlowTracker()
    for t, (key, flags, _) in enumerate(HANDSHAKE):
        ft.observe(key, t, flags)
    assert ft.observe(C2S, 3, RST) == (True, True)
    assert ft.observe(C2S, 4, PA) == (True, True)            # in flight after the RST: still that flow
    assert ft.observe(S2C, 5, SYN) == (True, False)          # closed: a SYN (here the other way) starts over
    assert ft.observe(C2S, 6, SYNACK) == (False, False)
    assert ft.observe(S2C, 7, ACK) == (True, True)
    ft2 = FlowTracker()
    for t, (key, flags, _) in enumerate(HANDSHAKE):
        ft2.observe(key, t, flags)
    ft2.observe(C2S, 3, FA)
    assert ft2.observe(S2C, 4, SYN) == (False, True)         # one FIN: not closed, the reverse SYN is ignored
    ft2.observe(S2C, 5, FA)
    assert ft2.observe(S2C, 6, SYN) == (True, False)         # FINs both ways: closed, so it starts over


def test_midstream_direction_from_the_ports():
    ft = FlowTracker()
    assert ft.observe(S2C, 0, PA) == (False, False)          # from port 80 to 5555: the server's packet
    assert ft.observe(C2S, 1, PA) == (True, True)
    assert ft.observe(S2C, 2, RST) == (False, True)
    dns = FlowKey.of("10.0.0.2", "192.0.2.1", "udp", 53, 40000)
    assert FlowTracker().observe(dns, 0) == (False, False)
    assert FlowTracker().observe(FlowKey.of("10.0.0.2", "192.0.2.1", "udp", 5000, 6000), 0) == (True, False)
    assert FlowTracker().observe(S2C, 0, RST) == (False, False) and len(FlowTracker()) == 0


# --- 4. content escapes -----------------------------------------------------------------------------

def test_escaped_pipe_is_a_literal_pipe_and_unknown_escapes_are_errors():
    def pat(c):
        return parse_rule(f"alert tcp any any -> any any (content:{c}; sid:1;)").contents[0].pattern
    assert pat(r'"x\|41\|"') == b"x|41|"                     # was b"xA"
    assert pat(r'"a\|b"') == b"a|b"                          # was "unbalanced |"
    assert pat(r'"|41|\||42|"') == b"A|B"
    assert pat(r'"a\;b\"c\\d"') == b'a;b"c\\d'
    s = SignatureSet.parse(r'alert tcp any any -> any any (content:"x\|41\|"; sid:1;)')
    assert [r.sid for r in s.match(b"..x|41|..", K)] == [1] and s.match(b"xA", K) == []
    for c, bad in [(r'"\x41"', r"'\x'"), (r'"a\n"', r"'\n'"), (r'"|41|\:"', r"'\:'")]:
        with pytest.raises(SnortSyntaxError, match="unknown escape " + bad.replace("\\", "\\\\")):
            pat(c)


# --- 5. !any ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("header,variables,where", [
    ("!any any -> any any", {}, "'!any' matches nothing (source address '!any')"),
    ("any !any -> any any", {}, "'!any' matches nothing (source port '!any')"),
    ("any any -> ![any] any", {}, "destination address '![any]'"),
    ("!$HOME_NET any -> any any", {}, "source address '!$HOME_NET' is !any and matches nothing ($HOME_NET is any)"),
    ("$EXTERNAL_NET any -> any any", {"EXTERNAL_NET": "!$HOME_NET"},
     "'$EXTERNAL_NET' is !any and matches nothing ($EXTERNAL_NET is !$HOME_NET, $HOME_NET is any)"),
    ("[10.0.0.1,$NOT] any -> any any", {"NOT": "!any"}, "($NOT is !any)"),
    ("any !$P -> any any", {"P": "any"}, "source port '!$P' is !any"),
])
def test_not_any_is_an_error_naming_the_variable(header, variables, where):
    with pytest.raises(SnortSyntaxError) as ei:
        parse_rule(f"alert tcp {header} (sid:1;)", 3, "x.rules", variables)
    assert str(ei.value).startswith("x.rules:3:") and where in str(ei.value)


def test_double_negation_is_any_and_a_negated_list_with_exceptions_is_them():
    r = parse_rule("alert tcp !$N any -> any any (sid:1;)", variables={"N": "!any"})
    assert r.header_match(K)
    r = parse_rule("alert tcp ![any,!192.0.2.1] any -> any any (sid:1;)")  # everything but x, negated: x
    assert r.header_match(K) and not r.header_match(FlowKey.of("192.0.2.2", "10.0.0.2", "tcp", 5555, 80))
    for addr in ("![any,10.0.0.1]", "[10.0.0.1,!any]"):
        with pytest.raises(SnortSyntaxError, match="matches nothing"):
            parse_rule(f"alert tcp {addr} any -> any any (sid:1;)")


# --- 6. rules files ---------------------------------------------------------------------------------

def test_rules_file_not_utf8_names_path_and_line(tmp_path):
    f = tmp_path / "latin1.rules"
    f.write_bytes(b'# ok\nalert tcp any any -> any 80 (content:"caf\xe9"; sid:1;)\n')
    with pytest.raises(FunctionConfigError, match=rf"{f}:2: not UTF-8 text \(byte 0xe9 at column 42\).*\|e9\|"):
        validate_config(load_function("ids"), {"rules_files": [str(f)]})


def test_a_sid_in_two_files_names_both(tmp_path):
    a, b = tmp_path / "a.rules", tmp_path / "b.rules"
    a.write_text('alert tcp any any -> any 80 (content:"a"; sid:1;)\n')
    b.write_text('# b\nalert tcp any any -> any 80 (content:"b"; sid:1;)\n')
    with pytest.raises(FunctionConfigError, match=rf"{b}:2: sid 1 is also used on {a}:1"):
        validate_config(load_function("ids"), {"rules_files": [str(a), str(b)]})
    with pytest.raises(SnortSyntaxError, match=r"^y.rules:1: sid 7 is also used on x.rules:3"):
        load([("x.rules", "\n\nalert ip any any -> any any (sid:7;)"), ("y.rules", "alert ip any any -> any any (sid:7;)")])


# --- 7. flow options --------------------------------------------------------------------------------

@pytest.mark.parametrize("flow", ["to_server,to_client", "established,not_established", "from_client,from_server",
                                  "to_client,established,from_client"])
def test_contradictory_flow_options_are_errors(flow):
    with pytest.raises(SnortSyntaxError, match="contradict each other"):
        parse_rule(f"alert tcp any any -> any any (flow:{flow}; sid:1;)")
    assert parse_rule("alert tcp any any -> any any (flow:to_server,from_client,established,stateless; sid:1;)").to_server


# --- 8. line breaks ---------------------------------------------------------------------------------

def test_lines_end_at_newline_only():
    rule = 'alert tcp any any -> any 80 (content:"a{}b"; sid:{};)'
    text = "\n".join([rule.format("\x0c", 1), "\x0c", rule.format("\x85", 2), rule.format("\u2028", 3) + "\r",
                      rule.format("\x1c", 4), rule.format("\x1e\x1d\x0b", 5), "alert tcp any any -> any 80 (sid:x;)"])
    with pytest.raises(SnortSyntaxError, match=r"^t.rules:7: sid needs a number"):
        parse_rules(text, "t.rules")
    rules = parse_rules(text.rsplit("\n", 1)[0], "t.rules")
    assert [r.line for r in rules] == [1, 3, 4, 5, 6]
    assert [r.contents[0].pattern for r in rules] == [b"a\x0cb", "a\x85b".encode(), "a\u2028b".encode(),
                                                      b"a\x1cb", b"a\x1e\x1d\x0bb"]


# --- 9. linear parsing ------------------------------------------------------------------------------

def _line_events(fn) -> int:
    n = 0

    def tracer(frame, event, arg):
        nonlocal n
        if frame.f_code.co_filename == snort.__file__:
            n += 1
            return tracer
        return None
    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return n


def test_option_splitting_does_not_loop_over_characters():
    # p12: a 1M-character content took 14.5 s (a string built a character at a time); now the
    # Python lines run do not grow with the length of the text
    def rule(n):
        return 'alert tcp any any -> any [80,' + ",".join(str(p) for p in range(1000, 1000 + n // 100)) + \
            '] (msg:"' + "m" * n + '"; content:"' + "a" * n + '"; sid:1;)'
    small, large = _line_events(lambda: parse_rules(rule(1000))), _line_events(lambda: parse_rules(rule(20_000)))
    assert large < small + 200 * 20 * 3, (small, large)  # ports: a few lines each; contents: none per byte
    assert parse_rules(rule(20_000))[0].contents[0].pattern == b"a" * 20_000


# --- 10. gid and on_timer ---------------------------------------------------------------------------

def test_rules_are_keyed_on_gid_and_sid():
    text = ('alert tcp any any -> any 80 (msg:"one"; content:"a"; gid:1; sid:1;)\n'
            'alert tcp any any -> any 80 (msg:"two"; content:"b"; gid:2; sid:1; rev:3;)\n')
    ids = Ids(SignatureSet.parse(text))
    _, al = ids.inspect(b"ab", K, 0.0)
    assert [a.line().split(" [**]")[0] for a in al] == ["[**] [1:1:1] one", "[**] [2:1:3] two"]
    assert al[1].as_dict()["gid"] == 2
    assert ids.counters() == {1: 1, (2, 1): 1}
    with pytest.raises(SnortSyntaxError, match=r"t.rules:2: gid:sid 2:1 is also used on line 1"):
        SignatureSet.parse(text.replace("gid:1", "gid:2"), "t.rules")
    fn = ids_fn({"rules": text})
    run(fn, [build.ipv4(build.tcp(5, 80, b"b", flags="PA", src=S, dst=D), src=S, dst=D, proto=6)])
    assert fn.counters()["sid2:1"] == 1


def test_on_timer_always_returns_a_time_and_expires_flows_after_a_reconfigure():
    cls = load_function("ids")
    fn = ids_fn({"rules": 'alert tcp any any -> any 80 (content:"a"; sid:1;)'})
    # before: None here, and the runtime never called on_timer again
    assert fn.on_timer(1.0) == 2.0
    fn.reconfigure(validate_config(cls, {"rules": 'alert tcp any any -> any 80 (flow:to_server; content:"a"; sid:1;)'}))
    run(fn, [build.ipv4(build.tcp(5, 80, b"x", flags="S", src=S, dst=D), src=S, dst=D, proto=6)], now=2.0)
    assert fn.counters()["flows"] == 1
    assert fn.on_timer(3.0) == 4.0 and fn.counters()["flows"] == 1
    fn.on_timer(400.0)
    assert fn.counters()["flows"] == 0 and fn.counters()["flows_expired"] == 1
