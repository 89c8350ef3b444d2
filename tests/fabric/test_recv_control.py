"""`Node.recv_control` / `Port.recv_control`: the control messages waiting ahead of any data frame,
taken without a data frame and without changing any ring's or tape's order."""
from __future__ import annotations

import pytest

from shmfabric.fabric import FabricError

from .conftest import assert_conserved


def _collector(node) -> list[tuple[int, bytes]]:
    seen: list[tuple[int, bytes]] = []
    node.on_message = lambda src, payload: seen.append((src, payload))
    return seen


def test_takes_only_the_control_messages_ahead_of_data_in_each_ring(fab):
    a, b, c = fab.attach("a"), fab.attach("b"), fab.attach("c")
    seen = _collector(c)
    assert a.send_control(c.id, b"m1")
    assert a.send(c.id, b"d1" * 20)
    assert a.send_control(c.id, b"m2")  # behind a data frame: waits for recv_batch
    assert b.send_control(c.id, b"n1") and b.send_control(c.id, b"n2")  # b's ring holds only control

    assert c.recv_control() == 3
    assert sorted(seen) == sorted([(a.id, b"m1"), (b.id, b"n1"), (b.id, b"n2")])
    assert [p for s, p in seen if s == b.id] == [b"n1", b"n2"]  # a ring's order kept
    assert c.recv_control() == 0  # a's ring starts with the data frame now: nothing taken

    with c.recv_batch(16, 0) as batch:
        assert [bytes(f.payload) for f in batch] == [b"d1" * 20]
    assert seen[-1] == (a.id, b"m2")  # handed to on_message by the receive that passed the frame
    assert c.recv_control() == 0
    assert_conserved(fab)


def test_max_messages_bounds_what_one_call_takes(fab):
    a, c = fab.attach("a"), fab.attach("c")
    seen = _collector(c)
    for k in range(5):
        assert a.send_control(c.id, b"m%d" % k)
    assert c.recv_control(2) == 2
    assert c.recv_control(64) == 3
    assert [p for _, p in seen] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert_conserved(fab)


def test_a_tape_is_read_up_to_its_first_data_frame(fab):
    c, b = fab.attach("c"), fab.attach("b")
    with c.recv_batch(16, 0.2):  # b's hello, which c answers: the tape is read to its end
        pass
    b.broadcast(b"x" * 40)  # a data frame on the broadcast tape...
    d = fab.attach("d")  # ... and d's hello (a control message) behind it
    assert c.recv_control() == 0
    assert "d" not in c._peers
    with c.recv_batch(16, 0.2) as batch:
        assert len(batch) == 1 and bytes(batch[0].payload) == b"x" * 40
    assert c._peers.get("d") == d.id  # the hello came with that receive

    e = fab.attach("e")  # a hello with nothing before it: taken by recv_control
    assert c.recv_control() >= 1
    assert c._peers.get("e") == e.id


def test_bad_arguments_and_a_detached_node_are_refused(fab):
    c = fab.attach("c")
    port = c._port
    for bad in (0, -1, 65537):
        with pytest.raises(ValueError, match="max_messages must be between 1 and 65536"):
            port.recv_control(bad)
    c.detach()
    with pytest.raises(FabricError):
        port.recv_control()


def test_a_sender_that_keeps_its_ring_full_of_control_messages_starves_no_other(fab):
    # was: every call scanned the rings from node 0, so a lower-numbered node keeping 64 control
    # messages queued took every call and the manager's message was never reached
    chatty, c, mgr = fab.attach("chatty"), fab.attach("c"), fab.attach("mgr")
    assert chatty.id < c.id < mgr.id
    seen: list[int] = []
    c.on_message = lambda src, payload: seen.append(src)
    assert mgr.send_control(c.id, b"stats")
    for _ in range(50):
        while chatty.send_control(c.id, b"noise"):
            pass
        c.recv_control()
        if mgr.id in seen:
            break
    assert mgr.id in seen


def test_recv_control_clears_the_wakeup_fd_once_nothing_waits(fab):
    # was: the eventfd stayed readable after recv_control took everything, so a selector loop
    # answering control messages with recv_control spun
    import select

    a, c = fab.attach("a"), fab.attach("c")
    fd = c.fileno()
    c.recv_batch(64, 0).release()
    assert a.send_control(c.id, b"hi")
    assert select.select([fd], [], [], 5)[0]
    assert c.recv_control() == 1
    assert not select.select([fd], [], [], 0.2)[0]
    assert a.send(c.id, b"data" * 10)  # a data frame left behind keeps it readable
    assert select.select([fd], [], [], 5)[0]
    assert c.recv_control() == 0
    assert select.select([fd], [], [], 5)[0]
    c.recv_batch(64, 0).release()
