"""`shmfabric bench transport`: shmfabric against the IPC a Python user could pick instead.

One run measures, side by side, every transport in `shmfabric.bench.peers` at each frame size:

- ``throughput``: a sender and a receiver process; frames/s and payload bytes/s of frames the
  receiver touched (read the length and one payload byte) during a timed window;
- ``latency``: ping-pong of one frame; one-way latency is half a round trip, p50 and p99;
- ``forward``: A sends, B receives, touches and forwards, C touches and counts;

plus the machine's memcpy rate (``mode="memcpy"``), so that bytes/s can be read as a share of
what copying costs here: of a 64 MiB buffer (DRAM), of a 256 KiB one (in cache), and of a
buffer as large as shmfabric's ring working set at each frame size (the pool slots its
throughput case actually cycled, times the frame size). Every case runs in fresh processes
(each pinned to its own core when there are two), for a bounded time, and is cleaned up
whatever happens; a transport that fails yields an ``error`` row and the run goes on.

Ratios are taken against UNIX seqpacket (the fair kernel baseline for frames) and against
memcpy, in the same run, like for like where it matters: batched shmfabric (its batch API)
is shown next to per-frame shmfabric (``shmfabric-1``, one call per frame like the sockets),
and the latency of busy-polling receivers is taken against seqpacket busy-polling
(``seqpacket-spin``), that of blocking ones against blocking seqpacket.

This module holds the orchestration and the report; the transports are in `peers`.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from multiprocessing import connection as mp_connection
from typing import Any, Callable, Iterable

from .provenance import run_info
from .peers import BASELINE, BASELINE_SPIN, MODES, ROLES, Spec, Transport, TransportUnavailable, all_transports
from .peers.base import MARKER, MEASURING_ROLE, Ctl

DEFAULT_SIZES: tuple[int, ...] = (64, 1500, 9000, 65000)
DEFAULT_DURATION = 1.0
#: Environment variable that overrides the default duration per case (seconds).
DURATION_ENV = "SHMFABRIC_BENCH_DURATION"
#: Largest frame size accepted on the command line (the fabric's largest MTU).
MAX_SIZE = 65536
#: How long the other processes of a case may take to finish after the measuring one reported,
#: or after one failed, before they are terminated.
GRACE = 3.0
#: Time for the drain after a window (the sender notices the stop flag, the receiver empties).
DRAIN = 5.0

MEMCPY_BUFFERS = (("memcpy", 64 << 20), ("memcpy-cached", 256 << 10))
#: memcpy of a buffer as large as shmfabric's ring working set (one row per frame size).
MEMCPY_RING = "memcpy-ring"
#: The transport whose throughput case gives the ring working set.
RING_TRANSPORT = "shmfabric"
#: Frames whose slot the receiver must have sampled before the count of distinct slots is
#: taken as the working set (a short case sees too few of them and would undercount).
MIN_SLOT_SAMPLES = 4096

ROW_FIELDS = ("transport", "label", "size", "mode", "status", "frames_per_s", "bytes_per_s", "p50_us", "p99_us",
              "vs_seqpacket", "vs_memcpy", "vs_memcpy_ring", "frames", "samples", "duration_s", "error", "details",
              "command", "time_utc", "commit", "uncommitted_changes", "machine", "peers")


@dataclass
class BenchConfig:
    """What to run. `only` holds transport names (case-insensitive); None means all."""

    sizes: tuple[int, ...] = DEFAULT_SIZES
    duration: float = DEFAULT_DURATION
    modes: tuple[str, ...] = MODES
    only: tuple[str, ...] | None = None
    pin: bool = True
    setup_timeout: float = 10.0
    memcpy: bool = True
    start_method: str = "fork"
    batch: int = 256
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self, transports: Iterable[Transport]) -> None:
        """Raise ValueError naming the problem for a bad configuration."""
        if not self.sizes:
            raise ValueError("no frame sizes given")
        for s in self.sizes:
            if not 1 <= s <= MAX_SIZE:
                raise ValueError(f"frame size {s} is outside 1..{MAX_SIZE}")
        if not self.duration > 0:
            raise ValueError(f"duration must be positive, not {self.duration}")
        for m in self.modes:
            if m not in MODES:
                raise ValueError(f"unknown mode {m!r} (known: {', '.join(MODES)})")
        if self.only is not None:
            known = {t.name.lower() for t in transports}
            unknown = [n for n in self.only if n.lower() not in known]
            if unknown:
                raise ValueError(f"unknown transport(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        if self.start_method not in multiprocessing.get_all_start_methods():
            raise ValueError(f"start method {self.start_method!r} is not available here "
                             f"({', '.join(multiprocessing.get_all_start_methods())})")
        if self.batch < 1:
            raise ValueError("batch must be at least 1")


def default_duration() -> float:
    """The per-case duration: $SHMFABRIC_BENCH_DURATION if set and valid, else 1 s."""
    raw = os.environ.get(DURATION_ENV)
    if not raw:
        return DEFAULT_DURATION
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{DURATION_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{DURATION_ENV} must be positive, not {raw}")
    return value


# --- rows --------------------------------------------------------------------------------


def _row(name: str, size: int, mode: str, status: str, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = {k: None for k in ROW_FIELDS}
    row.update(transport=name, label=name, size=size, mode=mode, status=status, details={})
    row.update(values)
    return row


def _label(transport: Transport) -> str:
    return transport.label or transport.name


# --- one case ----------------------------------------------------------------------------


def _child(transport: Transport, role: str, chan: Any, spec: Spec, ctl: Ctl, conn: Any,
           cpu: int | None) -> None:
    """Body of a worker process: pin, run the role, send back ("ok", result) or ("error", text)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and ends us
    try:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        result = transport.run(role, chan, spec, ctl)
        conn.send(("ok", result))
    except BaseException as exc:  # report everything, the parent decides
        try:
            ctl.abort()
        except Exception:
            pass
        conn.send(("error", f"{role}: {type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _cpus_for(roles: tuple[str, ...], pin: bool) -> dict[str, int | None]:
    """Role -> CPU. Two roles get a core each; a third role (forwarding) is left to the scheduler
    when there are only two cores, rather than doubled up with a fixed partner."""
    cpus = sorted(os.sched_getaffinity(0)) if pin and hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        return {r: None for r in roles}
    return {r: (cpus[i] if i < len(cpus) else None) for i, r in enumerate(roles)}


def _reap(procs: list[tuple[str, Any]], grace: float) -> list[str]:
    """Make sure every worker is gone; returns the roles that had to be terminated."""
    killed = []
    end = time.monotonic() + grace
    for role, p in procs:
        p.join(max(0.0, end - time.monotonic()))
        if p.is_alive():
            killed.append(role)
            p.terminate()
            p.join(1.0)
            if p.is_alive():
                p.kill()
                p.join(1.0)
    return killed


def run_case(transport: Transport, spec: Spec, mp_ctx: Any, pin: bool = True) -> dict[str, Any]:
    """Run one (transport, size, mode) case in fresh processes and return its row."""
    row = _run_case(transport, spec, mp_ctx, pin)
    row["label"] = _label(transport)
    return row


def _run_case(transport: Transport, spec: Spec, mp_ctx: Any, pin: bool) -> dict[str, Any]:
    name, size, mode = transport.name, spec.size, spec.mode
    reason = transport.unsupported(spec)
    if reason:
        return _row(name, size, mode, "n/a", error=reason)
    roles = ROLES[mode]
    measuring = MEASURING_ROLE[mode]
    cpus = _cpus_for(roles, pin)
    details: dict[str, Any] = dict(transport.details(spec))
    details["busy_poll"] = transport.busy_polls(spec)
    details["cpus"] = {r: c for r, c in cpus.items()}
    procs: list[tuple[str, Any]] = []
    readers: dict[Any, str] = {}
    results: dict[str, Any] = {}
    errors: list[str] = []
    chan: Any = None
    ctl: Ctl | None = None
    have_chan = False
    killed: list[str] = []
    interrupted = False
    phase = "setup"
    started = time.monotonic()
    try:
        chan = transport.setup(spec)
        have_chan = True
        phase = "harness"
        ctl = Ctl(mp_ctx, len(roles), spec.setup_timeout)
        for role in roles:
            r, w = mp_ctx.Pipe(duplex=False)
            p = mp_ctx.Process(target=_child, args=(transport, role, chan, spec, ctl, w, cpus[role]),
                               name=f"bench-{name}-{mode}-{role}", daemon=True)
            p.start()
            w.close()
            procs.append((role, p))
            readers[r] = role
        deadline = time.monotonic() + spec.setup_timeout + spec.duration + DRAIN
        pending = dict(readers)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for r in mp_connection.wait(list(pending), left):
                role = pending.pop(r)
                try:
                    kind, value = r.recv()
                except EOFError:
                    proc = dict(procs)[role]
                    proc.join(1.0)
                    kind, value = "error", f"{role}: process ended without a result (exit code {proc.exitcode})"
                if kind == "ok":
                    results[role] = value
                else:
                    errors.append(value)
                    ctl.abort()
                    deadline = min(deadline, time.monotonic() + GRACE)
            if measuring in results:
                deadline = min(deadline, time.monotonic() + GRACE)
        if pending and not errors and measuring not in results:
            errors.append(f"timed out waiting for {', '.join(sorted(pending.values()))}")
        if pending:
            ctl.abort()
    except KeyboardInterrupt:
        interrupted = True
        if ctl is not None:
            ctl.abort()
        raise
    except Exception as exc:
        errors.append(f"{phase}: {type(exc).__name__}: {exc}")
    finally:
        killed = _reap(procs, 0.2 if interrupted else GRACE if not errors else 1.0)
        for r in readers:
            r.close()
        if have_chan:
            try:
                transport.cleanup(chan)
            except Exception as exc:
                errors.append(f"cleanup: {type(exc).__name__}: {exc}")
    details["wall_s"] = round(time.monotonic() - started, 3)  # set-up to clean-up, for diagnosis
    if killed:
        details["terminated"] = killed
    for role, res in results.items():
        if role != measuring:
            details.update({k: v for k, v in res.items() if k in ("sent", "echoed", "forwarded")})
            if "stats" in res:
                details[f"{role}_stats"] = res["stats"]
    if errors or measuring not in results:
        return _row(name, size, mode, "error", error="; ".join(errors) or f"{measuring} gave no result",
                    details=details)
    return _figures(name, spec, results[measuring], details)


def _figures(name: str, spec: Spec, res: dict[str, Any], details: dict[str, Any]) -> dict[str, Any]:
    """Turn the measuring side's result into a row, checking what it says it saw."""
    size, mode = spec.size, spec.mode
    if res.get("last_byte") != MARKER:
        return _row(name, size, mode, "error", details=details,
                    error=f"payload corrupted: first byte {res.get('last_byte')!r}, expected {MARKER:#x}")
    if "stats" in res:
        details["stats"] = res["stats"]
    if mode == "latency":
        details.update(min_us=res["min_us"], max_us=res["max_us"])
        return _row(name, size, mode, "ok", p50_us=res["p50_us"], p99_us=res["p99_us"],
                    samples=res["samples"], duration_s=spec.duration, details=details)
    frames, nbytes, elapsed = res["frames"], res["bytes"], res["elapsed"]
    if frames <= 0 or elapsed <= 0:
        return _row(name, size, mode, "error", details=details, error="no frame touched in the window")
    if nbytes != frames * size:
        return _row(name, size, mode, "error", details=details,
                    error=f"{nbytes} payload bytes in {frames} frames of {size} bytes")
    for key in ("batch", "slots_cycled", "slot_samples"):
        if key in res:
            details[key] = res[key]
    return _row(name, size, mode, "ok", frames_per_s=frames / elapsed, bytes_per_s=nbytes / elapsed,
                frames=frames, duration_s=elapsed, details=details)


# --- memcpy ------------------------------------------------------------------------------


def measure_memcpy(duration: float, pin: bool = True) -> list[dict[str, Any]]:
    """The machine's copy rate, measured now: memoryview slice assignment (a C memcpy) of a
    64 MiB buffer (beyond the caches) and of a 256 KiB one (in L2), and numpy's copyto when
    numpy is installed. Pinned to the first core, like the senders."""
    saved = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cpus = sorted(saved) if saved else []
    rows = []
    each = min(0.5, max(0.02, duration / 2))
    try:
        if pin and len(cpus) >= 2:
            os.sched_setaffinity(0, {cpus[0]})
        for label, nbytes in MEMCPY_BUFFERS:
            src = memoryview(b"\x5a" * nbytes)
            dst = memoryview(bytearray(nbytes))

            def copy(d: memoryview = dst, s: memoryview = src) -> None:
                d[:] = s

            rows.append(_copy_row(label, nbytes, copy, each, "memoryview slice assignment"))
        try:
            import numpy as np
        except ImportError:
            pass
        else:
            nbytes = MEMCPY_BUFFERS[0][1]
            a = np.full(nbytes, 0x5A, dtype=np.uint8)
            z = np.empty_like(a)
            rows.append(_copy_row("memcpy-numpy", nbytes, lambda: np.copyto(z, a), each, "numpy.copyto"))
    finally:
        if saved is not None and pin and len(cpus) >= 2:
            os.sched_setaffinity(0, saved)
    return rows


def measure_memcpy_ring(frame_size: int, slots: int, duration: float, pin: bool = True) -> dict[str, Any]:
    """memcpy of one buffer of `slots` x `frame_size` bytes: what shmfabric's throughput case
    cycles through (the payload bytes of the pool slots its ring used), pinned like the others."""
    saved = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cpus = sorted(saved) if saved else []
    nbytes = max(1, slots * frame_size)
    try:
        if pin and len(cpus) >= 2:
            os.sched_setaffinity(0, {cpus[0]})
        src = memoryview(b"\x5a" * nbytes)
        dst = memoryview(bytearray(nbytes))

        def copy() -> None:
            dst[:] = src

        row = _copy_row(MEMCPY_RING, nbytes, copy, min(0.5, max(0.02, duration / 2)),
                        f"memoryview slice assignment, {slots} slots x {frame_size} B (shmfabric's ring working set)")
    finally:
        if saved is not None and pin and len(cpus) >= 2:
            os.sched_setaffinity(0, saved)
    row["details"].update(frame_size=frame_size, slots=slots)
    return row


def _copy_row(label: str, nbytes: int, copy: Callable[[], None], duration: float, how: str) -> dict[str, Any]:
    copy()  # first touch of the destination pages belongs to set-up, not to the rate
    reps = 0
    clock = time.perf_counter
    now = t0 = clock()
    while now - t0 < duration:
        copy()
        reps += 1
        now = clock()
    elapsed = now - t0
    return _row(label, nbytes, "memcpy", "ok", frames_per_s=reps / elapsed, bytes_per_s=reps * nbytes / elapsed,
                frames=reps, duration_s=elapsed, details={"how": how})


# --- the whole run -----------------------------------------------------------------------


def run_bench(config: BenchConfig, transports: list[Transport] | None = None,
              progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run every selected case and return the rows (with ratios), memcpy rows first."""
    transports = all_transports() if transports is None else transports
    config.validate(transports)
    if config.only is not None:
        wanted = {n.lower() for n in config.only}
        transports = [t for t in transports if t.name.lower() in wanted]
    mp_ctx = multiprocessing.get_context(config.start_method)
    info = run_info()
    rows: list[dict[str, Any]] = []
    copies: list[dict[str, Any]] = []  # memcpy rows, shown first
    if config.memcpy:
        if progress:
            progress("memcpy")
        copies.extend(measure_memcpy(config.duration, config.pin))
    unavailable: dict[str, str] = {}
    for t in transports:
        try:
            t.check_available()
        except TransportUnavailable as exc:
            unavailable[t.name] = str(exc)
    counter = itertools.count()
    for mode in config.modes:
        for size in config.sizes:
            for t in transports:
                if mode not in t.modes:
                    continue
                if t.name in unavailable:
                    rows.append(_row(t.name, size, mode, "skipped", label=_label(t), error=unavailable[t.name]))
                    continue
                spec = Spec(size=size, mode=mode, duration=config.duration, setup_timeout=config.setup_timeout,
                            batch=config.batch, start_method=config.start_method,
                            tag=f"{os.getpid()}-{next(counter)}")
                if progress:
                    progress(f"{t.name} {mode} {size} B")
                row = run_case(t, spec, mp_ctx, pin=config.pin)
                rows.append(row)
                slots = row["details"].get("slots_cycled")
                if (config.memcpy and t.name == RING_TRANSPORT and mode == "throughput" and row["status"] == "ok"
                        and slots and row["details"].get("slot_samples", 0) >= MIN_SLOT_SAMPLES):
                    # right after the case, so that it sees the machine in the same state
                    if progress:
                        progress(f"memcpy of the ring working set, {size} B frames")
                    copies.append(measure_memcpy_ring(size, slots, config.duration, config.pin))
    rows = copies + rows
    for r in rows:
        r.update(info)
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Fill the ratios, higher is better everywhere:

    - `vs_seqpacket`: frames/s over seqpacket's at the same mode and size; for latency rows,
      the baseline's p50 over ours, like for like: a busy-polling receiver (details
      ``busy_poll``) against `seqpacket-spin`, a blocking one against `seqpacket` (none when
      that baseline was not run). ``details["vs"]`` names the baseline used.
    - `vs_memcpy`: payload bytes/s over the 64 MiB (DRAM) memcpy rate;
    - `vs_memcpy_ring`: payload bytes/s over the memcpy rate of a buffer as large as
      shmfabric's ring working set at that frame size (throughput rows).
    """
    memcpy = next((r["bytes_per_s"] for r in rows if r["transport"] == "memcpy" and r["status"] == "ok"), None)
    ring = {r["details"]["frame_size"]: r["bytes_per_s"] for r in rows
            if r["transport"] == MEMCPY_RING and r["status"] == "ok"}
    base = {(r["transport"], r["mode"], r["size"]): r for r in rows
            if r["transport"] in (BASELINE, BASELINE_SPIN) and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok" or r["mode"] == "memcpy":
            continue
        if r["mode"] == "latency":
            name = BASELINE_SPIN if (r.get("details") or {}).get("busy_poll") else BASELINE
            b = base.get((name, r["mode"], r["size"]))
            if b and r["p50_us"]:
                r["vs_seqpacket"] = b["p50_us"] / r["p50_us"]
                r["details"]["vs"] = name
            continue
        b = base.get((BASELINE, r["mode"], r["size"]))
        if b and b["frames_per_s"]:
            r["vs_seqpacket"] = r["frames_per_s"] / b["frames_per_s"]
            r["details"]["vs"] = BASELINE
        if memcpy:
            r["vs_memcpy"] = r["bytes_per_s"] / memcpy
        if r["mode"] == "throughput" and ring.get(r["size"]):
            r["vs_memcpy_ring"] = r["bytes_per_s"] / ring[r["size"]]


# --- the targets -----------------------------------------------------------------


def _find(rows: list[dict[str, Any]], transport: str, mode: str, size: int) -> dict[str, Any] | None:
    for r in rows:
        if r["transport"] == transport and r["mode"] == mode and r["size"] == size and r["status"] == "ok":
            return r
    return None


def _ring_copy(rows: list[dict[str, Any]], frame_size: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["transport"] == MEMCPY_RING and r["status"] == "ok"
                 and r["details"].get("frame_size") == frame_size), None)


def _memcpy_refs(rows: list[dict[str, Any]], frame_size: int) -> list[tuple[dict[str, Any] | None, str]]:
    """The memcpy rows bytes/s can be read against, for frames of `frame_size`: (row, what)."""
    def named(name: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["transport"] == name and r["status"] == "ok"), None)

    return [(named("memcpy"), "large buffer (DRAM)"), (_ring_copy(rows, frame_size), "ring working set"),
            (named("memcpy-cached"), "small buffer (in cache)")]


#: The batched rows compare shmfabric's batch API with per-frame socket calls; say so.
BATCHED = "batch API vs per-frame socket calls"


def evaluate_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 2's benchmark targets, checked against this run: target, measured, ok (None when
    the run did not measure what the target needs). The 1,500-byte memcpy target is checked
    against each memcpy reference of the run, one line each."""
    out: list[dict[str, Any]] = []

    def add(target: str, value: float | None, ok: bool | None, shown: str | None) -> None:
        out.append({"target": target, "value": value, "ok": ok, "measured": shown if value is not None else "not measured"})

    t64 = _find(rows, "shmfabric", "throughput", 64)
    add("64 B batched >= 10 M frames/s", t64 and t64["frames_per_s"],
        t64 and t64["frames_per_s"] >= 10e6, t64 and f"{t64['frames_per_s'] / 1e6:.2f} M/s")
    v = t64 and t64["vs_seqpacket"]
    add(f"64 B batched >= 10x seqpacket ({BATCHED})", v, v and v >= 10, v and f"{v:.1f}x")
    t1500 = _find(rows, "shmfabric", "throughput", 1500)
    v = t1500 and t1500["vs_seqpacket"]
    add(f"1500 B batched >= 3x seqpacket ({BATCHED})", v, v and v >= 3, v and f"{v:.1f}x")
    for ref, what in _memcpy_refs(rows, 1500):
        v = t1500 and ref and t1500["bytes_per_s"] / ref["bytes_per_s"]
        add(f"1500 B bytes/s >= 50% of memcpy: {what}", v, v and v >= 0.5,
            v and f"{v * 100:.0f}% of {_bytes(ref['size'])}")
    f64 = _find(rows, "shmfabric", "forward", 64)
    v = f64 and f64["frames_per_s"]
    add("forward 64 B >= 5 M frames/s", v, v and v >= 5e6, v and f"{v / 1e6:.2f} M/s")
    l64 = _find(rows, "shmfabric", "latency", 64)
    v = l64 and l64["p50_us"]
    add("latency 64 B p50 <= 3 us (busy-poll)", v, v and v <= 3, v and f"{v:.2f} us")
    b64 = _find(rows, "shmfabric-block", "latency", 64)
    v = b64 and b64["p99_us"]
    add("latency 64 B p99 <= 50 us (blocking)", v, v and v <= 50, v and f"{v:.2f} us")
    for t in out:
        if t["value"] is None:
            t["ok"] = None
        else:
            t["ok"] = bool(t["ok"])
    return out


def comparisons(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ratios that need saying what is compared with what, per frame size measured:
    {"comparison", "figures", "ratio"} (ratio None when a side was not measured)."""
    out: list[dict[str, Any]] = []

    def fps(x: float) -> str:
        return _si(x)

    def add(what: str, ours: dict[str, Any] | None, theirs: dict[str, Any] | None, latency: bool = False) -> None:
        if not ours or not theirs:
            return
        if latency:
            ratio = theirs["p50_us"] / ours["p50_us"] if ours["p50_us"] else None
            figures = f"{_us(theirs['p50_us'])} us / {_us(ours['p50_us'])} us"
        else:
            ratio = ours["frames_per_s"] / theirs["frames_per_s"] if theirs["frames_per_s"] else None
            figures = f"{fps(ours['frames_per_s'])} / {fps(theirs['frames_per_s'])} frames/s"
        out.append({"comparison": what, "figures": figures, "ratio": ratio})

    sizes = sorted({r["size"] for r in rows if r["mode"] != "memcpy" and r["status"] == "ok"})
    for mode in ("throughput", "forward"):
        for size in sizes:
            seq = _find(rows, BASELINE, mode, size)
            batched = _find(rows, "shmfabric", mode, size)
            b = (batched or {}).get("details", {}).get("batch")
            how = BATCHED if b and b > 1 else "per-frame calls"
            add(f"{mode} {size} B, shmfabric batch {b} / seqpacket ({how})", batched, seq)
            add(f"{mode} {size} B, shmfabric-1 / seqpacket (per-frame vs per-frame calls)",
                _find(rows, "shmfabric-1", mode, size), seq)
    for size in sizes:
        add(f"latency {size} B p50, seqpacket-spin / shmfabric (busy-poll vs busy-poll)",
            _find(rows, "shmfabric", "latency", size), _find(rows, BASELINE_SPIN, "latency", size), latency=True)
        add(f"latency {size} B p50, seqpacket / shmfabric-block (blocking vs blocking)",
            _find(rows, "shmfabric-block", "latency", size), _find(rows, BASELINE, "latency", size), latency=True)
    for size in sizes:
        ours = _find(rows, "shmfabric", "throughput", size)
        if not ours:
            continue
        for ref, what in _memcpy_refs(rows, size):
            if ref:
                out.append({"comparison": f"throughput {size} B, shmfabric bytes/s / memcpy, {what}",
                            "figures": f"{ours['bytes_per_s'] / 1e9:.2f} / {ref['bytes_per_s'] / 1e9:.2f} GB/s "
                                       f"({_bytes(ref['size'])})",
                            "ratio": ours["bytes_per_s"] / ref["bytes_per_s"]})
    return out


# --- report ------------------------------------------------------------------------------


def _si(x: float | None, unit: str = "") -> str:
    if x is None:
        return ""
    for div, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}{unit}"
    return f"{x:.0f} {unit}".rstrip()


def _us(x: float | None) -> str:
    return "" if x is None else (f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:.0f}")


def _ratio(x: float | None, pct: bool = False) -> str:
    if x is None:
        return ""
    return f"{x * 100:.0f}%" if pct else f"{x:.2f}x"


def _bytes(n: int) -> str:
    for shift, unit in ((20, "MiB"), (10, "KiB")):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


def render(rows: list[dict[str, Any]], console: Any = None) -> None:
    """Print the rows as a rich table (grouped by mode and size), the like-for-like ratios and
    the targets table."""
    from rich.console import Console
    from rich.table import Table

    # Not a terminal (a pipe, a file): rich would wrap at 80 columns; the table needs ~170.
    console = console or Console(width=None if os.isatty(1) else 180)
    table = Table(title="shmfabric bench transport", title_justify="left")
    for col, just in (("mode", "left"), ("size", "right"), ("transport", "left"), ("frames/s", "right"),
                      ("GB/s", "right"), ("p50 us", "right"), ("p99 us", "right"), ("x seqpacket", "right"),
                      ("x memcpy", "right"), ("x ring memcpy", "right"), ("note", "left")):
        table.add_column(col, justify=just, max_width=26 if col == "transport" else None)  # type: ignore[arg-type]
    last: tuple[str, int] | None = None
    for r in rows:
        key = (r["mode"], 0 if r["mode"] == "memcpy" else r["size"])
        if last is not None and key != last:
            table.add_section()
        last = key
        gbs = "" if r["bytes_per_s"] is None else f"{r['bytes_per_s'] / 1e9:.2f}"
        if r["status"] == "ok":
            note = _note(r)
            style = "bold" if r["transport"].startswith("shmfabric") else None
        else:
            note = f"{r['status']}: {r['error']}"
            style = "red" if r["status"] == "error" else "dim"
        size = _bytes(r["size"]) if r["mode"] == "memcpy" else str(r["size"])
        fps = "" if r["mode"] == "memcpy" else _si(r["frames_per_s"])  # (copies/s in JSON)
        table.add_row(r["mode"], size, r.get("label") or r["transport"], fps, gbs, _us(r["p50_us"]),
                      _us(r["p99_us"]), _ratio(r["vs_seqpacket"]), _ratio(r["vs_memcpy"], pct=True),
                      _ratio(r.get("vs_memcpy_ring"), pct=True), note, style=style)
    console.print(table)
    cmp = comparisons(rows)
    if cmp:
        ct = Table(title="like-for-like ratios (this run)", title_justify="left")
        ct.add_column("comparison")
        ct.add_column("figures", justify="right")
        ct.add_column("ratio", justify="right")
        for c in cmp:
            pct = "memcpy" in c["comparison"]
            ct.add_row(c["comparison"], c["figures"], _ratio(c["ratio"], pct=pct))
        console.print(ct)
    targets = evaluate_targets(rows)
    tt = Table(title="issue 2 targets (this run)", title_justify="left")
    tt.add_column("target")
    tt.add_column("measured", justify="right")
    tt.add_column("met")
    for t in targets:
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: "[dim]-[/]"}[t["ok"]]
        tt.add_row(t["target"], t["measured"], met)
    console.print(tt)


def _note(r: dict[str, Any]) -> str:
    d = r.get("details") or {}
    parts = []
    if "batch" in d:
        parts.append(f"batch {d['batch']}" + (f" ({d['calls']})" if "calls" in d else ""))
    if "wait_mode" in d:
        parts.append(d["wait_mode"])
    elif d.get("busy_poll"):
        parts.append("busy-poll")
    if "how" in d:
        parts.append(d["how"])
    if r["mode"] == "latency" and d.get("vs") == BASELINE_SPIN:
        parts.append(f"x {BASELINE_SPIN}")
    if "slots_cycled" in d:
        few = d.get("slot_samples", 0) < MIN_SLOT_SAMPLES
        parts.append(f"{d['slots_cycled']} slots cycled" + (" (too few samples for a ring memcpy)" if few else ""))
    if r["mode"] == "latency" and r["samples"]:
        parts.append(f"{r['samples']} samples")
    if d.get("terminated"):
        parts.append(f"terminated {','.join(d['terminated'])}")
    return ", ".join(parts)


def public_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for --json: every field, `details` kept (a dict), numbers as floats or null; each
    row also carries what it ran with (`provenance.run_info`: the same for every row of a run)."""
    return [{k: r.get(k) for k in ROW_FIELDS} for r in rows]
