"""Hosts on a LAN for the adapter bench and tests: network namespaces joined either by the
fabric (a TAP adapter per namespace) or by a veth pair (the kernel's way, the peer). Root only.

    with FabricLan(2) as lan:             # or VethLan()
        lan.run(1, ["redis-server", ...]) # a program in host 1's namespace
        lan.ip(1)                          # its address
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from typing import Any, Sequence

SUBNET = "10.77.{lan}.{host}"


class LanError(Exception):
    """A LAN that could not be set up (the message says which step and why)."""


def _ip(*argv: str) -> None:
    r = subprocess.run(["ip", *argv], capture_output=True, text=True)
    if r.returncode != 0:
        raise LanError(f"`ip {' '.join(argv)}` failed: {r.stderr.strip()}")


class _Lan:
    """Network namespaces host0..hostN-1 (the names carry a random tag), addresses 10.77.L.1...

    Subclasses connect them. `run`/`popen` start programs in a host's namespace; every process
    still in a namespace when the LAN closes is killed.
    """

    kind = "lan"

    def __init__(self, hosts: int = 2, mtu: int = 1500, lan: int = 0) -> None:
        self.hosts = hosts
        self.mtu = mtu
        self.lan = lan
        self.tag = uuid.uuid4().hex[:6]
        self.namespaces = [f"sf{self.tag}-{i}" for i in range(hosts)]
        self._procs: list[subprocess.Popen] = []

    def ip(self, host: int) -> str:
        """Host `host`'s address."""
        return SUBNET.format(lan=self.lan, host=host + 1)

    def cidr(self, host: int) -> str:
        return f"{self.ip(host)}/24"

    def exec_argv(self, host: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[host], *argv]

    def run(self, host: int, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
        """Run `argv` in host `host`'s namespace to the end (subprocess.run keywords)."""
        return subprocess.run(self.exec_argv(host, argv), **kw)

    def popen(self, host: int, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start `argv` in host `host`'s namespace; killed when the LAN closes if still running."""
        p = subprocess.Popen(self.exec_argv(host, argv), **kw)
        self._procs.append(p)
        return p

    def sysctl(self, host: int, setting: str) -> None:
        """`sysctl -w setting` in host `host`'s namespace, or LanError."""
        r = self.run(host, ["sysctl", "-qw", setting], capture_output=True, text=True)
        if r.returncode:
            raise LanError(f"sysctl {setting} failed in {self.namespaces[host]}: {r.stderr.strip()}")

    def redis(self, host: int, port: int, dir: str | None = None) -> subprocess.Popen:
        """A redis-server in host `host`'s namespace on its address and `port` (no persistence,
        reachable from the other hosts)."""
        argv = ["redis-server", "--bind", self.ip(host), "--port", str(port), "--save", "", "--appendonly", "no",
                "--protected-mode", "no"]
        if dir is not None:
            argv += ["--dir", dir]
        return self.popen(host, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self) -> "_Lan":
        try:
            for ns in self.namespaces:
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            self.connect()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        raise NotImplementedError

    def disconnect(self) -> None:
        pass

    def close(self) -> None:
        """Stop what runs in the namespaces and remove them."""
        for p in self._procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.disconnect()
        for ns in self.namespaces:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class VethLan(_Lan):
    """Two namespaces joined by a veth pair: the kernel's own link, the peer of the fabric."""

    kind = "veth"

    def __init__(self, mtu: int = 1500, lan: int = 1) -> None:
        super().__init__(2, mtu, lan)

    def connect(self) -> None:
        a, b = self.namespaces
        _ip("link", "add", f"v{self.tag}a", "netns", a, "type", "veth", "peer", "name", f"v{self.tag}b", "netns", b)
        for i, (ns, dev) in enumerate(((a, f"v{self.tag}a"), (b, f"v{self.tag}b"))):
            _ip("-n", ns, "link", "set", dev, "mtu", str(self.mtu))
            _ip("-n", ns, "addr", "add", self.cidr(i), "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")


class RoutedLan(_Lan):
    """Hosts 0..N-1, each on a subnet of its own (10.77.L+h.0/24, the host .1), joined by veth
    pairs to a router namespace (the last one, `router`) that forwards between them (.254)."""

    def __init__(self, hosts: int, mtu: int = 1500, lan: int = 3) -> None:
        super().__init__(hosts + 1, mtu, lan)
        self.router = hosts

    def ip(self, host: int) -> str:
        return f"10.77.{self.lan + host}.1"

    def connect(self) -> None:
        rt = self.namespaces[self.router]
        for h in range(self.router):
            ns, a, b = self.namespaces[h], f"v{self.tag}{h}", f"v{self.tag}{h}r"
            net = f"10.77.{self.lan + h}"
            _ip("link", "add", a, "netns", ns, "type", "veth", "peer", "name", b, "netns", rt)
            for where, dev, addr in ((ns, a, f"{net}.1/24"), (rt, b, f"{net}.254/24")):
                _ip("-n", where, "link", "set", dev, "mtu", str(self.mtu))
                _ip("-n", where, "addr", "add", addr, "dev", dev)
                _ip("-n", where, "link", "set", dev, "up")
            _ip("-n", ns, "route", "add", "default", "via", f"{net}.254")
        self.sysctl(self.router, "net.ipv4.ip_forward=1")


class RoutedVethLan(RoutedLan):
    """Two hosts on two subnets joined by a router namespace with an nftables firewall: the
    kernel's way of putting a firewall between namespaces (the peer of adapters `--via fw`)."""

    kind = "veth+nft"

    def __init__(self, mtu: int = 1500, lan: int = 3, accept_tcp: Sequence[int] = ()) -> None:
        super().__init__(2, mtu, lan)  # host0, host1 and the router (namespace 2)
        self.accept_tcp = list(accept_tcp)

    def connect(self) -> None:
        super().connect()
        rt = self.namespaces[self.router]
        ports = ", ".join(map(str, self.accept_tcp)) or "0"
        rules = ("table inet fw {\n chain forward {\n  type filter hook forward priority 0; policy drop;\n"
                 "  ct state established,related accept\n"
                 f"  tcp dport {{ {ports} }} accept\n  ip protocol icmp accept\n }}\n}}\n")
        r = subprocess.run(["ip", "netns", "exec", rt, "nft", "-f", "-"], input=rules, capture_output=True, text=True)
        if r.returncode:
            raise LanError(f"nft refused the router's rules: {r.stderr.strip()}")


class FabricLan(_Lan):
    """Namespaces joined by the fabric: a fabric of its own, a `shmfabric adapter` per namespace."""

    kind = "fabric"

    def __init__(self, hosts: int = 2, mtu: int = 1500, lan: int = 2, network_mtu: int = 65536, slots: int = 1024,
                 tape_entry_size: int = 2048, firewall: str | None = None,
                 adapter_args: Sequence[str] = ()) -> None:
        """`mtu` is the devices'; `network_mtu` the fabric network's (its slot size): 16 KB or
        more lets TCP segments cross uncut (see `shmfabric adapter`). With `firewall` (rule
        text), the adapters' IP frames cross a chain: `fw` (a firewall with those rules) then
        `router` (delivering by destination address), each a function process. `adapter_args`:
        more options for every adapter (e.g. `--source-check`)."""
        super().__init__(hosts, mtu, lan)
        self.firewall = firewall
        self.adapter_args = list(adapter_args)
        self.fabric = f"lan{self.tag}"
        self.network_mtu = network_mtu
        self.slots = slots
        self.tape_entry_size = tape_entry_size
        self.adapters: list[subprocess.Popen | None] = [None] * hosts
        self.ready: list[str] = [""] * hosts

    def connect(self) -> None:
        from shmfabric.fabric import Fabric

        # ephemeral: removed once no node is left and this process is gone, however it ended
        Fabric.create(self.fabric, networks=[{"mtu": self.network_mtu, "slots": self.slots}],
                      tape_entry_size=self.tape_entry_size, ephemeral=True).close()
        for i in range(self.hosts):
            self.start(i)
        if self.firewall is not None:
            routes = self.routes()
            self.function("router", "router", {"routes": routes}, ports=sorted(set(routes.values())))
            self.function("fw", "firewall", {"rules": self.firewall}, nxt="router")
            fab = Fabric.open(self.fabric)
            try:
                if not wait_until(lambda: fab.node_id("fw") is not None and fab.node_id("router") is not None,
                                  timeout=30):
                    raise LanError("the chain's functions (fw, router) did not attach within 30 s")
            finally:
                fab.close()

    def routes(self) -> dict[str, str]:
        """The chain's router's routes (with `firewall`): each host's address to its adapter."""
        return {f"{self.ip(i)}/32": f"host{i}" for i in range(self.hosts)}

    def function(self, node: str, function: str, config: dict, nxt: str = "",
                 ports: Sequence[str] = ()) -> subprocess.Popen:
        """Start a function process (`python -m shmfabric.functions.run`) on the LAN's fabric."""
        argv = [sys.executable, "-m", "shmfabric.functions.run", "--fabric", self.fabric, "--node", node,
                "--function", function, "--config", json.dumps(config), "--wait-mode", "block"]
        if nxt:
            argv += ["--next", nxt]
        for p in ports:
            argv += ["--port", p]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_die_with_parent)
        self._procs.append(proc)
        return proc

    def adapter_argv(self, host: int) -> list[str]:
        via = ["--via", "fw"] if self.firewall is not None else []
        return [sys.executable, "-m", "shmfabric", "adapter", self.fabric, f"host{host}",
                "--netns", self.namespaces[host], "--address", self.cidr(host), "--mtu", str(self.mtu), "--json",
                *via, *self.adapter_args]

    def start(self, host: int, timeout: float = 20.0) -> str:
        """Start host `host`'s adapter and wait for its ready line (returned). Call from the thread
        that owns the LAN: the adapter is told to stop when the thread that started it ends."""
        p = subprocess.Popen(self.adapter_argv(host), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=_die_with_parent)
        self.adapters[host] = p
        r, _, _ = select.select([p.stdout], [], [], timeout)
        line = p.stdout.readline() if r else ""  # type: ignore[union-attr]
        if not line.startswith("adapter "):
            p.kill()
            _, err = p.communicate()
            raise LanError(f"adapter host{host} did not start: {(line + err).strip() or 'no output'}")
        self.ready[host] = line.strip()
        return self.ready[host]

    def stop(self, host: int, timeout: float = 10.0) -> dict[str, int]:
        """Stop host `host`'s adapter (SIGTERM); its counters."""
        p = self.adapters[host]
        self.adapters[host] = None
        if p is None:
            return {}
        p.send_signal(signal.SIGTERM)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            raise LanError(f"adapter host{host} did not stop on SIGTERM within {timeout} s") from None
        if p.returncode != 0:
            raise LanError(f"adapter host{host} exited with {p.returncode}: {err.strip()}")
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        return json.loads(lines[-1])["counters"] if lines else {}

    def kill(self, host: int) -> None:
        """SIGKILL host `host`'s adapter."""
        p = self.adapters[host]
        self.adapters[host] = None
        if p is not None:
            p.kill()
            p.communicate()

    def disconnect(self) -> None:
        from shmfabric.fabric import Fabric

        for i, p in enumerate(self.adapters):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
            self.adapters[i] = None
        Fabric.destroy(self.fabric)


def _die_with_parent() -> None:
    # In the child before exec: SIGTERM when the parent ends, however it ends (SIGKILL
    # included), so an adapter (and its device) never outlives the LAN that started it. The
    # signal follows the *thread* that forked: start a LAN's adapters from the thread that owns it.
    import ctypes

    parent = os.getppid()  # (in the child: the process that forked it, or init if it is gone already)
    if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM) != 0:  # PR_SET_PDEATHSIG
        os._exit(1)
    if os.getppid() != parent or parent == 1:  # the parent died before the prctl
        os._exit(1)


def wait_until(check, timeout: float = 10.0, every: float = 0.05) -> bool:
    """Poll `check()` until it is true or `timeout` passes; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        ok = check()
        if ok or time.monotonic() >= deadline:
            return bool(ok)
        time.sleep(every)


def connect_times_out(lan: _Lan, host: int, ip: str, port: int, timeout: float = 2.0) -> bool:
    """Whether a TCP connection from host `host` to ip:port times out (its SYNs dropped on the way,
    as a firewall does), rather than being answered or refused. LanError for anything else."""
    code = ("import socket, sys\n"
            f"s = socket.socket(); s.settimeout({timeout})\n"
            f"try:\n    s.connect(({ip!r}, {port}))\nexcept TimeoutError:\n    sys.exit(3)\n"
            "except ConnectionRefusedError:\n    sys.exit(4)\n")
    r = lan.run(host, [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout + 30)
    if r.returncode not in (0, 3, 4):
        raise LanError(f"connect test from host{host} to {ip}:{port} failed: {r.stderr.strip()[-300:]}")
    return r.returncode == 3


class GlobalFabricLan(FabricLan):
    """A fabric LAN whose members share one address (the VIP), as `shmfabric global` serves it.

    host0 is the client; host1..N are the members: each adapter is started with `--global VIP`
    (the VIP on the member namespace's lo, ARP for it left to the dispatcher), so a member answers
    a client straight (direct return). `start_dispatcher` starts `shmfabric global` on the same
    fabric with every member; it answers ARP for the VIP and hands each new connection to a
    member that listens on its port.

        with GlobalFabricLan(members=2) as lan:
            lan.popen(1, [...]); lan.popen(2, [...])   # servers in the members
            lan.start_dispatcher()
            lan.run(0, ["curl", f"http://{lan.vip}/"])
    """

    kind = "global"

    def __init__(self, members: int = 2, mtu: int = 1500, lan: int = 5, **kw: Any) -> None:
        """`members` member hosts (host1..) besides the client (host0); `kw` as FabricLan's."""
        super().__init__(members + 1, mtu, lan, **kw)
        self.members = members
        self.dispatcher: subprocess.Popen | None = None
        self.dispatcher_ready = ""
        self._dispatcher_err: Any = None

    @property
    def vip(self) -> str:
        """The address the members share."""
        return f"10.77.{self.lan}.100"

    def adapter_argv(self, host: int) -> list[str]:
        argv = super().adapter_argv(host)
        return argv + ["--global", self.vip] if host >= 1 else argv

    def routes(self) -> dict[str, str]:
        # (with `firewall`: the global address is the dispatcher's, `gw`, to the chain's router,
        # which waits up to 30 s for that node before it forwards anything: start the dispatcher
        # within that time)
        return {**super().routes(), f"{self.vip}/32": "gw"}

    def dispatcher_argv(self, name: str = "gw") -> list[str]:
        argv = [sys.executable, "-m", "shmfabric", "global", self.fabric, name, "--address", self.vip]
        for h in range(1, self.hosts):
            argv += ["--member", f"host{h}={self.namespaces[h]}"]
        return argv + ["--json"]

    def start_dispatcher(self, name: str = "gw", timeout: float = 20.0) -> str:
        """Start `shmfabric global` as node `name` and wait for its ready line (returned). Call
        from the thread that owns the LAN (see `start`)."""
        import tempfile

        if self.dispatcher is not None:
            raise LanError("the dispatcher runs already")
        # stderr to a file, not a pipe: nobody reads it while the dispatcher runs, and a full
        # pipe would stall it
        err = tempfile.TemporaryFile(mode="w+")
        p = subprocess.Popen(self.dispatcher_argv(name), stdout=subprocess.PIPE, stderr=err, text=True,
                             preexec_fn=_die_with_parent)
        self.dispatcher, self._dispatcher_err = p, err
        r, _, _ = select.select([p.stdout], [], [], timeout)
        line = p.stdout.readline() if r else ""  # type: ignore[union-attr]
        if not line.startswith("global "):
            self.dispatcher, self._dispatcher_err = None, None
            p.kill()
            p.communicate()
            err.seek(0)
            why = (line + err.read()).strip() or f"no output within {timeout} s"
            err.close()
            raise LanError(f"dispatcher {name} did not start: {why}")
        self.dispatcher_ready = line.strip()
        return self.dispatcher_ready

    def stop_dispatcher(self, timeout: float = 10.0) -> dict[str, Any]:
        """Stop the dispatcher (SIGTERM); its counters (from its --json line; {} if none)."""
        p, err = self.dispatcher, self._dispatcher_err
        self.dispatcher, self._dispatcher_err = None, None
        if p is None:
            return {}
        try:
            p.send_signal(signal.SIGTERM)
            try:
                out, _ = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
                raise LanError(f"the dispatcher did not stop on SIGTERM within {timeout} s") from None
            if p.returncode != 0:
                err.seek(0)
                raise LanError(f"the dispatcher exited with {p.returncode}: {err.read().strip()[-500:]}")
        finally:
            if err is not None:
                err.close()
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if not lines:
            return {}
        report = json.loads(lines[-1])
        return report.get("counters", report) if isinstance(report, dict) else {}

    def kill_dispatcher(self) -> None:
        """SIGKILL the dispatcher."""
        p, err = self.dispatcher, self._dispatcher_err
        self.dispatcher, self._dispatcher_err = None, None
        if p is not None:
            if p.poll() is None:
                p.kill()
            p.communicate()
        if err is not None:
            err.close()

    def disconnect(self) -> None:
        self.kill_dispatcher()
        super().disconnect()
