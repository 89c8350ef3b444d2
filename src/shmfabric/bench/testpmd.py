"""Drive DPDK's ``dpdk-testpmd`` with one memif port: a reference memif peer for tests and benchmarks.

`Testpmd` starts ``dpdk-testpmd`` in interactive mode (``-i``) with a single ``net_memif`` vdev
(port 0), talks to its command line through stdin, and reads its packet counters::

    with Testpmd("/tmp/x/memif.sock", role="server", mode="rxonly") as rx, \\
         Testpmd("/tmp/x/memif.sock", role="client", mode="txonly", main_lcore=1) as tx:
        rx.wait_link(); tx.wait_link()
        rx.start_forwarding(); tx.start_forwarding()
        ...
        tx.stop_forwarding(); rx.stop_forwarding()
        print(rx.port_stats()["rx_packets"])

Every wait has a timeout; a testpmd that exits, or a link that never comes up, raises
`TestpmdError` carrying the tail of testpmd's output. `close()` (also on ``with`` exit, and on a
failed `start()`) sends ``quit``, then SIGTERM, then SIGKILL, and removes the EAL runtime
directory ``/var/run/dpdk/<file-prefix>`` (each instance gets a unique ``--file-prefix``) and,
for a server, the memif socket file.

How testpmd is run, and why (found by experiment on DPDK 22.11, Debian ``dpdk``, 2-core VM
without hugepages):

- EAL: ``--no-huge -m <memory_mb> --no-pci``; testpmd's default mbuf count does not fit in
  no-huge memory ("cannot allocate memory"), so ``--total-num-mbufs`` is always passed.
  ``--log-level=lib.eal:error`` keeps the EAL chatter out of the way;
  ``--log-level=pmd.net.memif:info`` keeps the memif driver's connect/disconnect lines
  ("memif_connect(): Connected.", "Disconnect received: Incorrect secret"), which end up in
  error messages.
- lcores: testpmd needs a main lcore (command line) and one forwarding lcore, which busy-polls.
  The default ``lcores="0-1"`` with ``main_lcore=0`` forwards on CPU 1; give a second instance
  ``main_lcore=1`` so that it forwards on CPU 0.
- stdout: testpmd's printf output is block-buffered on a pipe (command answers would only show
  up at exit), so stdout/stderr go to a pseudo-terminal, where stdio is line-buffered; stdin
  stays a pipe (testpmd's cmdline library reads commands from it and echoes them).
- The link: the memif link comes up only once the peer has connected; forwarding started
  before that sends a first burst into nothing (``txonly`` was seen to send 32 packets in
  all), hence `wait_link` (polls ``show port info 0`` for ``Link status: up``).
  ``show port summary`` is *not* a 22.11 command ("Bad arguments"; it wants ``all``).

Options checked on 22.11 (each by running two instances against each other):

- memif devargs (from the ``net_memif`` PMD info string, all accepted): ``id=<int>``,
  ``role=server|client``, ``bsize=<int>`` (memif buffer size, default 2048), ``rsize=<int>``
  (log2 of the ring size, default 10), ``socket=<path>``, ``socket-abstract=yes|no``,
  ``mac=xx:xx:xx:xx:xx:xx``, ``zero-copy=yes|no`` (client only), ``secret=<string>``.
  There is no ``owner-uid``/``owner-gid`` in 22.11. Checked: id=3, secret, mac, bsize=4096,
  rsize=12 on both sides link and pass traffic; a secret mismatch keeps the link down and the
  client logs "memif_msg_receive_disconnect(): Disconnect received: Incorrect secret"; an id
  mismatch keeps it down silently.
- ``socket-abstract`` defaults to **yes** in 22.11: ``socket=/tmp/m.sock`` then listens on the
  abstract address ``@/tmp/m.sock`` and no file appears. This harness passes
  ``socket-abstract=no`` unless ``memif_args`` overrides it, so the socket is a real file that
  a Python peer can ``connect()`` to (and the server leaves it behind: `close` removes it).
- A client connects once, at port start, and never retries: started before its server it logs
  "memif_connect_client(): Failed to connect socket" and "Fail to start port 0" (yet reaches
  its prompt). `wait_link` restarts a client's port until the link is up.
- ``--eth-peer=0,MAC`` and ``set eth-peer 0 MAC`` both work (destination MAC of txonly frames
  and of ``start tx_first`` bursts; default 02:00:00:00:00:00). txonly's source MAC is the
  port's own (``mac=`` devarg, random otherwise).
- ``set txpkts N`` and ``set txpkts A,B,C`` (segments) work. ``--txpkts=N`` also works but
  only up to the default mbuf data room: a larger value is dropped with a log line
  ("length[0]=4000 > mbuf_data_size=2176 - give up") even with ``--mbuf-size``, and txonly then
  sends 64-byte frames; so this harness sets txpkts by command and checks it took.
- ``show port summary`` needs an argument (``all``); ``show port info 0`` gives the link.
- ``set verbose 1`` makes rxonly/io/macswap print one line per received frame (src, dst,
  type, length, nb_segs): `rx_dumps` parses them. Keep it for small bursts only.

Frames larger than 2048 bytes (one memif buffer, default bsize) — chained memif buffers:

- They work in both directions with **no** extra option. Checked with ``start tx_first``
  (32 frames) and a peer in io/macswap mode sending them back: 5000-byte frames as 3 mbuf
  segments (``set txpkts 2000,2000,1000``), and 9000-byte frames from an instance with
  ``mbuf_size=9216`` (one mbuf, sent as 5 chained 2048-byte memif buffers) came back intact
  in count and length (received as nb_segs=1 with 9216-byte mbufs, chained with default
  mbufs). The memif PMD chains mbufs on receive and chains memif buffers on send by itself.
- ``--max-pkt-len`` above 1518 **fails**: "Frame size (9000) > device max frame size (1518)",
  "Fail to configure port 0" (the 22.11 memif PMD reports max_rx_pktlen 1518). The MTU shown
  stays 1500 but is not enforced on send or receive.
- ``--enable-scatter`` **fails**: "requested Rx offloads 0x2000 doesn't match Rx offloads
  capabilities 0x0" (memif advertises no offloads; it scatters anyway).
- ``--mbuf-size=N`` (`mbuf_size`) works, and is what lets txonly send a one-segment frame
  above ~2048 bytes; ``bsize=`` larger than the frame sends it unchained.
"""
from __future__ import annotations

import glob
import itertools
import os
import pty
import re
import shutil
import signal
import stat
import subprocess
import threading
import time
import tty
from collections.abc import Mapping, Sequence
from typing import Any, Self

__all__ = [
    "DEFAULT_BINARY",
    "Testpmd",
    "TestpmdError",
    "parse_forward_stats",
    "parse_port_stats",
    "parse_rx_dumps",
    "testpmd_available",
]

DEFAULT_BINARY = "dpdk-testpmd"
PROMPT = "testpmd> "
# The cmdline library writes the prompt a character at a time, so a line printed meanwhile by
# the forwarding lcore (``set verbose``) or a driver thread can land inside it:
# "t" + "port 0/queue 0: received 32 packets\n..." + "estpmd> ". Such lines are written whole,
# so a split prompt starts a line and its pieces have whole lines between them.
_SPLIT_PROMPT = re.compile("^" + "(?:[^\n]*\n){0,200}?".join(map(re.escape, PROMPT)), re.MULTILINE)
RUNTIME_DIR = "/var/run/dpdk"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\r")
_MEMIF_GLOBS = ("/usr/lib/*/dpdk/pmds-*/librte_net_memif.so*", "/usr/lib/dpdk/pmds-*/librte_net_memif.so*",
                "/usr/local/lib*/dpdk/pmds-*/librte_net_memif.so*", "/usr/lib*/librte_net_memif.so*",
                "/usr/local/lib*/librte_net_memif.so*", "/usr/lib/*/librte_net_memif.so*")
_STATS_KEYS = {"RX-packets": "rx_packets", "RX-missed": "rx_missed", "RX-bytes": "rx_bytes",
               "RX-errors": "rx_errors", "RX-nombuf": "rx_nombuf", "TX-packets": "tx_packets",
               "TX-errors": "tx_errors", "TX-bytes": "tx_bytes", "Rx-pps": "rx_pps", "Rx-bps": "rx_bps",
               "Tx-pps": "tx_pps", "Tx-bps": "tx_bps"}
_STATS_RE = re.compile(r"(" + "|".join(map(re.escape, _STATS_KEYS)) + r"):\s*(\d+)")
_LOG_LINE = re.compile(r"\w+\(\): ")  # a DPDK driver log line, "memif_connect(): ..."
_MAX_KEPT = 1 << 20  # characters of output kept; enough for any answer and the error tail
_seq = itertools.count()


#: DPDK 22.11's EAL interrupt thread aborts ("PANIC in eal_intr_thread_main(): Error adding fd N
#: epoll_ctl, Bad file descriptor") when a memif peer's connection is closed while testpmd is
#: still starting (its control channel's fd is closed under the thread rebuilding its epoll set;
#: seen once, in a fresh-clone suite run, right after "sendmsg fail: Broken pipe"). A crash of
#: testpmd's own, before its first prompt: `Testpmd.start` starts it once more.
_INTR_PANIC = "PANIC in eal_intr_thread_main"


class TestpmdError(RuntimeError):
    """testpmd failed to start, exited, did not answer, or its link did not come up."""

    __test__ = False  # not a pytest test class despite its name


def _memif_pmd_present() -> bool:
    return any(glob.glob(g) for g in _MEMIF_GLOBS)


def testpmd_available(binary: str = DEFAULT_BINARY) -> str | None:
    """None if `Testpmd` can run here, else why not (a one-line reason, for test skips)."""
    path = shutil.which(binary)
    if path is None:
        return f"{binary} not found (install Debian's dpdk package: apt-get install dpdk)"
    if os.geteuid() != 0:
        return f"{binary} needs root (EAL runtime dir {RUNTIME_DIR}, memory locking)"
    if not _memif_pmd_present():
        return "DPDK's memif driver (librte_net_memif) is not installed"
    if (os.cpu_count() or 1) < 2:
        return "dpdk-testpmd needs 2 CPUs (a main and a forwarding lcore)"
    return None


class Testpmd:
    """One ``dpdk-testpmd`` process with one memif port (port 0), driven interactively.

    socket_path: the memif control socket (a file unless ``memif_args`` sets
        ``socket_abstract="yes"``); role: ``"server"`` (listens, creates the socket) or
        ``"client"`` (connects). mode: a testpmd forwarding mode (``rxonly``, ``txonly``,
        ``macswap``, ``io``, ``mac``, ``icmpecho``, ...). memif_args: devargs of the vdev
        (``id``, ``secret``, ``mac``, ``bsize``, ``rsize``, ``zero_copy``, ``socket_abstract``;
        ``None`` values are left out; underscores become dashes). txpkts: frame length (or a
        list of segment lengths) in txonly mode. eth_peer: destination MAC for txonly and mac
        modes. extra_args: more testpmd (not EAL) options; eal_args: more EAL options.
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, socket_path: str | os.PathLike[str], role: str = "server", mode: str = "rxonly", *,
                 main_lcore: int = 0, lcores: str = "0-1", memif_args: Mapping[str, Any] | None = None,
                 extra_args: Sequence[str] = (), eal_args: Sequence[str] = (),
                 txpkts: int | Sequence[int] | None = None, eth_peer: str | None = None,
                 memory_mb: int = 1024, total_num_mbufs: int = 16384, mbuf_size: int | None = None,
                 binary: str = DEFAULT_BINARY,
                 log_levels: Sequence[str] = ("lib.eal:error", "pmd.net.memif:info")) -> None:
        if role not in ("server", "client"):
            raise ValueError(f"memif role must be 'server' or 'client', not {role!r}")
        self.socket_path = os.fspath(socket_path)
        if len(self.socket_path.encode()) >= 108:
            raise ValueError(f"memif socket path too long for a unix socket (max 107 bytes): {self.socket_path}; "
                             "use a shorter directory, e.g. under /tmp")
        self.role = role
        self.mode = mode
        self.binary = binary
        self.port = 0
        self.prefix = f"shmfab-tp-{os.getpid()}-{next(_seq)}"
        devargs: dict[str, Any] = {"socket_abstract": "no"}
        devargs.update(memif_args or {})
        self.devargs = {k.replace("_", "-"): v for k, v in devargs.items() if v is not None}
        self.vdev = ",".join([f"net_memif{self.devargs.get('id', 0)}", f"role={role}", f"socket={self.socket_path}"]
                             + [f"{k}={v}" for k, v in self.devargs.items()])
        args = [binary, "-l", lcores, "--main-lcore", str(main_lcore), "--no-huge", "-m", str(memory_mb), "--no-pci",
                "--file-prefix", self.prefix, *[f"--log-level={lv}" for lv in log_levels], f"--vdev={self.vdev}",
                *eal_args, "--", "-i", f"--total-num-mbufs={total_num_mbufs}", f"--forward-mode={mode}"]
        if mbuf_size is not None:
            args.append(f"--mbuf-size={mbuf_size}")
        # --txpkts is checked against the default mbuf size before --mbuf-size applies and is then
        # dropped with only a log line, so the length is set by command once the pool exists
        self.txpkts = None if txpkts is None else ([txpkts] if isinstance(txpkts, int) else list(txpkts))
        if eth_peer is not None:
            args.append(f"--eth-peer={self.port},{eth_peer}")
        args += list(extra_args)
        self.args = args
        self._proc: subprocess.Popen[bytes] | None = None
        self._master = -1
        self._reader: threading.Thread | None = None
        self._cond = threading.Condition()
        self._out = ""       # output kept, ANSI sequences and CRs removed
        self._base = 0       # absolute offset of self._out[0] (older output is dropped)
        self._eof = False
        self._closed = False
        self._port_started = False
        self._answers: list[tuple[int, int]] = []  # spans of our own commands' answers, left out of error tails

    # -- life cycle -------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Self:
        """Start testpmd and wait until its prompt shows (port 0 configured and started). Started
        once more if DPDK's interrupt thread panicked during the start (see `_INTR_PANIC`)."""
        try:
            return self._start_once(timeout)
        except TestpmdError as exc:
            if _INTR_PANIC not in str(exc):
                raise
        # a fresh start: the same file prefix (close() removed its runtime directory), no output
        self._proc, self._master, self._reader = None, -1, None
        self._out, self._base, self._eof, self._closed, self._answers = "", 0, False, False, []
        return self._start_once(timeout)

    def _start_once(self, timeout: float) -> Self:
        if self._proc is not None:
            raise TestpmdError(f"testpmd {self.prefix} was already started")
        if self.role == "server" and self.devargs.get("socket-abstract") == "no":
            # a socket file left by a killed server makes bind() fail with "Address in use"
            _unlink_socket(self.socket_path)
        master, slave = pty.openpty()
        tty.setraw(slave)  # no \n -> \r\n, no echo games: plain bytes out
        try:
            self._proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=slave, stderr=slave,
                                          close_fds=True, start_new_session=True)
        except OSError as e:
            os.close(master)
            os.close(slave)
            raise TestpmdError(f"cannot run {self.binary}: {e}") from None
        os.close(slave)
        self._master = master
        self._reader = threading.Thread(target=self._read_loop, name=f"testpmd-{self.prefix}", daemon=True)
        self._reader.start()
        try:
            self._wait_prompt(0, timeout, "its first prompt")
            self._check_startup()
            if self.txpkts is not None:
                self.set_txpkts(*self.txpkts)
        except BaseException:
            self.close()
            raise
        return self

    def _check_startup(self) -> None:
        out = self.output()
        # testpmd reaches its prompt even when the port could not be set up; say so now rather
        # than as a link that never comes up
        fatal = [line for line in out.splitlines()
                 if "Fail to configure port" in line or "> device max frame size" in line
                 or ("Fail to start port" in line and self.role == "server")]
        if fatal:
            raise TestpmdError(f"testpmd {self.prefix} could not set up its memif port ({fatal[0].strip()}); "
                               f"command: {' '.join(self.args)}\nlast output:\n{self.tail()}")
        # a client whose server is not listening yet fails to start its port; wait_link retries
        self._port_started = not any("Fail to start port" in line for line in out.splitlines())

    def __enter__(self) -> Self:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float = 10.0) -> int | None:
        """Quit testpmd (then SIGTERM, then SIGKILL), clean its files up; returns its exit code."""
        if self._closed:
            return self._proc.returncode if self._proc else None
        self._closed = True
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                try:
                    self._send("quit")
                except OSError:
                    pass
                for sig in (None, signal.SIGTERM, signal.SIGKILL):
                    if sig is not None:
                        try:
                            proc.send_signal(sig)
                        except ProcessLookupError:
                            pass
                    try:
                        proc.wait(timeout)
                        break
                    except subprocess.TimeoutExpired:
                        continue
            if proc.stdin is not None:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
        if self._reader is not None:
            self._reader.join(5)
        if self._master >= 0:
            os.close(self._master)
            self._master = -1
        shutil.rmtree(os.path.join(RUNTIME_DIR, self.prefix), ignore_errors=True)
        if self.role == "server" and self.devargs.get("socket-abstract") == "no":
            _unlink_socket(self.socket_path)
        return proc.returncode if proc else None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def output(self) -> str:
        """All output kept so far (the last ~1 MiB), ANSI sequences and CRs removed."""
        with self._cond:
            return self._out

    def tail(self, lines: int = 25, skip_answers: bool = False) -> str:
        """The last lines of output, for error messages; `skip_answers` leaves out the answers to
        commands this object sent (but not DPDK log lines that came meanwhile)."""
        with self._cond:
            out, base, spans = self._out, self._base, list(self._answers)
        if skip_answers:
            parts, at = [], base
            for start, end in spans:
                if end <= at:
                    continue
                parts.append(out[at - base:max(start, at) - base])
                inside = out[max(start, at) - base:end - base]
                parts.extend(l + "\n" for l in inside.splitlines() if _LOG_LINE.search(l))
                at = end
            parts.append(out[at - base:])
            out = "".join(parts)
        return "\n".join(out.rstrip("\n").splitlines()[-lines:])

    # -- commands ---------------------------------------------------------------------------

    def command(self, cmd: str, timeout: float = 10.0) -> str:
        """Run one testpmd command and return its answer (text between the echo and the next prompt)."""
        if "\n" in cmd:
            raise ValueError("one command at a time")
        self._check_running(f"command {cmd!r}")
        with self._cond:
            pos = self._base + len(self._out)
        self._send(cmd)
        start, end = self._wait_prompt(pos, timeout, f"the answer to {cmd!r}")
        with self._cond:
            text = self._out[max(pos - self._base, 0):start - self._base]
            self._answers = [a for a in self._answers[-200:] if a[1] > self._base] + [(pos, end)]
        # drop the echoed command line
        first, _, rest = text.partition("\n")
        answer = rest if cmd in first else text
        if "Bad arguments" in answer or "bad arguments" in answer:
            raise TestpmdError(f"testpmd {self.prefix} rejected {cmd!r}: {answer.strip()}")
        return answer

    def port_info(self) -> str:
        return self.command(f"show port info {self.port}")

    def link_up(self) -> bool:
        """Whether port 0's memif link is up (the peer connected and the memif handshake finished)."""
        m = re.search(r"Link status:\s*(\w+)", self.port_info())
        return bool(m and m.group(1).lower() == "up")

    def wait_link(self, timeout: float = 20.0, interval: float = 0.1, reconnect_every: float = 1.0) -> None:
        """Wait until the memif link is up; TestpmdError if it is not within `timeout` s.

        A 22.11 memif client connects once, when its port starts, and never again: a client
        started before its server (or turned away by it) stays down. So a client's port is
        restarted (``port stop 0``, ``port start 0``) every `reconnect_every` s while down."""
        deadline = time.monotonic() + timeout
        next_retry = time.monotonic() + (0 if not self._port_started else reconnect_every)
        while True:
            if self._port_started and self.link_up():
                return
            now = time.monotonic()
            if now >= deadline:
                raise TestpmdError(
                    f"memif link of testpmd {self.prefix} (role={self.role}, socket={self.socket_path}) "
                    f"not up within {timeout:g}s: is the peer running, with the other role, the same socket "
                    f"path, id and secret? last output:\n{self.tail(skip_answers=True)}")
            if self.role == "client" and now >= next_retry:
                self.restart_port()
                next_retry = now + reconnect_every
            time.sleep(interval)

    def restart_port(self) -> bool:
        """``port stop 0`` + ``port start 0`` (a memif client then connects anew); whether it started."""
        if self._port_started:
            self.command(f"port stop {self.port}")
        answer = self.command(f"port start {self.port}")
        self._port_started = "Fail to start port" not in answer
        return self._port_started

    def start_forwarding(self, tx_first: bool = False) -> str:
        """``start`` (or ``start tx_first``: send one burst first, to prime a ping-pong loop)."""
        return self.command("start tx_first" if tx_first else "start")

    def stop_forwarding(self, timeout: float = 20.0) -> dict[str, int]:
        """``stop``: stop the forwarding lcore; returns its forward statistics for port 0
        (`parse_forward_stats`: rx_packets, rx_dropped, tx_packets, tx_dropped, ...), which
        unlike `port_stats` count frames the memif ring had no room for (``tx_dropped``)."""
        return parse_forward_stats(self.command("stop", timeout))

    def set_mode(self, mode: str) -> None:
        """``set fwd MODE`` (forwarding must be stopped)."""
        self.command(f"set fwd {mode}")
        self.mode = mode

    def set_txpkts(self, *segments: int) -> None:
        """``set txpkts N[,N...]``: txonly (and tx_first) frame length, or its segment lengths, each
        at most the mbuf data room (2048 unless `mbuf_size`); forwarding must be stopped."""
        want = ",".join(str(s) for s in segments)
        answer = self.command("set txpkts " + want)
        got = re.search(r"Segment sizes:\s*([\d,]+)", self.command("show config txpkts"))
        if not got or got.group(1) != want:
            raise TestpmdError(f"testpmd {self.prefix} did not take txpkts {want} ({answer.strip() or 'no reason given'}); "
                               f"each segment must fit an mbuf: pass mbuf_size= or split the length into segments")

    def set_eth_peer(self, mac: str) -> None:
        """``set eth-peer 0 MAC``: destination MAC of txonly and mac modes (forwarding stopped)."""
        self.command(f"set eth-peer {self.port} {mac}")

    def set_verbose(self, level: int = 1) -> None:
        """``set verbose N``: at 1, print every received frame (see `rx_dumps`); 0 turns it off."""
        self.command(f"set verbose {level}")

    def mark(self) -> int:
        """A position in the output, for `rx_dumps(since=...)`."""
        with self._cond:
            return self._base + len(self._out)

    def rx_dumps(self, since: int = 0) -> list[dict[str, Any]]:
        """The frames printed by ``set verbose 1`` since output position `since` (see `mark`)."""
        with self._cond:
            text = self._out[max(since - self._base, 0):]
        return parse_rx_dumps(text)

    def mac(self) -> str:
        """Port 0's MAC address (lower case)."""
        m = re.search(r"MAC address:\s*([0-9A-Fa-f:]{17})", self.port_info())
        if not m:
            raise TestpmdError(f"no MAC address in 'show port info' of testpmd {self.prefix}")
        return m.group(1).lower()

    def port_stats(self) -> dict[str, int]:
        """Counters of ``show port stats 0``: rx_packets, rx_bytes, rx_missed, rx_errors, rx_nombuf,
        tx_packets, tx_bytes, tx_errors, and the rates rx_pps/rx_bps/tx_pps/tx_bps (since last shown)."""
        return parse_port_stats(self.command(f"show port stats {self.port}"))

    def clear_stats(self) -> None:
        """``clear port stats 0``."""
        self.command(f"clear port stats {self.port}")

    # -- plumbing ---------------------------------------------------------------------------

    def _send(self, cmd: str) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise TestpmdError(f"testpmd {self.prefix} is not started")
        try:
            proc.stdin.write(cmd.encode() + b"\n")
            proc.stdin.flush()
        except BrokenPipeError:
            self._check_running(f"command {cmd!r}")
            raise

    def _check_running(self, what: str) -> None:
        if self._proc is None:
            raise TestpmdError(f"testpmd {self.prefix} is not started")
        if self._proc.poll() is not None:
            self._reader and self._reader.join(2)
            raise TestpmdError(f"testpmd {self.prefix} exited (code {self._proc.returncode}) before {what}; "
                               f"last output:\n{self.tail()}")

    def _read_loop(self) -> None:
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO once the process (the last slave holder) is gone
                data = b""
            with self._cond:
                if not data:
                    self._eof = True
                    self._cond.notify_all()
                    return
                self._out += _ANSI.sub("", data.decode("utf-8", "replace"))
                if len(self._out) > _MAX_KEPT:
                    cut = len(self._out) - _MAX_KEPT // 2
                    self._out = self._out[cut:]
                    self._base += cut
                self._cond.notify_all()

    def _wait_prompt(self, pos: int, timeout: float, what: str) -> tuple[int, int]:
        """Wait for a prompt at or after absolute offset `pos`; return its absolute (start, end)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = _find_prompt(self._out, max(pos - self._base, 0))
                if found:
                    return self._base + found[0], self._base + found[1]
                if self._eof or (self._proc is not None and self._proc.poll() is not None):
                    self._cond.wait(0.2)  # let the reader drain what is left
                    code = self._proc.poll() if self._proc else None
                    raise TestpmdError(f"testpmd {self.prefix} exited (code {code}) before {what}; "
                                       f"command: {' '.join(self.args)}\nlast output:\n{self._tail_locked()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TestpmdError(f"testpmd {self.prefix} gave no {what} within {timeout:g}s; "
                                       f"last output:\n{self._tail_locked()}")
                self._cond.wait(min(left, 0.5))

    def _tail_locked(self, lines: int = 25) -> str:
        return "\n".join(self._out.rstrip("\n").splitlines()[-lines:])


def parse_port_stats(text: str) -> dict[str, int]:
    """The counters in the text of ``show port stats N`` (names as in `Testpmd.port_stats`)."""
    stats = {_STATS_KEYS[k]: int(v) for k, v in _STATS_RE.findall(text)}
    if "rx_packets" not in stats or "tx_packets" not in stats:
        raise TestpmdError(f"cannot read port stats from testpmd's answer:\n{text.strip()}")
    return stats


def parse_forward_stats(text: str) -> dict[str, int]:
    """The per-port block of testpmd's ``stop`` answer: rx_packets, rx_dropped, rx_total,
    tx_packets, tx_dropped, tx_total (all zero if forwarding was not running)."""
    block = text.split("Accumulated forward statistics")[0]
    return {k.lower().replace("-", "_"): int(v)
            for k, v in re.findall(r"((?:RX|TX)-(?:packets|dropped|total)):\s*(\d+)", block)}


_DUMP_RE = re.compile(r"src=([0-9A-Fa-f:]{17}) - dst=([0-9A-Fa-f:]{17}) - pool=\S+ - type=(0x[0-9a-fA-F]+) - "
                      r"length=(\d+) - nb_segs=(\d+)")


def parse_rx_dumps(text: str) -> list[dict[str, Any]]:
    """Frames in testpmd's verbose output: dicts of src, dst (lower case), type, length, nb_segs."""
    return [{"src": m[0].lower(), "dst": m[1].lower(), "type": int(m[2], 16), "length": int(m[3]),
             "nb_segs": int(m[4])} for m in _DUMP_RE.findall(text)]


def _find_prompt(text: str, start: int) -> tuple[int, int] | None:
    """(start, end) of the first prompt in `text` from `start`, whole or split by other lines."""
    i = text.find(PROMPT, start)
    if i >= 0:
        return i, i + len(PROMPT)
    m = _SPLIT_PROMPT.search(text, start)
    if m is None:
        return None
    # a line of the answer that starts like the prompt ("testpmd: ...") can begin an earlier
    # match with the same end: take the latest start
    while (later := _SPLIT_PROMPT.search(text, m.start() + 1)) is not None and later.end() == m.end():
        m = later
    return m.start(), m.end()


def _unlink_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
