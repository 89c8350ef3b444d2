"""Reasons, their text, MalformedError and ReasonCounter."""
from shmfabric.net.errors import MalformedError, Reason, ReasonCounter


def test_reasons():
    assert not Reason.NOT_IP.malformed and not Reason.FRAGMENT.malformed
    assert all(r.malformed for r in Reason if r >= 100)
    assert all(r.describe() and r < 256 for r in Reason)
    e = MalformedError(Reason.TRUNCATED_TCP, 34, "header is 24 bytes")
    assert isinstance(e, ValueError) and e.reason is Reason.TRUNCATED_TCP and e.offset == 34
    assert str(e) == "TCP header runs past the end of the packet (at byte 34): header is 24 bytes"


def test_counter():
    c = ReasonCounter()
    c.add(Reason.NOT_IP)
    c.add(Reason.TRUNCATED_UDP, 3)
    assert c[Reason.TRUNCATED_UDP] == 3 and c.malformed == 3
    assert list(c.as_dict()) == ["not_ip", "truncated_udp"]
