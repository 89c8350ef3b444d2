"""Move frames between a TAP device and a fabric node (the adapter's I/O loop).

Device -> fabric: each frame the kernel sends goes, whole, into the ring of the node its
destination MAC names, or to every node through the broadcast tape (ARP, neighbour discovery,
multicast). A full ring drops the frame and counts it, as a congested switch port does: waiting
for room would hold up the frames to every other node behind one slow receiver, and the TAP
device drops what its queue cannot hold meanwhile anyway (TCP's congestion control finds the
bottleneck either way: iperf3 retransmits over a veth pair too).
Fabric -> device: each frame received (unicast or from the tape) is written to the device.
"""
from __future__ import annotations

import errno
import json
import os
import selectors
import threading
import time
from collections import Counter
from typing import Callable

from shmfabric.adapters.ethernet import (ETH_HLEN, FLOOD, VNET_LEN, VNET_ZERO, Verdict, arp_claim, arp_probe, classify,
                                         complete_checksum, csum_of, meta_to_vnet, needs_offload, routed, vnet_to_meta)
from shmfabric.adapters.source_guard import SourceGuard
from shmfabric.adapters.tap import Tap
from shmfabric.core import native
from shmfabric.fabric import Node

WAKE_EVERY = 0.2  # seconds: a stop request is seen at least this often while idle
ERROR_PAUSE = 0.05  # seconds of pause after a device error other than its deletion
SHARE_EVERY = 1.0  # seconds between looks at how many nodes share the pool


def fair_share(slots: int, nodes: int, ring_size: int) -> int:
    """How many frames an adapter may leave in one destination's ring: half a network's pool
    spread over the `nodes` attached (at least 2, at most a ring), so the frames every other
    node leaves for one stopped receiver hold about half the pool at most. A ring holds as many
    frames as a small pool has slots: without a bound one stopped receiver would hold the whole
    pool and every other pair on the network would stop too."""
    return max(2, min(ring_size, slots // (2 * max(nodes, 2))))


class DeviceGone(OSError):
    """The adapter's interface was deleted under it (`ip link del`): the adapter ends."""


class FabricPort:
    """What every adapter does on the fabric side, whatever its device (a TAP device, a memif
    peer): `deliver` sends a frame read from the device to the node its destination MAC names (or
    to `via`, or to every node), within a fair share of the pool per destination ring; control
    requests (`stats`, `stop`) are answered. Subclasses move frames to and from their device."""

    kind = "adapter"  # the `function` a stats reply names
    # checks each frame's sender before it is sent (`--source-check`); None: frames go as they are
    guard: SourceGuard | None = None

    def __init__(self, node: Node, batch: int = 256, in_flight: int | Callable[[], int] = 64,
                 via: Callable[[], tuple[int, int] | None] | None = None):
        """`in_flight`: the most frames this adapter leaves in any one destination's ring
        (`fair_share`), or a function giving it, asked again every SHARE_EVERY seconds (as nodes
        come and go): a stopped or slow receiver then holds that many pool slots, not the pool."""
        self.node = node
        self.batch = batch
        # `via`: where unicast frames go instead of the node their MAC names (the first function of
        # a chain whose end, a `router`, delivers them): a function giving its (node id,
        # incarnation), None when not attached; asked again when a send finds the id gone or held
        # by another incarnation (ids are reused: frames must never reach whoever took it)
        self._via = via
        self._via_id: int | None = None
        self._via_gen = 0  # the incarnation resolved: a send fails once another one holds the id
        if via is not None:
            self._resolve_via()
        self._share = in_flight if callable(in_flight) else None
        self.in_flight = in_flight() if callable(in_flight) else in_flight
        self._share_at = time.monotonic()
        self._budget: dict[int, int] = {}  # destination -> sends left before its ring is looked at again
        # one Counter per direction: each thread updates only its own
        self.from_device: Counter[str] = Counter()
        self.from_fabric: Counter[str] = Counter()
        self.stop_requested = False  # a control `stop` came
        # set by run(): until then (the device is being set up: addresses, a duplicate check) a
        # `stats` request is answered "starting", so a service manager does not count it ready
        self.ready = False
        node.on_message = self._on_message

    @property
    def device_name(self) -> str:
        """What a stats reply calls the device."""
        return ""

    def refresh_share(self) -> None:
        """Ask the share function again once SHARE_EVERY seconds have passed (call once a batch)."""
        if self._share is not None and time.monotonic() - self._share_at >= SHARE_EVERY:
            self._share_at = time.monotonic()
            share = self._share()
            if share < self.in_flight:  # budgets handed out under the larger share: looked at again
                self._budget.clear()
            self.in_flight = share

    def deliver(self, hdr: bytearray, buf: native.Buffer, size: int, meta: int = 0) -> bool:
        """Send a frame read from the device (Ethernet header `hdr`, payload `buf[:size]`) where it
        goes; True if `buf` itself was sent (it is the fabric's now), False if it is still the
        caller's (the frame was copied, or dropped and counted)."""
        c = self.from_device
        own = self.node.mac
        if self.guard is not None and size >= 0:
            why = self.guard.verdict(hdr, buf, size, meta)
            if why is not None:
                c[why] += 1
                return False
        dst = classify(hdr, own) if size >= 0 else Verdict.SHORT
        inc = 0
        if dst >= 0 and self._via is not None and routed(hdr, buf):
            dst = self._via_id if self._via_id is not None else self._resolve_via()
            if dst is None:
                c["drop_no_via"] += 1
                return False
            inc = self._via_gen
        if dst >= 0:
            budget = self._budget
            if not budget.get(dst) and not self._room(dst):
                c["drop_ring_full"] += 1  # the destination holds its share of the pool already
                return False
            budget[dst] -= 1  # (whichever way it is sent: each frame sent takes a slot)
        if dst >= 0 and hdr[6:12] == own:
            try:
                if self.node.send_buffer(dst, buf, size, (hdr[12] << 8) | hdr[13], meta, inc):
                    c["to_fabric"] += 1
                    return True
                c["drop_ring_full"] += 1  # the buffer stays the caller's, for the next frame
            except native.DestinationError:
                c["drop_no_node"] += 1
                if self._via is not None:
                    self._resolve_via()
        elif dst >= 0 or dst == FLOOD:
            with memoryview(buf) as v:
                frame = hdr + v[:size]
            self._send_copy(dst, frame, meta, inc)
        else:
            c["drop_" + Verdict(dst).name.lower()] += 1
        return False

    def deliver_sorted(self, groups: dict[int, list[bytes]], floods: list[bytes]) -> None:
        """Send whole frames read from the device (each with its Ethernet header), sorted by where
        they go (`native.memif_take` sorts a memif peer's batch in one pass, as `classify` and
        `routed` would): `groups` maps a node id, or `native.MEMIF_VIA` for the chain (when this
        port has one), to its frames, in the order each destination first appeared; `floods`
        holds the broadcasts and multicasts. They are copied into pool slots by the core one
        destination at a time: one publication and at most one wake-up per destination per
        call, not per frame. Within a destination frames keep their order; those past its fair
        share are dropped and counted."""
        for f in floods:
            self._send_copy(FLOOD, bytearray(f), 0)
        for dst, group in groups.items():
            if dst != native.MEMIF_VIA:
                self._send_group(dst, group, 0)
                continue
            via = self._via_id if self._via_id is not None else self._resolve_via()
            if via is None:
                self.from_device["drop_no_via"] += len(group)
            else:
                self._send_group(via, group, self._via_gen)

    def _send_group(self, dst: int, group: list[bytes], inc: int) -> None:
        """Send frames to one destination within its fair share (`inc`: the via node's incarnation)."""
        c = self.from_device
        budget = self._budget
        if budget.get(dst, 0) < len(group):
            self._room(dst)
        take = min(len(group), budget.get(dst, 0))
        if take < len(group):
            c["drop_ring_full"] += len(group) - take
            del group[take:]
        if not group:
            return
        try:
            sent = self.node.send_batch(dst, group, raw=True, incarnation=inc)
        except native.DestinationError:
            c["drop_no_node"] += len(group)
            if inc:
                self._resolve_via()
            return
        budget[dst] -= sent
        c["to_fabric"] += sent
        if sent < len(group):  # (the ring had room, by the budget: the pool had no slot)
            c["drop_pool_empty"] += len(group) - sent

    def _resolve_via(self) -> int | None:
        """The `via` node's id now (it may have restarted under another one); None if not attached."""
        ref = self._via() if self._via is not None else None
        self._via_id, self._via_gen = (None, 0) if ref is None else ref
        return self._via_id

    def _room(self, dst: int) -> bool:
        """Whether `dst`'s ring has room under `in_flight`; sets the sends left before it is looked
        at again (frames only leave a ring: after `in_flight - depth` sends it may be at the bound)."""
        try:
            left = self.in_flight - self.node.ring_depth(dst)
        except IndexError:  # an id past the node table: the send says so (drop_no_node)
            left = 1
        self._budget[dst] = max(0, left)
        return left > 0

    def _send_copy(self, dst: int, frame: bytearray, meta: int, inc: int = 0) -> None:
        """The rare frames sent from a copy: floods, and unicast frames whose source MAC is not
        the device's (a bridge in the namespace), sent with their header as it is."""
        c = self.from_device
        if dst >= 0:
            try:
                if self.node.send_batch(dst, (frame,), raw=True, meta=meta, incarnation=inc):
                    c["to_fabric"] += 1
                else:
                    c["drop_ring_full"] += 1
            except native.DestinationError:
                c["drop_no_node"] += 1
                if inc:
                    self._resolve_via()
            return
        # The tape carries no `meta`: a checksum left to the device is done here, and a segment
        # to be cut (a UDP multicast with GSO: rare) cannot be flooded.
        if needs_offload(meta):
            c["drop_offload_flood"] += 1
            return
        cs = csum_of(meta)
        if cs is not None:
            complete_checksum(frame, *cs)
        try:
            self.node.flood(frame)
            c["flooded"] += 1
        except native.TapeBusyError:
            c["drop_tape_busy"] += 1
        except (native.FrameSizeError, ValueError):
            c["drop_too_big_to_flood"] += 1

    def address_in_use(self, ip: bytes, probes: int = 2, wait: float = 0.15) -> bytes | None:
        """Before the device has the IPv4 address `ip`: probe for it on the fabric (RFC 5227) and
        return the MAC of a host that answers (it has it already), else None. Call before `run`:
        the frames received meanwhile (others' broadcasts) are dropped."""
        probe = arp_probe(self.node.mac, ip)
        for _ in range(probes):
            self.node.flood(probe)
            deadline = time.monotonic() + wait
            while (left := deadline - time.monotonic()) > 0:
                with self.node.recv_batch(64, left) as b:
                    for f in b:
                        mac = arp_claim(f.raw, ip, self.node.mac)
                        if mac is not None:
                            return mac
        return None

    def _on_message(self, src: int, payload: bytes) -> None:
        """A control request (JSON, from any node: never trusted), as function nodes take them:
        `{"op": "stats"}` answers the counters, `{"op": "stop"}` ends the adapter; an `id` is
        echoed. Runs in the fabric thread, inside its receive."""
        try:
            msg = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            msg = None
        if not isinstance(msg, dict):
            out: dict = {"ok": False, "error": "control message is not a JSON object"}
        elif msg.get("op") == "stats" and not self.ready:
            out = {"ok": False, "error": "starting: the device is being set up"}
        elif msg.get("op") == "stats":
            out = {"ok": True, "node": self.node.name, "function": self.kind, "device": self.device_name,
                   "counters": self.counters}
        elif msg.get("op") == "stop":
            self.stop_requested = True
            out = {"ok": True}
        else:
            out = {"ok": False, "error": f"unknown op {str(msg.get('op'))[:64]!r}; an adapter answers stats and stop"}
        if isinstance(msg, dict) and "id" in msg:
            out["id"] = msg["id"]
        data = json.dumps(out).encode()
        if len(data) > self.node.mtu:  # (counters are a few hundred bytes)
            data = json.dumps({"ok": False, "error": "reply longer than the network MTU",
                               **({"id": out["id"]} if "id" in out else {})}).encode()
        try:
            self.node.send_control(src, data)
        except native.DestinationError:  # the requester went away
            pass

    @property
    def counters(self) -> dict[str, int]:
        """Both directions' counters (from any thread: each Counter is copied in one C call first,
        never iterated while the thread that owns it adds a key)."""
        out = dict(self.from_device)
        for k, v in dict(self.from_fabric).items():
            out[k] = out.get(k, 0) + v
        return dict(sorted(out.items()))


class TapBridge(FabricPort):
    """One node's TAP adapter: `pump_device` and `pump_fabric` move one batch each way; `run`
    runs both until told to stop."""

    def __init__(self, node: Node, tap: Tap, batch: int = 256, in_flight: int | Callable[[], int] = 64,
                 via: Callable[[], tuple[int, int] | None] | None = None, guard: SourceGuard | None = None):
        """`batch`, `in_flight`, `via`: as FabricPort's; `guard`: drop the frames that name another
        sender (`--source-check`)."""
        super().__init__(node, batch, in_flight, via)
        self.guard = guard
        self.tap = tap
        self._scratch = bytearray(node.mtu + 1)  # where a frame is read to be dropped (no free slot)
        self._hdr = bytearray(ETH_HLEN)  # the header of the frame being read (its payload goes to a slot)
        self._vnet = bytearray(VNET_LEN)  # its virtio_net_hdr (offloads)
        self._spare = bytearray(1)  # a byte past the slot: a frame reaching it did not fit
        self._vnets: dict[int, bytes] = {0: VNET_ZERO}  # meta -> virtio_net_hdr, for writes
        self._buf: native.Buffer | None = None  # the slot the next frame is read into

    @property
    def device_name(self) -> str:
        return self.tap.ifname

    def pump_device(self) -> int:
        """Frames read from the device and sent on (or dropped): at most one batch.

        A frame is read straight into a pool slot (`readv`: the virtio_net_hdr and the Ethernet
        header apart, the payload into the node's buffer), so its bytes are copied once, by the
        kernel, on their way in; the virtio_net_hdr rides in the descriptor's `meta`."""
        fd = self.tap.fd
        alloc, c, deliver = self.node.alloc, self.from_device, self.deliver
        readv = os.readv
        hdr, vnet, spare = self._hdr, self._vnet, self._spare
        buf = self._buf
        self.refresh_share()
        n = 0
        while n < self.batch:
            if buf is None:
                try:
                    buf = alloc()
                except MemoryError:  # the pool is exhausted: the frame is read all the same, and dropped
                    if self._read_and_drop() is None:
                        break
                    n += 1
                    c["drop_pool_empty"] += 1
                    continue
            view = memoryview(buf)
            try:
                got = readv(fd, [vnet, hdr, view, spare])
            except BlockingIOError:
                break
            except OSError as exc:
                if self._device_error(exc):
                    continue
                break
            finally:
                view.release()
            n += 1
            got -= VNET_LEN
            meta = 0
            if vnet != VNET_ZERO:
                meta = vnet_to_meta(vnet)  # type: ignore[assignment]
                if meta is None:
                    c["drop_offload_unsupported"] += 1
                    continue
            size = got - ETH_HLEN
            if size > buf.capacity:  # past the slot, into `spare`: cut (offloads bound it: never)
                c["drop_too_big"] += 1
                continue
            if deliver(hdr, buf, size, meta):
                buf = None
        self._buf = buf
        c["from_device"] += n
        return n

    def _read_and_drop(self) -> int | None:
        """Read one frame into scratch space (to drop it); None if there was none."""
        try:
            return os.readv(self.tap.fd, [self._vnet, self._hdr, self._scratch])
        except BlockingIOError:
            return None
        except OSError as exc:
            self._device_error(exc)
            return None

    def _device_error(self, exc: OSError) -> bool:
        """Handle a read or write error of the device: True to go on at once (EINTR). A device
        deleted under the adapter (EBADFD) ends it (DeviceGone); any other error is counted and
        followed by a short pause, so a device that keeps failing does not spin a core."""
        if exc.errno == errno.EINTR:
            return True
        if exc.errno in (errno.EBADFD, errno.ENODEV, errno.ENXIO):
            raise DeviceGone(f"the interface {self.tap.ifname} was deleted ({exc.strerror})") from None
        self.from_device["device_errors"] += 1
        time.sleep(ERROR_PAUSE)
        return False

    def pump_fabric(self, timeout: float = 0) -> int:
        """Frames received from the fabric (waiting up to `timeout` s for the first) and written
        to the device: at most one batch. Header and payload are gathered by the kernel from the
        slot (`writev`): no copy of ours."""
        fd, c = self.tap.fd, self.from_fabric
        writev = os.writev
        vnets = self._vnets
        with self.node.recv_batch(self.batch, timeout) as b:
            for f in b:
                meta = f.meta
                vh = vnets.get(meta)
                if vh is None:
                    vh = meta_to_vnet(meta)
                    if len(vnets) < 4096:  # (a few dozen in practice: MSS x offsets)
                        vnets[meta] = vh
                try:
                    writev(fd, (vh, f.dst + f.src_mac + f.ethertype.to_bytes(2, "big"), f))
                    c["to_device"] += 1
                except OSError as exc:  # device down or its queue full: dropped as a NIC would
                    if exc.errno in (errno.EBADFD, errno.ENODEV, errno.ENXIO):
                        raise DeviceGone(f"the interface {self.tap.ifname} was deleted ({exc.strerror})") from None
                    c["drop_device_write"] += 1
            return len(b)

    def run(self, stopping: Callable[[], bool]) -> None:
        """Bridge until `stopping()` is true or a control `stop` came (checked at least every
        WAKE_EVERY s).

        A thread per direction, each asleep in its own wait while idle: the device's in select(),
        the fabric's in the node's futex wait. One loop over both file descriptors would wake
        through the node's eventfd, whose notifier thread adds a second wake-up to every frame
        from the fabric (a c=1 redis-benchmark GET round trip: p50 0.10-0.25 ms against 0.055-0.063
        ms with two threads, on the 2-vCPU VM). The node is safe to share: its core holds the
        GIL for everything but the sleep itself.
        """
        failed: list[BaseException] = []
        user_stopping = stopping
        self.ready = True

        def stopping() -> bool:
            return self.stop_requested or user_stopping()

        def device_to_fabric() -> None:
            sel = selectors.DefaultSelector()
            try:
                sel.register(self.tap.fd, selectors.EVENT_READ)
                while not stopping() and not failed:
                    if self.pump_device() == 0:
                        sel.select(WAKE_EVERY)
            except BaseException as exc:  # handed to the main thread, which stops and raises it
                failed.append(exc)
            finally:
                sel.close()

        worker = threading.Thread(target=device_to_fabric, name="device-to-fabric", daemon=True)
        worker.start()
        try:
            while not stopping() and worker.is_alive():
                self.pump_fabric(WAKE_EVERY)
        except BaseException as exc:
            failed.append(exc)
        finally:
            worker.join()
        if failed:
            raise failed[0]
