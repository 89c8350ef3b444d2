"""Where a frame from a TAP device goes (pure: no device, no fabric)."""
from __future__ import annotations

import pytest

from shmfabric.adapters.ethernet import FLOOD, Verdict, classify, fabric_mac_node, format_mac
from shmfabric.fabric.control import node_mac

OWN = node_mac(3)


def frame(dst: bytes, payload: bytes = b"x" * 46) -> bytes:
    return dst + OWN + b"\x08\x00" + payload


@pytest.mark.parametrize("node", [0, 1, 255, 256, 1023, 0xFFFF])
def test_a_fabric_mac_names_its_node(node: int) -> None:
    assert fabric_mac_node(node_mac(node)) == node
    assert classify(frame(node_mac(node)), node_mac(0xFFFE if node != 0xFFFE else 1)) == node


@pytest.mark.parametrize("dst", [
    b"\xff" * 6,                          # broadcast (ARP requests)
    bytes.fromhex("01005e000001"),        # IPv4 multicast
    bytes.fromhex("3333ff000001"),        # IPv6 solicited-node multicast (neighbour discovery)
    bytes.fromhex("037366000000"),        # the fabric's own multicast tape address
])
def test_group_addressed_frames_are_flooded(dst: bytes) -> None:
    assert classify(frame(dst), OWN) == FLOOD


def test_frames_to_nowhere_are_dropped_with_the_reason() -> None:
    assert classify(frame(bytes.fromhex("0242ac110002")), OWN) == Verdict.FOREIGN  # a docker MAC
    assert classify(frame(bytes.fromhex("027366010001")), OWN) == Verdict.FOREIGN  # 4th byte not 0
    assert classify(frame(OWN), OWN) == Verdict.SELF
    assert classify(b"\xff" * 13, OWN) == Verdict.SHORT
    assert classify(b"", OWN) == Verdict.SHORT
    # the drop codes never collide with a node id or with FLOOD
    assert all(v < FLOOD < 0 for v in Verdict)


def test_classify_takes_memoryviews_and_bytearrays() -> None:
    f = frame(node_mac(7))
    assert classify(memoryview(f), OWN) == 7
    assert classify(bytearray(f), OWN) == 7


def test_format_mac() -> None:
    assert format_mac(node_mac(0x1234)) == "02:73:66:00:12:34"
    assert fabric_mac_node(b"\x02\x73\x66\x00\x00") is None  # 5 bytes
