"""`l4lb`: spreads flows over backend nodes with Maglev consistent hashing (logic in
functions.maglev). A flow stays on its backend; when backends come or go, few flows move.
Backends are the function's ports, in order; their admin states are HAProxy's: ready, drain
(keeps its flows, takes no new ones), maint (takes nothing).

IP fragments (the first one included) are balanced by (src, dst, proto), as in the Maglev
paper: later fragments carry no ports, so all fragments of a datagram go to the same backend.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shmfabric.functions.api import FunctionConfigError, FunctionContext, Verdict
from shmfabric.functions.maglev import MAX_TABLE_SIZE, MaglevBalancer, fragment_keys, is_prime
from shmfabric.net.flow import classify_batch

#: flow-table entries on_timer looks at per call (~0.3 µs each)
SWEEP_SLICE = 4096


class Backend(BaseModel):
    model_config = ConfigDict(extra="forbid")
    node: str
    weight: int = Field(1, ge=1, le=1000)
    state: Literal["ready", "drain", "maint"] = "ready"


class L4LbConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backends: list[Backend] = Field(default_factory=list, description="the ports, in order")
    table_size: int = Field(65537, description=f"a prime, 7..{MAX_TABLE_SIZE}")
    symmetric: bool = True
    seed: int = Field(0, ge=0, le=2**32 - 1, description="varies the backend permutations and the flow hash "
                      "(CRC32) per deployment, as flow_hash advises; not a cryptographic key")
    flow_timeout: float = Field(300.0, gt=0)
    max_flows: int = Field(1_000_000, ge=1, le=100_000_000,
                           description="flows remembered; when full, the least recently used one is "
                                       "forgotten (counted in flows_evicted)")

    @field_validator("table_size")
    @classmethod
    def _prime(cls, v: int) -> int:
        if v > MAX_TABLE_SIZE:  # before the primality test, which would take forever on a huge number
            raise ValueError(f"table_size {v} is too large: at most {MAX_TABLE_SIZE} (2**20; the largest prime "
                             f"below is 1048573, ~1 s to build); the default 65537 suits up to ~650 backends")
        if v < 7 or not is_prime(v):
            raise ValueError(f"table_size must be a prime (e.g. 65537, 16381, 4099), got {v}")
        return v

    @field_validator("backends")
    @classmethod
    def _unique(cls, v: list[Backend]) -> list[Backend]:
        names = [b.node for b in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"backend(s) {sorted(dup)} listed twice")
        return v

    @model_validator(mode="after")
    def _fits(self) -> "L4LbConfig":
        if len(self.backends) > self.table_size:
            raise ValueError(f"{len(self.backends)} backends do not fit a table of {self.table_size} slots; "
                             f"use a larger prime table_size (at least 100 per backend, e.g. 65537)")
        return self


class L4LoadBalancer:
    name: ClassVar[str] = "l4lb"
    version: ClassVar[str] = "1"
    Config = L4LbConfig

    def __init__(self, config: L4LbConfig, ctx: FunctionContext | None = None):
        self.ctx = ctx or FunctionContext()
        self._set_ports(config)
        self.lb = MaglevBalancer((), table_size=config.table_size, seed=config.seed, symmetric=config.symmetric,
                                 flow_timeout=config.flow_timeout, max_flows=config.max_flows)
        self.lb.set_backends({b.node: (b.weight, b.state) for b in config.backends})  # one table build
        self.no_backend = 0
        self.fragments = 0
        self.symmetric = config.symmetric

    def _set_ports(self, config: L4LbConfig) -> None:
        # backends are sent to by port index; ctx.ports (from the runtime) names the nodes in order
        order = self.ctx.ports or [b.node for b in config.backends]
        self.port_of = {name: Verdict.port(k) for k, name in enumerate(order)}
        missing = [b.node for b in config.backends if b.node not in self.port_of]
        if missing:
            raise ValueError(f"backends {missing} are not ports of this node (ports: {order})")

    def reconfigure(self, config: L4LbConfig) -> None:
        """Backends added, removed, re-weighted or put in drain/maint, all at once (one table
        build); flows on kept backends stay. A new table_size or seed builds the table anew:
        remembered flows stay on their backend, new flows follow the new table. A new
        flow_timeout applies to flows from their next packet; a smaller max_flows evicts the least
        recently used flows at the next new flow. `symmetric` cannot change live (it changes the
        key of every remembered flow): refused, nothing applied; replace the node to change it."""
        if config.symmetric != self.symmetric:
            raise FunctionConfigError(f"l4lb: symmetric cannot change live (from {str(self.symmetric).lower()} to "
                                      f"{str(config.symmetric).lower()}): it changes the key of every remembered "
                                      f"flow; restart (replace) the node to change it. Nothing was changed")
        old_ports = self.port_of
        self._set_ports(config)  # ValueError (nothing changed) if a backend is not a port
        try:
            self.lb.set_backends({b.node: (b.weight, b.state) for b in config.backends},
                                 table_size=config.table_size, seed=config.seed)  # one build, all or nothing
        except ValueError:
            self.port_of = old_ports
            raise
        self.lb.flow_timeout, self.lb.max_flows = config.flow_timeout, config.max_flows

    def process(self, frames: Sequence[Any], now: float, out: bytearray) -> None:
        keys = classify_batch(frames, None, "ip")
        self.fragments += fragment_keys(frames, keys)  # fragments: (src, dst, proto, 0, 0), all alike
        self.no_backend += self.lb.pick_into(keys, now, out, self.port_of, Verdict.DROP)

    def on_timer(self, now: float) -> float:
        """Forget idle flows, a bounded slice per call; called again at once (the runtime checks
        its timer before each batch, so traffic is never held up by a long sweep) while there
        is more to do, else in a second. Returning a time matters: an on_timer that returns
        None is only called again when the input goes idle."""
        self.lb.expire(now, SWEEP_SLICE)
        return now if self.lb.expire_pending(now) else now + 1.0

    def counters(self) -> dict[str, int]:
        c = {"flows": self.lb.flows(), "new_flows": self.lb.new_flows, "moved_flows": self.lb.moved_flows,
             "expired_flows": self.lb.expired_flows, "flows_evicted": self.lb.flows_evicted,
             "no_backend": self.no_backend, "fragments": self.fragments}
        for s in self.lb.status():
            c[f"backend_{s['backend']}_flows"] = s["flows"]
        return c
