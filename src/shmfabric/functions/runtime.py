"""The function runtime: one network function in one process, attached to the fabric.

It does the I/O the function may not: receive a batch (zero-copy views), call the function with
the time, forward each frame by its verdict without copying (`forward_where`), answer control
messages from the manager, keep counters, and stop gracefully (draining its input first).
"""
from __future__ import annotations

import gc
import json
import math
import operator
import signal
import sys
import time
import traceback
from typing import Any, Callable, Collection

from shmfabric.fabric import Fabric, FabricError, UnknownDestinationError
from shmfabric.fabric.control import node_mac
from shmfabric.functions import registry
from shmfabric.functions.api import FunctionConfigError, FunctionContext, Verdict, validate_config
from shmfabric.functions.control import MAX_REPLY, split_reply
from shmfabric.net.flow import parse_5tuple_ip, symmetric_hash

GROUP_BASE = 230  # verdict codes GROUP_BASE+i: instance i of a scaled-out next hop
MAX_GROUP = 255 - GROUP_BASE
RESOLVE_EVERY = 0.1  # seconds between name lookups of a next hop that went away
STOP_GRACE = 5.0  # a graceful stop waits at most this long for frames a function holds (shaping)
STOP_STUCK = 3.0  # ... and at most this long (seconds slept) for a full next-hop ring to take frames
MAX_WAIT = 30.0  # the longest a `set_next` or `mirror` op waits for the nodes it names (its "timeout")
REPLY_STUCK = 1.0  # seconds a control reply waits for room in the requester's ring before it is given up
# While a full ring blocks sending: seconds slept between takes of waiting control messages. 0: after
# every sleep. A take finding nothing costs ~0.2 us and a backoff sleep really lasts ~100-400 us
# here, so this is free; at 0.02 a blocked node took ~27 ms to answer `stats` (`bench control`).
POLL_EVERY = 0.0
ERROR_LOG_EVERY = 10.0  # an error of the same kind is logged at most this often (the first at once)


def backoff(waits: int) -> float:
    """Seconds to sleep after the `waits`-th try found the next hop's ring full: 20 us doubling to
    at most 320 us. Each sleep is a system call and a wake-up, so at a steady full ring a fixed
    20 us cost the sender more CPU than sending (the downstream node, on the same 2 cores, needs
    it); 320 us stays well below the time a downstream takes to drain a batch of ring space."""
    return 0.00002 * (1 << min(waits, 4))


def log(event: str, fields: dict) -> None:
    """One structured log line (JSON) on stderr."""
    sys.stderr.write(json.dumps({"ts": round(time.time(), 6), "event": event, **fields}) + "\n")


def flow_index(frame: Any, k: int) -> int:
    """Which of `k` instances takes `frame`: its 5-tuple's symmetric hash mod k (a flow stays put)."""
    key = parse_5tuple_ip(frame)
    return (symmetric_hash(key) if isinstance(key, tuple) else 0) % k


def group_by_flow(frames: list, k: int) -> dict[int, list]:
    """`frames` grouped by `flow_index` (instance index -> frames, in order)."""
    groups: dict[int, list] = {}
    for f in frames:
        groups.setdefault(flow_index(f, k), []).append(f)
    return groups


def parse_port(spec: str | list[str]) -> tuple[str, list[str]]:
    """A port as (name, instances): "sink" -> ("sink", ["sink"]); "sink=sink,sink-2" -> a group.

    The name is what the function sees in `ctx.ports` (the logical node); the instances are the
    nodes its frames go to, spread by flow hash when there are several.
    """
    if isinstance(spec, list):
        return spec[0], list(spec)
    name, sep, members = spec.partition("=")
    insts = [m for m in members.split(",") if m] if sep else [name]
    if not name or not insts:
        raise ValueError(f"port {spec!r}: use NAME or NAME=INSTANCE[,INSTANCE...]")
    return name, insts


class Hop:
    """A named destination (a node, or a scaled-out group of nodes) resolved to node ids."""

    def __init__(self, fabric: Fabric, names: list[str], label: str | None = None):
        if len(names) > MAX_GROUP:
            raise ValueError(f"a next hop group has at most {MAX_GROUP} instances, got {len(names)}")
        self.fabric = fabric
        self.label = label if label is not None else (names[0] if names else "")
        self.names = list(names)
        self.ids: list[int | None] = [None] * len(names)
        # The incarnation found under each name, passed with every send (`incarnation=`): after
        # restarts that swap ids (ids and sink-a, say) a send to the old id fails and the name is
        # resolved again, instead of frames bypassing a function. Per send, not per destination
        # id: replies and control answers to whoever holds an id now are not affected.
        self.gens: list[int] = [0] * len(names)
        self._last_resolve = 0.0

    def resolve(self, now: float, force: bool = False) -> None:
        """Look the names up in the node table (ids, incarnations; None for one not attached): at
        most every RESOLVE_EVERY seconds of `now`, or at once with `force`."""
        if not force and now - self._last_resolve < RESOLVE_EVERY:
            return
        self._last_resolve = now
        # one pass over the node table for all the names (it runs every RESOLVE_EVERY on the data
        # path while a member is down; a pass per name cost ~250 us each with 40 nodes)
        found = self.fabric.node_refs(self.names)
        refs = [found.get(n) for n in self.names]
        self.gens = [0 if ref is None else ref[1] for ref in refs]
        self.ids = [None if ref is None else ref[0] for ref in refs]

    def missing(self) -> list[str]:
        """The nodes of the hop not attached now."""
        self.resolve(0, force=True)
        return [n for n, i in zip(self.names, self.ids) if i is None]

    def wait(self, timeout: float, stop: Callable[[], bool] | None = None, down: Collection[str] = ()) -> bool:
        """Until every node of the hop is attached (True) or `stop()` says to give up (False);
        TimeoutError naming the missing nodes after `timeout` seconds. Nodes in `down` are not
        waited for (known down: resolved when they attach, see `resolve`)."""
        if not timeout >= 0:  # NaN or negative: look once
            timeout = 0.0
        deadline = time.monotonic() + min(timeout, 1e9)
        while True:
            missing = [n for n in self.missing() if n not in down]
            if not missing:
                return True
            if stop is not None and stop():
                return False
            if time.monotonic() > deadline:
                within = f" within {timeout:g} s" if timeout > 0 else ""
                raise TimeoutError(f"next hop node(s) {', '.join(map(repr, missing))} not attached to fabric "
                                   f"{self.fabric.name!r}{within}")
            time.sleep(0.01)


MAX_TAPS = 8  # taps (`mirror` op) a node serves at once
_RAW = operator.attrgetter("raw")  # a received frame, its Ethernet header included (a copy)


class Tap(Hop):
    """A tap's node (`mirror` op), with what was copied to it and what did not fit its ring."""

    def __init__(self, fabric: Fabric, names: list[str]):
        super().__init__(fabric, names)
        self.sent = 0
        self.dropped = 0

    def counts(self) -> dict:
        return {"mirrored": self.sent, "mirror_dropped": self.dropped}


_FIRST = operator.itemgetter(0)


def ip_ethertype_groups(frames: list) -> list[tuple[int, list]]:
    """Frames a function made (IP packets), as (Ethernet type, frames) by IP version: 0x0800,
    and 0x86DD for IPv6. One C-level pass over the first bytes; a split only when both versions
    are there (order is kept within each, and flows never mix versions)."""
    if not frames:
        return []
    try:
        firsts = bytes(map(_FIRST, frames))
    except IndexError:  # an empty frame: not IP, sent as before
        return [(0x0800, frames)]
    if min(firsts) >> 4 == max(firsts) >> 4:
        return [(0x86DD if firsts[0] >> 4 == 6 else 0x0800, frames)]
    v6 = [f for f, b in zip(frames, firsts) if b >> 4 == 6]
    rest = [f for f, b in zip(frames, firsts) if b >> 4 != 6]
    return [(0x0800, rest), (0x86DD, v6)]


def fn_name(fn_cls: Any) -> str:
    """A function class's `name` (its class name if it has none: a plugin's bug, named in errors)."""
    name = getattr(fn_cls, "name", None)
    return name if isinstance(name, str) and name else getattr(fn_cls, "__name__", repr(fn_cls))


def fn_label(fn_cls: Any) -> str:
    """`'name'`, and for a plugin where it comes from (its entry point and distribution)."""
    where = registry.origin(fn_cls)
    return f"{fn_name(fn_cls)!r}" + (f" ({where})" if where else "")


def _json_default(v: Any) -> Any:
    """What json.dumps makes of a value it cannot encode (a function's counters() may hold sets,
    bytes, numpy numbers): a reply is never lost to the type of one counter."""
    if isinstance(v, (set, frozenset)):
        try:
            return sorted(v)
        except TypeError:
            return [repr(x) for x in v]
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    for cast in (int, float):  # numpy scalars and friends
        try:
            if isinstance(v, cast) or hasattr(v, "__index__" if cast is int else "__float__"):
                return cast(v)
        except Exception:
            pass
    return repr(v)


def _number(msg: dict, key: str, default: float, lo: float = 0.0, hi: float = MAX_WAIT) -> float:
    """`msg[key]`, a number of seconds, clamped to lo..hi; ValueError if it is not a number (NaN
    neither: it would never end a wait)."""
    v = msg.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise ValueError(f"{key!r} must be a number of seconds ({lo:g} to {hi:g}), not {json.dumps(v)[:40]}")
    return min(max(float(v), lo), hi)


def _names(v: Any, what: str) -> list[str]:
    """A list of node names from a control message (ValueError naming `what` otherwise)."""
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ValueError(f"{what} must be a list of node names, not {json.dumps(v)[:60]}")
    return list(v)


def _validate(fn_cls: type, config: Any) -> Any:
    """`validate_config`, with any exception a validator lets out (a TypeError, say: pydantic
    only turns ValueError and AssertionError into a validation error) made a FunctionConfigError."""
    try:
        return validate_config(fn_cls, config)
    except FunctionConfigError:
        raise
    except Exception as e:
        raise FunctionConfigError(f"invalid configuration for function {fn_label(fn_cls)}: "
                                  f"{type(e).__name__}: {e}") from None


class FunctionRunner:
    """Runs function class `fn_cls` as node `node_name` of `fabric`; see `run()`."""

    def __init__(self, fabric: Fabric, node_name: str, fn_cls: type, config: dict | None,
                 next_hop: list[str] | None = None, ports: list[str | list[str]] | None = None, *, batch: int = 256,
                 network: int = 0, wait_mode: str = "adaptive", peer_timeout: float = 30.0,
                 down: Collection[str] = ()):
        """`down`: nodes of `next_hop` and `ports` known to be down (restarting, failed for good; the
        manager's `--down`): `run()` does not wait for them at its start. Frames to one of them are
        dropped and counted (`next_down`) until it attaches; it is found by name then (every
        RESOLVE_EVERY), as after a `set_next` naming it in "down"."""
        self.fabric = fabric
        self.fn_cls = fn_cls
        self.config_model = _validate(fn_cls, config)
        try:
            mtu = fabric.networks[network].mtu
        except IndexError:
            raise FunctionConfigError(f"network {network} does not exist in fabric {fabric.name!r}") from None
        port_specs = [parse_port(p) for p in (ports or [])]
        self.next = Hop(fabric, next_hop or [])
        self.ports = [Hop(fabric, insts, name) for name, insts in port_specs]
        self._check_groups(self.next, self.ports)
        self.ctx = FunctionContext(node=node_name, fabric=fabric.name, ports=[n for n, _ in port_specs], log=log, mtu=mtu)
        # build the function before attaching, so a function that cannot start (a missing file,
        # say) is a one-line configuration error and never a half-attached node
        try:
            self.fn = fn_cls(self.config_model, self.ctx)
        except (OSError, ValueError, LookupError) as e:
            raise FunctionConfigError(f"function {fn_label(fn_cls)} cannot start with this configuration: {e}") from None
        except Exception as e:  # a bug in the function, but still one line and exit status 2, not a traceback
            raise FunctionConfigError(f"function {fn_label(fn_cls)} cannot start with this configuration: "
                                      f"{type(e).__name__}: {e}") from None
        # a source's frames of a configured `size` (the generator's) must fit a slot: a frame carries
        # at most MTU bytes after its 14-byte Ethernet header; refused here, at start, not at the first send
        size = getattr(self.config_model, "size", None)
        if (hasattr(self.fn, "produce") and isinstance(size, int) and not getattr(self.config_model, "pcap", None)
                and size - 14 > mtu):
            raise FunctionConfigError(f"function {fn_label(fn_cls)}: size {size} does not fit network {network}'s MTU "
                                      f"{mtu} (a frame is at most MTU + 14 = {mtu + 14} bytes with its Ethernet "
                                      f"header); lower size to {mtu + 14} or less, or raise the network's mtu")
        self.node = fabric.attach(node_name, network)
        self.node.set_wait_mode(wait_mode)
        self.node.on_message = self._on_message
        self.is_source = hasattr(self.fn, "produce")
        # optional timer hooks (see functions/api.py); timer_at is the next time to call them
        self._has_on_timer = hasattr(self.fn, "on_timer")
        self._has_deadline = hasattr(self.fn, "next_deadline")
        self.timer_at: float | None = None
        self.batch = batch
        self.peer_timeout = peer_timeout
        self.down = frozenset(down)

        self.stopping = False
        # the taps (`mirror` op, `shmfabric capture`): None when there is none, so the data path
        # pays one `is not None` test a batch
        self.mirror: list[Tap] | None = None
        self._stop_requester: int | None = None
        self._handled: dict[tuple[int, int], bytes] = {}  # (ports, group size) -> verdict codes dispatch handles
        self.c = {"in_frames": 0, "out_frames": 0, "dropped": 0, "replied": 0, "bad_verdict": 0,
                  "next_down": 0, "ring_full_waits": 0, "batches": 0, "busy_ns": 0,
                  "first_ns": 0, "last_ns": 0,  # monotonic time of the first and last batch
                  "cpu_ns": 0,  # process CPU time (user + system) from the first batch to the last
                  "consumed": 0, "emitted": 0, "emit_too_large": 0, "emit_errors": 0,
                  "mirrored": 0, "mirror_dropped": 0,  # the tap (`mirror` op, `shmfabric capture`)
                  "process_errors": 0, "error_frames": 0,  # batches whose process() raised, their frames
                  "kept_views": 0,  # batches held back: the function kept a view of one of their frames
                  "timer_errors": 0,  # on_timer / next_deadline calls that raised or returned no time
                  "control_errors": 0}  # control messages refused as malformed, or whose handling failed
        self._logged: dict[str, float] = {}  # event -> monotonic time it was last logged
        self._reply_seq = 0  # numbers the long replies sent in parts (control.split_reply)
        # While a full next-hop ring blocks a send, control messages are taken (no data frame)
        # and stats and stop answered; other ops wait in `_deferred` until the batch is sent.
        self._deferred: list[tuple[int, bytes]] = []
        self._polling = False
        self._in_control = 0  # > 0 while a control message is handled (see _on_message)
        self._timer_idle = False  # a batch was processed since the last on_timer call (see run)
        self._held: list[Any] = []  # batches that could not be released (views of their frames kept)
        self._stop_slept = 0.0  # seconds slept on full rings since the stop began (at most ~STOP_STUCK)

    # -- control -------------------------------------------------------------------------------
    def _log_error(self, event: str, fields: dict, tb: bool = True) -> None:
        """Log an error line, the first of its kind at once (with the traceback of the exception
        being handled, if `tb`), later ones at most every ERROR_LOG_EVERY seconds."""
        now = time.monotonic()
        last = self._logged.get(event)
        if last is not None and now - last < ERROR_LOG_EVERY:
            return
        self._logged[event] = now
        extra = {"traceback": traceback.format_exc(limit=8)} if tb and sys.exc_info()[0] is not None else {}
        log(event, {"node": self.node.name, **fields, **extra})

    def _reply(self, dst: int, msg: dict) -> None:
        """Send `msg` to node `dst`: one control message if it fits the MTU, else several parts
        (control.split_reply; ControlClient puts them together). Never raises: a reply that
        cannot be encoded becomes an error reply, one that cannot be sent (the requester went
        away, or its ring stays full) is logged and given up."""
        try:
            try:
                data = json.dumps(msg, default=_json_default).encode()
            except Exception as e:  # a circular structure, say
                data = json.dumps({"ok": False, "error": f"the reply cannot be encoded as JSON: {type(e).__name__}: "
                                   f"{e}"[:300], **({"id": msg["id"]} if "id" in msg else {})}).encode()
            if len(data) > MAX_REPLY:
                data = json.dumps({"ok": False, "error": f"the reply is {len(data)} bytes, more than the "
                                   f"{MAX_REPLY} a control reply may be", **({"id": msg["id"]} if "id" in msg else {}),
                                   }).encode()
            self._reply_seq += 1
            parts = split_reply(data, self.node.mtu, self._reply_seq)
            for i, part in enumerate(parts):
                waited = 0.0
                # the requester reads its ring continuously; a full ring clears fast
                while not self.node.send_control(dst, part):
                    if waited >= REPLY_STUCK:
                        self.c["control_errors"] += 1
                        self._log_error("control_reply_error", {
                            "to": dst, "error": f"the requester's ring stayed full for {REPLY_STUCK:g} s; reply part "
                                                f"{i + 1} of {len(parts)} and the rest not sent"}, tb=False)
                        return
                    time.sleep(0.001)
                    waited += 0.001
        except Exception as e:  # the requester went away (UnknownDestinationError), ...
            self.c["control_errors"] += 1
            self._log_error("control_reply_error", {"to": dst, "error": f"{type(e).__name__}: {e}"[:300]}, tb=False)

    def stats(self) -> dict:
        c = dict(self.c)
        c["ns_per_frame"] = round(c["busy_ns"] / c["in_frames"], 1) if c["in_frames"] else 0.0
        # CPU per frame of the whole node (function, runtime, wake-ups): unlike busy_ns, which is
        # wall time inside process(), it does not grow when the node is preempted on a busy host
        c["cpu_ns_per_frame"] = round(c["cpu_ns"] / c["in_frames"], 1) if c["in_frames"] else 0.0
        out = {"ok": True, "node": self.node.name, "function": fn_name(self.fn_cls),
               "version": str(getattr(self.fn_cls, "version", "1")), "counters": c,
               "function_counters": {},
               "next": self.next.names, "ports": [p.label for p in self.ports],
               "port_instances": {p.label: p.names for p in self.ports}}
        if self.fn is not None and hasattr(self.fn, "counters"):
            # the function's own code: whatever it raises or returns, the node answers (a stats
            # request is the manager's readiness probe)
            try:
                fc = self.fn.counters()
                if not isinstance(fc, dict):
                    raise TypeError(f"counters() returned a {type(fc).__name__}, not a dict")
                out["function_counters"] = fc
            except Exception as e:
                out["function_counters_error"] = f"{type(e).__name__}: {e}"[:300]
                self._log_error("counters_error", {"error": out["function_counters_error"]})
        return out

    @staticmethod
    def _check_groups(nxt: Hop, ports: list[Hop]) -> None:
        # each scaled-out hop takes verdict codes GROUP_BASE.. for one batch's spreading
        used = sum(len(h.names) for h in [nxt, *ports] if len(h.names) > 1)
        if used > MAX_GROUP:
            raise ValueError(f"scaled-out next hop and ports have {used} instances in all; at most {MAX_GROUP}")

    def _on_message(self, src: int, payload: bytes) -> None:
        """A control message (from any node: never trusted). Whatever it holds, the node answers
        and goes on: a malformed message or a failure while handling it is an error reply."""
        rid = None
        try:
            try:
                msg = json.loads(payload)
            except (ValueError, UnicodeDecodeError):
                msg = None
            if not isinstance(msg, dict):
                self.c["control_errors"] += 1
                self._reply(src, {"ok": False, "error": "control message is not a JSON object"})
                return
            rid = msg.get("id")
            op = msg.get("op")
            if self._polling and op not in ("stats", "stop"):
                # received while a full ring blocks the batch being sent: the op waits for it
                self._deferred.append((src, payload))
                return
            # No receive while an op is handled (a reconfigure's emitted frames may wait for a
            # full ring): the receive this callback runs inside would return frames newer than
            # those a nested poll took, and they would be processed first
            self._in_control += 1
            try:
                out = self._handle(src, msg, op)
            finally:
                self._in_control -= 1
            if out is None:
                return  # stop: answered once drained
        except (FunctionConfigError, TimeoutError, ValueError) as e:
            out = {"ok": False, "error": str(e)}
        except Exception as e:  # a bug, or a malformed field the checks missed: the node goes on
            self.c["control_errors"] += 1
            self._log_error("control_error", {"from": src, "error": f"{type(e).__name__}: {e}"[:300]})
            out = {"ok": False, "error": f"control message failed: {type(e).__name__}: {e}"[:300]}
        if rid is not None:
            out["id"] = rid
        self._reply(src, out)

    def _handle(self, src: int, msg: dict, op: Any) -> dict | None:
        if op == "stats":
            return self.stats()
        if op == "reconfigure":
            config = msg.get("config")
            if not isinstance(config, dict):
                raise ValueError(f"reconfigure: 'config' must be an object (the function's configuration), not "
                                 f"{json.dumps(config)[:60]}")
            return self._reconfigure(config)
        if op == "set_next":
            return self._set_next_op(msg)
        if op == "stop":
            self.stopping = True
            self._stop_requester = src
            return None
        if op == "mirror":
            return self._mirror_op(msg)
        self.c["control_errors"] += 1
        return {"ok": False, "error": f"unknown op {json.dumps(op)[:40]}; use stats, reconfigure, set_next, mirror "
                                      "or stop"}

    def _set_next_op(self, msg: dict) -> dict:
        """The `set_next` op: "next", the next hop's instances; "ports" (optional): {port name:
        instances}. Every node named must be attached (within "timeout" seconds, 0 by default,
        at most MAX_WAIT: the data path waits meanwhile), else nothing changes; except those in
        "down" (optional): nodes the sender knows are down (restarting, failed), taken as given.
        Frames to one of those are dropped and counted (`next_down`) until it attaches, as for
        any next hop that went away, and it is found by name then (every RESOLVE_EVERY)."""
        timeout = _number(msg, "timeout", 0.0)
        down = frozenset(_names(msg.get("down"), "set_next: 'down'"))
        hop = Hop(self.fabric, _names(msg.get("next"), "set_next: 'next'"))
        want = msg.get("ports")
        if want is None:
            want = {}
        if not isinstance(want, dict):
            raise ValueError(f"set_next: 'ports' must be an object {{port name: [node names]}}, not "
                             f"{json.dumps(want)[:60]}")
        want = {name: _names(v, f"set_next: port {name!r}") for name, v in want.items()}
        labels = [p.label for p in self.ports]
        unknown = [name for name in want if name not in labels]
        if unknown:
            raise ValueError(f"set_next: {unknown} are not ports of {self.node.name!r} (ports: {labels})")
        ports = [Hop(self.fabric, want[p.label], p.label) if want.get(p.label) else p for p in self.ports]
        self._check_groups(hop, ports)
        for h in [hop, *ports]:
            if not h.wait(timeout=timeout, stop=lambda: self.stopping, down=down):
                return {"ok": False, "error": f"node {self.node.name!r} is stopping"}
        self.next, self.ports = hop, ports
        log("next_hop", {"node": self.node.name, "next": hop.names,
                         "ports": {p.label: p.names for p in ports}})
        return {"ok": True}

    def _reconfigure(self, config: Any) -> dict:
        """The `reconfigure` op. Whatever the function's validators or `reconfigure()` raise is an
        error reply, never an exception out of the control handler (which would take the node
        down): a bad configuration is the sender's mistake, not a reason to stop forwarding."""
        name = fn_name(self.fn_cls)
        new = _validate(self.fn_cls, config)  # FunctionConfigError: answered by the caller
        if not hasattr(self.fn, "reconfigure"):
            raise FunctionConfigError(f"function {name!r} cannot be reconfigured live; replace it")
        try:
            self.fn.reconfigure(new)
        except (FunctionConfigError, ValueError, TimeoutError):
            raise  # the function's own message, as before
        except Exception as e:
            log("reconfigure_error", {"node": self.node.name, "error": f"{type(e).__name__}: {e}",
                                      "traceback": traceback.format_exc()})
            return {"ok": False, "error": f"function {name!r} failed to apply the new configuration "
                                          f"({type(e).__name__}: {e}); it may run with parts of it, "
                                          f"reconfigure again or replace the node"}
        self.config_model = new
        if self.timer_at is not None:  # the time on_timer gave may not hold under the new config
            self.timer_at = time.monotonic()
        if self.ctx.emitted:  # e.g. a shaper releasing what it held under the old config
            self.send_emitted()
        log("reconfigured", {"node": self.node.name})
        return {"ok": True}

    # -- the data path -------------------------------------------------------------------------
    def _mirror_op(self, msg: dict) -> dict:
        """The `mirror` op: several taps at once, each to its own node.

        {"to": NAME} adds a tap to NAME (again for a NAME already tapping: its counters start
        over); {"to": NAME, "off": true} removes that one and replies with its counters;
        {"to": null} removes every tap; {"list": true} replies with the taps and their counters."""
        taps = self.mirror or []
        if msg.get("list"):
            return {"ok": True, "taps": {t.names[0]: t.counts() for t in taps}}
        to = msg.get("to")
        if to is None:
            self.mirror = None
            log("mirror", {"node": self.node.name, "to": None, "taps_removed": len(taps)})
            return {"ok": True, "removed": len(taps)}
        if not isinstance(to, str) or not to:
            raise ValueError(f"mirror: 'to' must be a node name or null, not {json.dumps(to)[:60]}")
        timeout = _number(msg, "timeout", 0.0)
        old = next((t for t in taps if t.names[0] == to), None)
        if msg.get("off"):
            if old is None:
                return {"ok": True, "removed": 0}
            rest = [t for t in taps if t is not old]
            self.mirror = rest or None
            log("mirror", {"node": self.node.name, "to": to, "off": True})
            return {"ok": True, "removed": 1, **old.counts()}
        if old is None and len(taps) >= MAX_TAPS:
            raise ValueError(f"node {self.node.name!r} has {len(taps)} taps already, at most {MAX_TAPS}; "
                             f"end one first")
        tap = Tap(self.fabric, [to])
        if not tap.wait(timeout=timeout, stop=lambda: self.stopping):
            return {"ok": False, "error": f"node {self.node.name!r} is stopping"}
        self.mirror = [t for t in taps if t is not old] + [tap]
        log("mirror", {"node": self.node.name, "to": to, "taps": len(self.mirror)})
        # "stamp": each copy's descriptor `meta` holds the wall-clock time the tap copied it, in
        # microseconds modulo 2**32; "header": copies keep their own Ethernet header
        return {"ok": True, "taps": len(self.mirror), "stamp": "us32", "header": "own"}

    def _tap(self, frames: Any) -> None:
        """Copy the frames this node receives (or a source makes) to every tap, if any.

        Each copy keeps the frame's own Ethernet header (MACs and ethertype; a source's frames
        get the header they are sent with), and its descriptor's `meta` carries the time of the
        copy (wall clock, microseconds modulo 2**32). A tap must never slow the data path: what
        does not fit a tap's ring is dropped and counted, and a tap whose node went away is
        removed."""
        taps = self.mirror
        if not taps:
            return
        if self.is_source:
            raws = self._source_raws(frames)
        else:
            raws = list(map(_RAW, frames))
        stamp = (time.time_ns() // 1000) & 0xFFFFFFFF
        gone = None
        for tap in taps:
            dst = tap.ids[0]
            try:
                if dst is None:
                    raise UnknownDestinationError("mirror node gone")
                sent = self.node.send_batch(dst, raws, meta=stamp, raw=True, incarnation=tap.gens[0])
            except UnknownDestinationError:
                gone = (gone or []) + [tap]
                continue
            except FabricError:  # a frame the tap cannot carry (too large): counted, never raised
                sent = 0
            tap.sent += sent
            tap.dropped += len(raws) - sent
            self.c["mirrored"] += sent
            self.c["mirror_dropped"] += len(raws) - sent
        if gone:
            self.mirror = [t for t in taps if t not in gone] or None
            for t in gone:
                log("mirror", {"node": self.node.name, "to": t.names[0], "off": True,
                               "reason": "mirror node went away"})

    def _source_raws(self, frames: list) -> list[bytes]:
        """A source's frames with the header `_send_frames` gives them: the next hop's MAC (the
        instance the flow goes to), this node's MAC, the Ethernet type of the IP version."""
        nxt = self.next.ids
        src = self.node.mac

        def etype(f: Any) -> bytes:
            return b"\x86\xdd" if len(f) and f[0] >> 4 == 6 else b"\x08\x00"

        def mac(i: int | None) -> bytes:  # a next hop that is gone: 02:73:66:00:ff:ff
            return node_mac(0xFFFF if i is None else i)

        if len(nxt) > 1:
            return [mac(nxt[flow_index(f, len(nxt))]) + src + etype(f) + bytes(f) for f in frames]
        head = mac(nxt[0] if nxt else None) + src
        return [head + etype(f) + bytes(f) for f in frames]

    def _poll_while_blocked(self, waited: float, polled: float) -> float:
        """Called between the sleeps of a send that waits for room in a full ring (`waited`
        seconds slept so far; `polled`: at that count the last poll): every POLL_EVERY seconds (0:
        after every sleep),
        take the control messages waiting ahead of any data frame (`recv_control`: no data frame
        is taken, so the data path's order is untouched), so that stats and stop are answered
        however long the data path is blocked (other ops wait until the batch is sent). The
        manager's ring to a node carries only control messages, so its requests are always
        reached. Returns `polled`."""
        if waited - polled < POLL_EVERY or self._polling or self._in_control:
            return polled
        self._polling = True
        try:
            self.node.recv_control()
        except Exception as e:  # the node was reclaimed, ...: the send loop finds out next
            self._log_error("poll_error", {"error": f"{type(e).__name__}: {e}"[:300]}, tb=False)
        finally:
            self._polling = False
        return waited

    def _send_code(self, batch: Any, out: bytearray, code: int, hop: Hop, i: int) -> int:
        """Forward the frames of `code` to instance `i` of `hop`, waiting while its ring is full.
        Returns frames sent."""
        pending = out.count(code)
        if not pending:
            return 0
        dst, gen = hop.ids[i], hop.gens[i]
        sent_total = 0
        waits = 0
        waited = polled = 0.0
        while pending:
            if dst is None:
                self.c["next_down"] += pending
                return sent_total
            try:
                sent = self.node.forward_where(dst, batch, out, code, gen)
            except UnknownDestinationError:
                hop.resolve(time.monotonic(), force=True)
                self.c["next_down"] += pending
                return sent_total
            sent_total += sent
            pending -= sent
            if pending:
                waits += 1
                self.c["ring_full_waits"] += 1
                if waits > 2:
                    d = backoff(waits - 3)
                    time.sleep(d)
                    waited += d
                    polled = self._poll_while_blocked(waited, polled)
                    if self.stopping:
                        self._stop_slept += d
                # a stuck downstream must not block a stop forever: STOP_STUCK for a batch, and for
                # all batches together once stopping (the next ones are not each given as long)
                if self.stopping and (waited > STOP_STUCK or self._stop_slept > STOP_STUCK):
                    self.c["dropped"] += pending
                    return sent_total
        return sent_total

    def _send_spread(self, batch: Any, out: bytearray, code: int, hop: Hop, base: int) -> None:
        """Send the frames of `code` over the instances of a scaled-out `hop` by flow hash (a flow
        stays put): each gets code base+i for instance i first."""
        k = len(hop.ids)
        for i in range(len(batch)):
            if out[i] == code:  # flow_index, inlined: once per frame of a whole batch
                key = parse_5tuple_ip(batch[i])
                out[i] = base + (symmetric_hash(key) if isinstance(key, tuple) else 0) % k
        for i in range(k):
            self.c["out_frames"] += self._send_code(batch, out, base + i, hop, i)

    def dispatch(self, batch: Any, out: bytearray) -> None:
        """Forward every frame of `batch` by its verdict in `out`."""
        now = time.monotonic()
        if self.next.ids and None in self.next.ids:
            self.next.resolve(now)
        nxt = self.next.ids
        base = GROUP_BASE  # the next free code for spreading over a scaled-out hop
        if len(nxt) > 1:
            self._send_spread(batch, out, Verdict.NEXT, self.next, base)
            base += len(nxt)
        elif nxt:
            self.c["out_frames"] += self._send_code(batch, out, Verdict.NEXT, self.next, 0)
        else:
            self.c["dropped"] += out.count(Verdict.NEXT)  # end of the chain: NEXT means consumed
        for k, hop in enumerate(self.ports):
            code = Verdict.port(k)
            if code in out:
                if None in hop.ids:
                    hop.resolve(now)
                if len(hop.ids) > 1:
                    self._send_spread(batch, out, code, hop, base)
                else:
                    self.c["out_frames"] += self._send_code(batch, out, code, hop, 0)
            if len(hop.ids) > 1:
                base += len(hop.ids)
        self.c["dropped"] += out.count(Verdict.DROP)
        if Verdict.CONSUMED in out:  # replaced or held by the function: not a loss
            self.c["consumed"] += out.count(Verdict.CONSUMED)
        if Verdict.REPLY in out:
            for i, f in enumerate(batch):
                if out[i] == Verdict.REPLY:
                    try:
                        self.c["replied"] += int(self.node.forward(f.src, f))
                    except FabricError:
                        self.c["next_down"] += 1
        # verdicts nobody handled: what is left after deleting the handled codes (one C call;
        # a set of the batch's verdicts cost ~3 us a batch)
        groups = base - GROUP_BASE
        handled = self._handled.get((len(self.ports), groups))
        if handled is None:
            handled = self._handled[(len(self.ports), groups)] = bytes(sorted(
                {Verdict.NEXT, Verdict.DROP, Verdict.REPLY, Verdict.CONSUMED,
                 *(Verdict.port(k) for k in range(len(self.ports))), *(GROUP_BASE + i for i in range(groups))}))
        bad = len(out.translate(None, handled))
        if bad:
            self.c["bad_verdict"] += bad

    # -- frames a function emitted (ctx.emit) ---------------------------------------------------
    def _send_copies(self, frames: list, hop: Hop, i: int) -> None:
        """Copy `frames` into slots and send them to instance `i` of `hop`, waiting while its ring
        is full; each with the Ethernet type of its IP version."""
        for ethertype, part in ip_ethertype_groups(frames):
            self._send_copies_typed(part, hop, i, ethertype)

    def _send_copies_typed(self, frames: list, hop: Hop, i: int, ethertype: int) -> None:
        dst, gen = hop.ids[i], hop.gens[i]
        waits = 0
        waited = polled = 0.0
        while frames:
            if dst is None:
                self.c["next_down"] += len(frames)
                return
            try:
                sent = self.node.send_batch(dst, frames, ethertype=ethertype, incarnation=gen)
            except UnknownDestinationError:
                hop.resolve(time.monotonic(), force=True)
                self.c["next_down"] += len(frames)
                return
            self.c["out_frames"] += sent
            self.c["emitted"] += sent
            frames = frames[sent:]
            if frames:
                waits += 1
                self.c["ring_full_waits"] += 1
                if waits > 2:
                    d = backoff(waits - 3)
                    time.sleep(d)
                    waited += d
                    polled = self._poll_while_blocked(waited, polled)
                    if self.stopping:
                        self._stop_slept += d
                # as in _send_code: a stop is never blocked for good
                if self.stopping and (waited > STOP_STUCK or self._stop_slept > STOP_STUCK):
                    self.c["dropped"] += len(frames)
                    return

    def send_emitted(self) -> None:
        """Send what the function emitted (ctx.emit) by verdict: NEXT (spread over a scaled-out
        group by flow hash, like forwarded frames) or a port. Frames too large for the network
        are counted (`emit_too_large`), not sent. ctx.emit refuses what is not a buffer; what a
        function put into `ctx.emitted` itself and cannot be sent is counted (`emit_errors`) and
        logged, never raised out of the runtime."""
        emitted = self.ctx.emitted
        self.ctx.emitted = []
        try:
            self._send_emitted(emitted)
        except Exception as e:
            self.c["emit_errors"] += len(emitted)
            self._log_error("emit_error", {"error": f"{type(e).__name__}: {e}"[:300], "frames": len(emitted)})

    def _send_emitted(self, emitted: list) -> None:
        mtu = self.node.mtu
        by_code: dict[int, list] = {}
        for code, data in emitted:
            if len(data) > mtu:
                self.c["emit_too_large"] += 1
                continue
            by_code.setdefault(code, []).append(data)
        now = time.monotonic()
        for code, frames in by_code.items():
            if code == Verdict.NEXT:
                nxt = self.next.ids
                if None in nxt:
                    self.next.resolve(now)
                    nxt = self.next.ids
                if not nxt:
                    self.c["dropped"] += len(frames)  # end of the chain: NEXT means consumed
                elif len(nxt) == 1:
                    self._send_copies(frames, self.next, 0)
                else:
                    for i, fs in group_by_flow(frames, len(nxt)).items():
                        self._send_copies(fs, self.next, i)
            elif 3 <= code < 3 + len(self.ports):
                hop = self.ports[code - 3]
                if None in hop.ids:
                    hop.resolve(now)
                ids = hop.ids
                for i, fs in (group_by_flow(frames, len(ids)).items() if len(ids) > 1 else [(0, frames)]):
                    self._send_copies(fs, hop, i)
            else:  # DROP, REPLY (an emitted frame has no sender) or an unknown code
                self.c["bad_verdict"] += len(frames)

    def _when(self, v: Any, what: str, now: float) -> float | None:
        """A time on_timer / next_deadline returned: None, or a finite number (monotonic
        seconds). Anything else (NaN, a negative time, a str) is a timer error: counted, logged,
        and the next call is a second from now (an answer "at once" forever would spin a core)."""
        if v is None:
            return None
        if v.__class__ is float:
            if 0.0 <= v < math.inf:
                return v
        elif isinstance(v, (int, float)) and not isinstance(v, bool):  # an int too (10**400: OverflowError)
            try:
                f = float(v)
                if 0.0 <= f < math.inf:
                    return f
            except Exception:
                pass
        self.c["timer_errors"] += 1
        self._log_error("timer_error", {"error": f"{what} returned {v!r:.80}, not a time (monotonic seconds, "
                                                 "finite and not negative) or None; called again in 1 s"}, tb=False)
        return now + 1.0

    def _deadline(self, now: float) -> float | None:
        """The function's next_deadline(now), checked (`_when`); a raise counts as a timer error."""
        try:
            d = self.fn.next_deadline(now)
        except Exception as e:
            self.c["timer_errors"] += 1
            self._log_error("timer_error", {"error": f"next_deadline raised {type(e).__name__}: {e}"[:300]})
            return now + 1.0
        return self._when(d, "next_deadline", now)

    def fire_timer(self, now: float) -> None:
        """Call the function's on_timer, send what it emitted, and note when to call it again.
        An on_timer that raises is counted (`timer_errors`) and logged (what it emitted meanwhile
        is dropped, as for a process() that raises); it is called again a second later."""
        fn = self.fn
        t = None
        if self._has_on_timer:
            try:
                t = self._when(fn.on_timer(now), "on_timer", now)
            except Exception as e:
                self.c["timer_errors"] += 1
                self.ctx.emitted = []
                self._log_error("timer_error", {"error": f"on_timer raised {type(e).__name__}: {e}"[:300]})
                t = now + 1.0
        d = self._deadline(now) if self._has_deadline else None
        self.timer_at = t if d is None else d if t is None else min(t, d)
        if self.ctx.emitted:
            self.send_emitted()

    def _send_frames(self, frames: list) -> None:
        """A source function's frames: copy each into a slot once and send down the chain."""
        nxt = self.next.ids
        # (a scaled-out group with one instance down: the others' flows go on, see _send_made)
        if not nxt or (nxt[0] is None and len(nxt) == 1):
            self.next.resolve(time.monotonic())
            self.c["next_down"] += len(frames)
            return
        groups = group_by_flow(frames, len(nxt)) if len(nxt) > 1 else {0: frames}
        # a source that says which IP version it makes (`ethertype`, e.g. the generator's
        # synthesized IPv4) is not checked frame by frame (~30 ns a frame)
        declared = getattr(self.fn, "ethertype", None)
        for i, group in groups.items():
            for ethertype, fs in ((declared, group),) if declared else ip_ethertype_groups(group):
                self._send_made(fs, i, ethertype)

    def _send_made(self, fs: list, i: int, ethertype: int) -> None:
        """A source's frames of one IP version to instance `i` of the next hop."""
        dst = self.next.ids[i]
        if dst is None:  # an instance of a scaled-out group that is down (restarting): found again by name
            self.next.resolve(time.monotonic())
            self.c["next_down"] += len(fs)
            return
        waits = 0
        waited = polled = 0.0
        while fs:
            try:
                sent = self.node.send_batch(dst, fs, ethertype=ethertype, incarnation=self.next.gens[i])
            except UnknownDestinationError:
                self.next.resolve(time.monotonic(), force=True)
                self.c["next_down"] += len(fs)
                break
            self.c["out_frames"] += sent
            fs = fs[sent:]
            if fs:
                self.c["ring_full_waits"] += 1
                if self.stopping:
                    self.c["dropped"] += len(fs)
                    break
                waits += 1
                d = backoff(waits)
                time.sleep(d)
                waited += d
                polled = self._poll_while_blocked(waited, polled)

    def run(self, duration: float | None = None) -> dict:
        """Process until stopped (SIGTERM/SIGINT, the `stop` op, or `duration` seconds). Returns stats."""
        # the wait for the next hops counts against the duration: a run never outlasts it
        start = time.monotonic()
        limit = self.peer_timeout if duration is None else min(self.peer_timeout, max(0.0, duration))
        hops = ([self.next] if self.next.names else []) + self.ports
        for hop in hops:
            try:
                # (not those known down: waiting for them, the node answered nothing, and the manager
                # killed it as hung after its START_TIMEOUT, for ever while they stayed down)
                if not hop.wait(max(0.0, start + limit - time.monotonic()), stop=lambda: self.stopping,
                                down=self.down):
                    break  # told to stop while waiting: the loop below ends at once
            except TimeoutError:
                missing = [n for h in hops for n in h.missing() if n not in self.down]
                why = f"the run's --duration, {duration:g} s" if limit < self.peer_timeout else f"{limit:g} s"
                raise TimeoutError(f"node {self.node.name!r}: next hop node(s) {', '.join(map(repr, missing))} not "
                                   f"attached to fabric {self.fabric.name!r} within {why}; start them first (a node "
                                   "waits for the ones it sends to), or leave them out of --next/--port") from None
        log("started", {"node": self.node.name, "function": fn_name(self.fn_cls), "id": self.node.id,
                        "next": self.next.names, **({"down": sorted(self.down)} if self.down else {})})
        end = None if duration is None else start + duration
        empty_polls = 0
        node, fn, batch_max, c, ctx = self.node, self.fn, self.batch, self.c, self.ctx
        perf = time.perf_counter_ns
        cpu, cpu0 = time.process_time_ns, 0
        timed = self._has_on_timer or self._has_deadline
        has_deadline = self._has_deadline
        if timed and self.timer_at is None:
            # A first call at once: its return says when the next is due. Without it on_timer
            # ran first at the first empty poll, so under traffic from the start a function's
            # housekeeping (expiring flow tables) never ran.
            self.timer_at = time.monotonic()
        stop_t0 = 0.0
        held_retry = 0.0
        while True:
            if self._deferred:  # ops that came while a full ring blocked the last batch
                self._run_deferred()
            now = time.monotonic()
            if end is not None and now >= end:
                self.stopping = True
            if self.stopping and not stop_t0:
                stop_t0 = now
            if self.is_source:
                if self.stopping:
                    break
                try:
                    frames = fn.produce(now, batch_max)
                except Exception as exc:  # as a process() that raises: counted, logged, the node goes on
                    self._process_failed(exc, 0)
                    frames = None
                if frames:
                    t0 = perf()
                    if not c["first_ns"]:
                        c["first_ns"] = time.monotonic_ns()
                        cpu0 = cpu()
                    frames = list(frames)
                    if self.mirror is not None:
                        self._tap(frames)
                    self._send_frames(frames)
                    c["busy_ns"] += perf() - t0
                    c["in_frames"] += len(frames)
                    c["batches"] += 1
                    c["last_ns"] = time.monotonic_ns()
                    c["cpu_ns"] = cpu() - cpu0
                with node.recv_batch(64, 0):  # control messages arrive through receives
                    pass
                if not frames:
                    # a source without next_deadline is asked again in a millisecond
                    deadline = self._deadline(now) if has_deadline else now + 0.001
                    if deadline is None:
                        self.stopping = True
                        continue
                    node.recv_batch(1, min(max(deadline - now, 0), 0.05)).release()
                continue
            timeout = 0.05 if self.stopping else 0.2
            if timed and self.timer_at is not None:
                if now >= self.timer_at:
                    self.fire_timer(now)
                if self.timer_at is not None:
                    timeout = min(timeout, max(0.0, self.timer_at - now))
            if self._held and now >= held_retry:  # batches a function kept views of: free again?
                held_retry = now + 0.02
                self._release_held()
            batch = node.recv_batch(batch_max, timeout)
            n = len(batch)
            if not n:
                batch.release()
                # on_timer when due, or at each empty poll if it asked for no time (None), and once
                # when the node goes idle after a batch: state the batch added may come due before
                # the time on_timer gave earlier (a firewall's new connection with a short timeout)
                if timed and (self.timer_at is None or self._timer_idle or time.monotonic() >= self.timer_at):
                    self._timer_idle = False
                    self.fire_timer(time.monotonic())
                if self.stopping:
                    empty_polls += 1
                    # input drained; a function still holding frames gets timer calls for a while
                    # (asked directly: timer_at may be a housekeeping timer of on_timer's)
                    holding = has_deadline and now - stop_t0 < STOP_GRACE and self._deadline(now) is not None
                    if empty_polls >= 2 and not holding:
                        break
                continue
            empty_polls = 0
            self._timer_idle = True
            if not c["first_ns"]:
                c["first_ns"] = time.monotonic_ns()
                cpu0 = cpu()
            if self.mirror is not None:
                self._tap(batch)
            out = bytearray(n)
            t0 = perf()
            try:
                fn.process(batch, now, out)
            except Exception as exc:
                out = self._process_failed(exc, n)
            else:
                if len(out) != n:  # a verdict per frame, or none of them can be trusted
                    out = self._process_failed(ValueError(
                        f"process() changed the length of `out` from {n} to {len(out)} (set out[i]; never resize "
                        "it)"), n, tb=False)
            c["busy_ns"] += perf() - t0
            c["in_frames"] += n
            c["batches"] += 1
            if ctx.emitted:  # before the batch: frames a shaper released precede newer ones
                self.send_emitted()
            try:
                self.dispatch(batch, out)
            except BufferError:
                self._kept_view(batch, n, sent=False)
            else:
                try:
                    batch.release()
                except BufferError:
                    self._kept_view(batch, n, sent=True)
            if has_deadline:
                d = self._deadline(now)
                if d is not None and (self.timer_at is None or d < self.timer_at):
                    self.timer_at = d
            c["last_ns"] = time.monotonic_ns()
            c["cpu_ns"] = cpu() - cpu0
        stats = self.stats()
        if self._stop_requester is not None:
            self._reply(self._stop_requester, {"ok": True, "processed": c["in_frames"], "stats": stats})
        log("stopped", {"node": self.node.name, **c})
        return stats

    def _run_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for src, payload in deferred:
            self._on_message(src, payload)

    def _process_failed(self, exc: Exception, n: int, tb: bool = True) -> bytearray:
        """A function's process() raised: its batch is dropped (verdicts left half written
        would send unchecked frames on: NEXT is 0), what it emitted meanwhile too, and the node
        goes on with the next batch. One packet that trips a bug in a function (a packet of
        death) then costs its batch, not a crash loop of the node and the chain behind it. The
        first exception is logged with its traceback, later ones at most every 10 s."""
        c = self.c
        c["process_errors"] += 1
        c["error_frames"] += n
        self.ctx.emitted = []
        now = time.monotonic()
        if now - self._logged.get("process_error", -ERROR_LOG_EVERY) >= ERROR_LOG_EVERY:
            self._logged["process_error"] = now
            log("process_error", {"node": self.node.name, "error": f"{type(exc).__name__}: {exc}"[:300],
                                  "batches_failed": c["process_errors"], "frames_dropped": c["error_frames"],
                                  **({"traceback": traceback.format_exc(limit=8)} if tb else {})})
        return bytearray(b"\x01") * n  # Verdict.DROP for every frame

    def _kept_view(self, batch: Any, n: int, sent: bool) -> None:
        """The function kept a memoryview of a frame of `batch` past process(): the core refuses
        to forward the batch (`sent` False: none of its frames went out; counted as
        `error_frames`) and to release it (its slots would be reused under the view). The batch
        is held, and released once the view is gone (`_release_held`)."""
        c = self.c
        c["kept_views"] += 1
        if not sent:
            c["error_frames"] += n
        self._held.append(batch)
        self._log_error("view_kept", {"error": (
            f"function {fn_name(self.fn_cls)!r} kept a view of a frame past its batch (a memoryview of a frame, "
            "or of a part of one, outlived process(); copy what you keep with bytes(frame)): "
            + ("the batch's frames were not sent, " if not sent else "")
            + "its slots stay held until the view is gone"),
            "frames": n, "batches_held": len(self._held)}, tb=False)

    def _release_held(self) -> None:
        keep = []
        for b in self._held:
            try:
                b.release()
            except BufferError:
                keep.append(b)
        self._held = keep

    def close(self) -> None:
        """Close the function (its optional `close()`: flush files) and detach the node.

        A function's close() that raises is logged. If the function still holds views of frames
        (see `_kept_view`), the runner lets go of the (closed) function so they go with it; a view
        that outlives even that (kept in a global) keeps the node attached: BufferError, one line
        saying so (the node's slots are reclaimed when the process exits)."""
        fn = self.fn
        try:
            if fn is not None and hasattr(fn, "close"):
                fn.close()
        except Exception as e:
            self._log_error("close_error", {"error": f"the function's close() raised {type(e).__name__}: {e}"[:300]})
        self._release_held()
        if self._held:
            self.fn = fn = None  # type: ignore[assignment]
            gc.collect()
            self._release_held()
        try:
            self.node.detach()
        except BufferError:
            msg = (f"node {self.node.name!r}: function {fn_name(self.fn_cls)!r} still holds a view of a frame "
                   f"({len(self._held)} batch(es) held) after close(), so the node cannot detach; it stays "
                   "attached until this process exits, and its slots are reclaimed then")
            log("close_error", {"node": self.node.name, "error": msg})
            raise BufferError(msg) from None


def install_signal_handlers(runner: FunctionRunner) -> None:
    """SIGTERM and SIGINT stop the runner gracefully (it drains its input first)."""
    def stop(signum: int, frame: Any) -> None:
        runner.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
