"""The supervisor: creates the fabric, runs every node as a process, keeps them running and steers them.

One `Supervisor` owns one fabric. Each logical node of the topology runs as one or more
*instances* (processes `python -m shmfabric.functions.run`, attached as NAME, NAME-2, ...). The
supervisor's loop (`tick`) watches process exits and the fabric's node table, restarts failed
instances with backoff (`RestartTracker`), feeds input-queue depths to the scale policy
(`ScaleDecider`) and collects counters. Operators (management API, `reload`) call the public
methods; every public method holds one lock, so the loop and API threads never interleave steps
(the loop releases it while it waits for its polls' and config pushes' replies: `_ask_each`).

Steering uses the runtime's control ops over the fabric (docs: notes/runtime_contract.md):
`set_next` re-points an upstream node, `stop` drains an instance's input ring and ends it,
`reconfigure` pushes a config, `stats` reads counters. Removing an instance always re-steers its
upstream first and stops it second, so the frames already queued to it are still processed.

Configs and secrets: an instance gets its config on an anonymous in-memory file (a memfd, passed
as `--config @/proc/self/fd/N` and closed by the manager once the process started), never on its
command line, which every local user reads (`ps`). A function's secret config fields
(`shmfabric.functions.api.secret_fields`: `repr=False` or `json_schema_extra={"secret": True}`) are
shown as "<redacted>" wherever the manager shows a config (status, API answers), and their values
are replaced by "<redacted>" in its events and error messages (`redact_text`). Internally the
real values are kept and compared (a reload that changes only a key pushes it).

Adapter nodes (`adapter:` in the topology: a TAP interface, a memif port or a global address's
dispatcher) run the `shmfabric adapter` / `shmfabric memif` / `shmfabric global` command
(`python -P -m shmfabric.cli.main ...`) as their one instance, shown as function `adapter:tap` /
`adapter:memif` / `adapter:global`. They answer only `stats` and `stop`: they are
polled, restarted and stopped like functions, but never steered, pushed a config or scaled; a
change of their settings (a reload) replaces the instance: the old one stops first (it owns the
device or socket), then the new one starts. A memif secret is not put on the command line: it is
the content of the instance's config fd, read with `--secret-file /proc/self/fd/N`.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from shmfabric.functions.api import REDACTED, secret_fields
from shmfabric.manager.config import (ADAPTER_FUNCTION_PREFIX, ConfigError, NodeConfig, Topology, adapter_claims,
                                      api_listen, api_token_file, check_functions, instance_name, is_source_function)
from shmfabric.manager.policy import RestartTracker, ScaleAction, ScaleDecider

__all__ = ["SupervisorError", "OperationInProgress", "ControlChannel", "Instance", "Supervisor", "pids_mapping", "proc_cpu_seconds"]

MANAGER_NODE = "manager"
CONTROL_TIMEOUT = 2.0       # a healthy runtime answers between two batches
READY_TIMEOUT = 0.2         # one readiness probe; a starting node is probed again next round
STATS_TIMEOUT = 0.5         # polls must not stall the loop behind one slow node
START_TIMEOUT = 15.0        # interpreter start, imports, config validation, attach
STOP_TIMEOUT = 10.0         # draining a full input ring through a slow function
OP_WAIT = 30.0              # an operator action waits this long for the one under way, then is refused (409)
CONTROL_BUSY_WAIT = 0.05    # the loop waits this long for the control channel an operation uses, then skips
STEP_JOIN = 60.0            # stop() waits this long for a scale policy step under way to end


class SupervisorError(Exception):
    """An operation the supervisor refused or could not finish; the message says why and what to do."""

    def __init__(self, message: str, status: int = 400, retry: bool = False):
        super().__init__(message)
        self.status = status  # HTTP status the management API answers with
        self.retry = retry  # a condition that clears by itself: `up` exits 75 (EX_TEMPFAIL), not 2


class OperationInProgress(SupervisorError):
    """Another operator action ran all the time this one waited its turn (409)."""


class ControlBusy(SupervisorError):
    """The loop did not ask: an operation is waiting for a reply on the control channel (asked next round)."""


class ControlChannel(Protocol):
    """Request/reply with a node's runtime (shmfabric.functions.control.ControlClient)."""

    def request(self, target: str, op: dict, timeout: float) -> dict: ...

    def close(self) -> None: ...


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process from /proc/PID/stat, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


NODE_COUNTERS = ("rx_frames", "rx_bytes", "tx_frames", "tx_bytes", "tx_drops", "tx_ring_full", "tx_nobuf", "rx_bad")


def _take_node_counters(inst: "Instance", e: dict) -> None:
    """Record node-table entry `e` as `inst`'s current process's counters; a new process (another
    node id, incarnation or pid) adds the previous one's last counters to the base first."""
    key = (e["id"], e["gen"], e["pid"])
    if inst.node_incarnation != key:
        if inst.node_incarnation is not None:
            for k in NODE_COUNTERS:
                inst.node_base[k] = inst.node_base.get(k, 0) + inst.node_last.get(k, 0)
        inst.node_incarnation = key
    inst.node_last = {k: e[k] for k in NODE_COUNTERS}


@dataclass
class Instance:
    """One process running a node's function."""

    name: str
    node: str
    function: str
    config: dict = field(repr=False)  # may hold secrets: never in a repr
    version: str | None
    index: int
    tracker: RestartTracker
    state: str = "starting"  # starting, running, backoff, stopping, stopped, exited (finished), failed
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    restarts: int = 0
    exit_code: int | None = None
    error: str | None = None
    counters: dict = field(default_factory=dict)           # the runtime's (in_frames, dropped, ...)
    function_counters: dict = field(default_factory=dict)  # the function's own (rule hits, alerts, ...)
    missing_polls: int = 0
    stats_failures: int = 0
    last_answer: float = 0.0  # when it last answered a control request (clock of the supervisor)
    counters_at: float | None = None  # when `counters` were read (clock of the supervisor)
    # sends its current process had refused by a full next-hop ring (node table `tx_ring_full`) between
    # the last two polls: its output is held up by its next hop (see `_output_blocked`)
    ring_full_delta: int = 0
    # started by an operator action that is not committed yet (reload, replace, scale out): in no
    # node's next group, and left alone by the loop, until the action commits (or withdraws it)
    staged: bool = False
    log_start: int = 0  # size of its log file when this run started: its error is read from there on
    # its process may run another config than `config` (a push that timed out, a push it missed while
    # starting): the loop pushes `config` to it once it answers again (`_push_pending`)
    push_config: bool = False
    # The node-table counters (NODE_COUNTERS) over all its processes: those of the processes that
    # ended (`node_base`) plus the last read of the current one's (`node_last`, kept after it
    # stops), so they never go back when it restarts or stops (Prometheus counters).
    node_base: dict = field(default_factory=dict)
    node_last: dict = field(default_factory=dict)
    node_incarnation: tuple | None = None
    via: str | None = None  # an adapter's: the instance its --via named at its start
    # A function's: the steer its process has, (next group, ports) as `_steer_key`: what its command
    # line carried at its start, then what each set_next it took said (adapters take none: None), and
    # the names its command line passed as --down. A command line is built when the process starts:
    # one that was starting while an operator action changed the group it sends to carries the old
    # group; it is told the current one once it runs (`_set_next` waits for it, `steer_due`).
    steer: tuple | None = None
    down_at_start: tuple = ()
    # it turned running with another steer than its node's current one: the loop sends it a
    # set_next (`_resteer_pending`); kept so until one is taken, retried after a failure at
    # `steer_retry_at` (doubling waits: one that keeps refusing does not hold operations up each round)
    steer_due: bool = False
    steer_failures: int = 0
    steer_retry_at: float = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def active(self) -> bool:
        """Part of its node's group (receives traffic once up)."""
        return self.state in ("starting", "running", "backoff") and not self.staged


@dataclass
class _Node:
    cfg: NodeConfig
    decider: ScaleDecider
    instances: list[Instance] = field(default_factory=list)
    function: str = ""
    config: dict = field(default_factory=dict, repr=False)  # may hold secrets: never in a repr
    version: str | None = None
    depth: int = 0
    resteer: bool = False  # an instance came back: upstream must resolve its name again
    # an operator's count outside the scale policy's bounds (`scale`): it stands, the policy does not
    # undo it, until the next operator action on the node (scale, reload)
    operator: int | None = None


class _Spawner:
    """Starts every function process from one thread that lives as long as the supervisor.

    A function dies with its manager (PR_SET_PDEATHSIG, see functions/run.py), and the kernel
    sends that signal when the *thread* that forked the process ends, not the process: forked
    from the caller's thread, an instance started by a management API request (one thread per
    request) would be stopped as soon as its request was answered. Daemon: a manager that is
    exiting must not wait for it."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future, list[str], dict] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="shmfabric-spawner", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            done, argv, kwargs = job
            try:
                done.set_result(subprocess.Popen(argv, **kwargs))
            except BaseException as exc:  # handed to the caller, who reports it
                done.set_exception(exc)

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """`subprocess.Popen(argv, **kwargs)`, run on the spawner thread; its exceptions are raised here."""
        done: Future = Future()
        self._jobs.put((done, argv, kwargs))
        return done.result()

    def close(self) -> None:
        """End the thread (every process it started must be gone: they are sent SIGTERM)."""
        self._jobs.put(None)
        self._thread.join(timeout=5)


def _config_fd(config: dict | bytes) -> int:
    """A file descriptor (close-on-exec, so only a process it is passed to gets it) from which the
    config's JSON reads, for `--config @/proc/self/fd/N`: an anonymous in-memory file (memfd), which
    is on no file system and which no other user can open (another user's /proc/PID/fd is closed to
    them). Where memfd_create is missing (or refused), the read end of a pipe a thread fills."""
    data = config if isinstance(config, bytes) else json.dumps(config, separators=(",", ":")).encode()
    try:
        fd = os.memfd_create("shmfabric-config", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            raise
        return _above_stdio(fd)  # its offset does not matter: /proc/self/fd/N opens the file from its start
    r, w = os.pipe()  # both close-on-exec (PEP 446)
    r = _above_stdio(r)

    def fill() -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(w, view):]
        except OSError:
            pass  # the process died before it read: it is restarted (or reported) like any failed start
        finally:
            os.close(w)

    threading.Thread(target=fill, name="shmfabric-config-pipe", daemon=True).start()
    return r


# Secret values remembered for redaction, at most (every key a node ever ran, rotations included,
# is far fewer; the bound only stops an API client from growing the set without end).
MAX_REMEMBERED_SECRETS = 1024


def _above_stdio(fd: int) -> int:
    """`fd`, moved to 3 or above (close-on-exec) if it is 0, 1 or 2: in a process started with a
    standard descriptor closed, a new descriptor takes its number, and the child's stdio set-up
    would then overwrite it (the instance read /dev/null as its config)."""
    if fd > 2:
        return fd
    import fcntl

    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)


def _private_opener(path: str, flags: int) -> int:
    """`open(..., opener=)`: a file created readable by its owner only (0600)."""
    return os.open(path, flags, 0o600)


def _default_control(fabric: Any) -> ControlChannel:
    from shmfabric.functions.control import ControlClient

    return ControlClient(fabric, node_name=MANAGER_NODE)


def _default_resolve(name: str) -> type:
    from shmfabric.functions import registry

    return registry.load(name)


class Supervisor:
    """Runs a topology. `start()`, then `tick()` periodically (or `run()`), then `stop()`."""

    def __init__(self, topo: Topology, *, source: str = "<config>", log_dir: str | Path | None = None,
                 python: str = sys.executable, control_factory: Callable[[Any], ControlChannel] = _default_control,
                 resolve: Callable[[str], type] | None = _default_resolve, clock: Callable[[], float] = time.monotonic,
                 extra_env: dict[str, str] | None = None, pinned: dict[str, str] | None = None,
                 event_stream: Any = None):
        self.topo = topo
        # what the API and metrics listeners were started with: a reload does not move them, so its
        # warnings compare with these, not with the file loaded last
        self._listening = {"api": topo.api, "metrics": topo.metrics}
        self.source = source
        # what the command line set over the file (`up --fabric NAME`, `--api HOST:PORT`): kept
        # over every file reloaded, or a reload of the file started with saw another fabric
        self.pinned = {k: v for k, v in (pinned or {}).items() if v is not None}
        self.python = python
        self.clock = clock
        self._control_factory = control_factory
        self._resolve = resolve
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        self.log_dir = Path(log_dir) if log_dir else None
        # LOCK ORDER: `_op_lock` first, then `lock`, then `_ctl_lock`; never the other way round. A
        # thread that holds `lock` never blocks on `_op_lock` (the loop only tries it, without
        # blocking, and not while holding `lock`): an operation holding `_op_lock` releases `lock`
        # while it waits (for new instances, `_cond.wait`; for a control reply, `_request`) and must
        # be able to take it back. Operator actions enter through `_operation()`, which takes both in
        # this order; the scale policy's steps run on a thread of their own (`_run_steps`), to which
        # the loop hands the `_op_lock` it took. `_ctl_lock` is taken last and held only around one
        # control request: a thread holding it takes no other lock. An operation asks without
        # holding `lock` (`_request`); so does the loop for its stats polls and config pushes
        # (`_ask_each`: a stopped instance's reply holds up the round, not status), and it applies
        # each reply, back under `lock`, only to the process it asked (`_same_run`). The loop makes
        # its config pushes only while it holds `_op_lock` (no operator action can change or push a
        # config between its snapshot and its reply). Its readiness probes (`_ready`, READY_TIMEOUT)
        # are still asked holding `lock`, as stop() asks; the loop waits at most CONTROL_BUSY_WAIT for
        # `_ctl_lock` and otherwise asks next round (the watch never waits for a reply an operation
        # waits for).
        self.lock = threading.RLock()
        # waits for new instances release `lock` (status answers meanwhile) through this condition
        self._cond = threading.Condition(self.lock)
        # operator actions (reload, replace, scale, reconfigure, and the policy's scale steps) run one
        # at a time: taken before `lock`, and held while `lock` is released for a wait
        self._op_lock = threading.Lock()
        # how long an operator action waits for the one under way before it is refused with 409
        self.op_wait = OP_WAIT
        self._op: dict | None = None  # the operator action in progress, shown by status()
        # the thread of the operation holding `_op_lock` (its control requests release `lock`)
        self._op_thread: int | None = None
        # one control request at a time: the channel (one fabric node) is not safe for two threads
        self._ctl_lock = threading.Lock()
        self._local = threading.local()  # .ticking: this thread runs the loop's round (`tick`)
        self._stepper: threading.Thread | None = None  # the scale policy's steps under way
        self._closing = False  # stop() began: no new policy step, waits for new instances end
        self._step_start_failed = False  # the last policy step thread could not be started (reported once)
        self._staging: Topology | None = None  # the topology a reload is starting new instances for
        # the instances the operation under way (an operator action, a policy step, `start`) started: a
        # set_next it sends names them down only by their state, never by a liveness check (`_not_up`),
        # so that it is refused when one of them died and the operation undoes itself
        self._op_new: list[Instance] = []
        self.fabric: Any = None
        self.control: ControlChannel | None = None
        self.nodes: dict[str, _Node] = {}
        self.events: deque[dict] = deque(maxlen=200)
        # where each event is also written, one line each (`up` sets sys.stderr: the detached manager's log)
        self.event_stream: Any = event_stream
        self.started_wall = time.time()
        self.started = False
        self._table: dict[str, dict] = {}
        self._delivered_seen: dict[str, int] = {}  # chain -> its tail's frames at the last status
        self._delivered_base: dict[str, int] = {}  # chain -> what instances no longer listed had delivered
        self._rings: list[dict] = []
        # instances with a (nearly) full output ring -> the instances their full rings lead to
        self._full_out: dict[str, list[str]] = {}
        self._pools: list[dict] = []
        self._sampled_at: float | None = None  # when the node table, rings and pools were last read
        self._spawner: _Spawner | None = None
        # secrets: each function's secret config fields, and every secret value a config brought
        # (kept after a key rotation: an old key is still a secret), replaced in texts shown to people
        self._secret_cache: dict[str, frozenset[str]] = {}
        self._secret_values: frozenset[str] = frozenset()
        self._secret_order: dict[str, None] = {}  # the values of _secret_values, oldest first (for the bound)
        self._secrets_lock = threading.Lock()  # its own: API threads redact without the supervisor lock
        for cfg in topo.nodes:
            self._remember_secrets(cfg.function_name, cfg.settings)

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Create the fabric and start every node (downstream first); raise SupervisorError on failure."""
        from shmfabric.fabric import Fabric, FabricError

        if self._resolve is not None:
            try:
                check_functions(self.topo, self.source, self._resolve, _read_text(self.source))
            except ConfigError as exc:
                raise SupervisorError(str(exc)) from None
        f = self.topo.fabric
        self._clear_stale(f.name)
        try:
            self.fabric = Fabric.create(f.name, max_nodes=f.max_nodes, ring_size=f.ring_size,
                                        networks=[{"mtu": n.mtu, "slots": n.slots} for n in f.networks])
        except FabricError as exc:
            raise SupervisorError(f"cannot create fabric {f.name!r}: {exc}") from None
        try:
            self.lock.acquire()
            if self.log_dir:
                try:
                    self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                    (self.log_dir / ".write-test").touch()
                    (self.log_dir / ".write-test").unlink()
                except OSError as exc:
                    raise SupervisorError(f"cannot write the instances' logs to {self.log_dir}: "
                                          f"{exc.strerror or exc}; make that directory writable, or set "
                                          "SHMFABRIC_STATE_DIR to a writable directory") from None
            self.control = self._control_factory(self.fabric)
            now = self.clock()
            for cfg in self.topo.nodes:
                self.nodes[cfg.name] = _Node(cfg, ScaleDecider(self.topo.scale_of(cfg.name)),
                                             function=cfg.function_name, config=cfg.settings, version=cfg.version)
            # all at once, downstream first: the runtime waits for its next hops itself, and
            # starting in parallel halves `up` time (each interpreter spends ~0.5 s importing)
            for name in self.topo.start_order():
                for k in range(1, self.topo.instances_of(name) + 1):
                    self._spawn(self.nodes[name], k, now)
            self._wait_up([i for n in self.nodes.values() for i in n.instances], START_TIMEOUT)
            # a cycle across chains (a reply path) has no downstream-first order: a node started
            # before a node it sends to got no --next for it; now that all are up, it is told
            order = self.topo.start_order()
            for name in order:
                later = set(order[order.index(name) + 1:])
                if any(t in later for t in self._targets(name)):
                    self._set_next(self.nodes[name])
            self.started = True
            self._event("up", "", f"fabric {f.name}, {sum(len(n.instances) for n in self.nodes.values())} instances")
            self._refresh(self.clock())
        except BaseException:
            self.stop()
            raise
        finally:
            self._op_new = []
            self.lock.release()

    def _clear_stale(self, name: str) -> None:
        """A fabric file left by a crashed manager is removed; one in use is an error, and so is
        another user's (which only its owner or root may remove: /dev/shm is sticky)."""
        from shmfabric.core.region import region_path
        from shmfabric.fabric import Fabric, FabricError, RegionNotFoundError

        path = region_path(name)
        try:
            owner = os.lstat(path).st_uid
        except OSError:
            owner = None  # none (Fabric.open says so), or not ours to look at (Fabric.open says why)
        if owner is not None and owner != os.geteuid() and os.geteuid() != 0:
            # not ours to remove, and its users' processes (another user's) are not ours to see in
            # /proc/PID/maps, so whether it is in use cannot be told either
            import pwd

            try:
                user = pwd.getpwuid(owner).pw_name
            except KeyError:
                user = "no user name"
            raise SupervisorError(f"region {path} belongs to uid {owner} ({user}); choose another fabric name "
                                  "(--fabric) or ask its owner to remove it", status=409)

        def destroy() -> None:
            try:
                Fabric.destroy(name)
            except FabricError as exc:  # e.g. made by another user since we looked
                raise SupervisorError(f"cannot create fabric {name!r}: {exc}", status=409) from None

        try:
            old = Fabric.open(name)
        except RegionNotFoundError:
            return
        except FabricError as exc:
            # unreadable (another layout version, not a region, truncated): nothing of ours can
            # use it, but a process of another shmfabric may map it, and removing the file
            # would leave it alone on a region nobody else can find
            users = pids_mapping(path)
            if users:
                who = ", ".join(f"{pid} ({_comm(pid)})" for pid in users)
                raise SupervisorError(f"fabric {name!r} cannot be opened ({exc}) and is mapped by live process(es) "
                                      f"pid {who}; stop them, or remove the region anyway with `shmfabric destroy "
                                      f"{name}` (they keep their mapping), or choose another fabric.name",
                                      status=409) from None
            # other users' processes are not seen (their /proc/PID/maps is not ours to read)
            nobody = "no live process maps it" if os.geteuid() == 0 else "no live process of yours maps it"
            print(f"shmfabric: fabric {name!r} cannot be opened ({exc}); {nobody}: replacing it "
                  "with a new one", file=sys.stderr, flush=True)
            self._event("replace-region", "", f"replaced unreadable {path}: {exc}")
            destroy()
            return
        try:
            alive = [n for n in old.nodes() if n["alive"] and n["state"] == "up"]
        finally:
            old.close()
        if alive:
            shown = 10
            who = ", ".join(f"{n['name']} (pid {n['pid']})" for n in alive[:shown])
            if len(alive) > shown:
                who += f" and {len(alive) - shown} more"
            pids = " ".join(sorted({str(n["pid"]) for n in alive}, key=int))
            raise SupervisorError(f"fabric {name!r} is in use by {who}; nodes of a manager that was killed stop "
                                  "by themselves within seconds (try again then); else stop their manager "
                                  f"(`shmfabric down --fabric {name}`) or the processes (`kill {pids}`), or choose "
                                  "another fabric.name", status=409, retry=True)
        # No node is up, but processes may still map it: those of a killed manager that left the
        # fabric and are still exiting (or a program that opened it without attaching)
        users = pids_mapping(path)
        if users:
            who = ", ".join(f"{pid} ({_comm(pid)})" for pid in users[:10])
            raise SupervisorError(f"fabric {name!r} has no node up but is still mapped by pid {who}: processes of "
                                  "a manager that was killed are still stopping (try again in a few seconds), or "
                                  f"stop them (`kill {' '.join(map(str, users))}`), or choose another fabric.name",
                                  status=409, retry=True)
        destroy()

    def stop(self) -> None:
        """Stop every instance (sources first, each draining its input), then remove the fabric."""
        # a scale policy step under way ends first (its waits for new instances give up at once), so
        # that it starts nothing after the instances are stopped; not waited for from a thread
        # holding `lock` (start() failing), which the step would need
        self._closing = True
        step = self._stepper
        if step is not None and step is not threading.current_thread() and not self.lock._is_owned():
            step.join(STEP_JOIN)
        with self.lock:
            order = list(reversed(self.topo.start_order()))
            order += [n for n in self.nodes if n not in order]  # e.g. left over from a failed reload
            for name in order:
                node = self.nodes.get(name)
                if node is None:
                    continue
                for inst in list(node.instances):
                    if inst.state not in ("stopped", "exited", "failed"):
                        # the stop reply comes once the input is drained: downstream may be stopped
                        # next while this process is still exiting
                        self._stop_instance(inst, drain=True, wait_exit=False)
            for node in self.nodes.values():
                for inst in node.instances:
                    _reap(inst.proc)
                node.instances.clear()
            if self.control is not None:
                with self._ctl_lock:  # not while an operation's request is using it
                    try:
                        self.control.close()
                    except Exception:
                        pass
                    self.control = None
            if self.fabric is not None:
                name = self.fabric.name
                try:
                    self.fabric.close()
                finally:
                    from shmfabric.fabric import Fabric

                    Fabric.destroy(name)
                self.fabric = None
            if self._spawner is not None:
                self._spawner.close()  # after the reaps: its end would signal what it started
                self._spawner = None
            if self.started:
                self._event("down", "", "all instances stopped")
            self.started = False

    def quiesce(self, timeout: float = 10.0) -> bool:
        """Stop the sources (nodes nothing sends to), then wait until every ring is empty and the
        counters hold still, so a final status adds up (frames sent = received + dropped).
        Returns whether that happened within `timeout`."""
        with self.lock:
            for name, node in self.nodes.items():
                if not self.topo.upstream_of(name):
                    for inst in node.instances:
                        if inst.state in ("running", "starting"):
                            self._stop_instance(inst, drain=True)
        deadline = self.clock() + timeout
        last = None
        while self.clock() < deadline:
            self.tick()
            with self.lock:
                snap = [(i.name, i.counters.get("in_frames"), i.counters.get("out_frames"))
                        for n in self.nodes.values() for i in n.instances]
                if snap == last and not any(r["depth"] for r in self._rings):
                    return True
                last = snap
            time.sleep(min(self.topo.poll_interval, 0.1))
        return False

    def run(self, stop: threading.Event, duration: float | None = None) -> None:
        """Tick every poll_interval until `stop` is set or `duration` seconds passed."""
        end = None if duration is None else self.clock() + duration
        while not stop.is_set():
            if end is not None and self.clock() >= end:
                break
            try:
                self.tick()
            except SupervisorError as exc:
                # a step that failed (a new instance that did not come up, a node that refused
                # set_next) is reported; the loop goes on, the next tick retries what is still due
                self._event("error", "", str(exc))
            except Exception as exc:  # a bug here must not take every function down with the manager
                self._event("error", "", f"{type(exc).__name__}: {exc}")
                print(self.redact_text(traceback.format_exc()), end="", file=sys.stderr, flush=True)
            wait = self.topo.poll_interval if end is None else max(0.0, min(self.topo.poll_interval, end - self.clock()))
            stop.wait(wait)

    # -- the loop --------------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        """One round: notice exits, restart due instances, poll counters, decide the scale policy's
        steps (and re-steering after restarts), which run on a thread of their own (`_run_steps`)."""
        # The stats polls and config pushes are asked with `lock` released (`_ask_each`): a slow or
        # stopped instance holds up this round, never status. (A caller that held `lock` would keep it
        # through them: none does.) Steering, scaling and the config pushes are the loop's operations:
        # `_op_lock` first, then `lock` (the lock order, see __init__). Only tried, never waited for, and
        # tried holding no `lock`, after the polls (an operator action is not held up by them either):
        # an operator action (or a policy step) that holds `_op_lock` leaves the watch below to this
        # round and its pushes and steps to a later one, and one that has just taken `_op_lock` cannot
        # starve the policy by waiting for `lock` behind us. When there is a step to take, `_op_lock` is
        # handed to the thread that takes it (released there): this round returns at once, and the
        # next rounds go on watching while the step waits.
        op = handed = False
        self._local.ticking = True
        try:
            with self.lock:
                if self.fabric is None:
                    return
                now = self.clock() if now is None else now
                polls = self._polls_due()
            # counters first: an answer just now must count before the watch judges responsiveness
            # (the lock may have been held long by an operator action, with no polls meanwhile)
            answers = self._ask_each(polls, STATS_TIMEOUT)
            op = self._op_lock.acquire(blocking=False)
            with self.lock:
                if self.fabric is None:
                    return
                self._refresh(now)
                self._take_stats(answers)
                for node in list(self.nodes.values()):
                    for inst in list(node.instances):
                        self._watch(node, inst, now)
                # only holding `_op_lock`: no operator action pushes or changes a config meanwhile
                pushes = self._push_pending() if op else []
                if pushes:  # named while it runs: in status, and in the 409 an operator action gets
                    self._op = {"kind": "reconfigure", "node": ", ".join(i.name for i, _, _ in pushes),
                                "since": round(time.time(), 3)}
            try:
                # one unanswered push ends this round's pushes: `_op_lock` is held at most one
                # CONTROL_TIMEOUT for them, whatever the number of instances flagged
                pushed = self._ask_each(pushes, CONTROL_TIMEOUT, stop_on_failure=True)
            finally:
                if pushes:
                    with self.lock:
                        self._op = None
            with self.lock:
                if self.fabric is None:
                    return
                self._take_pushes(pushed)
                if op and not self._closing:  # else an operator action is under way: steer and scale after it
                    handed = self._steer_and_scale(now)
        finally:
            self._local.ticking = False
            if op and not handed:
                self._op_lock.release()

    def _steer_and_scale(self, now: float) -> bool:
        """Feed the scale policy this round's depths and start a thread (`_run_steps`) for the steps
        due: the policy's, and re-steering the upstream of nodes whose instances came back. Called
        holding `_op_lock` and `lock`; returns whether the thread started (it releases `_op_lock`)."""
        resteer = any(self._resteer_due(node) or self._late_steer(node) for node in self.nodes.values())
        steps: list[tuple[str, ScaleAction]] = []
        before: dict[str, dict] = {}  # each decider as it was before this round (see below)
        for name, node in list(self.nodes.items()):
            running = [i for i in node.instances if i.active]
            if not running:
                continue  # finished or failed for good: scaling must not resurrect it
            if node.operator is not None:
                continue  # an operator's count outside the policy stands (see `scale`)
            if node.cfg.is_adapter:
                continue  # one instance: it owns its device or socket
            why = self._output_blocked(node)
            node.decider.output_blocked = why is not None
            saved = node.decider.state()
            action = node.decider.observe(now, node.depth, len(running))
            if action is ScaleAction.HELD:
                # its queue grows because its next hop does not take frames: more instances would
                # wait on the same rings
                pol = node.decider.policy
                nblocked, npolls = node.decider.blocked_polls()
                self._event("scale-skipped", name, f"not scaling out to {len(running) + 1} (queue depth {node.depth}, "
                            f"over out_depth {pol.out_depth} per instance for {pol.out_for:g}s): its output is "
                            f"blocked by its next hop ({why}; blocked at {nblocked} of the {npolls} polls of the "
                            f"last {pol.out_for:g}s); more instances would not help")
            elif action in (ScaleAction.OUT, ScaleAction.IN):
                steps.append((name, action))
                before[name] = saved
        if not resteer and not steps:
            return False
        step = threading.Thread(target=self._run_steps, args=(steps,), name="shmfabric-policy", daemon=True)
        try:
            step.start()
        except RuntimeError as exc:
            # no thread to be had: the steps are not taken. `observe` counted each as taken (its
            # cooldown began, its windows were cleared): put the deciders back as they were before
            # this round, so that the next round decides the same step again (not after the cooldown)
            for name, saved in before.items():
                node = self.nodes.get(name)
                if node is not None:
                    node.decider.restore(saved)
            if not self._step_start_failed:  # once until a step thread starts again, not every round
                self._event("error", "", f"cannot start the scale policy's step ({exc}); retried at the next rounds")
            self._step_start_failed = True
            return False
        self._step_start_failed = False
        self._stepper = step
        return True

    def _run_steps(self, steps: list[tuple[str, ScaleAction]]) -> None:
        """The scale policy's steps (and re-steering after restarts), run like an operator action:
        holding the `_op_lock` the loop handed over (released here), then `lock`, which the waits
        release (for new instances and for control replies), so the loop and status go on meanwhile."""
        try:
            with self.lock:
                self._op_thread = threading.get_ident()
                try:
                    self._resteer_pending()
                    for name, action in steps:
                        if self._closing or self.fabric is None:
                            break
                        try:
                            self._policy_step(name, action)
                        except SupervisorError as exc:
                            # a step that failed (a new instance that did not come up, a node that
                            # refused set_next) is reported; the policy tries again after its cooldown
                            self._event("error", name, str(exc))
                finally:
                    self._op_thread = None
                    self._op = None
        except Exception as exc:  # a bug here must not take every function down with the manager
            self._event("error", "", f"{type(exc).__name__}: {exc}")
            print(self.redact_text(traceback.format_exc()), end="", file=sys.stderr, flush=True)
        finally:
            self._op_lock.release()

    @staticmethod
    def _resteer_due(node: _Node) -> bool:
        """Whether `node`'s upstream is to be re-steered now: flagged, and its group runs. A group with
        none in it (its last instance failed for good since it was flagged) is none to steer to: its
        upstream would be sent an empty next group."""
        active = [i for i in node.instances if i.active]
        return node.resteer and bool(active) and all(i.state == "running" for i in active)

    def _resteer_pending(self) -> None:
        """Re-steer the upstream of every node an instance came back to, once its instances all run;
        then tell each instance that turned running with a stale steer (`steer_due`) the current one."""
        for node in list(self.nodes.values()):
            if self._resteer_due(node):
                node.resteer = False
                self._op = {"kind": "resteer", "node": node.cfg.name, "since": round(time.time(), 3)}
                try:
                    self._resteer_upstream(node.cfg.name)
                except SupervisorError as exc:
                    self._event("error", node.cfg.name, f"re-steering upstream failed: {exc}")
                finally:
                    self._op = None
        for node in list(self.nodes.values()):
            late = self._late_steer(node)  # (re-steered above as an upstream meanwhile: none left)
            if not late:
                continue
            self._op = {"kind": "resteer", "node": node.cfg.name, "since": round(time.time(), 3)}
            try:
                self._set_next(node, only=late)
            except SupervisorError as exc:
                self._event("error", node.cfg.name, f"steering {', '.join(i.name for i in late)} failed: {exc}; "
                            "tried again")
            finally:
                self._op = None
                now = self.clock()
                for inst in late:  # (not told: a refusal, a timeout; asked again later, less often each time)
                    if inst.steer_due:
                        inst.steer_failures += 1
                        inst.steer_retry_at = now + min(30.0, 2.0 ** inst.steer_failures)

    def _late_steer(self, node: _Node) -> list[Instance]:
        """`node`'s running instances with a stale steer to be told (`steer_due`, its retry due), whose
        steer is still not the node's current one (re-steered meanwhile: nothing to tell)."""
        now = self.clock()
        due = [i for i in node.instances if i.steer_due and i.state == "running" and not i.staged
               and i.steer_retry_at <= now]
        if not due:
            return []
        current = self._current_steer(node)
        for i in due:
            if i.steer == current:
                i.steer_due = False
        return [i for i in due if i.steer_due]

    def _policy_step(self, name: str, action: ScaleAction) -> None:
        """One step the policy decided: one instance more or fewer of node `name`, counted now (the
        watch may have seen an instance end since the decision)."""
        node = self.nodes.get(name)
        if node is None or node.operator is not None:
            return  # removed, or an operator's count since: theirs stands
        running = [i for i in node.instances if i.active]
        if not running:
            return
        count = len(running) + (1 if action is ScaleAction.OUT else -1)
        if count < 1:
            return
        self._op = {"kind": "autoscale", "node": name, "instances": count, "since": round(time.time(), 3)}
        try:
            self._scale_to(node, count, self.clock(), reason=f"queue depth {node.depth}")
        finally:
            self._op = None
            self._op_new = []

    def _output_blocked(self, node: _Node) -> str | None:
        """Why node `node`'s own output is held up by its next hop at this poll, or None: one of its
        running instances had sends refused by a full next-hop ring since the previous poll (its node
        table `tx_ring_full` grew), or has an output ring (nearly) full (the same test that exempts
        it from the health check). Its queue then grows because its next hop does not take frames."""
        why = []
        for inst in node.instances:
            if not inst.active or inst.state != "running":
                continue
            if inst.ring_full_delta > 0:
                why.append(f"{inst.name} had {inst.ring_full_delta} sends refused by a full ring since the last poll")
            full = self._full_out.get(inst.name)
            if full:
                why.append(f"{inst.name}'s ring to {', '.join(full)} is full")
        return "; ".join(why[:3]) + (f"; and {len(why) - 3} more" if len(why) > 3 else "") if why else None

    def _watch(self, node: _Node, inst: Instance, now: float) -> None:
        rc = inst.proc.poll() if inst.proc is not None else None
        entry = self._table.get(inst.name)
        up = entry is not None and entry.get("state") == "up" and entry.get("alive") and entry.get("pid") == inst.pid
        if inst.staged:
            return  # the operator action that started it watches it (_wait_up)
        if inst.state == "backoff":
            if inst.restart_at is not None and now >= inst.restart_at:
                self._respawn(node, inst, now)
            return
        if inst.state not in ("starting", "running"):
            return
        if rc is not None:
            self._on_exit(node, inst, rc, now)
            return
        if inst.state == "starting":
            ready = self._ready(inst) if up else False
            if ready:
                self._now_running(node, inst)
            elif ready is None:
                # attached, but not asked: the control channel is busy with an operation's request.
                # A round that did not ask says nothing about it: judged at a round that asks
                return
            elif now - inst.started_at > START_TIMEOUT:
                # not attached, or attached and its probe (sent) not answered, START_TIMEOUT after its start
                self._event("hung", inst.name, f"not attached after {START_TIMEOUT:g}s; killing it" if not up else
                            f"attached but not answering control requests after {START_TIMEOUT:g}s; killing it")
                _kill(inst.proc)
            return
        limit = inst.tracker.policy.unresponsive_after
        # a node waiting on a full output ring is held by backpressure (the runtime retries the send
        # without serving control messages); the stuck one is downstream and is judged on its own.
        # Judged only when its last poll was sent and not answered (`stats_failures`): a poll that was
        # not sent (the control channel busy with an operation's request) says nothing about it
        if (limit and inst.name not in self._full_out and inst.stats_failures
                and now - max(inst.last_answer, inst.started_at) > limit):
            # alive, attached, but deaf (stuck in a function, SIGSTOPped): only a restart helps
            self._event("hung", inst.name, f"no answer to control requests for {limit:g}s; killing it")
            _kill(inst.proc)
            return
        # running: the process lives but its node left the table (detached itself or was reclaimed)
        if not up:
            inst.missing_polls += 1
            if inst.missing_polls >= 3:
                self._event("hung", inst.name, "process alive but its node is gone from the fabric; killing it")
                _kill(inst.proc)
        else:
            inst.missing_polls = 0

    def _now_running(self, node: _Node, inst: Instance) -> None:
        """`inst`, starting, answered its readiness probe: it runs. If the steer its process has (its
        command line's) is not its node's current one, it is told (`steer_due`): its command line was
        built before an operator action changed the group it sends to (the loop restarted it while the
        action had released `lock`), and a set_next then skipped it as starting; sending to an instance
        that left the group, it kept that one from draining (killed after STOP_TIMEOUT), for good.
        A staged instance is left to the action that started it (it steers its node at its commit)."""
        inst.state = "running"
        if not inst.staged and inst.steer is not None and inst.steer != self._current_steer(node):
            inst.steer_due = True

    def _on_exit(self, node: _Node, inst: Instance, rc: int, now: float) -> None:
        """Judge the exit (status `rc`) of `inst`, starting or running, by its restart policy: backoff
        (restarted at `restart_at` by `_watch`), failed (exit 2 at start, the restart limit, restarts
        disabled) or exited (a bounded source that finished). The loop's (`_watch`), and that of a
        restart the manager made itself (`_restart_adapter`), whose exit at start is no different."""
        inst.exit_code = rc
        err = _exit_text(rc, _log_tail(self._log_path(inst.name), start=inst.log_start))
        pol = inst.tracker.policy
        if inst.state == "starting" and rc == 2:
            # exit 2 at start is the runtime's "invalid configuration": restarting cannot help
            inst.state, inst.error = "failed", err or "configuration rejected (exit 2)"
            self._event("failed", inst.name, f"exit 2 at start: {inst.error}")
            self._left_for_good(node)
            return
        # Exit 0 is "finished" only for a bounded source (see `_finishes`): only its input can run
        # out. Any other node has no end of input: its exit 0 means something stopped it from
        # outside (a SIGTERM), and the chain is dead behind it, so it is restarted like a failure.
        source = self._finishes(inst)
        if rc == 0 and ((pol.mode == "on-failure" and source) or not pol.enabled):
            inst.state = "exited"
            why = ("restarts are disabled (restart.enabled: false)" if not pol.enabled
                   else "a source that finished is not restarted (restart.mode on-failure)")
            self._event("exited", inst.name, f"finished (exit 0); {why}")
            return
        when = inst.tracker.on_exit(now)
        inst.error = err or f"exited with status {rc}"
        if rc == 0:
            inst.error = ("exited with status 0 though frames are sent to it (stopped from outside?)"
                          if not self._is_source(inst) else "exited with status 0 though it has no end (a "
                          "source without `count`: stopped from outside?)")
        if when is None:
            inst.state = "failed"
            if not pol.enabled:
                self._event("failed", inst.name, f"exit {rc}; not restarted: restarts are disabled "
                            "(restart.enabled: false)")
            else:
                self._event("failed", inst.name, f"exit {rc}; restart limit reached ({pol.max_restarts}"
                            f" in {pol.window:g}s), giving up")
            self._left_for_good(node)
        else:
            inst.state, inst.restart_at = "backoff", when
            self._event("exited", inst.name, f"exit {rc}; restart in {when - now:.2f}s")

    def _policy_note(self, node: _Node) -> str:
        """For a message saying that `node` did not come up: when its restart policy retries it."""
        inst = next((i for i in node.instances if i.state == "backoff" and i.restart_at is not None), None)
        if inst is None:
            return ""
        return f"; its restart policy restarts it in {max(0.0, inst.restart_at - self.clock()):.2f}s"

    @staticmethod
    def _holds(node: _Node) -> bool:
        """Whether `node` may hold its adapter's device, addresses or socket: a process of it lives, or
        the loop will start one (backoff). One failed or exited holds nothing."""
        return any(i.state in ("starting", "running", "stopping", "backoff")
                   or (i.proc is not None and i.proc.poll() is None) for i in node.instances)

    @staticmethod
    def _left_for_good(node: _Node) -> None:
        """One of `node`'s instances failed for good: if others run on, its upstream is re-steered to them
        (`_resteer_pending`), as after a restart. Else a function upstream kept the dead instance in its
        next group, and an adapter whose `via:` named it kept sending to it (`_check_via` moves it to the
        first that runs). With none left there is no group to steer to: nothing is sent."""
        if any(i.active for i in node.instances):
            node.resteer = True

    def _is_source(self, inst: Instance) -> bool:
        """Whether `inst` runs a source function (by the function's kind, as the config's loop check)."""
        if inst.function.startswith(ADAPTER_FUNCTION_PREFIX):
            return False  # it has no end of input: an exit 0 was a stop from outside (restarted)
        if self._resolve is None:  # no function classes at hand: a node nothing sends to
            return not self.topo.upstream_of(inst.node)
        try:
            return is_source_function(self._resolve(inst.function))
        except (LookupError, ValueError):
            return False

    def _finishes(self, inst: Instance) -> bool:
        """Whether an exit 0 of `inst` is the end of its input (finished, not restarted): a source
        function that is bounded. Bounded: the class's optional `finite(config) -> bool` says so, else a
        positive `count` in its config (the generator's: without one it runs for ever, a pcap too, being
        replayed in a loop). An unbounded source that exits 0 was stopped from outside: restarted."""
        if not self._is_source(inst):
            return False
        if self._resolve is not None:
            try:
                finite = getattr(self._resolve(inst.function), "finite", None)
            except (LookupError, ValueError):
                finite = None
            if callable(finite):
                try:
                    return bool(finite(dict(inst.config)))
                except Exception:
                    return True
        count = inst.config.get("count")
        return isinstance(count, int) and not isinstance(count, bool) and count > 0

    def _refresh(self, now: float) -> None:
        """Read the node table, ring depths and pools once per tick."""
        fab = self.fabric
        table = {}
        for e in fab.nodes():
            if e["state"] == "up":
                table[e["name"]] = e
        self._table = table
        self._sampled_at = self.clock()  # the table's rx/tx counters are as of now
        for node in self.nodes.values():
            for inst in node.instances:
                e = table.get(inst.name)
                inst.ring_full_delta = 0
                if e is not None and inst.state in ("running", "stopping"):
                    before = (inst.node_incarnation, inst.node_last.get("tx_ring_full", 0))
                    _take_node_counters(inst, e)
                    if before[0] == inst.node_incarnation:  # the same process: what it added since
                        inst.ring_full_delta = inst.node_last.get("tx_ring_full", 0) - before[1]
        ids = {e["id"]: name for name, e in table.items()}
        rings = []
        depth_to: dict[str, int] = {}
        for s, sname in ids.items():
            for d, dname in ids.items():
                if s == d:
                    continue
                st = fab.ring_stats(s, d)
                if st["enqueued"] or st["depth"]:
                    rings.append({"src": sname, "dst": dname, **{k: st[k] for k in
                                  ("depth", "enqueued", "dequeued", "full_events", "down")}})
                    depth_to[dname] = depth_to.get(dname, 0) + st["depth"]
        self._rings = rings
        full = max(1, self.topo.fabric.ring_size - self.topo.fabric.ring_size // 16)
        self._full_out = {}
        for r in rings:
            if r["depth"] >= full:
                self._full_out.setdefault(r["src"], []).append(r["dst"])
        for node in self.nodes.values():
            node.depth = sum(depth_to.get(i.name, 0) for i in node.instances if i.active)
        self._pools = []
        for k, spec in enumerate(fab.networks):
            a = fab.pool_audit(k)
            self._pools.append({"network": k, "mtu": spec.mtu, "total": a["total"], "free": a["free"],
                                "held": sum(a["held"].values()), "orphaned": a["orphaned"]})

    def _polls_due(self) -> list[tuple[Instance, Any, dict]]:
        """The stats polls of this round (holding `lock`): each running instance, with its process now."""
        return [(inst, inst.proc, {"op": "stats"}) for node in self.nodes.values() for inst in node.instances
                if inst.state == "running" and not (inst.proc is not None and inst.proc.poll() is not None)]

    def _ask_each(self, asks: list[tuple[Instance, Any, dict]], timeout: float,
                  stop_on_failure: bool = False) -> list[tuple]:
        """The loop's requests `asks` (instance, its process when listed, request), asked in turn with
        `lock` released (`_ctl_lock` only, around each: `_request`), so that status and operations go on
        while an instance is slow to answer. Touches no instance: returns (instance, process, request,
        reply or the SupervisorError, when) for each one asked, for the caller to apply under `lock`
        (`_same_run`). Stops at ControlBusy: an operation is waiting for a reply, the rest are asked
        next round (nobody is judged on a request that was not sent); with `stop_on_failure`, also after
        the first request that got no answer."""
        out = []
        for inst, proc, op in asks:
            try:
                reply: dict | SupervisorError = self._request(inst.name, op, timeout)
            except ControlBusy:
                break
            except SupervisorError as exc:
                reply = exc
            out.append((inst, proc, op, reply, self.clock()))
            if stop_on_failure and isinstance(reply, SupervisorError):
                break
        return out

    def _same_run(self, inst: Instance, proc: Any) -> bool:
        """Whether `inst` is still in its node, running and running `proc` (holding `lock`): a reply to a
        request the loop sent with `lock` released counts (and so does its absence) only for the process
        asked, not for an instance restarted, replaced, scaled in or stopped meanwhile."""
        node = self.nodes.get(inst.node)
        return (node is not None and any(i is inst for i in node.instances) and inst.proc is proc
                and inst.state == "running")

    def _take_stats(self, answers: list[tuple]) -> None:
        """Apply the stats polls' replies (`_ask_each`) to the instances still running the process asked."""
        for inst, proc, _, reply, at in answers:
            if not self._same_run(inst, proc):
                continue
            if isinstance(reply, SupervisorError):
                inst.stats_failures += 1
                continue
            inst.stats_failures = 0
            inst.last_answer = max(inst.last_answer, at)
            if inst.counters_at is not None and inst.counters_at > at:
                continue  # read since (another round's poll): not replaced by older counters
            if isinstance(reply.get("counters"), dict):
                inst.counters = reply["counters"]
                inst.counters_at = at
            if isinstance(reply.get("function_counters"), dict):
                inst.function_counters = reply["function_counters"]

    # -- instances -----------------------------------------------------------------------------
    def _targets(self, name: str) -> list[str]:
        node = self.nodes[name].cfg if name in self.nodes else self.topo.node(name)
        return self.topo.next_of(name) + [t for t in node.ports if t not in self.topo.next_of(name)]

    @staticmethod
    def _members(node: _Node, staged: bool) -> list[str]:
        return [i.name for i in node.instances if i.active or (staged and i.staged and i.state in ("starting", "running"))]

    def _next_instances(self, name: str, topo: Topology | None = None, staged: bool = False) -> list[str]:
        """Instance names that logical node `name` sends to: every active instance of its next step
        (with `staged`, also the instances an operator action is starting: a staged instance's own view)."""
        topo = topo or self.topo
        out = []
        for nxt in topo.next_of(name):
            node = self.nodes.get(nxt)
            if node is not None:
                out += self._members(node, staged)
        return out

    def _port_instances(self, name: str, topo: Topology | None = None, staged: bool = False) -> dict[str, list[str]]:
        """Port name -> the active instances behind it, for logical node `name`'s ports."""
        out: dict[str, list[str]] = {}
        if topo is not None:
            ports = topo.node(name).ports
        else:
            ports = self.nodes[name].cfg.ports if name in self.nodes else self.topo.node(name).ports
        for target in ports:
            tnode = self.nodes.get(target)
            members = self._members(tnode, staged) if tnode else []
            out[target] = members or [target]
        return out

    def _view_of(self, node: _Node, inst: Instance) -> tuple[Topology, NodeConfig]:
        """The topology and node config an instance runs: a staged instance of a reload runs the new
        topology's view of its node."""
        topo = self._staging if inst.staged and self._staging is not None else self.topo
        name = node.cfg.name
        return topo, (topo.node(name) if name in {n.name for n in topo.nodes} else node.cfg)

    def _argv(self, node: _Node, inst: Instance, config_fd: int | None) -> list[str]:
        """The instance's command line. Its config is not on it (every local user reads a command
        line: `ps`, /proc/PID/cmdline) but on `config_fd` (see `_config_fd`), inherited by the process."""
        topo, cfg = self._view_of(node, inst)
        name = node.cfg.name
        if cfg.adapter is not None:
            return self._adapter_argv(topo, cfg, inst, config_fd)
        # --parent-pid: the instance stops (gracefully) when this manager dies, even by kill -9
        # -P: the cwd (where `up` ran) is not put on sys.path, so a json.py lying there is not imported
        argv = [self.python, "-P", "-m", "shmfabric.functions.run", "--fabric", topo.fabric.name, "--node", inst.name,
                "--function", inst.function, "--config", f"@/proc/self/fd/{config_fd}",
                "--batch", str(cfg.batch), "--parent-pid", str(os.getpid())]
        in_topo = name in {n.name for n in topo.nodes}
        nxt = self._next_instances(name, topo, staged=inst.staged) if in_topo else []
        if nxt:
            argv += ["--next", ",".join(nxt)]
        ports = self._port_instances(name, topo, staged=inst.staged) if in_topo else {}
        for target, members in ports.items():
            # the function sees the logical name; frames spread over its instances by flow hash
            argv += ["--port", f"{target}={','.join(members)}"]
        names = [*nxt, *(n for members in ports.values() for n in members)]
        # not waited for at its start: started together with the nodes it sends to (`up`, an operator
        # action's staged instances), all but those known down (`_down_at_start`); restarted by the
        # loop (after an exit and its backoff), every one not running (`_not_up`): one merely starting
        # may never attach (a crash loop), and waiting for it the instance answered nothing and was
        # killed as hung after START_TIMEOUT, at each restart again
        down = self._down_at_start(names) if inst.staged or not self.started else self._not_up(names)
        for n in down:
            argv += ["--down", n]
        inst.steer, inst.down_at_start = _steer_key(nxt, ports), tuple(down)
        net = topo.network_index(name) if in_topo else 0
        if net:
            argv += ["--network", str(net)]
        return argv

    def _via_instance(self, via: str) -> str:
        """The instance an adapter with `via: NODE` sends through: NODE's first active instance (by
        index), or NODE's first instance name (NODE itself) when none runs."""
        node = self.nodes.get(via)
        active = sorted((i for i in node.instances if i.active), key=lambda i: i.index) if node else []
        return active[0].name if active else instance_name(via, 1)

    def _adapter_argv(self, topo: Topology, cfg: NodeConfig, inst: Instance, config_fd: int | None) -> list[str]:
        """An adapter instance's command line: `shmfabric adapter|memif FABRIC INSTANCE ...` through the
        CLI's module; a memif secret on `config_fd` (`--secret-file`), never on it."""
        a = cfg.adapter
        assert a is not None
        argv = [self.python, "-P", "-m", "shmfabric.cli.main"]
        if a.kind == "memif":
            argv += ["memif", topo.fabric.name, inst.name, "--socket", a.socket, "--role", a.role, "--id", str(a.id),
                     "--ring-size", str(a.ring_size), "--buffer-size", str(a.buffer_size)]
            if getattr(a, "secret", None):
                argv += ["--secret-file", f"/proc/self/fd/{config_fd}"]
            if a.abstract:
                argv.append("--abstract")
        elif a.kind == "global":
            argv += ["global", topo.fabric.name, inst.name, "--address", a.address,
                     "--walk-every", repr(a.walk_every), "--confirm-timeout", repr(a.confirm_timeout)]
            for m in a.members:
                # (the member's instance name: the dispatcher finds its node by name, whatever id it
                # has; validation made each member a tap adapter of this topology)
                argv += ["--member", f"{self._via_instance(m)}={topo.node(m).adapter.netns or ''}"]
                if m in a.weights:  # (validation made each weight's node a member, in range)
                    argv += ["--weight", f"{self._via_instance(m)}={a.weights[m]}"]
        else:
            argv += ["adapter", topo.fabric.name, inst.name, "--ifname", a.ifname]
            for addr in a.address:
                argv += ["--address", addr]
            if a.netns:
                argv += ["--netns", a.netns]
            if a.mtu is not None:
                argv += ["--mtu", str(a.mtu)]
            for g in a.global_:
                argv += ["--global", g]
            if a.source_check:
                argv.append("--source-check")
            for prefix in a.allow_source:
                argv += ["--allow-source", prefix]
            if a.dhcp_server:
                argv.append("--dhcp-server")
        argv += ["--batch", str(cfg.batch), "--parent-pid", str(os.getpid()),
                 "--network", str(topo.network_index(cfg.name))]
        inst.via = self._via_instance(cfg.via) if cfg.via else None
        if inst.via:
            argv += ["--via", inst.via]
        return argv

    def _log_path(self, name: str) -> Path | None:
        return self.log_dir / f"{name}.log" if self.log_dir else None

    def _launch(self, node: _Node, inst: Instance, now: float) -> None:
        log = self._log_path(inst.name)
        out = open(log, "ab", opener=_private_opener) if log else subprocess.DEVNULL
        inst.log_start = out.tell() if log else 0
        with self.lock:  # start() launches without holding it
            if self._spawner is None:
                self._spawner = _Spawner()
        fd = None
        try:
            adapter = self._view_of(node, inst)[1].adapter
            secret = getattr(adapter, "secret", None) if adapter is not None else None
            # a memif adapter's fd holds its secret alone (`--secret-file`); a function's, its config;
            # other adapters read none (and get none: it would stay open in them)
            fd = _config_fd(secret.encode() if secret else inst.config) if secret or adapter is None else None
            # the fd keeps its number in the process (pass_fds), which reads and closes it at start
            inst.proc = self._spawner.popen(self._argv(node, inst, fd), stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT if log else subprocess.DEVNULL, env=self._env,
                                            close_fds=True, pass_fds=(fd,) if fd is not None else (),
                                            start_new_session=True)
        finally:
            if fd is not None:
                os.close(fd)  # the manager's copy: the process holds its own
            if log:
                out.close()
        inst.state, inst.started_at, inst.exit_code, inst.restart_at = "starting", now, None, None
        inst.missing_polls = inst.stats_failures = 0
        inst.push_config = False  # started with `config` (on its config fd)
        inst.tracker.on_start(now)

    def _free_index(self, node: _Node) -> int:
        used = {i.index for i in node.instances}
        k = 1
        while k in used or self.fabric.node_id(instance_name(node.cfg.name, k)) is not None:
            k += 1
        if k > 99:
            raise SupervisorError(f"node {node.cfg.name!r} has no free instance name left")
        return k

    def _spawn(self, node: _Node, index: int | None, now: float, *, function: str | None = None,
               config: dict | None = None, version: str | None = None, staged: bool = False,
               topo: Topology | None = None, keep: bool = False) -> Instance:
        """Start an instance of `node` (index `index`, else the first free). A process that cannot be
        started raises SupervisorError; its instance leaves the node, or with `keep` stays in it,
        judged by its restart policy as if it had exited at start (backoff: `_watch` retries it)."""
        k = index if index is not None else self._free_index(node)
        self._remember_secrets(function or node.function, config if config is not None else node.config)
        inst = Instance(instance_name(node.cfg.name, k), node.cfg.name, function or node.function,
                        dict(config if config is not None else node.config),
                        version if version is not None else node.version, k,
                        RestartTracker((topo or self.topo).restart_of(node.cfg.name)), staged=staged)
        node.instances.append(inst)
        if staged or not self.started:
            self._op_new.append(inst)  # (see `_not_up`)
        try:
            self._launch(node, inst, now)
        except OSError as exc:
            if keep:
                # the node's only instance (an adapter the manager restarts): without it nothing would
                # ever start the node again, and status would show no instance at all
                self._cannot_start(node, inst, exc, now)
            else:
                node.instances.remove(inst)
            raise SupervisorError(f"cannot start {inst.name!r} ({inst.function}): {exc}", status=500) from None
        self._event("start", inst.name, f"{inst.function} pid {inst.pid}")
        return inst

    def _respawn(self, node: _Node, inst: Instance, now: float) -> None:
        try:
            self._launch(node, inst, now)
        except OSError as exc:
            # judged as an exit at start: retried within the restart limit, not every round for ever
            self._cannot_start(node, inst, exc, now)
            return
        inst.restarts += 1  # (processes started again, not attempts)
        node.resteer = True
        self._event("restart", inst.name, f"restart #{inst.restarts}, pid {inst.pid}")

    def _cannot_start(self, node: _Node, inst: Instance, exc: OSError, now: float) -> None:
        """Judge a process of `inst` that could not be started (`_launch` raised `exc`) by its restart
        policy, as an exit at start: backoff (`_watch` retries it), or failed at the restart limit."""
        when = inst.tracker.on_exit(now)
        inst.error = f"cannot start: {exc}"
        pol = inst.tracker.policy
        if when is None:
            inst.state, inst.restart_at = "failed", None
            why = (f"restart limit reached ({pol.max_restarts} in {pol.window:g}s), giving up" if pol.enabled
                   else "not restarted: restarts are disabled (restart.enabled: false)")
            self._event("failed", inst.name, f"{inst.error}; {why}")
            self._left_for_good(node)
        else:
            inst.state, inst.restart_at = "backoff", when
            self._event("exited", inst.name, f"{inst.error}; restart in {when - now:.2f}s")

    def _wait_up(self, insts: list[Instance], timeout: float, judge: bool = False) -> None:
        """Block until every instance's node is up in the table; SupervisorError names the one that is not.
        An instance that exits meanwhile is failed (the action that started it undoes it), or with
        `judge` left to its restart policy (`_on_exit`: backoff), as the loop judges any exit: for an
        instance in its node's group that no action undoes (an adapter the manager restarted)."""
        deadline = time.monotonic() + timeout
        pending = [i for i in insts if i.state == "starting"]
        procs = {id(i): i.proc for i in pending}  # the process each was started as
        while pending:
            if self.fabric is None or self._closing:
                raise SupervisorError("the manager is stopping", status=503)
            for inst in list(pending):
                if inst.state == "running" and inst.proc is procs[id(inst)]:
                    pending.remove(inst)  # the loop found it ready (it watches every instance not staged)
                    continue
                if inst.state != "starting" or inst.proc is not procs[id(inst)]:
                    # the loop saw its exit first (this wait releases `lock`) and its restart policy
                    # judged it (and may have started it again since): that stands
                    rc = inst.exit_code
                    why = inst.error or (_exit_text(rc, None) if rc is not None else inst.state)
                    raise SupervisorError(f"node {inst.name!r} ({inst.function}) exited"
                                          + (f" with status {rc}" if rc is not None else "")
                                          + f" at start: {why}", status=500)
                rc = inst.proc.poll() if inst.proc else None
                if rc is not None:
                    node = self.nodes.get(inst.node)
                    if judge and node is not None:
                        self._on_exit(node, inst, rc, self.clock())
                    else:
                        # (the action that started it undoes it: a staged instance, or `start`, which
                        # stops everything when one does not come up)
                        inst.state, inst.exit_code = "failed", rc
                        inst.error = _exit_text(rc, _log_tail(self._log_path(inst.name), start=inst.log_start))
                    raise SupervisorError(f"node {inst.name!r} ({inst.function}) exited with status {rc} at start: "
                                          f"{inst.error or _exit_text(rc, None)}", status=500)
                proc = inst.proc
                # `_ready` releases `lock` while it waits for the reply: the loop may judge an exit
                # meanwhile (and start it again). Running only if it is still this start's process,
                # unjudged; else the next round looks at it again
                if self._ready(inst) and inst.state == "starting" and inst.proc is proc:
                    node = self.nodes.get(inst.node)
                    if node is not None:
                        self._now_running(node, inst)
                    else:
                        inst.state = "running"
                    pending.remove(inst)
            if not pending:
                return
            if time.monotonic() > deadline:
                # attached and not answering is another fault than not attached (e.g. a function that
                # waits for a next hop that never attaches: it answers nothing meanwhile)
                deaf = [i.name for i in pending if self.fabric.node_id(i.name) is not None]
                absent = [i.name for i in pending if i.name not in deaf]
                why = []
                if absent:
                    why.append(f"node(s) {', '.join(absent)} did not attach within {timeout:g}s")
                if deaf:
                    why.append(f"node(s) {', '.join(deaf)} attached but did not answer a control request as "
                               f"ready within {timeout:g}s")
                raise SupervisorError("; ".join(why) + "; see their logs"
                                      + (f" in {self.log_dir}" if self.log_dir else ""), status=500)
            # the lock is released while waiting (fully, however deeply held): status answers meanwhile,
            # and the loop goes on watching the other instances (it leaves staged ones to this wait)
            self._cond.wait(0.02)

    def _ready(self, inst: Instance) -> bool | None:
        """Attached and answering control requests: the runtime built its function and reached its loop
        (a node attaches before its function is constructed, so attachment alone proves little).
        None: not asked (the loop found the control channel busy with an operation's request)."""
        if self.fabric.node_id(inst.name) is None:
            return False
        try:
            reply = self._request(inst.name, {"op": "stats"}, READY_TIMEOUT)
        except ControlBusy:
            return None
        except SupervisorError:
            return False
        inst.last_answer = self.clock()
        if isinstance(reply.get("counters"), dict):
            inst.counters = reply["counters"]
            inst.counters_at = inst.last_answer
        return bool(reply.get("ok"))

    def _stop_instance(self, inst: Instance, drain: bool, wait_exit: bool = True) -> int | None:
        """Stop one instance: op stop (drain) first, then SIGTERM, then SIGKILL. Returns the frames it
        processed in all (the runtime's reply). Without `wait_exit`, a process that confirmed the stop
        is left to exit on its own (reap it with `_reap`)."""
        processed = None
        proc = inst.proc
        if proc is not None and proc.poll() is None and inst.state in ("running", "starting", "stopping"):
            inst.state = "stopping"
            if drain and self.control is not None:
                try:
                    reply = self._request(inst.name, {"op": "stop"}, STOP_TIMEOUT)
                    processed = reply.get("processed")
                    if isinstance(processed, int):
                        # the reply carries the final input count; counters polled earlier are stale
                        c = inst.counters
                        if not self.topo.upstream_of(inst.node) and c.get("in_frames", 0) <= processed:
                            # a source sends what it produced, less what it could not hand on
                            c["out_frames"] = processed - int(c.get("dropped", 0)) - int(c.get("next_down", 0))
                        c["in_frames"] = processed
                        inst.counters_at = self.clock()
                except SupervisorError as exc:
                    self._event("stop", inst.name, f"no reply to stop ({exc}); terminating")
            if inst.proc is not proc or inst.state != "stopping":
                # the `stop` request released `lock` (an operation's): someone else (stop()) took
                # this instance over meanwhile; theirs is the rest
                return processed
            if processed is not None and not wait_exit:
                inst.state = "stopped"
                self._event("stop", inst.name, f"stopped (processed {processed})")
                return processed
            if not self._wait_exit(proc, STOP_TIMEOUT if processed is not None else 0.05):
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
                if not self._wait_exit(proc, STOP_TIMEOUT):
                    _kill(proc)
                    self._wait_exit(proc, 5)
            if inst.proc is not proc or inst.state != "stopping":
                return processed  # taken over while the waits released `lock` (see above)
        elif proc is not None:
            proc.poll()
        inst.exit_code = proc.returncode if proc is not None else None
        inst.state = "stopped"
        # (an adapter's stop reply carries no frame count: its counters are in status)
        done = f", processed {processed}" if processed is not None else ""
        self._event("stop", inst.name, f"stopped (exit {inst.exit_code}{done})")
        return processed

    def _wait_exit(self, proc: subprocess.Popen, timeout: float) -> bool:
        """Wait up to `timeout` seconds for `proc` to exit; returns whether it did. An operation (the
        thread holding `_op_lock`, as in `_request`) waits with `lock` released, however deeply held,
        as its other waits do: the loop (restarts, counters) and status go on meanwhile, and callers
        look at the instance again after. Anyone else (the loop, stop()) waits holding it."""
        if not (self._op_thread == threading.get_ident() and self.lock._is_owned()):
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._cond.wait(min(0.05, left))
        return True

    def _request(self, target: str, op: dict, timeout: float = CONTROL_TIMEOUT) -> dict:
        """Ask an instance over the control channel, one request at a time (`_ctl_lock`). An operation
        (the thread holding `_op_lock`) releases `lock` while it waits for the reply, however deeply
        held, as a wait for new instances does: the loop and status go on meanwhile (its instances
        may change state: callers look again after). The loop's round waits at most CONTROL_BUSY_WAIT
        for the channel (a round must not wait out an operation's reply; its probes hold `lock`) and
        raises ControlBusy instead; anyone else waits for it."""
        if self.control is None:
            raise SupervisorError("the manager is not running", status=503)
        if self._op_thread == threading.get_ident() and self.lock._is_owned():
            saved = self.lock._release_save()
            try:
                with self._ctl_lock:
                    return self._ask(target, op, timeout)
            finally:
                self.lock._acquire_restore(saved)
        wait = CONTROL_BUSY_WAIT if getattr(self._local, "ticking", False) else -1
        if not self._ctl_lock.acquire(timeout=wait):
            raise ControlBusy(f"{op.get('op')} to {target!r} not sent: the control channel is busy with "
                              f"{_op_text(self._op)}", status=503)
        try:
            return self._ask(target, op, timeout)
        finally:
            self._ctl_lock.release()

    def _ask(self, target: str, op: dict, timeout: float) -> dict:
        """One control request, holding `_ctl_lock`."""
        if self.control is None:  # stopped while this waited for the channel
            raise SupervisorError("the manager is not running", status=503)
        try:
            reply = self.control.request(target, op, timeout)
        except Exception as exc:  # the client's own timeout / unknown node errors
            raise SupervisorError(f"{op.get('op')} to {target!r} failed: {exc}", status=504) from None
        if not isinstance(reply, dict):
            raise SupervisorError(f"{op.get('op')} to {target!r}: malformed reply {reply!r}", status=502)
        return reply

    def _resteer_upstream(self, name: str) -> None:
        """Tell every running instance of the nodes before `name` its current next group."""
        for up in self.topo.upstream_of(name):
            node = self.nodes.get(up)
            if node is None:
                continue
            self._set_next(node)

    def _set_next(self, node: _Node, only: list[Instance] | None = None) -> None:
        """Tell `node`'s running instances (or those of `only`) its current next group and ports.

        One starting whose command line carries another steer (started before an operator action
        changed the group: the loop restarted it while the action had released `lock`) is waited for
        and told, when an operation steers (its other waits release `lock` as this one does): else
        it would run on the old group for good, and an instance leaving the group (a replaced one)
        would be sent its frames, never drain and be killed. Waited for at most what is left of its
        START_TIMEOUT, after which the loop kills it as hung: its restart gets the current steer (so
        does one in backoff); one that comes up later still is told by the loop (`_now_running`)."""
        if node.cfg.is_adapter:
            # it cannot take set_next: its --via is fixed at its start. Only when the instance it sends
            # through went away (replaced: a new name) is it restarted on the new one; one that does not
            # come up is the restart policy's (not a reason to undo the action that moved its via)
            try:
                self._check_via(node)
            except SupervisorError as exc:
                self._event("error", node.cfg.name, f"adapter restart on its new via failed: {exc}"
                            f"{self._policy_note(node)}")
            return
        nxt = self._next_instances(node.cfg.name)
        ports = self._port_instances(node.cfg.name)
        steer = _steer_key(nxt, ports)
        names = [*nxt, *(n for members in ports.values() for n in members)]
        waits = self._op_thread == threading.get_ident()  # an operation's: its waits release `lock`
        told: list[str] = []
        not_told: list[str] = []
        named_down: set[str] = set()
        for inst in list(node.instances):
            if only is not None and not any(inst is i for i in only):
                continue
            stale = inst.steer is not None and inst.steer != steer
            if inst.state == "starting" and not inst.staged and stale and waits:
                self._await_start(inst)
                # (the group may have changed during the wait, `lock` released: what is current now)
                nxt = self._next_instances(node.cfg.name)
                ports = self._port_instances(node.cfg.name)
                steer = _steer_key(nxt, ports)
                names = [*nxt, *(n for members in ports.values() for n in members)]
            if inst.state != "running":
                why = {"backoff": "restarts with it", "starting": "starting with it on its command line"
                       if not stale else "starting, not up yet: told once it runs"}.get(inst.state, inst.state)
                not_told.append(f"{inst.name} ({why})")
                continue
            # per request: each releases `lock` (an operation's), and instances go down or come back meanwhile
            down = self._not_up(names)
            msg: dict[str, Any] = {"op": "set_next", "next": nxt}
            if ports:
                msg["ports"] = ports
            if down:
                msg["down"] = down
            proc = inst.proc
            try:
                reply = self._request(inst.name, msg)
                if not reply.get("ok"):
                    raise SupervisorError(f"set_next on {inst.name!r} refused: {reply.get('error')}", status=502)
            except SupervisorError as exc:
                # this one and those after it are not told: the loop tells them once this steer is
                # still the current one (an operation that undoes itself puts back what they have)
                for other in node.instances:
                    if other.state == "running" and not other.staged and other.steer not in (None, steer):
                        other.steer_due = True
                # which instances have the new group now, for whoever reads the events afterwards
                self._event("steer-refused", node.cfg.name, f"next -> {nxt}: {exc}; "
                            + (f"told {', '.join(told)} before it" if told else "no instance told"))
                raise
            if inst.proc is proc:  # (restarted meanwhile: its command line says what it has)
                inst.steer, inst.steer_due, inst.steer_failures = steer, False, 0
            told.append(inst.name)
            named_down.update(down)
        self._event("steer", node.cfg.name, f"next -> {nxt}" + (f", ports -> {ports}" if ports else "")
                    + (f" ({', '.join(sorted(named_down))} down: reached once up again)" if named_down else "")
                    + (f"; told {', '.join(told)}" if told else "; no instance told")
                    + (f"; not {', '.join(not_told)}" if not_told else ""))

    def _await_start(self, inst: Instance) -> None:
        """Wait (an operation: `lock` released) until `inst`, starting and watched by the loop, runs; at
        most what is left of its START_TIMEOUT. Its exit meanwhile is judged by its restart policy, as
        the loop judges any; neither that nor a timeout is the operation's failure (see `_set_next`)."""
        left = START_TIMEOUT - max(0.0, self.clock() - inst.started_at)
        try:
            self._wait_up([inst], min(START_TIMEOUT, max(0.0, left)), judge=True)
        except SupervisorError:
            if self._closing or self.fabric is None:
                raise  # the manager is stopping: the operation ends as it would have before (503)

    def _current_steer(self, node: _Node) -> tuple:
        """`node`'s current next group and ports as `_steer_key` (what `_set_next` sends)."""
        return _steer_key(self._next_instances(node.cfg.name), self._port_instances(node.cfg.name))

    def _not_up(self, names: list[str]) -> list[str]:
        """Of the instance names a `set_next` sends (or a restarted instance's command line: `_argv`),
        those that are not up: not running (restarting: in backoff or starting again; failed for good),
        a node with no instance (its name stands in), and a running one whose process has exited or
        whose node is not in the fabric's node table (died since the loop last looked: it is judged at
        its next round). The runtime takes these as given (frames to them are dropped and counted
        until they attach) instead of refusing the whole set_next, which kept e.g. a router on stale
        next hops while one of its port adapters restarted, or refused an unrelated replace (502).
        The instances the operation under way started itself (`_op_new`) are named only by their
        state: the runtime's refusal is how the operation learns that one it has just started is gone
        (it then undoes itself)."""
        mine = self._op_new if self._op_thread == threading.get_ident() or not self.started else []
        running = {i.name: i for n in self.nodes.values() for i in n.instances if i.state == "running"}
        wanted = list(dict.fromkeys(names))
        checked = [n for n in wanted if n in running and not any(running[n] is i for i in mine)]
        # one pass over the node table for all of them
        attached = self.fabric.node_refs(checked) if checked and self.fabric is not None else None
        out = []
        for name in wanted:
            inst = running.get(name)
            if inst is None:
                out.append(name)
            elif name in checked and ((inst.proc is not None and inst.proc.poll() is not None)
                                      or (attached is not None and name not in attached)):
                out.append(name)
        return sorted(out)

    def _down_at_start(self, names: list[str]) -> list[str]:
        """Of the instance names on the command line of a function started together with the nodes it
        sends to (by `up`, or staged by a reload, a replace or a scale-out), those it must not wait for
        at its start (`--down`): an instance in backoff, failed for good (or exited, stopping, stopped),
        one starting again after its backoff (a restart by the loop, which may crash-loop and never
        attach), or a node's name standing in for a node none of whose instances is up or starting
        with it. A function waits for its next hops before it answers the manager (at most 30 s), so
        one waiting for such a node was killed as hung after START_TIMEOUT (a staged one: the action
        failed). Unlike `_not_up` (a set_next, a restart by the loop), an instance starting with it
        (staged, or all of them during `up`) is waited for, so that a chain's first frames are not
        dropped; so is a name no instance has yet (a node this operation is about to start, or an
        adapter between its stop and start in `_restart_adapter`)."""
        def live(i: Instance) -> bool:
            return i.state == "running" or (i.state == "starting" and (i.staged or not self.started))

        insts = {i.name: i for n in self.nodes.values() for i in n.instances}
        out = []
        for name in dict.fromkeys(names):
            if name in insts:
                if not live(insts[name]):
                    out.append(name)
                continue
            node = self.nodes.get(name)  # a stand-in (`_port_instances`): the node has no active instance
            if node is not None and node.instances and not any(live(i) for i in node.instances):
                out.append(name)
        return out

    def _check_via(self, node: _Node) -> None:
        """Restart adapter `node` if the instance its `via:` names now is not the one it was started with."""
        if not node.cfg.via:
            return
        want = self._via_instance(node.cfg.via)
        # (an instance whose process could not even be launched has no via yet: its retry takes the current one)
        if any(i.active and i.via is not None and i.via != want for i in node.instances):
            self._restart_adapter(node, f"via {node.cfg.via} now runs as {want}")

    def _restart_adapter(self, node: _Node, reason: str) -> None:
        """Replace an adapter's instance: stop the old one first (it owns the device or socket the new one
        needs), then start one (its first instance name again) and wait until it answers. The frames
        on its link meanwhile are lost, as on any link restart. Raises SupervisorError if it does not
        come up. Nothing undoes this restart, so its failure is the restart policy's, as the loop judges
        any exit: an exit at its start (or a process that cannot be started) puts it in backoff (the
        loop restarts it), or failed (exit 2, the restart limit) until a reload starts it again; one
        that neither exits nor answers stays starting, and the loop kills it after START_TIMEOUT."""
        self._stop_adapter(node)
        self._start_adapter(node, reason)

    def _stop_adapter(self, node: _Node) -> None:
        """Stop adapter `node`'s instance (drained) and take it out of the node: what it holds (its
        device, addresses, socket) is free once this returns."""
        for inst in list(node.instances):
            if inst.state in ("starting", "running", "stopping"):
                inst.state = "stopping"
                self._stop_instance(inst, drain=True)
            elif inst.proc is not None and inst.proc.poll() is None:
                _kill(inst.proc)
                _reap(inst.proc)
            if inst in node.instances:
                node.instances.remove(inst)

    def _start_adapter(self, node: _Node, reason: str) -> None:
        """Start adapter `node`'s instance (stopped by `_stop_adapter`) and wait until it answers; its
        failure is its restart policy's (see `_restart_adapter`)."""
        inst = self._spawn(node, 1, self.clock(), keep=True)
        self._event("replace", node.cfg.name, f"adapter restarted ({reason})")
        node.resteer = True  # whoever sends to it (a chain's end) resolves its name again
        self._wait_up([inst], START_TIMEOUT, judge=True)

    def _scale_to(self, node: _Node, count: int, now: float, reason: str) -> None:
        active = [i for i in node.instances if i.active]
        if count > len(active):
            self._room(count - len(active), f"scaling {node.cfg.name} out to {count}")
            new: list[Instance] = []
            try:
                for _ in range(count - len(active)):
                    new.append(self._spawn(node, None, now, staged=True))
                self._wait_up(new, START_TIMEOUT)
                for inst in new:
                    inst.staged = False
                self._resteer_upstream(node.cfg.name)
            except SupervisorError:
                self._withdraw(node, new)
                raise
            self._drop_dead(node)
            self._event("scale", node.cfg.name, f"out to {count} ({reason})")
        elif count < len(active):
            victims = sorted(active, key=lambda i: i.index)[count:]
            before = _mark_stopping(victims)  # out of the group before upstream is re-steered
            try:
                self._resteer_upstream(node.cfg.name)
            except SupervisorError:
                _unmark_stopping(before)  # still receiving from whoever was not re-steered: keep them
                self._try_resteer(node.cfg.name)
                raise
            for v in victims:
                self._stop_instance(v, drain=True)  # its waits release `lock` (an operation's)
                if v in node.instances:
                    node.instances.remove(v)
            self._event("scale", node.cfg.name, f"in to {count} ({reason})")
        # downstream of this node is unchanged; its own instances got --next at start

    def _room(self, needed: int, what: str) -> None:
        """Refuse (409) an action that needs `needed` more node table entries than the fabric has free: a
        replacement runs its new instances next to the old until these drained, so a `max_nodes` that
        fits every instance the policies allow can still be one replacement short. Says the max_nodes needed."""
        if needed <= 0 or self.fabric is None:
            return
        used = len([e for e in self.fabric.nodes() if e.get("alive")])
        total = self.topo.fabric.max_nodes
        if used + needed > total:
            raise SupervisorError(f"{what} needs {needed} more node(s) in the fabric at once (new instances start "
                                  f"next to the old ones, which stop once drained), but only {max(0, total - used)} "
                                  f"of max_nodes {total} are free; set fabric.max_nodes >= {used + needed} in the "
                                  "config and restart the manager (`shmfabric down`, `up`)", status=409)

    def _withdraw(self, node: _Node, new: list[Instance]) -> None:
        """Undo a half-done scale-out or replacement: the new instances leave the group and stop."""
        steered = any(not i.staged for i in new)  # still staged: no upstream was ever told of them
        for inst in new:
            inst.staged = False
            if inst.state in ("starting", "running", "backoff"):
                inst.state = "stopping"
        if steered:
            self._try_resteer(node.cfg.name)
        for inst in new:
            if inst.state == "stopping":
                self._stop_instance(inst, drain=True)
            else:
                _kill(inst.proc)
                _reap(inst.proc)
            if inst in node.instances:
                node.instances.remove(inst)

    @staticmethod
    def _drop_dead(node: _Node) -> None:
        """Instances that failed for good (or stopped) leave the list once the node runs new ones: a node
        an operator brought back is not shown degraded by the dead instance it replaced."""
        if any(i.active for i in node.instances):
            node.instances[:] = [i for i in node.instances if i.active or i.state == "stopping"]

    def _try_resteer(self, name: str) -> None:
        try:
            self._resteer_upstream(name)
        except SupervisorError as exc:
            self._event("error", name, f"re-steering upstream failed: {exc}")

    def _put_back(self, pushed: list[tuple[Instance, dict]]) -> list[str]:
        """Undo config pushes: each instance is sent the config it ran before (`inst.config` still
        says so). One that does not confirm (stopped, busy: a control message waits in its queue and
        is applied in order once it runs again) is flagged: the loop pushes its config again when it
        answers. Returns the names of those."""
        unsure = []
        for inst, before in pushed:
            try:
                ok = bool(self._request(inst.name, {"op": "reconfigure", "config": before}).get("ok"))
            except SupervisorError:
                ok = False
            if not ok:
                inst.push_config = True
                unsure.append(inst.name)
                self._event("reconfigure", inst.name, "did not confirm the config put back; pushed again when "
                            "it answers")
        return unsure

    def _push_pending(self) -> list[tuple[Instance, Any, dict]]:
        """The pushes due (holding `lock` and `_op_lock`, see `tick`): `config` to each running instance
        flagged `push_config` that answered the last poll; asked by `_ask_each`, applied by `_take_pushes`."""
        out = []
        for node in self.nodes.values():
            for inst in node.instances:
                if not inst.push_config or inst.staged or inst.state != "running" or inst.stats_failures:
                    continue
                if inst.proc is not None and inst.proc.poll() is not None:
                    continue
                if inst.name in self._full_out:
                    # its output is blocked: it answers stats but holds a reconfigure back until the
                    # batch it sends has gone (functions/runtime.py), so a push now would only wait
                    # CONTROL_TIMEOUT holding `_op_lock` (operator actions refused meanwhile): later
                    continue
                out.append((inst, inst.proc, {"op": "reconfigure", "config": dict(inst.config)}))
        return out

    def _take_pushes(self, answers: list[tuple]) -> None:
        """Clear `push_config` of each instance that answered the push of its `config` (`_push_pending`)."""
        for inst, proc, op, reply, _ in answers:
            if isinstance(reply, SupervisorError):
                continue  # still not answering: next round
            if not self._same_run(inst, proc) or inst.config != op["config"]:
                # restarted meanwhile (it started with `config`: `_launch` cleared the flag), scaled in or
                # stopped; or given another config since: the flag (whoever set it) stands
                continue
            inst.push_config = False
            if reply.get("ok"):
                self._event("reconfigure", inst.name, "config pushed (it ran another one)")
            else:
                self._event("error", inst.name, f"rejected its config: {reply.get('error')}; "
                            "restart it (replace) to run it")

    # -- operator actions (API, reload) --------------------------------------------------------
    @contextmanager
    def _operation(self, kind: str, wait: float | None = None, **what: Any) -> Iterator[None]:
        """Run an operator action: one at a time, `_op_lock` then `lock` (the lock order, see __init__).
        One under way is waited for up to `wait` seconds (`op_wait` by default); then 409 names it."""
        if self.lock._is_owned():  # would invert the lock order: a bug, never a wait
            raise RuntimeError("an operator action was started while holding the supervisor lock")
        wait = self.op_wait if wait is None else wait
        got = self._op_lock.acquire(timeout=wait) if wait > 0 else self._op_lock.acquire(blocking=False)
        if not got:
            raise OperationInProgress(f"an operation is in progress: {_op_text(self._op)}; try again when it is "
                                      "done (`shmfabric status` shows it)", status=409)
        try:
            with self.lock:
                self._op = {"kind": kind, **what, "since": round(time.time(), 3)}
                self._op_thread = threading.get_ident()  # its control requests release `lock` (`_request`)
                self._op_new = []
                try:
                    yield
                finally:
                    self._op_thread = None
                    self._op = None
                    self._op_new = []
        finally:
            self._op_lock.release()

    def _node(self, name: str) -> _Node:
        node = self.nodes.get(name)
        if node is None:
            raise SupervisorError(f"no node named {name!r}; nodes: {', '.join(self.nodes)}", status=404)
        return node

    def scale(self, name: str, instances: int) -> dict:
        """Set a node's instance count by hand (within 1..99); the policy's cooldown restarts."""
        with self._operation("scale", node=name, instances=instances):
            node = self._node(name)
            _refuse_adapter(node, "scaled (it runs exactly one instance)")
            if not isinstance(instances, int) or isinstance(instances, bool) or not 1 <= instances <= 99:
                raise SupervisorError(f"instances must be an integer 1..99, got {instances!r}")
            now = self.clock()
            self._scale_to(node, instances, now, reason="operator")
            node.decider.reset(now)
            pol = node.decider.policy
            node.operator = None
            if not pol.min_instances <= instances <= pol.max_instances:
                # the operator knows better than the policy for now: the count stands until the next
                # `scale` or `reload` (which applies the policy's bounds again)
                node.operator = instances
                self._event("scale", name, f"operator count {instances} is outside the scale policy's "
                            f"{pol.min_instances}..{pol.max_instances}: the policy leaves it until the next "
                            "scale or reload")
            return self._node_status(node)

    def reconfigure(self, name: str, config: dict) -> dict:
        """Push a new config to every running instance of `name` (validated first); no restart."""
        with self._operation("reconfigure", node=name):
            node = self._node(name)
            _refuse_adapter(node, "pushed a config")
            if not isinstance(config, dict):
                raise SupervisorError("config must be a JSON object")
            config = self._unredact(node.function, config, node.config)
            # validated first: a refused push must not make any word of it a "secret" that is
            # redacted from every later message (its error carries no input values)
            self._validate_config(node.function, config, name)
            self._remember_secrets(node.function, config)
            pushed: list[tuple[Instance, dict]] = []
            procs: dict[int, Any] = {}  # id(instance) -> the process the config was pushed to
            try:
                for inst in list(node.instances):
                    if inst.state != "running":
                        continue  # starting: pushed once it answers (below); backoff: restarts with it
                    pushed.append((inst, dict(inst.config)))  # before: a timed-out push may apply later
                    self._push(inst, config, procs)
            except SupervisorError as exc:
                # `inst.config` still holds the old config: an instance restarted meanwhile runs it
                unsure = self._put_back(pushed)
                extra = f"; except that {_unsure_text(unsure)}" if unsure else ""
                raise SupervisorError(f"config not applied, the instances run the config they ran{extra}: {exc}",
                                      status=exc.status) from None
            node.config = dict(config)
            self._commit_config(node, config, procs)
            self._event("reconfigure", name, "config pushed to running instances")
            return self._node_status(node)

    def _push(self, inst: Instance, config: dict, procs: dict[int, Any]) -> None:
        """An operation's push of `config` to running instance `inst`, its process recorded in `procs`
        (see `_commit_config`). The push supersedes one the loop had pending for it (its old config)."""
        inst.push_config = False
        procs[id(inst)] = inst.proc
        reply = self._request(inst.name, {"op": "reconfigure", "config": dict(config)})
        if not reply.get("ok"):
            raise SupervisorError(f"{inst.name!r} rejected the config: {reply.get('error')}", status=422)

    @staticmethod
    def _commit_config(node: _Node, config: dict, procs: dict[int, Any]) -> None:
        """Commit a config pushed to the running instances of `node` (`procs`: each pushed instance's
        process then). Every instance restarts with it from now on; a process that runs and did not
        take the push is flagged to be pushed it once it answers (`_push_pending`): one that was
        starting, and one started since its push or since the push began (the pushes release `lock`:
        the loop restarted it meanwhile with the config then recorded, the old one)."""
        for inst in node.instances:
            inst.config = dict(config)  # a later restart starts with what runs now
            took = id(inst) in procs and procs[id(inst)] is inst.proc
            if not took and inst.state in ("starting", "running") and inst.proc is not None:
                inst.push_config = True  # runs the old config: pushed once it answers

    def replace(self, name: str, function: str | None = None, config: dict | None = None,
                version: str | None = None) -> dict:
        """Replace every instance of `name` by one running `function`/`config`/`version`, losing no frame:
        start the new instances, re-steer upstream to them, then stop the old ones (each drains its ring)."""
        with self._operation("replace", node=name):
            node = self._node(name)
            _refuse_adapter(node, "replaced by a function")
            if function is not None and (not isinstance(function, str) or not function):
                raise SupervisorError(f"function must be a plugin name (a string), got {function!r}")
            if version is not None and not isinstance(version, str):
                raise SupervisorError(f"version must be a string (a label), got {version!r}")
            if config is not None and not isinstance(config, dict):
                raise SupervisorError("config must be a JSON object")
            function = function or node.function
            config = dict(node.config) if config is None else self._unredact(function, config, node.config)
            self._validate_config(function, config, name)
            self._remember_secrets(function, config)
            old = [i for i in node.instances if i.active]
            if not old:
                raise SupervisorError(f"node {name!r} has no running instance to replace", status=409)
            now = self.clock()
            self._room(len(old), f"replacing {name}")
            new: list[Instance] = []
            try:
                for _ in old:
                    new.append(self._spawn(node, None, now, function=function, config=config, version=version,
                                           staged=True))
                self._wait_up(new, START_TIMEOUT)
            except SupervisorError:
                self._withdraw(node, new)
                raise
            for inst in new:
                inst.staged = False
            before = _mark_stopping(old)
            try:
                self._resteer_upstream(name)
            except SupervisorError:
                _unmark_stopping(before)  # back to the old version: nothing is lost, the swap did not happen
                self._withdraw(node, new)
                raise
            node.function, node.config, node.version = function, config, version
            processed = 0
            for inst in old:
                processed += self._stop_instance(inst, drain=True) or 0
                if inst in node.instances:
                    node.instances.remove(inst)
            self._event("replace", name, f"{len(old)} instance(s) -> {function} {version or ''} "
                        f"(the old processed {processed} frames)".replace("  ", " "))
            out = self._node_status(node)
            out["processed_by_old"] = processed
            return out

    def reload(self, topo: Topology, source: str | None = None, *, remember: bool = False,
               wait: float | None = None) -> dict:
        """Apply a new topology to the running one; returns what changed.

        Each node is compared with what it runs now (its function, version, config, batch, ports,
        network: changed by the API too), not with the file loaded before. Transactional: new nodes,
        replacements and extra instances start first (staged: in no chain yet) and configs are pushed;
        only when all of that worked is the new topology committed (upstream re-steered, removed and
        replaced instances drained and stopped). A failure before the commit stops what was started,
        puts the configs back and leaves the running topology as it was; the error says what failed."""
        topo = self._pin(topo)
        source = source or self.source
        if self._resolve is not None:  # reads only the new topology: no lock needed
            try:
                check_functions(topo, source, self._resolve, _read_text(source))
            except ConfigError as exc:
                raise SupervisorError(str(exc), status=422) from None
        for cfg in topo.nodes:  # after the check (see reconfigure)
            self._remember_secrets(cfg.function_name, cfg.settings)
        with self._operation("reload", wait=wait, config=source):
            old = self.topo
            if topo.fabric != old.fabric:
                raise SupervisorError("the `fabric:` section changed; a region cannot be resized live; "
                                      "run `shmfabric down` and `up` again", status=409)
            try:
                changes = self._reload(old, topo)
            finally:
                self._staging = None
            if remember:
                self.source = source
            return changes

    def _reload(self, old: Topology, topo: Topology) -> dict:
        changes: dict[str, list[str]] = {"added": [], "removed": [], "reconfigured": [], "replaced": [],
                                         "scaled": [], "resteered": []}
        warnings: list[str] = []
        new_names = [n.name for n in topo.nodes]
        running = list(self.nodes)
        for name in new_names:
            if name in self.nodes and self.nodes[name].cfg.is_adapter != topo.node(name).is_adapter:
                raise SupervisorError(f"node {name!r} changes between a function and an adapter; give the new one "
                                      "another name (or remove the node, reload, then add it back)", status=409)
        # A changed adapter is not staged: a new instance cannot run beside the old (one device, one
        # socket). Those changed or not running start after the commit, once what leaves has stopped.
        adapters_added = [n for n in topo.start_order() if n not in self.nodes and topo.node(n).is_adapter]
        adapters_changed: list[str] = []
        for name in new_names:
            node = self.nodes.get(name)
            if node is None or not node.cfg.is_adapter:
                continue
            b = topo.node(name)
            try:
                old_net = old.network_index(name)
            except (KeyError, ValueError):
                old_net = None
            if (node.config, node.version, node.cfg.batch, node.cfg.via, old_net) != (
                    b.settings, b.version, b.batch, b.via, topo.network_index(name)) or not any(
                    i.active for i in node.instances):
                adapters_changed.append(name)
        added = [n for n in topo.start_order() if n not in self.nodes and n not in adapters_added]
        removed = [n for n in running if n not in new_names]
        kept = [n for n in new_names if n in self.nodes and not self.nodes[n].cfg.is_adapter]
        kept_adapters = [n for n in new_names if n in self.nodes and self.nodes[n].cfg.is_adapter]
        # An added adapter starts staged with the other new instances (step 1): a new or replaced node
        # that sends to it (a router's new port, a chain's new end) waits for it to attach, answering
        # nothing meanwhile, so its readiness needs the adapter up first. Only one that needs what a
        # node leaving or changed still holds (a device, an address, a socket: held until step 3 or 4)
        # starts after the commit, in step 4, as a changed one does.
        # what each adapter leaving or changed holds as it runs now (its old settings)
        old_claims = {n: adapter_claims(a) for n in removed + adapters_changed
                      if (a := self.nodes[n].cfg.adapter) is not None}
        held: dict[tuple, tuple[str, str]] = {}  # claim -> (what, the node holding it now)
        for name, claims in old_claims.items():
            if self._holds(self.nodes[name]):
                for key, what in claims.items():
                    held.setdefault(key, (what, name))
        adapters_deferred: dict[str, tuple[str, str]] = {}  # added adapter -> (what, who holds it)
        for name in adapters_added:
            new_adapter = topo.node(name).adapter
            assert new_adapter is not None  # (an adapter node)
            clash = next((held[k] for k in adapter_claims(new_adapter) if k in held), None)
            if clash is not None:
                adapters_deferred[name] = clash
        adapters_early = [n for n in adapters_added if n not in adapters_deferred]
        old_next = {n: self._next_instances(n) for n in running}
        now = self.clock()
        # -- plan: what each kept node runs now against what the file says
        plan: dict[str, dict[str, Any]] = {}
        for name in kept:
            node, b = self.nodes[name], topo.node(name)
            active = [i for i in node.instances if i.active]
            pol = topo.scale_of(name)
            try:
                old_net = old.network_index(name)
            except (KeyError, ValueError):
                old_net = None
            replace = (node.function, node.version, node.cfg.batch, list(node.cfg.ports), old_net) != (
                b.function, b.version, b.batch, list(b.ports), topo.network_index(name))
            finished = not active and node.instances and all(i.state == "exited" for i in node.instances)
            if b.instances != node.cfg.instances:
                target = topo.instances_of(name)  # the file's count changed: it wins over the policy
            elif finished and not replace and node.config == b.config:
                target = 0  # finished (exit 0) and unchanged: a reload does not run it again
            else:
                target = min(max(len(active), pol.min_instances), pol.max_instances)
            plan[name] = {"replace": replace, "reconfigure": not replace and node.config != b.config,
                          "active": active, "target": target, "new": [], "victims": []}
        # a new instance with a port to an adapter that starts only after the commit would wait for it
        # (it answers nothing meanwhile) until its start times out: refused at once, saying what to do
        # (a next step that is not there yet is left out of the instance's group, not waited for)
        for name in added + [n for n, p in plan.items() if p["replace"] or p["target"] > len(p["active"])]:
            for port in topo.node(name).ports:
                if port in adapters_deferred:
                    what, holder = adapters_deferred[port]
                    raise SupervisorError(
                        f"reload refused, nothing changed: node {name!r} would start with a port to adapter "
                        f"{port!r}, which needs {what} that {holder!r} holds until the reload stops it; apply it "
                        f"in two reloads: first one that removes or changes {holder!r} (without {port!r}), which "
                        f"frees {what}; then one that adds {port!r}", status=409)
        # -- 1. start what is new (staged: no upstream sends to it yet), push changed configs
        needed = sum(topo.instances_of(n) for n in added) + len(adapters_added)
        needed += sum(max(p["target"], 1) if p["replace"] else max(0, p["target"] - len(p["active"]))
                      for p in plan.values())
        self._room(needed, "this reload")
        self._staging = topo
        started: list[tuple[_Node, Instance]] = []
        new_nodes: list[str] = []
        pushed: list[tuple[Instance, dict]] = []  # (instance, the config it ran before)
        procs: dict[int, Any] = {}  # id(instance) -> the process the new config was pushed to
        try:
            # added adapters first: a new function's --next lists only the nodes that exist (these)
            for name in adapters_early:
                b = topo.node(name)
                node = _Node(b, ScaleDecider(topo.scale_of(name)), function=b.function_name, config=b.settings,
                             version=b.version)
                self.nodes[name] = node
                new_nodes.append(name)
                # staged: `_view_of` gives it the new topology (its network, its via's node)
                started.append((node, self._spawn(node, 1, now, staged=True, topo=topo)))
            for name in added:
                cfg = topo.node(name)
                node = _Node(cfg, ScaleDecider(topo.scale_of(name)), function=cfg.function,
                             config=dict(cfg.config), version=cfg.version)
                self.nodes[name] = node
                new_nodes.append(name)
                for k in range(1, topo.instances_of(name) + 1):
                    started.append((node, self._spawn(node, k, now, staged=True, topo=topo)))
            for name, p in plan.items():
                node, b = self.nodes[name], topo.node(name)
                if p["replace"]:
                    count = max(p["target"], 1)
                    for _ in range(count):
                        inst = self._spawn(node, None, now, function=b.function, config=dict(b.config),
                                           version=b.version, staged=True, topo=topo)
                        p["new"].append(inst)
                        started.append((node, inst))
                elif p["target"] > len(p["active"]):
                    for _ in range(p["target"] - len(p["active"])):
                        inst = self._spawn(node, None, now, config=dict(b.config), staged=True, topo=topo)
                        p["new"].append(inst)
                        started.append((node, inst))
            self._wait_up([i for _, i in started], START_TIMEOUT)
            for name, p in plan.items():
                if not p["reconfigure"]:
                    continue
                node, b = self.nodes[name], topo.node(name)
                for inst in p["active"]:
                    # one still starting runs the config it started with: it gets the new one
                    # once it answers (flagged at the commit); one in backoff restarts with it
                    if inst.state != "running":
                        continue
                    # listed before the push: one that times out may still apply it later (stopped,
                    # busy), so it is put back too
                    pushed.append((inst, dict(inst.config)))
                    self._push(inst, b.config, procs)
        except Exception as exc:  # a SupervisorError, or a bug: either way nothing may stay half-applied
            self._staging = None
            unsure = self._put_back(pushed)
            for name in {n.cfg.name for n, _ in started}:
                self._withdraw(self.nodes[name], [i for n, i in started if n.cfg.name == name])
            for name in new_nodes:
                self.nodes.pop(name, None)
            why = str(exc) if isinstance(exc, SupervisorError) else f"{type(exc).__name__}: {exc}"
            if unsure:
                self._event("reload-failed", "", f"{exc}; put back, except that {_unsure_text(unsure)}")
                raise SupervisorError(f"reload failed, the running topology is unchanged except that "
                                      f"{_unsure_text(unsure)}: {why}", status=getattr(exc, "status", 500)) from None
            self._event("reload-failed", "", f"{exc}; nothing changed")
            raise SupervisorError(f"reload failed, the running topology is unchanged: {why}",
                                  status=getattr(exc, "status", 500)) from None
        # -- 2. commit: the new topology; what leaves is out of every group before upstream is re-steered
        self.topo = topo
        self._staging = None
        # past the commit nothing is undone: a new instance that died since it answered is named down
        # like any other (`_not_up`), so upstream is still steered and the replaced ones drain
        self._op_new = []
        leaving: list[Instance] = []
        for _, inst in started:
            inst.staged = False
        for name in removed:
            for inst in self.nodes[name].instances:
                if inst.active:
                    inst.state = "stopping"
                    leaving.append(inst)
        committed = self.clock()
        for name, p in plan.items():
            node, b = self.nodes[name], topo.node(name)
            # a count the reload set (the file's `instances:` changed, or the policy's bounds moved it)
            # or a changed scale policy is the policy's new starting point: its windows and cooldown
            # restart from here (else a quiet node's old window scaled it back in at the next round)
            restart_policy = (b.instances != node.cfg.instances or p["target"] != len(p["active"])
                              or node.decider.policy != topo.scale_of(name))
            node.cfg = b
            node.decider.policy = topo.scale_of(name)
            if restart_policy:
                node.decider.reset(committed)
            node.operator = None  # a reload applies the policy's bounds again
            for inst in node.instances:
                inst.tracker.policy = topo.restart_of(name)
            if p["replace"]:
                victims = p["active"]
                node.function, node.config, node.version = b.function, dict(b.config), b.version
                changes["replaced"].append(name)
            else:
                victims = sorted(p["active"], key=lambda i: i.index)[p["target"]:] if p["target"] < len(p["active"]) else []
                if p["reconfigure"]:
                    node.config = dict(b.config)
                    # its new instances (a scale-out) started with it; every other running one that
                    # did not take the push (starting then, or restarted since) is pushed it
                    self._commit_config(node, b.config, {**procs, **{id(i): i.proc for i in p["new"]}})
                    changes["reconfigured"].append(name)
            for v in victims:
                v.state = "stopping"
                leaving.append(v)
            p["victims"] = victims
            after = len([i for i in node.instances if i.active])
            if after != len(p["active"]) and p["target"] != len(p["active"]) and p["target"]:
                changes["scaled"].append(f"{name}={after}")
            if p["new"]:
                self._drop_dead(node)
        for name in kept_adapters:
            node, b = self.nodes[name], topo.node(name)
            node.cfg = b
            node.decider.policy = topo.scale_of(name)
            for inst in node.instances:
                inst.tracker.policy = topo.restart_of(name)
        changes["added"] = list(new_nodes)
        # every node is told its group once (new ones too: they started with the staged view)
        for name in topo.start_order():
            node = self.nodes.get(name)
            if node is None or name in removed:
                continue  # (an adapter added by this reload that waits for a device or socket starts below)
            try:
                changed = name in new_nodes or self._next_instances(name) != old_next.get(name) or any(
                    plan.get(t, {}).get("new") or plan.get(t, {}).get("victims") for t in node.cfg.ports)
                if changed:
                    self._set_next(node)
                    if name not in new_nodes:
                        changes["resteered"].append(name)
            except SupervisorError as exc:
                warnings.append(f"re-steering {name} failed: {exc}")
                self._event("error", name, f"re-steering failed: {exc}")
        # -- 3. what left drains and stops, sources first
        order = list(reversed(old.start_order()))
        leaving.sort(key=lambda i: order.index(i.node) if i.node in order else len(order))
        for inst in leaving:
            self._stop_instance(inst, drain=True)
            node = self.nodes.get(inst.node)
            if node is not None and inst in node.instances:
                node.instances.remove(inst)
        for name in removed:
            del self.nodes[name]
            changes["removed"].append(name)
        # -- 4. adapters: the changed ones replaced (the old instance stops first), the added ones that
        # needed what a node leaving or changed held started, and any whose `via:` now runs as another
        # instance restarted on it
        # A changed one whose old instance holds what another one starting here needs (a deferred one, or
        # two changed ones trading devices) stops before any starts, whatever the start order; the others
        # are replaced one at a time, each down only while it restarts
        wanted: dict[str, set] = {n: set(adapter_claims(topo.node(n).adapter))
                                  for n in [*adapters_changed, *adapters_deferred]}
        stop_first = [n for n in adapters_changed
                      if old_claims[n].keys() & set().union(*(c for m, c in wanted.items() if m != n))]
        for name in stop_first:
            self._stop_adapter(self.nodes[name])
        for name in [n for n in topo.start_order() if n in adapters_deferred or n in adapters_changed]:
            b = topo.node(name)
            if name in adapters_deferred:
                node = self.nodes[name] = _Node(b, ScaleDecider(topo.scale_of(name)), function=b.function_name,
                                                config=b.settings, version=b.version)
                changes["added"].append(name)
            else:
                node = self.nodes[name]
                node.function, node.config, node.version = b.function_name, b.settings, b.version
                changes["replaced"].append(name)
            try:
                reason = "settings changed by a reload" if name in adapters_changed else "added by a reload"
                if name in adapters_changed and name not in stop_first:
                    self._restart_adapter(node, reason)
                else:
                    self._start_adapter(node, reason)
            except SupervisorError as exc:
                warnings.append(f"adapter {name} did not come up: {exc}{self._policy_note(node)}")
                self._event("error", name, f"adapter did not come up after the reload: {exc}{self._policy_note(node)}")
        for name in kept_adapters:
            if name not in adapters_changed:
                self._set_next(self.nodes[name])  # (restarts it only if its via moved)
        warnings += self._reload_warnings(old, topo)
        if old.poll_interval != topo.poll_interval:
            changes["settings"] = [f"poll_interval {old.poll_interval:g}s -> {topo.poll_interval:g}s"]
        self._event("reload", "", json.dumps({k: v for k, v in changes.items() if v}))
        for w in warnings:
            self._event("warning", "", w)
        if warnings:
            changes["warnings"] = warnings
        return changes

    def _reload_warnings(self, old: Topology, topo: Topology) -> list[str]:
        """What a reload does not apply: the API and metrics listeners. Compared with what they were
        started with (not with `old`, the file loaded last: after a reload of `api: null` the next
        reload of the file started with warned of a change that was none); `api:` by what it means
        (`HOST:PORT` is `{listen: HOST:PORT}`)."""
        def same(key: str, a: Any, b: Any) -> bool:
            if key == "api":
                return (api_listen(a), api_token_file(a)) == (api_listen(b), api_token_file(b))
            return a == b

        out = []
        for key in ("api", "metrics"):
            running, new = self._listening[key], getattr(topo, key)
            if not same(key, running, new):
                out.append(f"`{key}:` changed ({running} -> {new}); the listener is not "
                           "moved by a reload: restart the manager (`shmfabric down`, `up`) to apply it")
        return out

    def _pin(self, topo: Topology) -> Topology:
        """`topo` with the values the command line set over the file (see `pinned`)."""
        update: dict[str, Any] = {}
        if "fabric" in self.pinned:
            update["fabric"] = topo.fabric.model_copy(update={"name": self.pinned["fabric"]})
        if "api" in self.pinned:
            update["api"] = self.pinned["api"]
        return topo.model_copy(update=update) if update else topo

    def reload_file(self, path: str | None = None, wait: float | None = None) -> dict:
        """Read `path`, or with none the file last loaded (the one started with, or the last `path` given
        here), and apply it with `reload`; a `path` applied becomes the file a later plain reload reads.
        Holds no lock while it reads: `reload` takes them in order (see the lock order in __init__)."""
        from shmfabric.manager.config import load_topology

        source = path or self.source
        try:
            topo = load_topology(source)
        except ConfigError as exc:
            raise SupervisorError(str(exc), status=422) from None
        return self.reload(topo, source, remember=True, wait=wait)

    def _validate_config(self, function: str, config: dict, name: str) -> None:
        if self._resolve is None:
            return
        try:
            cls = self._resolve(function)
        except (LookupError, ValueError) as exc:
            raise SupervisorError(str(exc), status=422) from None
        model = getattr(cls, "Config", None)
        if model is not None and hasattr(model, "model_validate"):
            from pydantic import ValidationError

            try:
                model.model_validate(config)
            except ValidationError as exc:
                from shmfabric.functions.api import config_error_text

                raise SupervisorError("invalid config: " + config_error_text(exc, f"{name}.config"), status=422) from None

    # -- views -----------------------------------------------------------------------------------
    def _inst_status(self, inst: Instance) -> dict:
        e = self._table.get(inst.name) if inst.state in ("running", "stopping") else None
        pid = inst.pid if inst.proc is not None and inst.proc.poll() is None else None
        out = {"name": inst.name, "function": inst.function, "version": inst.version, "pid": pid,
               "state": inst.state, "restarts": inst.restarts, "exit_code": inst.exit_code,
               "error": self.redact_text(inst.error) if inst.error else inst.error,
               "node_id": e["id"] if e else None, "cpu_seconds": proc_cpu_seconds(pid) if pid else None,
               "uptime": round(self.clock() - inst.started_at, 3) if pid else None}
        for k in NODE_COUNTERS:  # over all its processes, and kept once it stopped (see Instance)
            out[k] = inst.node_base.get(k, 0) + inst.node_last.get(k, 0)
        out["queue_depth"] = sum(r["depth"] for r in self._rings if r["dst"] == inst.name)
        c = inst.counters
        node = self.nodes.get(inst.node)
        terminal = node is not None and not self.topo.next_of(inst.node) and not node.cfg.ports
        # at the end of a chain the runtime counts consumed frames as dropped: those are not losses
        out["dropped"] = int(c.get("next_down", 0)) + (0 if terminal else int(c.get("dropped", 0)))
        out["counters"] = dict(inst.counters)
        # when `counters` were read (the manager's clock, like "sampled_at"): rates divide by this
        out["counters_at"] = inst.counters_at
        out["function_counters"] = dict(inst.function_counters)
        return out

    def _node_status(self, node: _Node) -> dict:
        insts = [self._inst_status(i) for i in node.instances]
        pol = node.decider.policy
        # the config as people see it: secret fields "<redacted>" (the real one is `node.config`)
        return {"name": node.cfg.name, "function": node.function, "version": node.version,
                "config": self.redact_config(node.function, node.config),
                "next": self.topo.next_of(node.cfg.name), "instances": insts, "queue_depth": node.depth,
                "scale": {"min_instances": pol.min_instances, "max_instances": pol.max_instances,
                          "operator_count": node.operator},
                "state": _overall([i["state"] for i in insts])}

    def status(self) -> dict:
        """Everything `shmfabric status --json` prints; stable field names."""
        with self.lock:
            names = [n.name for n in self.topo.nodes if n.name in self.nodes]
            names += [n for n in self.nodes if n not in names]  # being added or removed by a reload
            nodes = [self._node_status(self.nodes[n]) for n in names]
            by_name = {n["name"]: n for n in nodes}
            chains = []
            for c in self.topo.chains:
                last = c.nodes[-1]
                tail = [last] if isinstance(last, str) else list(last)
                raw = sum(i["rx_frames"] for t in tail if t in by_name for i in by_name[t]["instances"])
                # Never back (a Prometheus counter): what instances scaled in or removed had
                # delivered stays counted.
                seen = self._delivered_seen.get(c.name, 0)
                if raw < seen:
                    self._delivered_base[c.name] = self._delivered_base.get(c.name, 0) + seen - raw
                self._delivered_seen[c.name] = raw
                chains.append({"name": c.name, "nodes": c.nodes, "tail": tail,
                               "delivered_frames": self._delivered_base.get(c.name, 0) + raw})
            # counters change only when polled: "sampled_at" is when the node table (rx_*/tx_*,
            # queue depths, delivered frames) was read, each instance's "counters_at" when its
            # runtime counters were, "clock" is now; all on the manager's monotonic clock (seconds,
            # only differences mean anything). A rate is a counter's delta over its samples' gap.
            return {"fabric": self.topo.fabric.name, "config": self.source, "pid": os.getpid(),
                    "running": self.started, "uptime": round(time.time() - self.started_wall, 3),
                    "clock": self.clock(), "sampled_at": self._sampled_at, "poll_interval": self.topo.poll_interval,
                    "nodes": nodes, "chains": chains, "rings": list(self._rings), "pools": list(self._pools),
                    "events": list(self.events)[-30:],
                    # the operator action under way (reload, replace, scale), or None
                    "operation": dict(self._op) if self._op else None}

    def node_status(self, name: str) -> dict:
        with self.lock:
            return self._node_status(self._node(name))

    def _event(self, kind: str, node: str, detail: str) -> None:
        ev = {"time": round(time.time(), 3), "kind": kind, "node": node, "detail": self.redact_text(detail)}
        self.events.append(ev)
        stream = self.event_stream
        if stream is not None:  # one line each (the detached manager's log): the ring above keeps only 200
            text = " ".join(f"{ev['node']}: {ev['detail']}".split()) if ev["node"] else " ".join(ev["detail"].split())
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ev["time"]))
            try:
                print(f"shmfabric: {stamp} event {kind}: {text}", file=stream, flush=True)
            except (OSError, ValueError):  # a closed or full stderr must not stop the manager
                pass

    # -- secrets ---------------------------------------------------------------------------------
    def secret_fields(self, function: str) -> frozenset[str]:
        """The secret config fields of `function` (`shmfabric.functions.api.secret_fields`); none
        for a function that cannot be loaded here. An adapter's: a memif's `secret`."""
        if function.startswith(ADAPTER_FUNCTION_PREFIX):
            return _ADAPTER_SECRETS
        known = self._secret_cache.get(function)
        if known is None:
            try:
                known = secret_fields((self._resolve or _default_resolve)(function))
            except Exception:  # an unknown plugin: its errors are reported where it is started
                known = frozenset()
            self._secret_cache[function] = known
        return known

    def redact_config(self, function: str, config: dict) -> dict:
        """`config` as shown to people: each secret field's value (if set) replaced by "<redacted>"."""
        secret = self.secret_fields(function)
        return {k: REDACTED if k in secret and v is not None else v for k, v in config.items()}

    def redact_text(self, text: str) -> str:
        """`text` (a message, an event, a log line) with every secret value a config brought replaced
        by "<redacted>". Thread-safe, no lock taken: the API redacts its error messages with it."""
        for v in sorted(self._secret_values, key=len, reverse=True):
            if v in text:
                text = text.replace(v, REDACTED)
        return text

    def _remember_secrets(self, function: str, config: Any) -> None:
        if not isinstance(config, dict):
            return
        secret = self.secret_fields(function)
        found = set()
        for k, v in config.items():
            if k in secret and isinstance(v, str):
                found.update(x for x in (v, v.strip()) if len(x) >= 4)  # shorter: no secret, and hits any text
        if not found:
            return
        with self._secrets_lock:
            order = dict(self._secret_order)
            for v in found:  # the newest last; the oldest go past the bound
                order.pop(v, None)
                order[v] = None
            while len(order) > MAX_REMEMBERED_SECRETS:
                del order[next(iter(order))]
            self._secret_order = order
            self._secret_values = frozenset(order)  # what redact_text reads, replaced whole (no lock)

    def _unredact(self, function: str, config: dict, current: dict) -> dict:
        """A config given by an operator, with each secret field given as "<redacted>" (a config copied
        from `status`) taking the value the node runs now."""
        secret = self.secret_fields(function)
        return {k: current[k] if k in secret and v == REDACTED and k in current else v for k, v in config.items()}


# An adapter's secret settings (shown "<redacted>", kept off its command line).
_ADAPTER_SECRETS = frozenset({"secret"})


def _steer_key(nxt: list[str], ports: dict[str, list[str]]) -> tuple:
    """A next group and ports (as on a command line or in a set_next), comparable."""
    return tuple(nxt), tuple((name, tuple(members)) for name, members in ports.items())


def _mark_stopping(insts: list[Instance]) -> list[tuple[Instance, str]]:
    """Mark instances "stopping" (out of their group, ignored by the loop) for an action that may
    still be undone; returns what `_unmark_stopping` needs to undo it."""
    before = [(i, i.state) for i in insts]
    for i in insts:
        i.state = "stopping"
    return before


def _unmark_stopping(before: list[tuple[Instance, str]]) -> None:
    """Undo `_mark_stopping`: each instance goes back to the state it had, not to "running" (one
    that was starting is probed again, one in backoff restarted when due; the loop judges a process
    that exited meanwhile). One the action moved on already (no longer "stopping") is left alone."""
    for inst, state in before:
        if inst.state == "stopping":
            inst.state = state


def _refuse_adapter(node: _Node, what: str) -> None:
    """An operator action a function node takes and an adapter node cannot: 409 saying what to do instead."""
    if node.cfg.is_adapter:
        raise SupervisorError(f"node {node.cfg.name!r} is an adapter ({node.function}): it cannot be {what}; "
                              "change its `adapter:` settings in the topology and reload (its instance is "
                              "replaced)", status=409)


def _unsure_text(names: list[str]) -> str:
    return (f"{', '.join(names)} did not confirm the config put back (stopped or busy): it may apply the "
            "new config when it runs again, then the old one; the manager pushes its config again once it answers")


def _op_text(op: dict | None) -> str:
    """An operation in progress, for messages: "reload of FILE (12.3 s)", "scale of fw to 3 (1.2 s)"."""
    if not op:
        return "another operator action (finishing)"
    kind = op.get("kind", "?")
    text = {"reload": f"reload of {op.get('config')}",
            "scale": f"scale of {op.get('node')} to {op.get('instances')}",
            "autoscale": f"the scale policy scaling {op.get('node')} to {op.get('instances')}",
            "resteer": f"re-steering the upstream of {op.get('node')} after a restart",
            "replace": f"replace of {op.get('node')}",
            "reconfigure": f"config push to {op.get('node')}"}.get(kind, kind)
    since = op.get("since")
    return text + (f" (running {max(0.0, time.time() - since):.1f} s)" if since else "")


def _overall(states: list[str]) -> str:
    if not states:
        return "stopped"
    if all(s == "running" for s in states):
        return "running"
    if any(s == "failed" for s in states):
        return "failed" if all(s == "failed" for s in states) else "degraded"
    return "degraded" if "running" in states else states[0]


def _reap(proc: subprocess.Popen | None) -> None:
    """Wait for a process told to stop; SIGTERM, then SIGKILL, if it lingers."""
    if proc is None:
        return
    for sig, wait in ((None, STOP_TIMEOUT), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            if sig is not None:
                proc.send_signal(sig)
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def _kill(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass


def _exit_text(rc: int, tail: str | None) -> str:
    """Why an instance ended: the signal that killed it (its log says nothing then), else its log's
    last lines of this run, else its status."""
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"killed by {name}" + (f" (last output: {tail})" if tail else "")
    return tail or f"exited with status {rc}"


def _log_tail(path: Path | None, lines: int = 3, start: int = 0) -> str | None:
    """The last lines of a log written since offset `start` (one run's output)."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(start, f.tell() - 4096))
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    tail = [ln for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(tail) or None


def pids_mapping(path: str | Path) -> list[int]:
    """Live processes (other than this one) that map the file at `path` now, from /proc/*/maps.

    A mapping of an older file of the same name, since removed (shown "(deleted)", another
    inode), does not count. Processes whose maps cannot be read (another user's) are not seen.
    """
    path = str(path)
    try:
        ino = os.stat(path).st_ino
    except OSError:
        return []
    needle = path.encode()
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/maps", "rb") as f:
                data = f.read()
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if needle not in data:
            continue
        for line in data.splitlines():
            fields = line.split(maxsplit=5)  # address perms offset dev inode path
            if len(fields) == 6 and fields[5] == needle and int(fields[4]) == ino:
                out.append(int(entry.name))
                break
    return sorted(out)


def _comm(pid: int) -> str:
    """A process's command name, for messages."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().decode(errors="replace").strip() or "?"
    except OSError:
        return "gone"


def _read_text(source: str) -> str | None:
    """The text of the config file (for error lines), read as bounded as `load_topology` reads it."""
    from shmfabric.manager.config import read_config_file

    try:
        return read_config_file(source).decode("utf-8")
    except (ConfigError, UnicodeDecodeError):
        return None
