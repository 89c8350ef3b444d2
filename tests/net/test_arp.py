"""ARP view against a request packed by hand."""
import struct

import pytest

from shmfabric.net.arp import ARP
from shmfabric.net.errors import MalformedError, Reason

SHA = bytes.fromhex("020000000001")


def packed(op=1, htype=1, ptype=0x0800, hlen=6, plen=4, spa=0x0A000001, tpa=0x0A000002):
    return struct.pack("!HHBBH6sI6sI", htype, ptype, hlen, plen, op, SHA, spa, b"\0" * 6, tpa)


def test_request_fields():
    a = ARP(packed())
    assert a.is_request and not a.is_reply and not a.is_gratuitous
    assert (a.sha, a.spa, a.tha, a.tpa) == (SHA, 0x0A000001, b"\0" * 6, 0x0A000002)
    assert "10.0.0.1" in repr(a)
    assert ARP(packed(op=2, tpa=0x0A000001)).is_gratuitous


def test_truncated_and_unsupported():
    for n in range(28):
        with pytest.raises(MalformedError) as ei:
            ARP(packed()[:n])
        assert ei.value.reason is Reason.TRUNCATED_ARP
    for kw in ({"htype": 6}, {"ptype": 0x86DD}, {"hlen": 8}, {"plen": 16}):
        with pytest.raises(MalformedError) as ei:
            ARP(packed(**kw))
        assert ei.value.reason is Reason.ARP_UNSUPPORTED
