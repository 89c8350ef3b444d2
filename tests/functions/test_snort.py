"""Snort subset: parsing with errors, matching against a brute-force reference, flow options,
alert/drop modes. Every test runs once per pattern engine (hyperscan, pyahocorasick)."""
import json

import pytest
from hypothesis import given, settings, strategies as st

from shmfabric.net.flow import FlowKey
from shmfabric.functions import snort
from shmfabric.functions.snort import (
    Ids, IdsVerdict, FlowTracker, SignatureSet, SnortSyntaxError, load, parse_rule,
)

ENGINES = ["pyahocorasick",
           pytest.param("hyperscan", marks=pytest.mark.skipif(snort.hyperscan is None, reason="hyperscan not installed"))]


@pytest.fixture(scope="module", autouse=True, params=ENGINES)
def engine(request):
    """Every SignatureSet built with engine "auto" (the default) in this module uses this engine.
    Module-scoped so the hypothesis tests may use it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(snort, "default_engine", lambda: request.param)
        yield request.param


def test_engine_in_use(engine):
    s = sigs()
    assert s.engine == engine
    assert (s._hs is not None) == (engine == "hyperscan") and (s._automaton is not None) == (engine == "pyahocorasick")

WEB = FlowKey.of("192.0.2.1", "10.0.0.2", "tcp", 5555, 80)
RULES = r"""
# local rules
alert tcp $EXTERNAL_NET any -> $HOME_NET $HTTP_PORTS (msg:"GET root"; flow:to_server,established; \
    content:"GET /"; nocase; offset:0; depth:5; content:"|0d 0a|"; sid:1000001; rev:2; classtype:web-application-attack;)
drop udp any any -> any 53 (msg:"bad dns"; content:"evil"; sid:1000002;)
alert tcp any any <> 10.0.0.0/8 !22 (msg:"bidirectional"; content:"secret"; content:!"public"; sid:1000003;)
pass tcp 192.0.2.99 any -> any any (msg:"trusted scanner"; sid:1000004;)
alert tcp any any -> any any (msg:"scanner probe"; content:"probe"; sid:1000005;)
"""
VARS = {"HOME_NET": "[10.0.0.0/8,fd00::/64]", "HTTP_PORTS": "[80,8080:8081]"}


def sigs(text=RULES, **kw):
    return SignatureSet.parse(text, "local.rules", VARS)


def test_parse_fields():
    s = sigs()
    r = s.rules[0]
    assert (r.line, r.action, r.proto, r.sid, r.rev, r.msg) == (3, "alert", "tcp", 1000001, 2, "GET root")
    assert r.to_server is True and r.established is True and r.classtype == "web-application-attack"
    assert [(c.pattern, c.nocase, c.offset, c.depth) for c in r.contents] == [(b"GET /", True, 0, 5), (b"\r\n", False, 0, None)]
    assert s.rules[2].bidirectional and s.rules[2].contents[1].negated
    assert s.patterns == 5


@pytest.mark.parametrize("rule,where,fix", [
    ('alert tcp any any -> any 80 (msg:"x"; pcre:"/a/"; sid:1;)', "unsupported option 'pcre'", "supported options"),
    ('alert tcp any any -> any 80 (content:"a"; distance:2; sid:1;)', "unsupported option 'distance'", "offset, depth"),
    ('alert tcp any any -> any 80 (msg:"x"; content:"a"; sid:1)', "not ended by ';'", "sid:1000001;"),
    ('alert tcp any any -> any 80 (msg:"x; sid:1;)', "unterminated quoted string", 'close it'),
    ('alert tcp any any -> any 80 (nocase; sid:1;)', "'nocase' before any content", "after the content"),
    ('alert tcp any any -> any 80 (content:"|0g|"; sid:1;)', "bad hex", "|0d 0a|"),
    ('alert tcp any any -> any 80 (content:"a|00"; sid:1;)', "unbalanced |", "two pipes"),
    ('alert tcp any any -> any 80 (content:"abc"; depth:2; sid:1;)', "shorter than its content", "cover"),
    ('alert tcp any any -> any 80 (content:"a";)', "rule has no sid", "sid:N;"),
    ('alret tcp any any -> any 80 (sid:1;)', "unknown action 'alret'", "alert"),
    ('alert sctp any any -> any 80 (sid:1;)', "unknown protocol 'sctp'", "tcp, udp, icmp or ip"),
    ('alert tcp $FOO any -> any 80 (sid:1;)', "undefined variable $FOO", "define it"),
    ('alert tcp any any -> any 99999 (sid:1;)', "above 65535", ""),
    ('alert tcp 10.0.0.300 any -> any 80 (sid:1;)', "not an address", "10.0.0.0/8"),
    ('alert icmp any 80 -> any any (sid:1;)', "ports given for protocol 'icmp'", "any"),
    ('alert tcp any any any 80 (sid:1;)', "not a rule", "ACTION PROTO"),
    ('alert tcp any any -> any 80 (flow:to_sever; sid:1;)', "unsupported flow option 'to_sever'", "to_server"),
])
def test_errors_name_line_and_fix(rule, where, fix):
    with pytest.raises(SnortSyntaxError) as ei:
        SignatureSet.parse("# first line\n" + rule, "x.rules")
    assert str(ei.value).startswith("x.rules:2:") and where in str(ei.value) and fix in str(ei.value)


def test_duplicate_sid_and_continuation_at_eof():
    with pytest.raises(SnortSyntaxError, match=r"x.rules:2: sid 5 is also used on line 1"):
        SignatureSet.parse('alert ip any any -> any any (sid:5;)\nalert ip any any -> any any (sid:5;)', "x.rules")
    with pytest.raises(SnortSyntaxError, match="continues past the end"):
        SignatureSet.parse('alert ip any any -> any any (sid:5; \\', "x.rules")


def test_content_window_nocase_and_flow():
    ids = Ids(sigs())
    assert ids.inspect(b"", WEB, 0.0, 0x02)[1] == []                    # SYN: not established
    ids.inspect(b"", WEB.reversed(), 0.1, 0x12)                         # SYN-ACK: not yet established
    v, alerts = ids.inspect(b"get / HTTP/1.1\r\n", WEB, 0.2, 0x18)     # the client's ACK (with data): now it is
    assert v is IdsVerdict.PASS and [a.sid for a in alerts] == [1000001]
    assert ids.inspect(b" GET / HTTP/1.1\r\n", WEB, 0.3)[1] == []       # outside depth 5 from offset 0
    assert ids.inspect(b"GET / HTTP/1.1", WEB, 0.4)[1] == []            # second content missing
    assert ids.inspect(b"GET /\r\n", WEB.reversed(), 0.5)[1] == []      # to_client, rule wants to_server
    other_port = FlowKey.of("192.0.2.1", "10.0.0.2", "tcp", 5555, 8081)
    ids.inspect(b"", other_port, 1.0)
    ids.inspect(b"", other_port.reversed(), 1.1)
    assert [a.sid for a in ids.inspect(b"GET /\r\n", other_port, 1.2)[1]] == [1000001]
    assert ids.counters()[1000001] == 2


def test_negated_content_bidirectional_and_ports():
    s = sigs()
    inbound = FlowKey.of("192.0.2.1", "10.0.0.2", "tcp", 1000, 443)
    assert [r.sid for r in s.match(b"the secret", inbound)] == [1000003]
    assert [r.sid for r in s.match(b"the secret", inbound.reversed())] == [1000003]  # <>
    assert s.match(b"public secret", inbound) == []                                  # !content
    assert s.match(b"the secret", FlowKey.of("192.0.2.1", "10.0.0.2", "tcp", 1000, 22)) == []  # !22
    assert s.match(b"the secret", FlowKey.of("192.0.2.1", "192.0.2.3", "tcp", 1000, 443)) == []


def test_modes_and_pass():
    dns = FlowKey.of("192.0.2.1", "192.0.2.2", "udp", 1, 53)
    alert_mode = Ids(sigs())
    v, al = alert_mode.inspect(b"xxevilxx", dns, 0.0)
    assert v is IdsVerdict.PASS and al[0].action == "drop"              # IDS mode only reports
    drop_mode = Ids(sigs(), mode="drop")
    assert drop_mode.inspect(b"xxevilxx", dns, 0.0)[0] is IdsVerdict.DROP and drop_mode.dropped == 1
    scanner = FlowKey.of("192.0.2.99", "10.0.0.2", "tcp", 1, 2)
    assert drop_mode.inspect(b"probe", scanner, 0.0) == (IdsVerdict.PASS, [])  # pass rule suppresses
    assert drop_mode.passed == 1
    assert [a.sid for a in drop_mode.inspect(b"probe", FlowKey.of("192.0.2.98", "10.0.0.2", "tcp", 1, 2), 0)[1]] == [1000005]
    with pytest.raises(ValueError):
        Ids(sigs(), mode="block")


def test_alert_output():
    ids = Ids(sigs())
    _, al = ids.inspect(b"evil", FlowKey.of("fd00::1", "fd00::2", "udp", 1, 53), 0.0)
    assert al[0].line() == "[**] [1:1000002:1] bad dns [**] {UDP} fd00::1:1 -> fd00::2:53"
    d = json.loads(al[0].json())
    assert d["sid"] == 1000002 and d["src"] == "fd00::1" and d["dport"] == 53


def test_ipv6_and_address_lists():
    r = parse_rule('alert ip [fd00::/64,!fd00::5] any -> any any (sid:9;)')
    assert r.header_match(FlowKey.of("fd00::4", "1.1.1.1", 6, 1, 2))
    assert not r.header_match(FlowKey.of("fd00::5", "1.1.1.1", 6, 1, 2))
    assert not r.header_match(FlowKey.of("10.0.0.1", "1.1.1.1", 6, 1, 2))
    neg = parse_rule('alert tcp !10.0.0.0/8 any -> any :1023 (sid:9;)')
    assert neg.header_match(FlowKey.of("11.0.0.1", "1.1.1.1", 6, 5000, 80))
    assert not neg.header_match(FlowKey.of("10.0.0.1", "1.1.1.1", 6, 5000, 80))
    assert not neg.header_match(FlowKey.of("11.0.0.1", "1.1.1.1", 6, 5000, 1024))


def test_flow_tracker_expiry_and_bound():
    ft = FlowTracker(max_flows=2, idle_timeout=10)
    a, b, c = (1, 2, 6, 1, 2), (1, 3, 6, 1, 2), (1, 4, 6, 1, 2)
    assert ft.observe(a, 0) == (True, False)
    assert ft.observe((2, 1, 6, 2, 1), 1) == (False, True)
    assert ft.observe(a, 2) == (True, True)
    ft.observe(b, 3)
    ft.observe(c, 4)
    assert len(ft) == 2
    assert ft.observe(a, 100) == (True, False)  # expired: starts over


def test_many_patterns_load():
    text = "\n".join(f'alert tcp any any -> any any (msg:"sig {i}"; content:"pattern-{i:04d}"; '
                     f'{"nocase; " if i % 2 else ""}sid:{2000000 + i};)' for i in range(1000))
    s = load([("a.rules", text), ("b.rules", 'alert udp any any -> any any (content:"x"; sid:1;)')])
    assert len(s.rules) == 1001 and s.patterns == 1001
    hits = s.match(b"..PATTERN-0007..pattern-0010..", FlowKey.of("1.1.1.1", "2.2.2.2", "tcp", 1, 2))
    assert [r.sid for r in hits] == [2000007, 2000010]  # 0007 is nocase, 0010 exact


# --- against a brute-force reference -------------------------------------------------------------------

pattern = st.binary(min_size=1, max_size=4).map(lambda b: bytes(x % 3 + 97 if x < 128 else 0xC0 for x in b))


def ref_found(c, payload):
    hay = payload.lower() if c.nocase else payload
    needle = c.pattern.lower() if c.nocase else c.pattern
    stop = len(hay) if c.depth is None else c.offset + c.depth
    return hay.find(needle, c.offset, stop) >= 0


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(pattern, st.booleans(), st.integers(0, 6), st.none() | st.integers(0, 8), st.booleans()),
                min_size=1, max_size=4),
       st.binary(max_size=30).map(lambda b: bytes(x % 4 + 97 if x < 200 else 0xE0 for x in b)))
def test_matches_brute_force(contents, payload):
    opts = []
    for pat, nocase, offset, depth, neg in contents:
        opts.append(f'content:{"!" if neg else ""}"|{pat.hex(" ")}|"; ' + ("nocase; " if nocase else "")
                    + f"offset:{offset}; " + (f"depth:{len(pat) + depth}; " if depth is not None else ""))
    rule = parse_rule("alert ip any any -> any any (" + "".join(opts) + "sid:1;)")
    s = SignatureSet([rule])
    expect = all(ref_found(c, payload) != c.negated for c in rule.contents)
    assert bool(s.match(payload, (1, 2, 6, 3, 4))) == expect


# --- nested lists, and nothing but SnortSyntaxError out of the parser ------------------------------

def _a(ip):
    return FlowKey.of(ip, "10.9.9.9", "tcp", 1000, 80)


def test_nested_address_and_port_lists():
    s = SignatureSet.parse(
        'alert tcp [10.0.0.1,[10.0.0.2,10.0.0.3]] any -> any 80 (msg:"nested"; sid:1;)\n'
        'alert tcp [10.0.0.0/8,![10.0.0.1,10.0.0.2]] any -> any 81 (msg:"negated sublist"; sid:2;)\n'
        'alert tcp $INNER any -> any [82, [443,8443]] (msg:"variable and spaces"; sid:3;)\n'
        'alert tcp [any,!10.0.0.1] any -> any [83:100,![85,86]] (msg:"any in a list"; sid:4;)\n',
        "x.rules", {"INNER": "[192.0.2.0/24,!$ONE]", "ONE": "192.0.2.1"})

    def sids(src, dport):
        return [r.sid for r in s.match(b"", FlowKey.of(src, "10.9.9.9", "tcp", 1000, dport))]
    assert sids("10.0.0.3", 80) == [1] and sids("10.0.0.4", 80) == []
    assert sids("10.0.0.3", 81) == [2] and sids("10.0.0.2", 81) == []
    assert sids("192.0.2.5", 8443) == [3] and sids("192.0.2.1", 8443) == [] and sids("192.0.2.5", 444) == []
    assert sids("10.0.0.5", 84) == [4] and sids("10.0.0.5", 85) == [] and sids("10.0.0.1", 84) == []
    assert sids("fd00::1", 84) == [4]


@pytest.mark.parametrize("rule,where", [
    ('alert tcp [10.0.0.1 any -> any 80 (sid:1;)', "'[' not closed in the rule header"),
    ('alert tcp 10.0.0.1] any -> any 80 (sid:1;)', "']' without '['"),
    ('alert tcp [10.0.0.1,,10.0.0.2] any -> any 80 (sid:1;)', "empty item"),
    ('alert tcp [10.0.0.1][10.0.0.2] any -> any 80 (sid:1;)', "after the closing ']'"),
    ('alert tcp 10.0.0.1[10.0.0.2] any -> any 80 (sid:1;)', "unbalanced brackets"),
    ('alert tcp ' + "[" * 40 + "10.0.0.1" + "]" * 40 + ' any -> any 80 (sid:1;)', "nested deeper than 16"),
    ('alert tcp $SELF any -> any 80 (sid:1;)', "refers to itself"),
    ('alert tcp any any -> any 80 (sid:²;)', "sid needs a number"),
    ('alert tcp any any -> any ' + "9" * 5000 + ' (sid:1;)', "not a port"),
])
def test_list_and_number_errors_name_the_line(rule, where):
    with pytest.raises(SnortSyntaxError) as ei:
        SignatureSet.parse("# first line\n" + rule, "x.rules", {"SELF": "!!$SELF"})
    assert str(ei.value).startswith("x.rules:2:") and where in str(ei.value)


_VARS = {"LIST": "[10.0.0.0/8,[192.168.0.0/16,!192.168.1.1]]", "SELF": "$SELF", "NEG": "!!$LIST",
         "PORTS": "[80,[443,!8443]]", "LOOP": "!$LOOP2", "LOOP2": "!!$LOOP"}
_leaf_addr = st.sampled_from(["any", "10.0.0.1", "10.0.0.0/8", "fd00::/64", "$LIST", "$NEG", "$SELF", "$LOOP",
                              "$HOME_NET", "300.1.1.1", "", "$PORTS"])
_leaf_port = st.sampled_from(["any", "80", "1:1024", ":1024", "1024:", ":", "$PORTS", "$LIST", "99999", "²", "9" * 30, ""])


def _nested(leaf):
    return st.recursive(st.tuples(st.booleans(), leaf).map(lambda t: ("!" if t[0] else "") + t[1]),
                        lambda ch: st.tuples(st.booleans(), st.lists(ch, max_size=3), st.booleans()).map(
                            lambda t: ("!" if t[0] else "") + "[" + ",".join(t[1]) + ("]" if t[2] else "")),
                        max_leaves=8)


_number = st.one_of(st.sampled_from(["1", "0", "-1", "²", "٣", "9" * 5000, "", "1e3"]), st.text(max_size=4))
_option = st.one_of(
    st.builds(lambda k, v: f"{k}:{v};", st.sampled_from(["sid", "rev", "offset", "depth", "priority", "gid", "flow"]), _number),
    st.builds(lambda v, neg: f'content:{"!" if neg else ""}"{v}";', st.text(max_size=8), st.booleans()),
    st.sampled_from(["nocase;", 'msg:"x";', "msg:x;", 'content:"|0d 0a|";', 'content:"|0|";',
                     "flow:established,to_server;", 'pcre:"/a/";', ";", '"', "\\"]),
)
_rule = st.builds(lambda a, pr, s, sp, d, dst, dp, opts: f"{a} {pr} {s} {sp} {d} {dst} {dp} ({' '.join(opts)})",
                  st.sampled_from(["alert", "drop", "pass", "bogus"]), st.sampled_from(["tcp", "udp", "icmp", "ip"]),
                  _nested(_leaf_addr), _nested(_leaf_port), st.sampled_from(["->", "<>", "<-"]),
                  _nested(_leaf_addr), _nested(_leaf_port), st.lists(_option, max_size=6))


@st.composite
def _mutated_rule(draw):
    r = draw(_rule)
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(r)))
        if draw(st.booleans()):
            r = r[:i] + r[i + 1:]
        else:
            r = r[:i] + draw(st.sampled_from(list("[]!,()$;:\"|\\ \n"))) + r[i:]
    return r


@settings(max_examples=300, deadline=None)
@given(st.lists(_mutated_rule(), min_size=1, max_size=3).map("\n".join))
def test_random_rule_text_only_raises_syntax_errors(text):
    # nested or unclosed lists used to recurse until RecursionError, huge or non-ASCII numbers
    # raised a bare ValueError from int()
    try:
        snort.parse_rules(text, "f.rules", _VARS)
    except SnortSyntaxError as e:
        assert str(e).startswith("f.rules:")


def test_flow_tracker_full_evicts_least_recently_used_with_bounded_work():
    ft = FlowTracker(max_flows=1000, idle_timeout=300)
    keys = [(0x0A000000 + i, 0x0A640001, 6, 1000, 80) for i in range(1100)]
    for k in keys[:1000]:
        ft.observe(k, 0.0)
    for k in keys[:500]:
        ft.observe((k[1], k[0], 6, 80, 1000), 1.0)        # replies: established, and recently used
    before = ft.swept
    for k in keys[1000:]:
        ft.observe(k, 2.0)
    assert len(ft) == 1000 and ft.evicted == 100 and ft.swept - before <= 500 + 3 * 100
    assert ft.observe(keys[0], 3.0) == (True, True)            # kept, still established
    assert ft.observe(keys[550], 3.0) == (True, False)         # evicted: starts over
    assert ft.expire(400.0, limit=10) == 10 and ft.expire(400.0) == 990 and len(ft) == 0
