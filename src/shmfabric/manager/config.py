"""The service manager's declarative topology: one YAML file describes a whole deployment.

```yaml
fabric:   {name: edge, ring_size: 1024, max_nodes: 32, networks: [{name: lan, mtu: 1500, slots: 8192}]}
api: 127.0.0.1:7878            # management API (HTTP + JSON); port 0 = any free port; or, with a token:
                               #   api: {listen: 127.0.0.1:7878, token_file: /etc/shmfabric/edge.token}
metrics: 127.0.0.1:9478        # Prometheus metrics (optional; /metrics is also served on the API)
policies:                      # defaults for every node; a node may override `restart:` and `scale:`
  restart: {max_restarts: 5, window: 60, backoff_initial: 0.5, backoff_max: 30}
  scale:   {min_instances: 1, max_instances: 1}
nodes:
  - {name: gen, function: generator, config: {rate: 20000}}
  - {name: fw, function: firewall, config: {...}, scale: {max_instances: 3, out_depth: 256, out_for: 2}}
  - {name: sink-a, function: sink}
chains:
  - {name: main, nodes: [gen, fw, [sink-a, sink-b]]}
```

A node may instead be an adapter (`adapter: {kind: tap | memif | global, ...}`, optional `via: NODE`): a
TAP interface, a memif port or a global address's dispatcher, run as exactly one instance (see
docs/manager.md, "Adapter nodes").

A chain is an ordered list of node names; a step may be a list of nodes (a fan-out group: the
upstream node spreads flows over them by 5-tuple hash). The runtime's `--next` of every node is
derived from the chains (`Topology.next_of`).

`load_topology(path)` parses with a YAML composer that keeps line numbers, so every problem is
raised as one `ConfigError` whose lines read ``FILE:LINE: field `nodes[2].scale.max_instances`:
problem; fix: ...``. Pure: no processes, no fabric.
"""
from __future__ import annotations

import ipaddress
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)

__all__ = [
    "ConfigError", "NetworkConfig", "FabricSection", "RestartPolicy", "ScalePolicy", "Policies",
    "NodeConfig", "ChainConfig", "Topology", "load_topology", "parse_topology", "instance_name",
    "DEFAULT_CONFIG", "check_functions", "ApiSection", "api_listen", "api_token_file",
    "TapAdapter", "MemifAdapter", "GlobalAdapter", "ADAPTER_FUNCTION_PREFIX",
]

DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "examples" / "edge.yaml"

# A node's instances are NAME, NAME-2, ... NAME-99; fabric names are at most 31 bytes.
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.]*(?:-[A-Za-z0-9_.]+)*$")
_NODE_NAME_MAX = 27
RESERVED_NODE_NAMES = ("manager",)


class ConfigError(Exception):
    """A topology the user has to fix; every line names the file, the line, the field and the fix."""


def instance_name(node: str, index: int) -> str:
    """Name of instance `index` (1-based) of `node`: the first keeps the node's name, then NAME-2, NAME-3..."""
    return node if index == 1 else f"{node}-{index}"


def _check_address(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected a HOST:PORT string, got {type(value).__name__}")
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:7878; port 0 = any free port)")
    return value.strip()


def _check_ipv4(value: Any) -> Any:
    """The management API's server listens on IPv4 (an IPv6 address would fail only at start)."""
    if isinstance(value, str) and ":" in value.rpartition(":")[0].strip("[]"):
        raise ValueError(f"{value!r}: the management API listens on IPv4 only; give an IPv4 address or a host "
                         "name, e.g. 127.0.0.1:7878 (port 0 = any free port)")
    return value


def _check_api(value: Any) -> Any:
    """`api:` is HOST:PORT (checked here), null, or a mapping {listen, token_file} (an ApiSection)."""
    if isinstance(value, (dict, ApiSection)):
        return value
    if value is not None and not isinstance(value, str):
        raise ValueError(f"expected a HOST:PORT string or a mapping {{listen: HOST:PORT, token_file: PATH}}, got "
                         f"{type(value).__name__}")
    return _check_address(value)


class _Model(BaseModel):
    # Unknown keys are errors: a misspelt policy field silently ignored is worse than a refusal.
    # Strict: `ring_size: '1024'` (a string) or `enabled: "no"` is refused, not converted.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class NetworkConfig(_Model):
    """One network of the fabric: a pool of slots of one MTU."""

    name: str | None = Field(None, description="optional label; nodes may name it in `network:`")
    mtu: int = Field(1500, ge=1490, le=65536, description="largest frame payload in bytes")
    slots: int = Field(8192, ge=64, le=4_194_304, description="packet buffers in the pool")


class FabricSection(_Model):
    """The shared-memory fabric the manager creates."""

    name: str = Field(min_length=1, max_length=24, description="region file /dev/shm/shmfabric-NAME")
    networks: list[NetworkConfig] = Field(default_factory=lambda: [NetworkConfig()], min_length=1, max_length=8)
    ring_size: int = Field(1024, ge=16, le=65536, description="descriptors per ring (a power of two)")
    max_nodes: int = Field(32, ge=2, le=1024, description="node table size: every instance and the manager count")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError(f"fabric name {v!r} may only hold letters, digits, '_', '.', '-', and must start "
                             "with a letter or digit")
        return v

    @field_validator("ring_size")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v & (v - 1):
            lo = 1 << (v.bit_length() - 1)
            raise ValueError(f"ring_size {v} is not a power of two; use {lo} or {lo * 2}")
        return v


class RestartPolicy(_Model):
    """Restart a failed instance after an exponential backoff; give up after too many in a window."""

    enabled: bool = True
    mode: Literal["on-failure", "always"] = Field("on-failure", description="on-failure: an instance that exits "
                                                 "with status 0 has finished (a generator with a count); always: "
                                                 "restart it too")
    max_restarts: int = Field(5, ge=0, description="restarts allowed within `window` seconds before giving up")
    window: float = Field(60.0, gt=0, description="seconds over which restarts are counted")
    backoff_initial: float = Field(0.5, ge=0, description="delay before the first restart (seconds)")
    backoff_max: float = Field(30.0, ge=0, description="the delay doubles per restart up to this")
    stable_after: float = Field(10.0, ge=0, description="an instance up this long has its backoff reset")
    unresponsive_after: float = Field(10.0, ge=0, description="a running instance that answers no control "
                                      "request for this long is killed and restarted (0: never)")

    @model_validator(mode="after")
    def _order(self) -> "RestartPolicy":
        if self.backoff_max < self.backoff_initial:
            raise ValueError(f"backoff_max ({self.backoff_max}) is smaller than backoff_initial "
                             f"({self.backoff_initial}); raise backoff_max")
        return self


class ScalePolicy(_Model):
    """Scale out when the input queue stays deep, back in when it stays shallow.

    Depth is the mean number of frames waiting per instance (sum of its input rings' depths).
    """

    min_instances: int = Field(1, ge=1, le=99)
    max_instances: int = Field(1, ge=1, le=99)
    out_depth: int = Field(256, ge=1, description="scale out when the mean depth stays above this...")
    out_for: float = Field(2.0, ge=0, description="...for this many seconds")
    in_depth: int = Field(8, ge=0, description="scale in when the mean depth stays below this...")
    in_for: float = Field(10.0, ge=0, description="...for this many seconds")
    cooldown: float = Field(5.0, ge=0, description="no other scale step this soon after one")

    @model_validator(mode="after")
    def _order(self) -> "ScalePolicy":
        if self.min_instances > self.max_instances:
            raise ValueError(f"min_instances ({self.min_instances}) is larger than max_instances "
                             f"({self.max_instances}); lower min_instances or raise max_instances")
        if self.in_depth >= self.out_depth:
            raise ValueError(f"in_depth ({self.in_depth}) must be below out_depth ({self.out_depth}), "
                             "or the node would flap between scale out and in")
        return self


class ApiSection(_Model):
    """`api: {listen: HOST:PORT, token_file: PATH}`: the management API with bearer-token authentication.

    With `token_file`, every request to the API needs `Authorization: Bearer TOKEN`, TOKEN being the
    file's content (see shmfabric.manager.api.load_token: a missing file is created, 0600, with a random
    token; one that its group or others may read or write is refused, as is a symbolic link, and a file
    whose directory, or one above it, another user could change: see `check_token_dir`). `api:
    HOST:PORT` is the same as `api: {listen: HOST:PORT}`: no token."""

    listen: str = Field("127.0.0.1:0", description="HOST:PORT (IPv4; port 0 = any free port)")
    token_file: str | None = Field(None, description="absolute path of the file holding the API's bearer token")

    _v4 = field_validator("listen", mode="after")(_check_ipv4)

    @field_validator("listen", mode="before")
    @classmethod
    def _listen(cls, v: Any) -> Any:
        if v is None:
            raise ValueError("listen must be HOST:PORT (to run without a management API, write `api: null`)")
        return _check_address(v)

    @field_validator("token_file")
    @classmethod
    def _token_path(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if not v.strip() or "\0" in v:
            raise ValueError("token_file must be a file path (a non-empty string)")
        if not os.path.isabs(v):
            raise ValueError(f"token_file {v!r} is not an absolute path; give one starting with '/' (e.g. "
                             "/etc/shmfabric/NAME.token), so that it does not depend on the manager's directory")
        return os.path.normpath(v)

    def __str__(self) -> str:  # how a reload's warning shows it
        return self.listen + (f" (token_file {self.token_file})" if self.token_file else "")


def _api_kind(value: Any) -> str:
    return "api:mapping" if isinstance(value, (dict, ApiSection)) else "api:address"


def api_listen(api: "str | ApiSection | None") -> str | None:
    """The HOST:PORT of a topology's `api:` (None: no API), whichever form it was written in."""
    return api.listen if isinstance(api, ApiSection) else api


def api_token_file(api: "str | ApiSection | None") -> str | None:
    """The token file of a topology's `api:` (None: no authentication)."""
    return api.token_file if isinstance(api, ApiSection) else None


class Policies(_Model):
    """Defaults for every node."""

    restart: RestartPolicy = RestartPolicy()
    scale: ScalePolicy = ScalePolicy()


_IFNAME_MAX = 15  # IFNAMSIZ - 1
_MEMIF_SECRET_MAX = 23  # bytes (memif's SECRET_SZ - 1)
_UNIX_PATH_MAX = 107
ADAPTER_FUNCTION_PREFIX = "adapter:"  # an adapter node's "function" in status: adapter:tap, adapter:memif


class TapAdapter(_Model):
    """`adapter: {kind: tap, ...}`: a TAP network interface on the fabric (`shmfabric adapter`, root)."""

    kind: Literal["tap"]
    address: list[str] = Field(default_factory=list, description="CIDR addresses, e.g. [10.77.0.1/24]")
    netns: str | None = Field(None, description="network namespace (`ip netns add NAME`); default the manager's")
    mtu: int | None = Field(None, ge=68, le=65535, description="interface MTU (default: the network's)")
    ifname: str = Field("sf0", description="interface name (1-15 bytes)")
    global_: list[str] = Field(default_factory=list, alias="global",
                               description="global addresses this adapter is a member of (`kind: global` nodes)")
    source_check: bool = Field(False, description="drop frames naming another sender: a source MAC or IP not "
                                                  "the adapter's (`shmfabric adapter --source-check`)")
    allow_source: list[str] = Field(default_factory=list,
                                    description="further source prefixes allowed (implies source_check), "
                                                "e.g. [10.9.0.0/16] routed behind the namespace")
    dhcp_server: bool = Field(False, description="the namespace runs a DHCP or DHCPv6 server: its replies to "
                                                 "clients pass the source check (implies source_check)")

    @field_validator("allow_source")
    @classmethod
    def _allowed(cls, v: list[str]) -> list[str]:
        from shmfabric.adapters.source_guard import allowed_prefix

        for a in v:
            allowed_prefix(a)  # (its ValueError says what is wrong)
        return v

    @field_validator("global_")
    @classmethod
    def _globals(cls, v: list[str]) -> list[str]:
        for a in v:
            _check_global_address(a)
        return v

    @model_validator(mode="after")
    def _member_has_address(self) -> "TapAdapter":
        # (as `shmfabric adapter --global` checks: without an address of its own on the interface,
        # the kernel could ask ARP questions from the global address and move clients to it)
        for g in self.global_:
            fam = ipaddress.ip_address(g).version
            if not any(ipaddress.ip_interface(a).version == fam for a in self.address):
                raise ValueError(f"a member of global address {g} needs an IPv{fam} address of its own in "
                                 f"`address:` (e.g. {'10.77.0.2/24' if fam == 4 else 'fd00::2/64'})")
        return self

    @field_validator("address")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        import ipaddress

        for a in v:
            if "/" not in a:
                raise ValueError(f"address {a!r} has no prefix length; give one, e.g. {a}/24")
            try:
                ipaddress.ip_interface(a)
            except ValueError:
                raise ValueError(f"address {a!r} is not an IPv4 or IPv6 address with a prefix "
                                 "(e.g. 10.77.0.1/24, fd00::1/64)") from None
        return v

    @field_validator("ifname")
    @classmethod
    def _ifname(cls, v: str) -> str:
        if not v or len(v.encode()) > _IFNAME_MAX or any(c in "/:" or c.isspace() for c in v) or v in (".", ".."):
            raise ValueError(f"interface name {v!r} is not valid: 1-15 bytes, no '/', ':' or spaces (e.g. sf0)")
        return v

    @field_validator("netns")
    @classmethod
    def _netns(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or v in (".", "..") or "\0" in v):
            raise ValueError(f"netns {v!r} is not a network namespace name (as `ip netns add NAME` takes)")
        return v


class MemifAdapter(_Model):
    """`adapter: {kind: memif, socket: PATH, ...}`: a memif port for DPDK/VPP peers (`shmfabric memif`)."""

    kind: Literal["memif"]
    socket: str = Field(min_length=1, description="the memif control socket's path (or abstract name)")
    role: Literal["server", "client"] = Field("server", description="server: listen; client: connect")
    id: int = Field(0, ge=0, le=0xFFFFFFFF, description="the memif interface id")
    secret: str | None = Field(None, repr=False, description="a shared secret the peer must give (at most 23 bytes)")
    abstract: bool = Field(False, description="the socket is in the abstract namespace (DPDK's default)")
    ring_size: int = Field(1024, ge=2, le=16384, description="client: descriptors per ring (a power of two)")
    buffer_size: int = Field(2048, ge=128, le=65472, description="client: bytes per buffer (a multiple of 64)")

    @field_validator("socket")
    @classmethod
    def _socket(cls, v: str) -> str:
        if "\0" in v or len(v.encode()) > _UNIX_PATH_MAX:
            raise ValueError(f"socket {v!r} is longer than a unix socket address ({_UNIX_PATH_MAX} bytes) or holds "
                             "a NUL; give a shorter path")
        return v


    @field_validator("secret")
    @classmethod
    def _secret(cls, v: str | None) -> str | None:
        if v is not None and (len(v.encode()) > _MEMIF_SECRET_MAX or "\0" in v):
            # (the value itself is not repeated: it is a secret)
            raise ValueError(f"secret is {len(v.encode())} bytes: give at most {_MEMIF_SECRET_MAX}, no NUL")
        if v is not None and not v:
            raise ValueError("secret is empty, which would let any peer in; give one, or remove `secret:`")
        if v is not None and (any(ord(c) < 32 or ord(c) == 127 for c in v) or v != v.strip()):
            # (a YAML block scalar ends in a newline the peer would not type)
            raise ValueError("secret holds a control character (a line break?) or spaces at its ends; "
                             "write it on one line, e.g. secret: \"...\"")
        return v

    @field_validator("ring_size")
    @classmethod
    def _ring(cls, v: int) -> int:
        if v & (v - 1):
            lo = 1 << (v.bit_length() - 1)
            raise ValueError(f"ring_size {v} is not a power of two; use {lo} or {lo * 2}")
        return v

    @field_validator("buffer_size")
    @classmethod
    def _buffer(cls, v: int) -> int:
        if v % 64:
            raise ValueError(f"buffer_size {v} is not a multiple of 64; use {v // 64 * 64 or 128} or {(v // 64 + 1) * 64}")
        return v


def _check_global_address(a: str) -> str:
    from shmfabric.adapters.tap import TapError, parse_global  # (what `shmfabric adapter --global` takes)

    try:
        parse_global(a)
    except TapError as exc:
        raise ValueError(str(exc)) from None
    return a


class GlobalAdapter(_Model):
    """`adapter: {kind: global, address: IP, members: [NODE, ...], weights: {NODE: N}}`: one address
    for several TAP adapters (`shmfabric global`, root): the members list it under their `global:`;
    a member's weight (1 to 256, default 1) is its share of new connections and flows."""

    kind: Literal["global"]
    address: str = Field(description="the shared address, e.g. 10.77.0.100")
    members: list[str] = Field(min_length=1, description="the tap adapter nodes sharing it")
    weights: dict[str, Annotated[int, Field(ge=1, le=256)]] = Field(
        default_factory=dict, description="member -> weight (1 to 256; a member not named has 1)")
    walk_every: float = Field(1.0, gt=0, le=60, description="seconds between walks of the members' sockets")
    confirm_timeout: float = Field(5.0, gt=0, le=3600, description="seconds a new TCP connection may wait for a "
                                                                  "walk to show its member holding it")

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        return _check_global_address(v)

    @model_validator(mode="after")
    def _timeouts(self) -> "GlobalAdapter":
        if self.confirm_timeout < 2 * self.walk_every:
            raise ValueError(f"confirm_timeout {self.confirm_timeout:g} is shorter than two walks (walk_every "
                             f"{self.walk_every:g}): a connection placed would be forgotten before a walk could "
                             f"show it; give at least {2 * self.walk_every:g}")
        return self


AdapterConfig = Annotated[TapAdapter | MemifAdapter | GlobalAdapter, Field(discriminator="kind")]


class NodeConfig(_Model):
    """One logical node: a function, its config, and how many instances run it; or an adapter (a TAP
    interface or a memif port), which runs exactly one instance."""

    name: str = Field(min_length=1, max_length=_NODE_NAME_MAX)
    function: str | None = Field(None, min_length=1,
                                 description="plugin name (entry point group shmfabric.functions)")
    adapter: AdapterConfig | None = Field(None, description="a TAP interface or a memif port instead of a function")
    via: str | None = Field(None, min_length=1, description="adapters: unicast frames go to this node first")
    config: dict[str, Any] = Field(default_factory=dict, description="validated by the function's own Config")
    version: str | None = Field(None, description="label shown in status; a replacement sets a new one")
    instances: int | None = Field(None, ge=1, le=99, description="instances at start (default: scale.min_instances)")
    network: int | str = Field(0, description="network index or name")
    batch: int = Field(256, ge=1, le=4096, description="frames per batch (runtime --batch)")
    ports: list[str] = Field(default_factory=list, description="nodes behind Verdict.port(0), port(1)... (runtime --port)")
    restart: RestartPolicy | None = None
    scale: ScalePolicy | None = None

    @model_validator(mode="after")
    def _function_or_adapter(self) -> "NodeConfig":
        if self.function is None and self.adapter is None:
            raise ValueError("a node needs `function:` (a plugin name) or `adapter:` ({kind: tap, ...}, "
                             "{kind: memif, ...} or {kind: global, ...}); add one")
        if self.function is not None and self.adapter is not None:
            raise ValueError("a node has either `function:` or `adapter:`, not both; remove one (or make two nodes)")
        return self

    @property
    def is_adapter(self) -> bool:
        return self.adapter is not None

    @property
    def function_name(self) -> str:
        """The function shown in status: the plugin name, or `adapter:tap` / `adapter:memif`."""
        return ADAPTER_FUNCTION_PREFIX + self.adapter.kind if self.adapter is not None else str(self.function)

    @property
    def settings(self) -> dict[str, Any]:
        """What the node runs with: its function's `config`, or its adapter's settings (without `kind`)."""
        if self.adapter is None:
            return dict(self.config)
        return self.adapter.model_dump(exclude={"kind"})

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"node name {v!r} must start with a letter and hold only letters, digits, '_', '.', '-'")
        if v in RESERVED_NODE_NAMES:
            raise ValueError(f"node name {v!r} is reserved for the manager's own node; pick another")
        if re.search(r"-\d+$", v):
            raise ValueError(f"node name {v!r} ends in -DIGITS, which is how instances are named "
                             f"(NAME-2, NAME-3); rename it, e.g. {v.rsplit('-', 1)[0]}{v.rsplit('-', 1)[1]}")
        return v


class ChainConfig(_Model):
    """An ordered path of nodes; a step may be a list of nodes that share the upstream's flows."""

    name: str = Field(min_length=1)
    nodes: list[str | list[str]] = Field(min_length=2)


class Topology(_Model):
    """A whole manager config file."""

    fabric: FabricSection
    nodes: list[NodeConfig] = Field(min_length=1)
    chains: list[ChainConfig] = Field(default_factory=list)
    policies: Policies = Policies()
    # HOST:PORT (kept a string, as before), or {listen, token_file} (an ApiSection); null: no API.
    # `api_listen(topo.api)` and `api_token_file(topo.api)` read either form.
    api: Annotated[Union[Annotated[str, Tag("api:address")], Annotated[ApiSection, Tag("api:mapping")]],
                   Discriminator(_api_kind)] | None = Field(
        "127.0.0.1:0", description="management API HOST:PORT, or {listen: HOST:PORT, token_file: PATH} (null: no API)")
    metrics: str | None = Field(None, description="Prometheus HOST:PORT in addition to the API's /metrics")
    poll_interval: float = Field(0.5, gt=0, le=60, description="seconds between health and counter polls")

    _addr = field_validator("metrics", mode="before")(_check_address)
    _api = field_validator("api", mode="before")(_check_api)
    _api_v4 = field_validator("api", mode="after")(_check_ipv4)

    @model_validator(mode="after")
    def _references(self) -> "Topology":
        problems = _cross_references(self.fabric, [(i, n.name, n) for i, n in enumerate(self.nodes)],
                                     list(enumerate(self.chains)), self.policies)
        if problems:
            raise _LocErrors(problems)  # every one of them, not just the first
        return self

    # -- derived views ---------------------------------------------------------------------------
    def node(self, name: str) -> NodeConfig:
        """The node called `name` (KeyError if none)."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def next_of(self, name: str) -> list[str]:
        """Logical nodes that follow `name` in the chains (empty for the end of a chain)."""
        for chain in self.chains:
            for si, step in enumerate(chain.nodes[:-1]):
                if step == name:
                    nxt = chain.nodes[si + 1]
                    return [nxt] if isinstance(nxt, str) else list(nxt)
        return []

    def upstream_of(self, name: str) -> list[str]:
        """Logical nodes whose next step contains `name` (or whose ports name it)."""
        ups = [n.name for n in self.nodes if name in self.next_of(n.name)]
        ups += [n.name for n in self.nodes if name in n.ports and n.name not in ups]
        ups += [n.name for n in self.nodes if n.via == name and n.name not in ups]  # adapters sending through it
        return ups

    def restart_of(self, name: str) -> RestartPolicy:
        return self.node(name).restart or self.policies.restart

    def scale_of(self, name: str) -> ScalePolicy:
        return self.node(name).scale or self.policies.scale

    def instances_of(self, name: str) -> int:
        n = self.node(name)
        if n.adapter is not None:
            return 1  # an adapter owns one device or socket: exactly one instance
        return n.instances if n.instances is not None else self.scale_of(name).min_instances

    def network_index(self, name: str) -> int:
        net = self.node(name).network
        if isinstance(net, int):
            return net
        return [x.name for x in self.fabric.networks].index(net)

    def start_order(self) -> list[str]:
        """Nodes ordered so that every node starts after the nodes it sends to (sinks first)."""
        order: list[str] = []
        visiting: set[str] = set()

        def visit(name: str) -> None:
            if name in order or name in visiting:
                return  # a cycle (allowed: e.g. a reply path) is broken arbitrarily
            visiting.add(name)
            node = self.node(name)
            for nxt in self.next_of(name) + list(node.ports) + ([node.via] if node.via else []):
                visit(nxt)
            visiting.discard(name)
            order.append(name)

        for n in self.nodes:
            visit(n.name)
        return order


class _LocError(ValueError):
    """A cross-field error raised from a model validator, carrying the field it is about."""

    def __init__(self, loc: tuple[Any, ...], msg: str):
        super().__init__(msg)
        self.loc = loc
        self.msg = msg


class _LocErrors(ValueError):
    """Every cross-reference problem of a topology, raised at once from its model validator."""

    def __init__(self, errors: list[_LocError]):
        super().__init__("; ".join(e.msg for e in errors))
        self.errors = errors


def _cross_references(fabric: FabricSection | None, nodes: list[tuple[int, str | None, NodeConfig | None]],
                      chains: list[tuple[int, ChainConfig | None]], policies: Policies | None) -> list[_LocError]:
    """Every problem between fields: names, references to nodes and networks, chains, node budget.

    Works on a partly valid file too: a part that failed its own validation is passed as None (a node
    as its raw name, if that is a string) and the checks that need it are skipped, so the problems
    found here can be reported together with the field errors.
    """
    errs: list[_LocError] = []
    seen: dict[str, int] = {}
    for i, name, _ in nodes:
        if name is None:
            continue
        if name in seen:
            errs.append(_LocError(("nodes", i, "name"), f"node name {name!r} is used twice "
                                  f"(also nodes[{seen[name]}]); node names must be unique"))
        else:
            seen[name] = i

    def scale_of(n: NodeConfig) -> ScalePolicy | None:
        return n.scale or (policies.scale if policies is not None else None)

    if fabric is not None:
        net_names: dict[str, int] = {}
        for k, net in enumerate(fabric.networks):
            if net.name is None:
                continue
            if net.name in net_names:
                errs.append(_LocError(("fabric", "networks", k, "name"), f"network name {net.name!r} is used twice "
                                      f"(also networks[{net_names[net.name]}]); network names must be unique"))
            else:
                net_names[net.name] = k
    for i, _, n in nodes:
        if n is None:
            continue
        if n.name in n.ports:
            errs.append(_LocError(("nodes", i, "ports", n.ports.index(n.name)), f"node {n.name!r} names itself as "
                                  "a port; a port sends frames on to another node"))
        if fabric is not None:
            if isinstance(n.network, str):
                names = [net.name for net in fabric.networks]
                if n.network not in names:
                    errs.append(_LocError(("nodes", i, "network"), f"no network named {n.network!r}; "
                                          f"the fabric's networks are {[x for x in names if x] or 'unnamed'}"))
            elif not 0 <= n.network < len(fabric.networks):
                errs.append(_LocError(("nodes", i, "network"), f"network {n.network} does not exist; use 0.."
                                      f"{len(fabric.networks) - 1}"))
            a = n.adapter
            if isinstance(a, TapAdapter) and a.mtu is not None:
                names = [net.name for net in fabric.networks]
                k = names.index(n.network) if isinstance(n.network, str) and n.network in names else n.network
                if isinstance(k, int) and 0 <= k < len(fabric.networks) and a.mtu > fabric.networks[k].mtu:
                    errs.append(_LocError(("nodes", i, "adapter", "mtu"), f"mtu {a.mtu} is larger than the node's "
                                          f"network's ({fabric.networks[k].mtu}); give at most that, or put the "
                                          f"node on a network with a larger MTU"))
        for k, target in enumerate(n.ports):
            if target not in seen:
                errs.append(_LocError(("nodes", i, "ports", k), f"port {k} names node {target!r}, "
                                      "which is not defined under `nodes:`; add it or fix the name"))
        errs += _adapter_errors(i, n, seen)
        pol = scale_of(n)
        if n.adapter is not None:
            pass  # one instance, whatever the policies say (checked in `_adapter_errors`)
        elif pol is not None and n.instances is not None and not pol.min_instances <= n.instances <= pol.max_instances:
            errs.append(_LocError(("nodes", i, "instances"), f"instances {n.instances} is outside the scale "
                                  f"policy's {pol.min_instances}..{pol.max_instances}; change one of them"))
    pols = [scale_of(n) if n is not None else None for _, _, n in nodes]
    if fabric is not None and pols and all(p is not None for p in pols):
        total = sum(1 if n is not None and n.adapter is not None else p.max_instances
                    for (_, _, n), p in zip(nodes, pols)) + 1
        if total > fabric.max_nodes:
            errs.append(_LocError(("fabric", "max_nodes"), f"max_nodes {fabric.max_nodes} is too small: the nodes "
                                  f"may scale to {total - 1} instances plus the manager's node; "
                                  f"set max_nodes >= {total}"))
    errs += _adapter_clashes(nodes)
    errs += _global_errors(nodes)
    adapters = {n.name for _, _, n in nodes if n is not None and n.adapter is not None}
    nexts: dict[str, tuple[tuple[str, ...], int]] = {}
    chain_names: dict[str, int] = {}
    for ci, chain in chains:
        if chain is None:
            continue
        if chain.name in chain_names:
            errs.append(_LocError(("chains", ci, "name"), f"chain name {chain.name!r} is used twice "
                                  f"(also chains[{chain_names[chain.name]}])"))
        else:
            chain_names[chain.name] = ci
        where: dict[str, str] = {}  # node -> the step it first appears at
        looped = False
        for si, step in enumerate(chain.nodes):
            group = [step] if isinstance(step, str) else step
            if not group:
                errs.append(_LocError(("chains", ci, "nodes", si), "an empty group; list at least one node"))
            for gi, member in enumerate(group):
                loc = ("chains", ci, "nodes", si) + (() if isinstance(step, str) else (gi,))
                here = _fmt_loc(loc[2:])
                if member not in seen:
                    errs.append(_LocError(loc, f"node {member!r} is not defined under `nodes:`; add it or fix the name"))
                if member in where:
                    looped = True
                    errs.append(_LocError(loc, f"node {member!r} appears twice in chain {chain.name!r} "
                                          f"({where[member]} and {here}); a chain cannot loop back on itself"))
                else:
                    where[member] = here
            if si + 1 < len(chain.nodes) and isinstance(step, str) and step in adapters:
                errs.append(_LocError(("chains", ci, "nodes", si), f"node {step!r} is an adapter: it sends each "
                                      "frame to the node its destination MAC names, not to a next step; put it "
                                      "only at the end of a chain, and give it `via: NODE` to send its frames "
                                      "through a chain first"))
            if si + 1 < len(chain.nodes) and not isinstance(step, str):
                errs.append(_LocError(("chains", ci, "nodes", si), "a group of nodes may only be the last step "
                                      "of a chain; start a second chain from each member instead"))
        if looped:
            continue  # its next steps mean nothing; the loop is the problem reported
        for si, step in enumerate(chain.nodes[:-1]):
            if not isinstance(step, str):
                continue
            nxt = chain.nodes[si + 1]
            target = (nxt,) if isinstance(nxt, str) else tuple(nxt)
            if step in nexts and nexts[step][0] != target:
                errs.append(_LocError(("chains", ci, "nodes", si), f"node {step!r} already leads to "
                                      f"{list(nexts[step][0])} in chains[{nexts[step][1]}]; a node has one next "
                                      "step (use a group [a, b] to fan out)"))
            elif step not in nexts:
                nexts[step] = (target, ci)
    return errs


def _adapter_errors(i: int, n: NodeConfig, names: dict[str, int]) -> list[_LocError]:
    """The rules of one node's `adapter:` and `via:` (see `_cross_references`)."""
    errs: list[_LocError] = []
    if n.adapter is None:
        if n.via is not None:
            errs.append(_LocError(("nodes", i, "via"), "`via:` applies to adapter nodes only (a function's next "
                                  "step comes from `chains:`); remove it or make the node an adapter"))
        return errs
    kind = n.adapter.kind
    if n.instances is not None and n.instances != 1:
        errs.append(_LocError(("nodes", i, "instances"), f"instances {n.instances}: an adapter ({kind}) runs "
                              "exactly one instance (it owns its device or socket); remove `instances:` or set 1"))
    if n.scale is not None:
        errs.append(_LocError(("nodes", i, "scale"), f"an adapter ({kind}) runs exactly one instance and is not "
                              "scaled; remove `scale:` from this node"))
    if n.ports:
        errs.append(_LocError(("nodes", i, "ports"), f"an adapter ({kind}) has no ports (it sends by destination "
                              "MAC, or to `via:`); remove `ports:`"))
    if n.config:
        errs.append(_LocError(("nodes", i, "config"), f"an adapter ({kind}) takes its settings in `adapter:`, "
                              "not `config:`; move them there (see docs/manager.md, adapter nodes)"))
    if n.via is not None and kind == "global":
        errs.append(_LocError(("nodes", i, "via"), "a global address's dispatcher sends to its members, not through "
                              "a chain; remove `via:` (give it to the members' clients instead)"))
    elif n.via is not None:
        if n.via == n.name:
            errs.append(_LocError(("nodes", i, "via"), f"node {n.name!r} names itself in `via:`; name the first "
                                  "node of the chain its frames go through"))
        elif n.via not in names:
            errs.append(_LocError(("nodes", i, "via"), f"via names node {n.via!r}, which is not defined under "
                                  "`nodes:`; add it or fix the name"))
    return errs


def adapter_claims(adapter: TapAdapter | MemifAdapter | GlobalAdapter) -> dict[tuple, str]:
    """What `adapter` holds while it runs that no other adapter may hold at the same time, key -> how a
    message names it. Config validation refuses two adapters of one file with a key in common (their
    start would clash); a reload starts an adapter it adds only once no adapter it stops holds one of
    its keys. The keys:

    - ("socket", abstract, path): a memif adapter's control socket;
    - ("device", netns, ifname): a TAP adapter's interface (netns None: the manager's namespace);
    - ("address", ip): each of a TAP adapter's addresses (its duplicate-address probe would see the
      other's, or run before it is set and see nothing);
    - ("global-lo", netns, ip): each global address a TAP member puts on its namespace's `lo` (a
      member takes it off when it stops, if it put it there: from under another member there);
    - ("global", ip): a `kind: global` dispatcher's address."""
    if isinstance(adapter, MemifAdapter):
        path = adapter.socket if adapter.abstract else os.path.normpath(adapter.socket)
        return {("socket", adapter.abstract, path): f"memif socket {adapter.socket!r}"}
    if isinstance(adapter, GlobalAdapter):
        ip = str(ipaddress.ip_address(adapter.address))
        return {("global", ip): f"global address {ip}"}
    where = f"netns {adapter.netns!r}" if adapter.netns else "the manager's network namespace"
    out: dict[tuple, str] = {("device", adapter.netns, adapter.ifname): f"interface {adapter.ifname!r} in {where}"}
    for addr in adapter.address:
        ip = str(ipaddress.ip_interface(addr).ip)
        out[("address", ip)] = f"address {ip}"
    for g in adapter.global_:
        ip = str(ipaddress.ip_address(g))
        out[("global-lo", adapter.netns, ip)] = f"global address {ip} on lo in {where}"
    return out


def _adapter_clashes(nodes: list[tuple[int, str | None, NodeConfig | None]]) -> list[_LocError]:
    """Two memif adapters on one socket, or two TAP adapters with one interface name in one network
    namespace, or one address: the second could never start. By `adapter_claims`, as a reload
    decides which adapters it adds must wait for one it stops (the global ones: `_global_errors`)."""
    errs: list[_LocError] = []
    claimed: dict[tuple, int] = {}  # claim -> the index of the node that has it
    for i, _, n in nodes:
        if n is None or n.adapter is None:
            continue
        a = n.adapter
        ips = [str(ipaddress.ip_interface(x).ip) for x in a.address] if isinstance(a, TapAdapter) else []
        for k, ip in enumerate(ips):
            if ip in ips[:k]:
                errs.append(_LocError(("nodes", i, "adapter", "address", k), f"address {ip} is listed twice; "
                                      "each adapter needs addresses of its own"))
        if isinstance(a, MemifAdapter) and not a.abstract and not os.path.isabs(a.socket):
            # the peer is another program, started elsewhere: a path relative to where `up` ran
            # means nothing to it (an abstract name is a name, not a path)
            errs.append(_LocError(("nodes", i, "adapter", "socket"), f"socket {a.socket!r} is a relative path; "
                                  f"give an absolute one, e.g. /run/{os.path.basename(a.socket) or 'memif.sock'}"))
        for key, what in adapter_claims(a).items():
            if key[0] in ("global", "global-lo"):
                continue  # (checked in `_global_errors`: by dispatcher and member, with the fix for each)
            j = claimed.setdefault(key, i)
            if j == i:
                continue
            if key[0] == "address":
                # adapters of one topology start together: their duplicate-address probes would all
                # run before any address is set, and none would see the other
                errs.append(_LocError(("nodes", i, "adapter", "address", ips.index(key[1])),
                                      f"{what} is also tap nodes[{j}]'s; each adapter needs addresses of its own"))
            elif key[0] == "socket":
                errs.append(_LocError(("nodes", i, "adapter", "socket"), f"socket {a.socket!r} is also memif "
                                      f"nodes[{j}]'s; each memif adapter needs a socket of its own"))
            else:
                errs.append(_LocError(("nodes", i, "adapter", "ifname"), f"{what} is also nodes[{j}]'s; give one "
                                      "of them another `ifname:` or `netns:`"))
    return errs


def _global_errors(nodes: list[tuple[int, str | None, NodeConfig | None]]) -> list[_LocError]:
    """`kind: global` nodes: one per address; each member a tap adapter node listing the address
    under `global:`, and every tap adapter listing one a member of its dispatcher."""
    errs: list[_LocError] = []
    by_name = {n.name: n for _, _, n in nodes if n is not None}
    owners: dict[str, tuple[int, str]] = {}  # address -> (index, dispatcher)
    for i, _, n in nodes:
        a = n.adapter if n is not None else None
        if not isinstance(a, GlobalAdapter):
            continue
        ip = str(ipaddress.ip_address(a.address))
        if ip in owners:
            errs.append(_LocError(("nodes", i, "adapter", "address"), f"global address {ip} is also nodes"
                                  f"[{owners[ip][0]}]'s; one dispatcher per address"))
        else:
            owners[ip] = (i, n.name)  # type: ignore[union-attr]
        for m in a.weights:
            if m not in a.members:
                errs.append(_LocError(("nodes", i, "adapter", "weights", m), f"a weight is given for {m!r}, which is "
                                      f"not among `members:` ({', '.join(a.members)}); add it there or fix the name"))
        for k, m in enumerate(a.members):
            member = by_name.get(m)
            ma = member.adapter if member is not None else None
            if m in a.members[:k]:
                errs.append(_LocError(("nodes", i, "adapter", "members", k), f"member {m!r} is listed twice"))
            elif member is None:
                errs.append(_LocError(("nodes", i, "adapter", "members", k), f"member {m!r} is not defined under "
                                      "`nodes:`; add it (a `kind: tap` adapter) or fix the name"))
            elif not isinstance(ma, TapAdapter):
                errs.append(_LocError(("nodes", i, "adapter", "members", k), f"member {m!r} is not a tap adapter; "
                                      "a global address's members are `adapter: {kind: tap, global: [...]}` nodes"))
            elif ip not in {str(ipaddress.ip_address(g)) for g in ma.global_}:
                errs.append(_LocError(("nodes", i, "adapter", "members", k), f"member {m!r} does not list {ip} under "
                                      f"its adapter's `global:`; add `global: [{ip}]` to it"))
            else:
                # (the address on lo is the namespace's: the first member to stop would take it off
                # under the other, and one walk would count the namespace's sockets twice)
                other = next((o for o in a.members[:k] if o in by_name and by_name[o].adapter is not None
                              and getattr(by_name[o].adapter, "netns", 0) == ma.netns), None)
                if other is not None:
                    where = f"netns {ma.netns!r}" if ma.netns else "the manager's network namespace"
                    errs.append(_LocError(("nodes", i, "adapter", "members", k), f"members {other!r} and {m!r} are "
                                          f"both in {where}; give each member a namespace of its own"))
    for i, _, n in nodes:
        a = n.adapter if n is not None else None
        if isinstance(a, TapAdapter):
            for k, g in enumerate(a.global_):
                ip = str(ipaddress.ip_address(g))
                owner = owners.get(ip)
                if owner is None:
                    errs.append(_LocError(("nodes", i, "adapter", "global", k), f"no `kind: global` node serves "
                                          f"{ip}; add one with this node among its members, or remove it"))
                elif n.name not in by_name[owner[1]].adapter.members:  # type: ignore[union-attr]
                    errs.append(_LocError(("nodes", i, "adapter", "global", k), f"node {n.name!r} is not among the "
                                          f"members of {owner[1]!r}, which serves {ip}; add it there"))
    return errs


def _partial_references(data: dict) -> list[_LocError]:
    """The cross-reference checks on a file that failed field validation: each section is validated
    on its own and what passes is checked (see `_cross_references`)."""

    def valid(model: type[BaseModel], raw: Any) -> Any:
        try:
            return model.model_validate(raw)
        except (ValidationError, TypeError, ValueError):
            return None

    fabric = valid(FabricSection, data["fabric"]) if "fabric" in data else None
    policies = valid(Policies, data["policies"]) if "policies" in data else Policies()
    raw_nodes = data.get("nodes")
    nodes = []
    if isinstance(raw_nodes, list):
        for i, raw in enumerate(raw_nodes):
            name = raw.get("name") if isinstance(raw, dict) else None
            nodes.append((i, name if isinstance(name, str) else None, valid(NodeConfig, raw)))
    raw_chains = data.get("chains", [])
    chains = [(ci, valid(ChainConfig, raw)) for ci, raw in enumerate(raw_chains)] if isinstance(raw_chains, list) else []
    if not isinstance(raw_nodes, list):
        # with no readable `nodes:` every chain member would read as undefined: say nothing about chains
        chains = []
    return _cross_references(fabric, nodes, chains, policies)


# -- YAML with line numbers ----------------------------------------------------------------------
Mark = tuple[int, int]  # (line, column), 1-based


@dataclass
class _Located:
    data: Any
    marks: dict[tuple[Any, ...], Mark]


_MAX_VALUES = 100_000  # values a file may expand to through aliases (a topology holds a few hundred)
_MAX_DEPTH = 64         # nesting levels (a topology uses about 6)
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _check_graph(root: yaml.Node, source: str) -> None:
    """Refuse what a topology never needs and a hostile file uses: aliases that expand past
    `_MAX_VALUES` values (an "alias bomb"), an alias to itself, nesting deeper than `_MAX_DEPTH`,
    and a key given twice in one mapping (YAML would keep the last one silently). Each node is
    visited once (sizes are remembered by node), so the check costs what the file's text does."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def visit(node: yaml.Node, depth: int) -> int:
        line = node.start_mark.line + 1
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in visiting:
            raise ConfigError(f"{source}:{line}: an alias refers to a value that contains it; fix: remove the "
                              "recursive alias")
        if depth > _MAX_DEPTH:
            raise ConfigError(f"{source}:{line}: nesting too deep (more than {_MAX_DEPTH} levels); fix: flatten "
                              "the file (a topology needs a few levels)")
        visiting.add(id(node))
        size = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for knode, vnode in node.value:
                if isinstance(knode, yaml.ScalarNode) and knode.tag != _MERGE_TAG:
                    key = (knode.tag, knode.value)
                    kline = knode.start_mark.line + 1
                    if key in seen:
                        raise ConfigError(f"{source}:{kline}: key {knode.value!r} is given twice in one mapping "
                                          f"(lines {seen[key]} and {kline}); fix: keep one of them (YAML would "
                                          "silently use the last)")
                    seen[key] = kline
                size += visit(knode, depth + 1) + visit(vnode, depth + 1)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                size += visit(item, depth + 1)
        visiting.discard(id(node))
        if size > _MAX_VALUES:
            raise ConfigError(f"{source}:{line}: the aliases here expand to more than {_MAX_VALUES:,} values; "
                              "fix: write the values out, or use fewer aliases (`*name`)")
        sizes[id(node)] = size
        return size

    visit(root, 0)


def _compose(text: str, source: str) -> _Located:
    """Parse YAML keeping the line of every mapping value and list item (keyed by its path)."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except RecursionError:
            raise ConfigError(f"{source}:{loader.line + 1}: nesting too deep (more than {_MAX_DEPTH} levels); "
                              "fix: flatten the file (a topology needs a few levels)") from None
        if root is None:
            return _Located(None, {})
        _check_graph(root, source)
        data = loader.construct_document(root)
        marks: dict[tuple[Any, ...], Mark] = {}

        def walk(node: yaml.Node, path: tuple[Any, ...]) -> None:
            marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
            if isinstance(node, yaml.MappingNode):
                for knode, vnode in node.value:
                    try:
                        key = loader.construct_object(knode, deep=True)
                    except Exception:
                        continue
                    if isinstance(key, (list, dict)):
                        continue
                    # the key's own line: an unknown key is reported where it is written
                    marks[path + (key, "__key__")] = (knode.start_mark.line + 1, knode.start_mark.column + 1)
                    walk(vnode, path + (key,))
            elif isinstance(node, yaml.SequenceNode):
                for i, item in enumerate(node.value):
                    walk(item, path + (i,))

        walk(root, ())
        return _Located(data, marks)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        pos = f"{where.line + 1}" if where else "?"
        problem = _unquoted(getattr(exc, "problem", None) or "syntax error")
        raise ConfigError(f"{source}:{pos}: not valid YAML: {problem}; fix: correct the syntax "
                          "(indent with spaces, quote values holding ': ' or '#')") from None
    finally:
        loader.dispose()


def _line_of(marks: dict[tuple[Any, ...], Mark], loc: tuple[Any, ...], key: bool = False) -> int | None:
    if key and loc and (loc + ("__key__",)) in marks:
        return marks[loc + ("__key__",)][0]
    if key and loc:
        k = loc[:-1] + (loc[-1], "__key__")
        if k in marks:
            return marks[k][0]
    for n in range(len(loc), -1, -1):
        if loc[:n] in marks:
            return marks[loc[:n]][0]
    return None


def _fmt_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic adds union branch names ("str", "list[str]", "function-after[...]") to locations
    # (and the tags of `api:`'s two forms, "api:address" and "api:mapping")
    # (and the tag of `adapter:`'s kinds: `nodes[0].adapter.memif.socket` reads `nodes[0].adapter.socket`)
    loc = tuple(p for k, p in enumerate(loc) if not (k and loc[k - 1] == "adapter" and p in ("tap", "memif", "global")))
    return tuple(p for p in loc if isinstance(p, int) or not (
        str(p).startswith(("function-", "list[", "dict[", "api:")) or p in ("str", "int")))


_FIXES = {
    "extra_forbidden": "remove it or fix its spelling (see docs/manager.md for the fields)",
    "missing": "add it",
    "literal_error": "use one of the values listed",
    "union_tag_invalid": "give `kind: tap` (a TAP interface), `kind: memif` (a memif port) or `kind: global` "
                         "(one address for several tap adapters)",
    "union_tag_not_found": "add `kind: tap` (a TAP interface), `kind: memif` (a memif port) or `kind: global` "
                           "(one address for several tap adapters)",
}


def _fix_for(kind: str) -> str:
    if kind in _FIXES:
        return _FIXES[kind]
    if kind.startswith(("int_", "float_")) or kind in ("greater_than", "greater_than_equal", "less_than",
                                                         "less_than_equal"):
        return "give a number in the allowed range"
    if kind.startswith(("string_too", "too_")):
        return "change the length as stated"
    if kind.endswith("_type"):
        return "give a value of the expected type"
    return ""


def _format_loc_errors(errs: list[_LocError], source: str, marks: dict[tuple[Any, ...], Mark]) -> list[str]:
    lines = []
    for e in errs:
        line = _line_of(marks, e.loc)
        where = f"{source}:{line}" if line else source
        lines.append(f"{where}: field `{_fmt_loc(e.loc)}`: {e.msg}")
    return lines


def _format_errors(exc: ValidationError, source: str, marks: dict[tuple[Any, ...], Mark],
                   prefix: tuple[Any, ...] = ()) -> str:
    lines = []
    for err in exc.errors():
        if isinstance((err.get("ctx") or {}).get("error"), _LocErrors):
            lines += _format_loc_errors(err["ctx"]["error"].errors, source, marks)
            continue
        kind = err.get("type", "")
        if prefix and kind == "extra_forbidden":  # a function's own config: its docs list the fields
            fix = "remove it or fix its spelling (see the function's section in docs/functions.md)"
        else:
            fix = _fix_for(kind)
        ctx = err.get("ctx") or {}
        inner = ctx.get("error")
        loc = prefix + _clean_loc(tuple(err.get("loc", ())))
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        if isinstance(inner, _LocError):
            loc = prefix + inner.loc
            msg = inner.msg
        line = _line_of(marks, loc, key=kind == "extra_forbidden")
        where = f"{source}:{line}" if line else source
        lines.append(f"{where}: field `{_fmt_loc(loc)}`: {msg}" + (f"; fix: {fix}" if fix else ""))
    return "\n".join(lines)


def _ran_cross_references(exc: ValidationError) -> bool:
    return any(isinstance((e.get("ctx") or {}).get("error"), (_LocError, _LocErrors)) for e in exc.errors())


def _unquoted(problem: str) -> str:
    """A YAML parser's problem without the file's text it quotes (an alias, a tag, a token): an error
    about a file that is not a topology must not show what it holds (it may be another user's file
    named to the API). A quoted single character (or its escape, such as '\\t') is kept."""
    return re.sub(r"'[^']{5,}'|\"[^\"]{5,}\"", "'...'", problem.split("\n", 1)[0])


MAX_FILE_BYTES = 4 << 20  # a topology is a few KiB; a bigger "config" is not one (e.g. /dev/zero, a log)


def parse_topology(text: str, source: str = "<config>",
                   resolve: Callable[[str], Any] | None = None) -> Topology:
    """Validate YAML text as a Topology; raise ConfigError naming source, line, field and fix.

    Every problem is reported in one ConfigError: the field errors (types, ranges, unknown keys), the
    cross-reference errors (chains, ports, names, networks, node budget) of every part that passed its
    own field checks, and, with `resolve` (see `check_functions`), each node's function and `config:`.
    Only a file that is not YAML, is empty, or is not a mapping stops at that.
    """
    located = _compose(text, source)
    data = located.data
    if data is None:
        raise ConfigError(f"{source}: the file is empty; fix: add `fabric:` and `nodes:` (see examples/edge.yaml)")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:1: the top level must be a mapping with `fabric:`, `nodes:` and `chains:`")
    if "fabric" not in data and "nodes" not in data:
        # not the shape of a topology: say so without quoting its keys (the file's own text, which may
        # be a file its reader could not read otherwise, named to the manager's API)
        raise ConfigError(f"{source}:1: not a topology: the top level has neither `fabric:` nor `nodes:`; "
                          "fix: give a topology file (see examples/edge.yaml)")
    lines: list[str] = []
    topo: Topology | None = None
    try:
        topo = Topology.model_validate(data)
    except ValidationError as exc:
        lines.append(_format_errors(exc, source, located.marks))
        if not _ran_cross_references(exc):  # pydantic skips the model's checks after a field error
            lines += _format_loc_errors(_partial_references(data), source, located.marks)
    if resolve is not None:
        if topo is not None:
            nodes = [(i, n.function, n.config) for i, n in enumerate(topo.nodes) if n.function is not None]
        else:
            raw = data.get("nodes")
            nodes = [(i, n.get("function"), n.get("config", {})) for i, n in enumerate(raw)
                     if isinstance(n, dict)] if isinstance(raw, list) else []
            nodes = [(i, f, c) for i, f, c in nodes if isinstance(f, str) and f and isinstance(c, dict)]
        lines += _function_errors(nodes, source, resolve, located.marks)
        if topo is not None and not lines:
            lines += _loop_errors(topo, source, resolve, located.marks)
    if lines:
        raise ConfigError("\n".join(lines))
    assert topo is not None
    return topo


def read_config_file(path: str | Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes; ConfigError otherwise. The file is
    opened without blocking (a FIFO does not hang the reader) and read at most `limit` + 1 bytes (a
    device such as /dev/zero, or a /proc file, cannot fill the memory)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}; fix: check the path") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise ConfigError(f"{path}: {what}; fix: give a topology file (a regular YAML file)")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}; fix: check the path") from None
    finally:
        os.close(fd)
    if size > limit:
        raise ConfigError(f"{path}: larger than {limit >> 20} MiB, too big for a topology; fix: give a topology file")
    return b"".join(chunks)


def load_topology(path: str | Path, resolve: Callable[[str], Any] | None = None) -> Topology:
    """Read and validate a topology file (see the module docstring and `parse_topology`)."""
    path = Path(path)
    try:
        text = read_config_file(path).decode("utf-8")
    except UnicodeDecodeError as exc:  # worded like the splicer's read_yaml (which this layer may not import)
        before = exc.object[: exc.start]
        line, column = before.count(b"\n") + 1, exc.start - before.rfind(b"\n")
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at column {column}); "
                          "fix: save the file as UTF-8") from None
    return parse_topology(text, str(path), resolve)


def _function_errors(nodes: list[tuple[int, str, dict]], source: str, resolve: Callable[[str], Any],
                     marks: dict[tuple[Any, ...], Mark]) -> list[str]:
    lines = []
    for i, function, config in nodes:
        try:
            cls = resolve(function)
        except (LookupError, ValueError) as exc:
            line = _line_of(marks, ("nodes", i, "function"))
            lines.append(f"{source}:{line or '?'}: field `nodes[{i}].function`: {exc}; fix: install the plugin "
                         "or correct the name")
            continue
        model = getattr(cls, "Config", None)
        if model is None or not hasattr(model, "model_validate"):
            continue
        try:
            model.model_validate(config)
        except ValidationError as exc:
            lines.append(_format_errors(exc, source, marks, prefix=("nodes", i, "config")))
    return lines


def check_functions(topo: Topology, source: str, resolve: Callable[[str], Any], text: str | None = None) -> None:
    """Check every node's function exists and its `config:` passes the function's own Config.

    `resolve(name)` returns the plugin class (with a pydantic `Config`) or raises LookupError/ValueError
    with a message listing what exists. Errors point at the node's line in `text` when given.
    """
    marks = _compose(text, source).marks if text else {}
    lines = _function_errors([(i, n.function, n.config) for i, n in enumerate(topo.nodes) if n.function is not None],
                             source, resolve, marks)
    if not lines:
        lines = _loop_errors(topo, source, resolve, marks)
    if lines:
        raise ConfigError("\n".join(lines))


def is_source_function(cls: Any) -> bool:
    """A source makes frames (it has `produce()`, like the generator) instead of forwarding what it
    receives. The one rule, by the function's kind, for the loop check (frames sent to a source go no
    further) and for the manager's reading of an exit 0 (only a source can run out of input)."""
    return hasattr(cls, "produce")


def _loop_errors(topo: Topology, source: str, resolve: Callable[[str], Any],
                 marks: dict[tuple[Any, ...], Mark]) -> list[str]:
    """A loop of nodes that all forward what they receive is refused: frames would circle for ever.

    Chains may form a cycle across them only as a reply path, one that leads back to a source (a
    function that makes frames, such as the generator: frames sent to a source are not forwarded,
    so the loop ends there). A loop through no source is reported once, naming its nodes."""
    def is_source(name: str) -> bool:
        if topo.node(name).function is None:
            return False  # an adapter: it forwards nothing by chain (it is only ever a chain's end)
        try:
            return is_source_function(resolve(topo.node(name).function))
        except (LookupError, ValueError):
            return False

    index = {n.name: i for i, n in enumerate(topo.nodes)}
    edges: dict[str, list[tuple[str, tuple[Any, ...]]]] = {}
    for n in topo.nodes:
        if is_source(n.name):
            continue  # what reaches a source goes no further
        for t in topo.next_of(n.name):
            ci = next(ci for ci, c in enumerate(topo.chains) if n.name in c.nodes[:-1])
            edges.setdefault(n.name, []).append((t, ("chains", ci, "nodes")))
        for k, t in enumerate(n.ports):
            edges.setdefault(n.name, []).append((t, ("nodes", index[n.name], "ports", k)))
    lines: list[str] = []
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in done:
            return
        path.append(name)
        for t, loc in edges.get(name, []):
            if t in path:
                loop = path[path.index(t):] + [t]
                line = _line_of(marks, loc)
                lines.append(f"{source}:{line or '?'}: field `{_fmt_loc(loc)}`: the chains make a loop "
                             f"{' -> '.join(loop)} through no source: each node forwards what it receives, so "
                             "frames would circle for ever; fix: remove a step of the loop (a path back is "
                             "allowed only to a source, e.g. a generator, which forwards nothing it receives)")
            elif t not in done:
                visit(t, path)
        path.pop()
        done.add(name)

    for n in topo.nodes:
        visit(n.name, [])
    return lines
