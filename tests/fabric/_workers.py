"""Small node programs the fabric tests run as real processes (``python _workers.py ROLE ARGS...``).

Each role attaches to an existing fabric, does one job and prints one JSON line with its result
on stdout, so the test process can check it. Every loop is bounded by a deadline: a worker never
outlives a broken test by more than its own timeout (and the fixtures kill it anyway).

Payloads used by the traffic roles are self-checking: ``src(u16) dst(u16) seq(u32) filler...
crc32(u32)``, so a receiver can tell a lost, duplicated, reordered or torn frame apart.
"""
from __future__ import annotations

import json
import os
import random
import resource
import struct
import sys
import time
import zlib

from shmfabric.fabric import Fabric, RegionOpenError

HDR = struct.Struct("<HHI")


def make_payload(src: int, dst: int, seq: int, size: int) -> bytes:
    """A checksummed payload of `size` bytes (at least 12)."""
    body = HDR.pack(src, dst, seq)
    n = size - HDR.size - 4
    # cheap deterministic filler that differs per frame
    filler = bytes(((seq * 31 + i + src * 7) & 0xFF) for i in range(min(n, 64)))
    filler = (filler * (n // 64 + 1))[:n] if n else b""
    body += filler
    return body + struct.pack("<I", zlib.crc32(body))


def check_payload(p: bytes | memoryview) -> tuple[int, int, int]:
    """(src, dst, seq) of a payload made by make_payload; ValueError if its checksum is wrong."""
    p = bytes(p)
    if len(p) < HDR.size + 4:
        raise ValueError(f"payload of {len(p)} bytes is too short")
    (crc,) = struct.unpack_from("<I", p, len(p) - 4)
    if zlib.crc32(p[:-4]) != crc:
        raise ValueError("payload checksum mismatch (torn or corrupted frame)")
    return HDR.unpack_from(p)


def out(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def role_all_to_all(fabric: str, k: int, n: int, per_peer: int, size: int, timeout: float) -> int:
    """Node k of n: send `per_peer` frames to every other node, receive as many from each."""
    fab = Fabric.open(fabric)
    me = fab.attach(f"n{k}")
    deadline = time.monotonic() + timeout
    ids = {j: me.wait_for_peer(f"n{j}", timeout=timeout) for j in range(n) if j != k}
    next_seq = {j: 0 for j in ids}          # next seq to send to j
    expect = {j: 0 for j in ids}            # next seq expected from j (rings keep order)
    errors: list[str] = []
    by_id = {v: j for j, v in ids.items()}
    sent_total = 0
    while time.monotonic() < deadline:
        busy = False
        for j, pid in ids.items():
            s = next_seq[j]
            if s < per_peer:
                batch = [make_payload(k, j, q, size) for q in range(s, min(per_peer, s + 32))]
                sent = me.send_batch(pid, batch)
                next_seq[j] = s + sent
                sent_total += sent
                busy = True
        with me.recv_batch(256, timeout=0 if busy else 0.05) as b:
            for f in b:
                try:
                    src, dst, seq = check_payload(f.payload)
                except ValueError as e:
                    errors.append(str(e))
                    continue
                if dst != k or by_id.get(f.src) != src:
                    errors.append(f"misdelivered: src={src} dst={dst} frame.src={f.src}")
                elif seq != expect[src]:
                    errors.append(f"from {src}: got seq {seq}, expected {expect[src]}")
                    expect[src] = max(expect[src], seq + 1)
                else:
                    expect[src] += 1
        if all(v == per_peer for v in next_seq.values()) and all(v >= per_peer for v in expect.values()):
            break
    # stay attached until everybody has received everything from us
    out({"k": k, "sent": sent_total, "received": {str(j): v for j, v in expect.items()}, "errors": errors[:20],
         "n_errors": len(errors), "stats": me.stats()})
    # wait for the test to tell us to go (stdin closes), so no peer sends to a detached node
    sys.stdin.read()
    fab.close()
    return 0


def role_stream(fabric: str, name: str, peers: str, size: int, timeout: float) -> int:
    """Send to and receive from `peers` (comma-separated names) until a line on stdin or timeout.

    Prints a JSON line "ready" once attached, then, at the end, its counts. Sending to a peer
    that went away raises UnknownDestinationError; that is recorded and the peer is dropped.
    """
    import threading

    from shmfabric.fabric import UnknownDestinationError

    fab = Fabric.open(fabric)
    me = fab.attach(name)
    ids = {p: me.wait_for_peer(p, timeout=timeout) for p in peers.split(",") if p}
    out({"ready": name, "id": me.id})
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    deadline = time.monotonic() + timeout
    seq = 0
    received = 0
    gone: list[str] = []
    bad = 0
    while not stop.is_set() and time.monotonic() < deadline:
        for p, pid in list(ids.items()):
            try:
                seq += me.send_batch(pid, [make_payload(me.id, pid, seq + i, size) for i in range(16)])
            except UnknownDestinationError:
                gone.append(p)
                del ids[p]
        with me.recv_batch(256, timeout=0.001) as b:
            for f in b:
                try:
                    check_payload(f.payload)
                except ValueError:
                    bad += 1
                received += 1
    out({"name": name, "sent": seq, "received": received, "gone": gone, "bad": bad})
    sys.stdin.read()  # stay attached until the test lets us go, so no peer sees us leave
    fab.close()
    return 0


def role_victim(fabric: str, name: str, peer: str, size: int) -> int:
    """Receive from and send to `peer` forever, holding frames and buffers, until killed with -9.

    It keeps an unreleased batch and an unsent buffer at all times, so a kill always leaves
    slots behind that only reclaim can return.
    """
    fab = Fabric.open(fabric)
    me = fab.attach(name)
    pid = me.wait_for_peer(peer, timeout=10)
    held = [me.alloc() for _ in range(8)]  # allocated, never sent
    out({"ready": name, "id": me.id})
    seq = 0
    kept = None
    while True:
        try:
            seq += me.send_batch(pid, [make_payload(me.id, pid, seq + i, size) for i in range(16)])
        except Exception:  # the peer went away: keep holding our slots anyway
            pass
        b = me.recv_batch(64, timeout=0.001)
        if len(b):
            if kept is not None:
                kept.release()
            kept = b  # never release the latest batch
        held.append(held.pop(0))


def role_alloc_free(fabric: str, name: str, rounds: int, seed: int) -> int:
    """Allocate and free buffers in random bursts; also send some to ourselves and receive them."""
    rng = random.Random(seed)
    fab = Fabric.open(fabric)
    me = fab.attach(name)
    out({"ready": name, "id": me.id})
    sys.stdin.readline()  # start together with the others
    allocs = frees = nobuf = 0
    held = []
    for _ in range(rounds):
        want = rng.randrange(1, 64)
        for _ in range(want):
            try:
                held.append(me.alloc())
                allocs += 1
            except MemoryError:
                nobuf += 1
                break
        rng.shuffle(held)
        k = rng.randrange(max(0, len(held) - 100), len(held) + 1)  # hold at most ~100
        # send some through our own ring (dst = self) to exercise the ring path, free the rest
        for buf in held[:k]:
            if rng.random() < 0.3:
                with memoryview(buf) as mv:
                    mv[:4] = b"ping"
                if not me.send_buffer(me.id, buf, 4):
                    pass  # ring full: the buffer is freed when dropped below
            frees += 1
        del held[:k]
        with me.recv_batch(1024, timeout=0):
            pass
    frees += len(held)
    held.clear()
    with me.recv_batch(65536, timeout=0):
        pass
    out({"name": name, "allocs": allocs, "frees": frees, "nobuf": nobuf, "stats": me.stats()})
    fab.close()
    return 0


def role_idle_block(fabric: str, name: str, seconds: float, mode: str) -> int:
    """Block in recv_batch for `seconds` with nothing arriving; report this process's CPU time."""
    import selectors

    fab = Fabric.open(fabric)
    me = fab.attach(name)
    sel = None
    if mode == "selector":  # wait on fileno(), as an asyncio or selectors user would
        sel = selectors.DefaultSelector()
        sel.register(me.fileno(), selectors.EVENT_READ)
    else:
        me.set_wait_mode(mode)
    with me.recv_batch(1, timeout=0.05):
        pass  # let the hello traffic pass first
    out({"ready": name, "id": me.id})
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    frames = 0
    while time.monotonic() - t0 < seconds:
        if sel is not None:
            sel.select(0.25)
            with me.recv_batch(16, timeout=0) as b:
                frames += len(b)
            continue
        with me.recv_batch(16, timeout=None) as b:
            frames += len(b)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    out({"name": name, "cpu_s": cpu, "wall_s": time.monotonic() - t0, "frames": frames, "stats": me.stats()})
    fab.close()
    return 0


def role_block_recv(fabric: str, name: str, timeout: float) -> int:
    """Block (mode 'block') until one frame arrives; echo it back to its sender."""
    fab = Fabric.open(fabric)
    me = fab.attach(name)
    me.set_wait_mode("block")
    out({"ready": name, "id": me.id})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with me.recv_batch(1, timeout=deadline - time.monotonic()) as b:
            if len(b):
                f = b[0]
                src, data = f.src, f.tobytes()
                break
    else:
        out({"name": name, "got": None})
        return 1
    me.send(src, data[::-1])
    out({"name": name, "got": data.hex(), "wakeups": me.stats()["wakeups"]})
    sys.stdin.read()
    fab.close()
    return 0


def role_attach_hold(fabric: str, name: str) -> int:
    """Attach, report, and hold on until killed (or stdin closes)."""
    fab = Fabric.open(fabric)
    me = fab.attach(name)
    b = me.alloc()  # hold a slot so reclaim has something to return
    out({"ready": name, "id": me.id})
    sys.stdin.read()
    del b
    fab.close()
    return 0


def role_open(path: str) -> int:
    """Open a region file; print the error class and message (or "ok"). Never crashes."""
    try:
        fab = Fabric.open(path)
    except RegionOpenError as e:
        out({"error": type(e).__name__, "message": str(e)})
        return 0
    out({"error": None, "nodes": len(fab.nodes())})
    fab.close()
    return 0


def role_eph_create(fabric: str) -> int:
    """Create an ephemeral fabric, attach to it, report, and hold on until stdin closes (or -9)."""
    fab = Fabric.create(fabric, ephemeral=True, max_nodes=4, networks=[{"mtu": 1500, "slots": 256}])
    me = fab.attach("creator")
    out({"ready": "creator", "id": me.id, "path": str(fab.path)})
    sys.stdin.read()
    fab.close()
    return 0


def role_broadcaster(fabric: str, name: str, count: int, seed: int) -> int:
    """Broadcast `count` checksummed frames of random sizes as fast as possible, then report."""
    rng = random.Random(seed)
    fab = Fabric.open(fabric)
    me = fab.attach(name)
    out({"ready": name, "id": me.id})
    sys.stdin.readline()  # go
    for s in range(count):
        me.broadcast(make_payload(me.id, 0xFFFF, s, rng.randint(12, 1000)))
    out({"name": name, "sent": count})
    sys.stdin.read()
    fab.close()
    return 0


def role_sink(fabric: str, name: str, seconds: float) -> int:
    """Receive and release for `seconds`, then detach while senders are still sending to us."""
    fab = Fabric.open(fabric)
    me = fab.attach(name)
    out({"ready": name, "id": me.id})
    end = time.monotonic() + seconds
    frames = 0
    while time.monotonic() < end:
        with me.recv_batch(1024, timeout=0.01) as b:
            frames += len(b)
    fab.close()  # detach: our rings go down with frames still arriving
    out({"name": name, "frames": frames})
    return 0


def _blast(fabric: str, name: str, target: str, timeout: float, batches: list[list[bytes]]) -> int:
    """Send `batches` round robin to whichever node is called `target` (looked up before every
    batch), until stdin has a line; report what was sent and refused."""
    import threading

    from shmfabric.fabric import UnknownDestinationError

    fab = Fabric.open(fabric)
    me = fab.attach(name)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    out({"ready": name, "id": me.id})
    sent = refused = k = 0
    deadline = time.monotonic() + timeout
    while not stop.is_set() and time.monotonic() < deadline:
        dst = fab.node_id(target)
        if dst is None:
            time.sleep(0.0002)
            continue
        try:
            sent += me.send_batch(dst, batches[k % len(batches)])
            k += 1
        except UnknownDestinationError:
            refused += 1
    out({"name": name, "sent": sent, "refused": refused})
    sys.stdin.read()
    fab.close()
    return 0


def role_blaster(fabric: str, name: str, target: str, timeout: float) -> int:
    """Send big batches of large frames to whichever node is called `target`, until stdin has a line."""
    return _blast(fabric, name, target, timeout, [[b"\xab" * 1400] * 256])


def role_checked_blaster(fabric: str, name: str, target: str, timeout: float) -> int:
    """Like blaster, with checksummed frames in batches of 64. Most of the time is spent inside
    send_batch copying, so a SIGSTOP usually lands between reserving ring entries and publishing."""
    return _blast(fabric, name, target, timeout, [[make_payload(0, 0, b * 64 + i, 1400) for i in range(64)]
                                                  for b in range(8)])


def role_checking_sink(fabric: str, name: str) -> int:
    """Receive and check every frame (checksum); on each stdin line print what was received and
    how many frames were torn or corrupted so far; run until killed or stdin closes."""
    import threading

    fab = Fabric.open(fabric)
    me = fab.attach(name)
    lock = threading.Lock()
    counts = {"received": 0, "bad": 0}

    stop = threading.Event()

    def report() -> None:
        for _ in sys.stdin:
            with lock:
                out(dict(counts))
        stop.set()

    threading.Thread(target=report, daemon=True).start()
    out({"ready": name, "id": me.id})
    while not stop.is_set():
        with me.recv_batch(1024, timeout=0.05) as b:
            bad = 0
            for f in b:
                try:
                    check_payload(f)
                except ValueError:
                    bad += 1
            with lock:
                counts["received"] += len(b)
                counts["bad"] += bad
    fab.close()
    return 0


def role_tape_hammer(fabric: str, name: str, size: int) -> int:
    """Broadcast big checksummed frames in a loop until killed (so a kill often lands while this
    process holds the tape's writer lock)."""
    fab = Fabric.open(fabric)
    me = fab.attach(name)
    out({"ready": name, "id": me.id})
    # precomputed, so the loop spends most of its time inside tape_send (under the lock)
    frames = [make_payload(me.id, 0xFFFF, s, size) for s in range(4)]
    while True:
        for f in frames:
            me.broadcast(f)


def role_send_then_hold(fabric: str, name: str, target: str, count: int) -> int:
    """Send `count` checksummed frames to `target`, report, and wait to be killed."""
    fab = Fabric.open(fabric)
    me = fab.attach(name)
    dst = me.wait_for_peer(target, timeout=10)
    sent = 0
    while sent < count:
        sent += me.send_batch(dst, [make_payload(me.id, dst, s, 500) for s in range(sent, min(count, sent + 64))])
    out({"ready": name, "id": me.id, "sent": sent})
    sys.stdin.read()
    return 0


def role_send_buffer_on_go(fabric: str, name: str, target: str) -> int:
    """Attach, fill a buffer and report its slot (from its address in our mapping of the region);
    on a line from stdin send it to `target` and report what the send said; then wait."""
    import ctypes

    from shmfabric.core.region import L

    fab = Fabric.open(fabric)
    me = fab.attach(name)
    dst = me.wait_for_peer(target, timeout=10)
    buf = me.alloc()
    with memoryview(buf) as v:
        v[:5] = b"zomb!"
        addr = ctypes.addressof(ctypes.c_char.from_buffer(v))
    with memoryview(fab.region.mm) as whole:
        base = ctypes.addressof(ctypes.c_char.from_buffer(whole))
    lay = fab.region.layout
    _, _, off_owner, off_slots = lay.net_offsets[me.network]
    slot = (addr - base - off_slots) // lay.networks[me.network].slot_size
    out({"ready": name, "id": me.id, "slot": slot, "owner_offset": off_owner + 4 * slot})
    sys.stdin.readline()
    try:
        res: object = me.send_buffer(dst, buf, 5)
    except Exception as exc:  # (the node was reclaimed meanwhile)
        res = type(exc).__name__
    out({"sent": res})
    sys.stdin.read()
    return 0


def role_attach_at(fabric: str, name: str, at: float) -> int:
    """Attach as `name` at wall-clock time `at` (so several processes race); report ok or dup."""
    from shmfabric.fabric import AttachError

    fab = Fabric.open(fabric)
    while time.time() < at:
        pass  # spin: sleeping would spread the start times out
    try:
        me = fab.attach(name)
        out({"ok": True, "id": me.id})
    except AttachError as e:
        out({"ok": False, "error": str(e)})
    sys.stdin.read()
    fab.close()
    return 0


def role_fork_child(fabric: str, child_exit: str) -> int:
    """Attach two nodes, fork; the child tries the inherited node, then exits (`child_exit`:
    "normal" runs interpreter shutdown and finalizers, "os_exit" skips them). The parent then
    checks that its nodes and the pool are untouched."""
    from shmfabric.fabric import FabricError

    fab = Fabric.open(fabric)
    a, b = fab.attach("a"), fab.attach("b")
    assert a.send_batch(b.id, [b"held"] * 4) == 4
    held = b.recv_batch(4, timeout=1)  # frames in hand across the fork
    buf = a.alloc()
    pid = os.fork()
    if pid == 0:
        try:
            a.send(b.id, b"from the child")
            child = "inherited node usable"
        except FabricError as e:
            child = str(e)
        with open(f"/tmp/{fabric}.child", "w") as f:
            f.write(child)
        if child_exit == "os_exit":
            os._exit(0)
        sys.exit(0)
    _, status = os.waitpid(pid, 0)
    with open(f"/tmp/{fabric}.child") as f:
        child = f.read()
    os.unlink(f"/tmp/{fabric}.child")
    res = {"child_status": status, "child": child, "a_up": fab.node_id("a") == a.id,
           "b_up": fab.node_id("b") == b.id}
    try:
        res["held"] = [f.tobytes().decode() for f in held]
        held.release()
        del buf
        res["sent_after"] = a.send(b.id, b"after")
        with b.recv_batch(16, timeout=1) as bt:
            res["got_after"] = [f.tobytes().decode() for f in bt]
    except FabricError as e:
        res["error_after"] = f"{type(e).__name__}: {e}"
    audit = fab.pool_audit()
    res["audit"] = audit
    out(res)
    sys.stdin.read()
    fab.close()
    return 0


def role_open_and_use(path: str) -> int:
    """Open a region file, attach two nodes and move frames; print what happened. A corrupt
    region may refuse to open or run dry, but must never crash the process."""
    from shmfabric.fabric import FabricError

    try:
        fab = Fabric.open(path)
    except RegionOpenError as e:
        out({"opened": False, "error": type(e).__name__, "message": str(e)})
        return 0
    res: dict = {"opened": True}
    try:
        a, b = fab.attach("a"), fab.attach("b")
        sent = 0
        for _ in range(20):
            sent += a.send_batch(b.id, [b"x" * 100] * 16)
            with b.recv_batch(256, timeout=0) as bt:
                res["received"] = res.get("received", 0) + len(bt)
        res["sent"] = sent
        try:
            bufs = [a.alloc() for _ in range(200)]
            res["allocated"] = len(bufs)
        except MemoryError as e:
            res["alloc_error"] = str(e)
    except (FabricError, MemoryError) as e:
        res["error"] = f"{type(e).__name__}: {e}"
    out(res)
    return 0


def role_hold_pool_lock(fabric: str) -> int:
    """Take the region's pool lock (as a reclaim or a sweep does), report, and hold it until
    killed: what a process stopped or killed in the middle of one leaves."""
    import ctypes

    from shmfabric.core.region import L

    fab = Fabric.open(fabric)
    mm = fab.region.mm
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mm, L["sf_superblock.pool_lock"]))
    rc = ctypes.CDLL(None).pthread_mutex_lock(ctypes.c_void_p(addr))
    out({"locked": rc})
    sys.stdin.read()
    return 0


def role_hold_tape_lock(fabric: str) -> int:
    """Take the broadcast tape's writer lock (as a writer in the middle of an entry does), report,
    and hold it until killed: what a process stopped (SIGSTOP) inside a broadcast leaves."""
    import ctypes

    fab = Fabric.open(fabric)
    lay = fab.region.layout
    addr = ctypes.addressof(ctypes.c_char.from_buffer(fab.region.mm, lay.off_tapes))  # tape 0's lock comes first
    rc = ctypes.CDLL(None).pthread_mutex_lock(ctypes.c_void_p(addr))
    out({"locked": rc})
    sys.stdin.read()
    return 0


def role_reclaim_and_die(fabric: str, victim: str) -> int:
    """Do what a reclaim does first (take the pool lock, move the dead victim's entry to RECLAIM),
    report, and stop there until killed: a reclaimer killed half-way through."""
    import ctypes

    from shmfabric.core import native
    from shmfabric.core.region import L

    fab = Fabric.open(fabric)
    region = fab.region
    addr = ctypes.addressof(ctypes.c_char.from_buffer(region.mm, L["sf_superblock.pool_lock"]))
    rc = ctypes.CDLL(None).pthread_mutex_lock(ctypes.c_void_p(addr))
    out({"locked": rc})
    sys.stdin.readline()  # the victim is dead now
    idx = next(i for i in range(region.node_hwm()) if region.node_entry(i)["name"] == victim)
    ok = region.core.cas_node_state(idx, native.NODE_UP, native.NODE_RECLAIM)
    out({"id": idx, "cas": ok, "state": region.core.node_state(idx)})
    sys.stdin.read()
    return 0


def role_wait_reclaimed(fabric: str, name: str, mode: str, how: str) -> int:
    """Attach, then wait on the node for ever (`how`: recv = recv_batch(timeout=inf), wait =
    wait(inf), notifier = the fileno() wake-up thread) and report how the wait ended. The test
    stops this process meanwhile, reclaims the node and lets another take its id."""
    import select

    fab = Fabric.open(fabric)
    me = fab.attach(name)
    me.set_wait_mode(mode)
    while True:  # nothing pending (the test's hellos), so the wait below really waits
        b = me._port.recv_batch(1024, 0)
        n, ctl = len(b), b.control
        b.release()
        if not n and ctl is None:
            break
    fd = me._port.fileno() if how == "notifier" else None
    out({"id": me.id, "gen": me._gen})
    res: dict = {}
    try:
        if how == "recv":
            with me._port.recv_batch(64, float("inf")) as b:
                res["got"] = [f.tobytes().decode() for f in b]
        elif how == "wait":
            res["got"] = me._port.wait(float("inf"))
        else:
            sys.stdin.readline()  # the test has looked at the entry after the resume
            res["readable"] = bool(select.select([fd], [], [], 2.0)[0])
            with me._port.recv_batch(64, 0) as b:
                res["got"] = [f.tobytes().decode() for f in b]
    except Exception as e:  # noqa: BLE001 - reported to the test
        res["error"] = type(e).__name__
    out(res)
    sys.stdin.read()
    return 0


ROLES = {
    "hold_tape_lock": (role_hold_tape_lock, (str,)),
    "reclaim_and_die": (role_reclaim_and_die, (str, str)),
    "open_and_use": (role_open_and_use, (str,)),
    "fork_child": (role_fork_child, (str, str)),
    "attach_at": (role_attach_at, (str, str, float)),
    "tape_hammer": (role_tape_hammer, (str, str, int)),
    "send_then_hold": (role_send_then_hold, (str, str, str, int)),
    "send_buffer_on_go": (role_send_buffer_on_go, (str, str, str)),
    "sink": (role_sink, (str, str, float)),
    "blaster": (role_blaster, (str, str, str, float)),
    "checked_blaster": (role_checked_blaster, (str, str, str, float)),
    "checking_sink": (role_checking_sink, (str, str)),
    "eph_create": (role_eph_create, (str,)),
    "broadcaster": (role_broadcaster, (str, str, int, int)),
    "all_to_all": (role_all_to_all, (str, int, int, int, int, float)),
    "stream": (role_stream, (str, str, str, int, float)),
    "victim": (role_victim, (str, str, str, int)),
    "alloc_free": (role_alloc_free, (str, str, int, int)),
    "idle_block": (role_idle_block, (str, str, float, str)),
    "block_recv": (role_block_recv, (str, str, float)),
    "attach_hold": (role_attach_hold, (str, str)),
    "hold_pool_lock": (role_hold_pool_lock, (str,)),
    "open": (role_open, (str,)),
    "wait_reclaimed": (role_wait_reclaimed, (str, str, str, str)),
}


def main(argv: list[str]) -> int:
    fn, types = ROLES[argv[0]]
    if len(argv) - 1 != len(types):
        raise SystemExit(f"{argv[0]} takes {len(types)} arguments, got {len(argv) - 1}")
    return fn(*(t(a) for t, a in zip(types, argv[1:])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
