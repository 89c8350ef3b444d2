"""`shmfabric.bench.testpmd`: the dpdk-testpmd memif harness, checked against itself.

Two testpmd instances are joined over one memif socket (one server, one client) and each
test checks counts that do not depend on speed: every frame a txonly side sent is counted by
the rxonly side, a ``start tx_first`` burst (exactly 32 frames) comes back from a macswap or io
peer with the right MACs and lengths, chained (over 2048-byte) frames arrive whole, and the
failure paths raise `TestpmdError` with testpmd's own words and leave nothing behind.
The parsers are also checked on canned testpmd output, which needs no DPDK.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest

from shmfabric.bench.testpmd import (
    RUNTIME_DIR,
    Testpmd,
    TestpmdError,
    parse_forward_stats,
    parse_port_stats,
    parse_rx_dumps,
    testpmd_available,
)

_REASON = testpmd_available()
needs_testpmd = pytest.mark.skipif(_REASON is not None, reason=f"dpdk-testpmd unusable: {_REASON}")

PEER_MAC = "02:00:00:00:00:99"


def _until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `cond` until true or `timeout` s pass; the final value."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return cond()
        time.sleep(0.05)
    return True


def _gone(t: Testpmd) -> None:
    assert t.returncode is not None, "testpmd still running after close()"
    assert not os.path.exists(os.path.join(RUNTIME_DIR, t.prefix)), "EAL runtime dir left behind"


@pytest.fixture
def sock() -> Iterator[str]:
    # short path: unix socket paths are limited to 108 bytes, pytest's tmp_path can be longer
    d = tempfile.mkdtemp(prefix="shmfab-tp-", dir="/tmp")
    try:
        yield os.path.join(d, "memif.sock")
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- parsers (no DPDK needed) -----------------------------------------------------------------

PORT_STATS = """
  ######################## NIC statistics for port 0  ########################
  RX-packets: 18033600   RX-missed: 1          RX-bytes:  1803360000
  RX-errors: 2
  RX-nombuf:  3
  TX-packets: 7          TX-errors: 4          TX-bytes:  448

  Throughput (since last show)
  Rx-pps:            5          Rx-bps:            6
  Tx-pps:            7          Tx-bps:            8
  ############################################################################
"""

STOP = """
Telling cores to stop...
Waiting for lcores to finish...

  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 10             RX-dropped: 1             RX-total: 11
  TX-packets: 18033600       TX-dropped: 701536        TX-total: 18735136
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 99             RX-dropped: 99            RX-total: 99
  TX-packets: 99             TX-dropped: 99            TX-total: 99
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++

Done.
"""

DUMP = """port 0/queue 0: received 1 packets
  src=02:00:00:00:00:00 - dst=86:93:50:E8:EA:36 - pool=mb_pool_0 - type=0x0800 - length=5000 - nb_segs=3 - sw ptype: L2_ETHER
"""


def test_parse_port_stats_reads_every_counter() -> None:
    assert parse_port_stats(PORT_STATS) == {
        "rx_packets": 18033600, "rx_missed": 1, "rx_bytes": 1803360000, "rx_errors": 2, "rx_nombuf": 3,
        "tx_packets": 7, "tx_errors": 4, "tx_bytes": 448, "rx_pps": 5, "rx_bps": 6, "tx_pps": 7, "tx_bps": 8}


def test_parse_port_stats_rejects_other_text() -> None:
    with pytest.raises(TestpmdError, match="cannot read port stats"):
        parse_port_stats("Invalid port 3\n")


def test_parse_forward_stats_takes_the_port_block() -> None:
    assert parse_forward_stats(STOP) == {"rx_packets": 10, "rx_dropped": 1, "rx_total": 11,
                                         "tx_packets": 18033600, "tx_dropped": 701536, "tx_total": 18735136}


def test_parse_rx_dumps() -> None:
    assert parse_rx_dumps(DUMP) == [{"src": "02:00:00:00:00:00", "dst": "86:93:50:e8:ea:36", "type": 0x0800,
                                     "length": 5000, "nb_segs": 3}]


def test_availability_is_none_or_a_reason() -> None:
    assert _REASON is None or (isinstance(_REASON, str) and _REASON)
    assert testpmd_available("no-such-testpmd-binary").startswith("no-such-testpmd-binary not found")


def test_bad_role_is_refused() -> None:
    with pytest.raises(ValueError, match="role"):
        Testpmd("/tmp/x.sock", role="master")


# -- two live instances -----------------------------------------------------------------------

@needs_testpmd
def test_txonly_frames_are_all_counted_by_rxonly(sock: str) -> None:
    with Testpmd(sock, role="server", mode="rxonly", main_lcore=0) as rx, \
         Testpmd(sock, role="client", mode="txonly", main_lcore=1, txpkts=100, eth_peer=PEER_MAC) as tx:
        assert os.path.exists(sock), "socket-abstract=no should give a socket file"
        rx.wait_link(20)
        tx.wait_link(20)
        rx.clear_stats()
        tx.clear_stats()
        rx.start_forwarding()
        tx.start_forwarding()
        assert _until(lambda: rx.port_stats()["rx_packets"] >= 1000), "rxonly side got no frames"
        sent = tx.stop_forwarding()
        txs = tx.port_stats()
        assert txs["tx_packets"] == sent["tx_packets"] > 0
        # the ring drains into the still-running receiver: every frame sent is counted
        assert _until(lambda: rx.port_stats()["rx_packets"] == txs["tx_packets"]), \
            (rx.port_stats(), txs)
        got = rx.stop_forwarding()
        rxs = rx.port_stats()
        assert got["rx_packets"] == rxs["rx_packets"] == txs["tx_packets"]
        assert rxs["rx_bytes"] == txs["tx_bytes"] == 100 * txs["tx_packets"]
        assert rxs["rx_errors"] == rxs["rx_missed"] == txs["tx_errors"] == 0
    _gone(rx)
    _gone(tx)
    assert not os.path.exists(sock), "server's socket file left behind"


def _burst_round_trip(sock: str, peer_mode: str, segments: tuple[int, ...], mbuf_size: int | None = None
                      ) -> tuple[list[dict[str, object]], str]:
    """A (server, rxonly) sends one tx_first burst of 32 frames, B (client, `peer_mode`) sends
    them back; returns the frames A printed and A's MAC."""
    with Testpmd(sock, role="server", mode="rxonly", main_lcore=0, mbuf_size=mbuf_size, eth_peer=PEER_MAC) as a, \
         Testpmd(sock, role="client", mode=peer_mode, main_lcore=1) as b:
        a.wait_link(20)
        b.wait_link(20)
        a.set_txpkts(*segments)
        a.set_verbose(1)
        mark = a.mark()
        b.start_forwarding()
        a.start_forwarding(tx_first=True)
        assert _until(lambda: a.port_stats()["rx_packets"] >= 32), (a.port_stats(), b.port_stats())
        fa, fb = a.stop_forwarding(), b.stop_forwarding()
        sa, sb = a.port_stats(), b.port_stats()
        assert fa["tx_packets"] == sa["tx_packets"] == 32
        assert sb["rx_packets"] == sb["tx_packets"] == fb["rx_packets"] == 32
        assert sa["rx_packets"] == 32
        assert sa["rx_bytes"] == sb["rx_bytes"] == 32 * sum(segments)
        assert _until(lambda: len(a.rx_dumps(mark)) >= 32)
        a_mac = a.mac()
        dumps = a.rx_dumps(mark)
    _gone(a)
    _gone(b)
    assert len(dumps) == 32
    assert {d["length"] for d in dumps} == {sum(segments)}
    return dumps, a_mac


@needs_testpmd
def test_macswap_peer_returns_the_burst_with_macs_swapped(sock: str) -> None:
    dumps, a_mac = _burst_round_trip(sock, "macswap", (64,))
    # A sent src=own MAC, dst=PEER_MAC; macswap turns that round
    assert {(d["src"], d["dst"]) for d in dumps} == {(PEER_MAC, a_mac)}


@needs_testpmd
def test_io_peer_returns_the_burst_unchanged(sock: str) -> None:
    dumps, a_mac = _burst_round_trip(sock, "io", (64,))
    assert {(d["src"], d["dst"]) for d in dumps} == {(a_mac, PEER_MAC)}


@needs_testpmd
@pytest.mark.parametrize("segments,mbuf_size", [((2000, 2000, 1000), None), ((9000,), 9216)],
                         ids=["5000-in-3-mbufs", "9000-in-one-big-mbuf"])
def test_frames_over_one_memif_buffer_cross_whole(sock: str, segments: tuple[int, ...], mbuf_size: int | None
                                                  ) -> None:
    # over 2048 bytes the memif PMD chains buffers; no --max-pkt-len/--enable-scatter (both refused)
    dumps, _ = _burst_round_trip(sock, "macswap", segments, mbuf_size)
    assert all(d["length"] == sum(segments) for d in dumps)


@needs_testpmd
def test_client_started_before_its_server_still_links(sock: str) -> None:
    with Testpmd(sock, role="client", mode="rxonly", main_lcore=1) as c:
        assert not c.link_up()
        with Testpmd(sock, role="server", mode="rxonly", main_lcore=0) as s:
            c.wait_link(20)
            s.wait_link(20)
            assert c.link_up() and s.link_up()
    _gone(c)
    _gone(s)


@needs_testpmd
def test_link_that_never_comes_up_is_reported_with_testpmd_words(sock: str) -> None:
    with Testpmd(sock, role="server", memif_args={"secret": "one"}, main_lcore=0) as s, \
         Testpmd(sock, role="client", memif_args={"secret": "two"}, main_lcore=1) as c, \
         pytest.raises(TestpmdError) as e:
        c.wait_link(3)
    msg = str(e.value)
    assert "not up within 3s" in msg and "Incorrect secret" in msg
    assert "Infos for port" not in msg, "the harness's own polling should not fill the error tail"
    _gone(s)
    _gone(c)
    assert not os.path.exists(sock)


@needs_testpmd
def test_port_that_cannot_be_configured_fails_start(sock: str) -> None:
    t = Testpmd(sock, role="server", extra_args=["--max-pkt-len=9000"])
    with pytest.raises(TestpmdError, match="device max frame size"):
        t.start()
    _gone(t)


@needs_testpmd
def test_testpmd_that_exits_fails_start_with_its_output(sock: str) -> None:
    t = Testpmd(sock, role="server", extra_args=["--no-such-option"])
    with pytest.raises(TestpmdError, match=r"exited \(code 1\)[\s\S]*Invalid option: --no-such-option"):
        t.start()
    _gone(t)


@needs_testpmd
def test_txpkts_larger_than_an_mbuf_is_refused_not_ignored(sock: str) -> None:
    # testpmd itself only logs this and goes on sending 64-byte frames
    t = Testpmd(sock, role="server", mode="txonly", txpkts=4000)
    with pytest.raises(TestpmdError, match="did not take txpkts 4000"):
        t.start()
    _gone(t)


def test_a_testpmd_whose_interrupt_thread_panicked_at_start_is_started_once_more(tmp_path):
    # DPDK 22.11's EAL interrupt thread aborts now and then when a memif peer's connection closes
    # while testpmd starts; Testpmd.start starts it once more then (only then: any other failure,
    # or the same one twice, is raised). A stand-in binary panics on its first run.
    from shmfabric.bench.testpmd import Testpmd, TestpmdError

    marker = tmp_path / "ran"
    fake = tmp_path / "fake-testpmd"
    fake.write_text(f"""#!/bin/sh
if [ ! -e {marker} ]; then
  touch {marker}
  echo "PANIC in eal_intr_thread_main():"
  echo "Error adding fd 21 epoll_ctl, Bad file descriptor"
  kill -ABRT $$
fi
printf 'testpmd> '
read line
""")
    fake.chmod(0o755)
    tp = Testpmd(str(tmp_path / "m.sock"), role="client", binary=str(fake))
    try:
        tp.start(timeout=10)
        assert marker.exists() and "PANIC" not in tp.output()  # the second run's output only
    finally:
        tp.close()
    marker.write_text("")  # from now on the stand-in panics every time
    fake.write_text(fake.read_text().replace(f"if [ ! -e {marker} ]; then\n  touch {marker}\n", "if true; then\n"))
    tp = Testpmd(str(tmp_path / "m.sock"), role="client", binary=str(fake))
    with pytest.raises(TestpmdError, match="PANIC in eal_intr_thread_main"):
        tp.start(timeout=10)  # twice: raised
