"""The fabric's Python API: create or open a fabric, attach nodes, exchange frames.

    fab = Fabric.create("demo", ephemeral=True)
    a = fab.attach("a")
    ...
    with a.recv_batch(timeout=1.0) as batch:
        for frame in batch:
            use(frame.src, frame.ethertype, frame.payload)

Hot-path methods of a Node are the compiled core's own methods bound at attach time, so a call
costs what a C method call costs.
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable

from shmfabric.core import native
from shmfabric.core.errors import (
    AttachError,
    BadMagicError,
    FabricError,
    FabricFullError,
    NameInUseError,
    RegionCreateError,
    RegionOpenError,
    UnknownDestinationError,
)
from shmfabric.core.liveness import BEAT, node_alive, sweep
from shmfabric.core.region import (
    FLAG_EPHEMERAL,
    FabricConfig,
    MappedRegion,
    NetworkSpec,
    has_region_magic,
    pid_namespace,
    proc_start_time,
    region_path,
)
from shmfabric.fabric import control

DETACH_LOCK_WAIT = 5.0  # seconds detach retries a busy pool lock before leaving it to the watchdog
# How long attach's HELLO and detach's BYE wait for the broadcast tape's writer lock. A writer
# holds it for microseconds; one stopped while holding it (SIGSTOP, a debugger) would otherwise
# hang every attach and detach in the fabric. The announcement is skipped with a warning: it only
# speeds up discovery (peers() and node_id() read the node table, which attach and detach update
# regardless), so skipping it keeps the fabric usable, where failing the attach would not.
ANNOUNCE_LOCK_WAIT = 0.2
WAIT_MODES = {"poll": native.WAIT_POLL, "block": native.WAIT_BLOCK, "adaptive": native.WAIT_ADAPTIVE}
STATE_NAMES = {native.NODE_FREE: "free", native.NODE_ATTACHING: "attaching", native.NODE_UP: "up",
               native.NODE_RECLAIM: "reclaiming", native.NODE_DOWN: "down"}


def _networks(networks: Iterable[NetworkSpec | dict | int] | None) -> tuple[NetworkSpec, ...]:
    if networks is None:
        return (NetworkSpec(),)
    out = []
    for n in networks:
        if isinstance(n, NetworkSpec):
            out.append(n)
        elif isinstance(n, int):
            out.append(NetworkSpec(mtu=n))
        elif isinstance(n, dict):
            unknown = set(n) - {"mtu", "slots", "headroom"}
            if unknown:
                raise RegionCreateError(f"unknown network setting(s) {sorted(unknown)}; use mtu, slots, headroom")
            out.append(NetworkSpec(**n))
        else:
            raise RegionCreateError(f"a network is given as NetworkSpec, dict or MTU int, not {type(n).__name__}")
    return tuple(out)


class _Watchdog:
    """One thread per process: heartbeats for this process's nodes, and reclaim of dead ones."""

    def __init__(self, fabric: "Fabric"):
        self._fabric = weakref.ref(fabric)
        self._stop = threading.Event()
        self.reclaimed: list[tuple[int, str, int]] = []
        self._thread = threading.Thread(target=self._run, name="shmfabric-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(BEAT):
            fab = self._fabric()
            if fab is None or fab._region is None:
                return
            try:
                for node in list(fab._nodes.values()):
                    node._port.heartbeat()
                for entry in list(fab._detaching):  # detached while the pool lock was busy
                    if fab._region.core.reclaim(entry[0], native.NODE_UP, entry[1]) != -2:
                        fab._detaching.remove(entry)
                self.reclaimed.extend(sweep(fab._region))
            except (FabricError, ValueError, OSError):
                # the mapping went away under us (closing): nothing left to watch
                return
            del fab

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2)


class Fabric:
    """A shared-memory fabric: one region file mapped by every node."""

    def __init__(self, region: MappedRegion, owner: bool = False):
        self._region: MappedRegion | None = region
        self._nodes: dict[int, Node] = {}
        self._detaching: list[tuple[int, int]] = []  # (id, incarnation) detached, not yet reclaimed
        self._attach_lock = threading.Lock()
        self._pid = os.getpid()  # nodes belong to this process, not to children forked later
        self._owner = owner
        self._watchdog = _Watchdog(self)

    # -- lifecycle -------------------------------------------------------------------------------
    @classmethod
    def create(cls, name: str, *, max_nodes: int = 32, ring_size: int = 1024,
               networks: Iterable[NetworkSpec | dict | int] | None = None, n_mcast: int = 4,
               tape_entries: int = 256, tape_entry_size: int = 2048, ephemeral: bool = False,
               mode: int = 0o600, group: int | str | None = None, exist_ok: bool = False) -> "Fabric":
        """Create fabric `name` (file /dev/shm/shmfabric-NAME) and map it.

        An ephemeral fabric's file is removed once no node of it is left, however they ended.
        Raises RegionCreateError with the reason and the fix.
        """
        cfg = FabricConfig(max_nodes, ring_size, _networks(networks), n_mcast, tape_entries, tape_entry_size)
        region = MappedRegion.create(name, cfg, ephemeral=ephemeral, mode=mode, group=group, exist_ok=exist_ok)
        if ephemeral:
            start = proc_start_time(os.getpid())
            subprocess.Popen([sys.executable, "-m", "shmfabric.core.reaper", str(region.path), str(os.getpid()),
                              str(start)], start_new_session=True, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)
        return cls(region, owner=True)

    @classmethod
    def open(cls, name: str) -> "Fabric":
        """Map an existing fabric. Raises RegionOpenError (not found, bad magic, version, truncated, corrupt)."""
        return cls(MappedRegion.open(name))

    @staticmethod
    def destroy(name: str) -> bool:
        """Remove fabric `name`'s file. Nodes that still map it keep working until they detach.

        False if there is no such file. A fabric named by a path (anything with a '/') must be
        a region (its magic number is read first): a slip such as ``destroy examples/edge.yaml``
        raises RegionOpenError and removes nothing. A name (the file shmfabric-NAME in
        /dev/shm) is removed even half made, so a creation that died can be cleaned up. A file
        this user may not remove (another user's, in sticky /dev/shm) raises FabricError naming
        its owner (uid and user name).
        """
        path = region_path(name)
        if "/" in name:
            try:
                is_region = has_region_magic(path)
            except FileNotFoundError:
                return False
            except IsADirectoryError:
                raise BadMagicError(f"{path} is a directory, not a shmfabric region: not removed") from None
            except OSError as exc:
                raise RegionOpenError(f"{path}: {exc.strerror}: not removed") from None
            if not is_region:
                raise BadMagicError(f"{path} is not a shmfabric region (its first bytes are not the fabric magic "
                                    "number): not removed; name a fabric, or give the path of its region file")
        try:
            path.unlink()
            return True
        except FileNotFoundError:
            return False
        except PermissionError as exc:
            # /dev/shm is sticky: only the file's owner (or root) may remove it (another user's
            # fabric of the same name, e.g. root's `make run`)
            try:
                uid = os.lstat(path).st_uid
            except OSError as err:
                raise FabricError(f"cannot remove {path} ({exc.strerror}; its owner cannot be told: "
                                  f"{err.strerror})") from None
            if uid == os.geteuid():
                raise FabricError(f"cannot remove {path} ({exc.strerror}): it is yours (uid {uid}), but its "
                                  f"directory {path.parent} does not let you remove files") from None
            try:
                import pwd

                user = pwd.getpwuid(uid).pw_name
            except KeyError:
                user = "no user name"
            raise FabricError(f"cannot remove {path} ({exc.strerror}): it belongs to uid {uid} ({user}), and "
                              "only its owner or root may remove it; ask its owner to remove it, or choose "
                              "another fabric name") from None

    def close(self) -> None:
        """Detach this process's nodes and unmap the region.

        A node with memoryviews of its buffers or frames still alive cannot detach (BufferError,
        see Node.detach): every other node is detached, then BufferError names the nodes left.
        The fabric stays open with them attached (and their heartbeats going); release the
        views and call close() again."""
        if self._region is None:
            return
        child = os.getpid() != self._pid
        # in a forked child the watchdog and the nodes inherited from the parent are the
        # parent's (left attached); only the nodes the child attached itself are detached
        left = self._detach_all(lambda node: not child or node._pid == os.getpid())
        if child:
            self._nodes = {node.id: node for node in left}
        if left:
            names = ", ".join(f"{node.name!r} (id {node.id})" for node in left)
            raise BufferError(f"fabric {self.name!r} not closed: node(s) {names} still have memoryviews of their "
                              "buffers or frames and stay attached; release them and call close() again (the "
                              "other nodes were detached)")
        if not child:
            self._watchdog.stop()
        self._nodes.clear()
        region, self._region = self._region, None
        region.close()

    def _detach_all(self, which: Callable[["Node"], bool]) -> list["Node"]:
        """Detach every node `which` selects that can be; the ones refused (views alive) are returned."""
        left = []
        for node in list(self._nodes.values()):
            if not which(node):
                continue
            try:
                node.detach()
            except BufferError:
                left.append(node)
        return left

    def __enter__(self) -> "Fabric":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- properties -----------------------------------------------------------------------------
    @property
    def region(self) -> MappedRegion:
        if self._region is None:
            raise FabricError("fabric is closed")
        return self._region

    @property
    def name(self) -> str:
        return self.region.name

    @property
    def path(self) -> Path:
        return self.region.path

    @property
    def ephemeral(self) -> bool:
        return bool(self.region.flags & FLAG_EPHEMERAL)

    @property
    def networks(self) -> tuple[NetworkSpec, ...]:
        return self.region.layout.networks

    # -- nodes ---------------------------------------------------------------------------------
    def attach(self, name: str, network: int = 0) -> "Node":
        """Attach a node called `name` to `network`; returns its Node. Names are unique among live nodes."""
        region = self.region
        if not name or len(name.encode()) > 31:
            raise AttachError(f"node name {name!r} must be 1..31 bytes")
        if not 0 <= network < len(region.layout.networks):
            raise AttachError(f"network {network} does not exist; this fabric has networks "
                              f"0..{len(region.layout.networks) - 1}")
        # The name check and the claim must be one step, or processes attaching the same name at
        # once all pass the check. An flock on the region file serialises attaches across
        # processes (and namespaces sharing the file) and is dropped by the kernel if its holder
        # dies; the thread lock does the same between threads, which share the file description.
        with self._attach_lock:
            fcntl.flock(region.fd, fcntl.LOCK_EX)
            try:
                # a dead holder of the name should not block it; under the lock no claim is in
                # flight, so entries left ATTACHING by a dead attacher can be taken back too
                sweep(region, attaching=True)
                for i in range(region.node_hwm()):
                    if region.core.node_state(i) == native.NODE_UP:
                        e = region.node_entry(i)
                        if e["name"] == name:
                            raise NameInUseError(f"a node named {name!r} is already attached (id {i}, pid {e['pid']}); "
                                              "choose another name or detach it")
                pid = os.getpid()
                idx = region.core.claim_node(name, network, pid, proc_start_time(pid) or 0, pid_namespace())
            finally:
                fcntl.flock(region.fd, fcntl.LOCK_UN)
        if idx < 0:
            raise FabricFullError(f"fabric {self.name!r} is full ({region.layout.max_nodes} nodes); "
                              "detach a node or create the fabric with a larger max_nodes")
        node = Node(self, idx, name, network)
        self._nodes[idx] = node
        node._announce(control.HELLO)  # skipped with a warning if the tape stays locked
        return node

    def nodes(self) -> list[dict]:
        """Every node entry in use, with its state, pid, liveness and counters, sorted by id."""
        region = self.region
        out = []
        for i in range(region.node_hwm()):
            state = region.core.node_state(i)
            if state == native.NODE_FREE:
                continue
            e = region.node_entry(i)
            e["state"] = STATE_NAMES.get(state, str(state))
            e["alive"] = node_alive(e)
            e["id"] = i
            out.append(e)
        return out

    def node_id(self, name: str) -> int | None:
        """The id of the live node called `name`, or None."""
        ref = self.node_ref(name)
        return None if ref is None else ref[0]

    def node_ref(self, name: str) -> tuple[int, int] | None:
        """(id, incarnation) of the live node called `name`, or None. Ids are reused when nodes
        restart; pass the incarnation to `send_batch`/`forward_where` (`incarnation=`) and the
        send fails once another node has the id."""
        return self.node_refs((name,)).get(name)

    def node_refs(self, names) -> dict[str, tuple[int, int]]:
        """`node_ref` of each of `names` that is live, in one pass over the node table."""
        wanted = set(names)
        region = self.region
        core = region.core
        out: dict[str, tuple[int, int]] = {}
        for i in range(region.node_hwm()):
            if core.node_state(i) != native.NODE_UP:
                continue
            e = region.node_entry(i)
            # Checked again after the read: the entry belongs to the node we read only if it
            # was up, with the same incarnation, on both sides of it.
            if e["name"] in wanted and e["name"] not in out and core.node_state(i) == native.NODE_UP \
                    and region.node_entry(i)["gen"] == e["gen"]:
                out[e["name"]] = (i, e["gen"])
        return out

    def pool_audit(self, network: int = 0) -> dict:
        """Slot accounting of a network's pool.

        ``total`` slots; ``free``: owned by no node; ``held``: per live node id; ``orphaned``:
        tagged for a node that is gone (its reclaim returns them); ``stack_count``: the free
        stack's own count; ``on_stack``: the slots a walk of the free stack reaches (exact while
        no node moves slots; -1 if the stack changed under the walk). With no node moving slots,
        ``free == stack_count == on_stack``; a ``free`` above ``on_stack`` means slots lost by a
        node killed inside a free-stack operation, which ``sweep()`` gives back.
        """
        total, stack, owners = self.region.core.pool_audit(network)
        held: dict[int, int] = {}
        unknown = 0
        live_tags = {}
        for e in self.nodes():
            if e["state"] == "up":
                live_tags[((e["gen"] & 0xFFFF) << 16) | (e["index"] + 1)] = e["index"]
        for tag, count in owners.items():
            if tag == 0:
                continue
            if tag in live_tags:
                held[live_tags[tag]] = held.get(live_tags[tag], 0) + count
            else:
                unknown += count
        return {"total": total, "free": owners.get(0, 0), "stack_count": stack, "held": held, "orphaned": unknown,
                "on_stack": self.region.core.stack_walk(network)}

    def sweep(self, force: bool = False) -> int:
        """Give back the slots a node killed inside a free-stack operation left owned by nobody
        and reachable from no stack. Runs on its own after such a kill (the dead node's reclaim
        starts it); ``force`` runs it regardless. Every pool operation waits while it runs (one
        pass over the owner table, at most 2 ms: a node held off longer cancels it). Returns
        the slots given back, or -1 if it could not look undisturbed (a node stayed inside a
        pool operation or cancelled it, or a reclaim held the lock: a later call tries again).
        Raises CoreError if a free stack is corrupt."""
        return self.region.core.sweep(force=force)

    def ring_stats(self, src: int, dst: int) -> dict:
        """Indices and counters of the ring from node src to node dst."""
        head, tail, down, enq, deq, full = self.region.core.ring_stats(src, dst)
        return {"src": src, "dst": dst, "depth": (head - tail) & 0xFFFFFFFF, "down": bool(down),
                "enqueued": enq, "dequeued": deq, "full_events": full}

    def inspect(self) -> dict:
        """Layout, nodes, pools and live ring counters, as plain data (what `shmfabric inspect` prints)."""
        r = self.region
        sb = r.superblock()
        nodes = self.nodes()
        ids = [n["id"] for n in nodes]
        rings = []
        for s in ids:
            for d in ids:
                if s != d:
                    st = self.ring_stats(s, d)
                    if st["enqueued"] or st["depth"]:
                        rings.append(st)
        nets = []
        for i, spec in enumerate(r.layout.networks):
            a = self.pool_audit(i)
            nets.append({"index": i, "mtu": spec.mtu, "slots": spec.slots, "slot_size": spec.slot_size,
                         "free": a["free"], "held": sum(a["held"].values()), "orphaned": a["orphaned"]})
        return {
            "name": r.name, "path": str(r.path), "size": sb["total_size"], "version": sb["version"],
            "ephemeral": self.ephemeral, "max_nodes": sb["max_nodes"], "ring_size": sb["ring_size"],
            "multicast_groups": sb["n_mcast"], "tape_entries": sb["tape_entries"],
            "creator_pid": sb["creator_pid"], "networks": nets, "nodes": nodes, "rings": rings,
        }


class Node:
    """A process's place on the fabric: sends to and receives from other nodes.

    Frames are addressed by node id. Hot-path methods (bound from the compiled core):

    - ``send(dst, payload, ethertype=0x88B5, meta=0) -> bool`` (False: ring full)
    - ``send_batch(dst, payloads, ethertype=0x88B5, meta=0, incarnation=0) -> int`` (how many were sent)
    - ``alloc() -> Buffer`` and ``send_buffer(dst, buf, length, ethertype=0x88B5) -> bool`` (zero copy)
    - ``forward(dst, frame) -> bool`` and ``forward_batch(dst, batch) -> int`` (zero copy)
    - ``forward_where(dst, batch, codes, code, incarnation=0) -> int``: the frames i with codes[i] == code (zero copy)
    - ``wait(timeout=None) -> bool``

    Ids are reused when nodes restart. `incarnation` (the second half of `Fabric.node_ref(name)`;
    0: any) makes a send fail with `UnknownDestinationError` once another incarnation holds the
    id, so frames meant for a node never reach another that took its id.
    """

    def __init__(self, fabric: Fabric, index: int, name: str, network: int):
        self._fabric = fabric
        self.id = index
        self.name = name
        self.network = network
        self._port = port = native.Port(fabric.region.core, index)
        self._pid = os.getpid()  # the process that attached it: only it may detach it (fork)
        self._gen: int = fabric.region.node_entry(index)["gen"]  # our incarnation, for detach's reclaim
        self.mac: bytes = port.mac
        self._peers: dict[str, int] = {}
        self._groups: set[int] = set()
        self.mtu = fabric.region.layout.networks[network].mtu
        # bound C methods: no Python frame between the user and the core
        self.send = port.send
        self.send_batch = port.send_batch
        self.alloc = port.alloc
        self.send_buffer = port.send_buffer
        self.forward = port.forward
        self.forward_batch = port.forward_batch
        self.forward_where = port.forward_where
        self.wait = port.wait

    def __repr__(self) -> str:
        return f"<Node {self.name!r} id={self.id} fabric={self._fabric.name!r}>"

    def recv_batch(self, max_frames: int = 256, timeout: float | None = None) -> native.FrameBatch:
        """Receive up to `max_frames` frames as zero-copy views, valid until the batch is released.

        timeout: 0 returns at once; a number waits up to that many seconds; None waits until
        frames arrive, returning an empty batch every 0.2 s at most so signals are handled.
        Use as a context manager, or call ``batch.release()``, to give the slots back.
        """
        batch = self._port.recv_batch(max_frames, timeout)
        ctl = batch.control
        if ctl is None:
            return batch
        # control traffic woke us: handle it, and keep waiting for frames if time is left
        deadline = None if timeout is None or timeout <= 0 else time.monotonic() + timeout
        while True:
            self._on_control(ctl)
            if len(batch) or timeout is None or deadline is None:
                return batch
            left = deadline - time.monotonic()
            if left <= 0:
                return batch
            batch = self._port.recv_batch(max_frames, left)
            ctl = batch.control
            if ctl is None:
                return batch

    def recv_control(self, max_messages: int = 64) -> int:
        """Handle the control messages waiting ahead of any data frame, without taking a frame.

        Each inbound ring (and tape) is read only up to its first data frame, so nothing is
        reordered: a control message queued behind data waits for `recv_batch`. A node whose
        send waits for room in a full ring calls this to keep answering its manager (whose ring
        to it carries only control messages). Never blocks. Returns the messages handled.
        """
        ctl = self._port.recv_control(max_messages)
        if ctl:
            self._on_control(ctl)
        return len(ctl)

    def recv(self, timeout: float | None = None) -> tuple[int, int, bytes] | None:
        """One frame as a copy (src, ethertype, payload), or None on timeout. For convenience, not speed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            with self.recv_batch(1, left) as b:
                if len(b):
                    f = b[0]
                    return f.src, f.ethertype, f.tobytes()
            if deadline is not None and time.monotonic() >= deadline:
                return None

    # -- broadcast and multicast ------------------------------------------------------------------
    def broadcast(self, payload: bytes | bytearray | memoryview, ethertype: int = control.ETHERTYPE) -> None:
        """Send a copy of `payload` to every other node through the broadcast tape."""
        self._port.tape_send(0, control.BROADCAST_MAC + self.mac + ethertype.to_bytes(2, "big") + bytes(payload))

    def ring_depth(self, dst: int) -> int:
        """Frames in this node's ring to node `dst` that `dst` has not taken yet."""
        head, tail = self._fabric.region.core.ring_stats(self.id, dst)[:2]
        return (head - tail) & 0xFFFFFFFF

    def flood(self, frame: bytes | bytearray | memoryview) -> None:
        """Send a whole Ethernet frame (header included, as a TAP device gives it) to every other
        node through the broadcast tape; its header is kept as it is (a TAP adapter's ARP)."""
        self._port.tape_send(0, frame)

    def multicast(self, group: int, payload: bytes | bytearray | memoryview, ethertype: int = control.ETHERTYPE) -> None:
        """Send to every node that joined multicast `group` (0..n_mcast-1)."""
        self._check_group(group)
        from shmfabric.core.region import mcast_group_mac
        self._port.tape_send(1 + group, mcast_group_mac(group) + self.mac + ethertype.to_bytes(2, "big") + bytes(payload))

    def join(self, group: int) -> None:
        """Start receiving multicast `group`."""
        self._check_group(group)
        self._groups.add(group)
        self._port.set_mcast(sum(1 << g for g in self._groups))

    def leave(self, group: int) -> None:
        """Stop receiving multicast `group`."""
        self._groups.discard(group)
        self._port.set_mcast(sum(1 << g for g in self._groups))

    def _check_group(self, group: int) -> None:
        n = self._fabric.region.layout.n_mcast
        if not 0 <= group < n:
            raise UnknownDestinationError(f"multicast group {group} does not exist; this fabric has groups 0..{n - 1}")

    # -- discovery -------------------------------------------------------------------------------
    def _announce(self, kind: bytes) -> None:
        gen = self._fabric.region.node_entry(self.id)["gen"]
        try:
            self._port.tape_send(0, control.encode(kind, self.id, gen, self.name), native.FLAG_CONTROL,
                                 ANNOUNCE_LOCK_WAIT)
        except native.TapeBusyError as exc:
            # see ANNOUNCE_LOCK_WAIT: discovery falls back on the node table
            warnings.warn(f"shmfabric: node {self.name!r} did not announce itself ({exc})", RuntimeWarning,
                          stacklevel=3)

    def send_control(self, dst: int, payload: bytes) -> bool:
        """Send a control message to node `dst`: it reaches that node's `on_message` callback, never
        its frame batches (so a data path needs no per-frame check). False if the ring was full."""
        return self._port.send_batch(dst, (payload,), ethertype=control.CONTROL_ETHERTYPE, control=True) == 1

    on_message: "Callable[[int, bytes], None] | None" = None
    """Called as on_message(src_id, payload) for each control message, from recv_batch."""

    def _on_control(self, frames: list[bytes]) -> None:
        for raw in frames:
            if raw[:6] != control.CONTROL_MAC:  # a unicast control message for the user
                if self.on_message is not None and len(raw) >= 14:
                    self.on_message((raw[10] << 8) | raw[11], raw[14:])
                continue
            h = control.decode(raw)
            if h is None or h.node == self.id:
                continue
            if h.kind == control.BYE:
                if self._peers.get(h.name) == h.node:
                    del self._peers[h.name]
                continue
            known = self._peers.get(h.name) == h.node
            self._peers[h.name] = h.node
            if h.kind == control.HELLO and not known:
                self._announce(control.HELLO_REPLY)  # so the newcomer learns of us without a join step

    def peers(self) -> dict[str, int]:
        """Live nodes by name (from hellos and the node table), this node excluded."""
        out = {}
        for e in self._fabric.nodes():
            if e["state"] == "up" and e["id"] != self.id:
                out[e["name"]] = e["id"]
        self._peers = {k: v for k, v in self._peers.items() if out.get(k) == v}
        return out

    def wait_for_peer(self, name: str, timeout: float = 5.0) -> int:
        """Block until a node called `name` is attached; returns its id. TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            pid = self._fabric.node_id(name)
            if pid is not None and pid != self.id:
                self._peers[name] = pid
                return pid
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no node named {name!r} attached within {timeout} s")
            time.sleep(0.005)

    # -- control ---------------------------------------------------------------------------------
    def fileno(self) -> int:
        """A file descriptor readable while frames may be waiting (for asyncio, selectors)."""
        return self._port.fileno()

    def set_wait_mode(self, mode: str, spin_us: float = 50.0) -> None:
        """How a receive waits: "poll" (busy), "block" (sleep at once), "adaptive" (poll `spin_us`, then sleep)."""
        if mode not in WAIT_MODES:
            raise ValueError(f"wait mode {mode!r} unknown; use one of {sorted(WAIT_MODES)}")
        self._port.set_wait_mode(WAIT_MODES[mode], spin_us)

    def stats(self) -> dict:
        """This node's counters: frames/bytes sent and received, ring-full, drops, lapped reads, ..."""
        return self._port.stats()

    def detach(self) -> None:
        """Leave the fabric: cached slots go back and every slot still held is returned.

        Raises BufferError (and stays attached) while memoryviews of this node's buffers or
        received frames exist: after the detach their slots belong to other nodes."""
        fab = self._fabric
        if fab._nodes.get(self.id) is not self:
            return
        if os.getpid() != self._pid:
            # an inherited node in a forked child: only mark the child's handle closed
            fab._nodes.pop(self.id, None)
            self._port.close()
            return
        # The refusal and the point of no return are one step: seal() refuses while views exist
        # and, once it passed, no new view can be taken, so the close below cannot be refused by
        # one taken while the BYE waits for the tape lock (with the GIL released), half-way
        # through the detach.
        try:
            self._port.seal()
        except BufferError:
            raise BufferError(f"{self._port.exports} memoryview(s) of node {self.name!r}'s buffers or frames still "
                              "exist; release them (or leave their `with memoryview(...)` blocks) before detaching"
                              ) from None
        fab._nodes.pop(self.id, None)
        try:
            self._announce(control.BYE)
        except FabricError:
            pass
        finally:  # the node leaves even if the BYE was interrupted (Ctrl-C while it waited)
            self._port.close()
            self._reclaim()

    def _reclaim(self) -> None:
        fab = self._fabric
        # -2: the pool lock is busy (a sweep or another reclaim). A holder stopped for long
        # leaves the entry to this process's watchdog, which retries it every beat (the
        # others' watchdogs see this process alive, so they would leave it up for its life).
        deadline = time.monotonic() + DETACH_LOCK_WAIT
        while fab.region.core.reclaim(self.id, native.NODE_UP, self._gen) == -2:
            if time.monotonic() > deadline:
                fab._detaching.append((self.id, self._gen))
                break
            time.sleep(0.01)
        fab.region.core.wake_all()

    def __enter__(self) -> "Node":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()
