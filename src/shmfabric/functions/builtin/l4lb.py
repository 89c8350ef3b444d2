"""`l4lb`: spreads flows over backend nodes with Maglev consistent hashing (logic in
functions.maglev). A flow stays on its backend; when backends come or go, few flows move.
Backends are the function's ports, in order; their admin states are HAProxy's: ready, drain
(keeps its flows, takes no new ones), maint (takes nothing).
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shmfabric.functions.api import FunctionContext, Verdict
from shmfabric.functions.maglev import MaglevBalancer, is_prime
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
    table_size: int = 65537
    symmetric: bool = True
    flow_timeout: float = Field(300.0, gt=0)
    max_flows: int = Field(1_000_000, ge=1, le=100_000_000,
                           description="flows remembered; when full, the least recently used one is "
                                       "forgotten (counted in flows_evicted)")

    @field_validator("table_size")
    @classmethod
    def _prime(cls, v: int) -> int:
        if not is_prime(v) or v < 7:
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


class L4LoadBalancer:
    name: ClassVar[str] = "l4lb"
    version: ClassVar[str] = "1"
    Config = L4LbConfig

    def __init__(self, config: L4LbConfig, ctx: FunctionContext | None = None):
        self.ctx = ctx or FunctionContext()
        self.lb = MaglevBalancer({b.node: b.weight for b in config.backends}, table_size=config.table_size,
                                 symmetric=config.symmetric, flow_timeout=config.flow_timeout,
                                 max_flows=config.max_flows)
        for b in config.backends:
            if b.state != "ready":
                self.lb.set_state(b.node, b.state)
        self._set_ports(config)
        self.no_backend = 0

    def _set_ports(self, config: L4LbConfig) -> None:
        # backends are sent to by port index; ctx.ports (from the runtime) names the nodes in order
        order = self.ctx.ports or [b.node for b in config.backends]
        self.port_of = {name: Verdict.port(k) for k, name in enumerate(order)}
        missing = [b.node for b in config.backends if b.node not in self.port_of]
        if missing:
            raise ValueError(f"backends {missing} are not ports of this node (ports: {order})")

    def reconfigure(self, config: L4LbConfig) -> None:
        """Backends added, removed, re-weighted or put in drain/maint; flows on kept backends stay.
        A new flow_timeout applies to flows from their next packet; a smaller max_flows evicts
        the least recently used flows at the next new flow."""
        self._set_ports(config)
        self.lb.flow_timeout, self.lb.max_flows = config.flow_timeout, config.max_flows
        want = {b.node: b for b in config.backends}
        for name in list(self.lb.weights):
            if name not in want:
                self.lb.remove_backend(name)
        for b in config.backends:
            if b.node not in self.lb.weights:
                self.lb.add_backend(b.node, b.weight, b.state)
            else:
                if self.lb.weights[b.node] != b.weight:
                    self.lb.weights[b.node] = b.weight
                self.lb.set_state(b.node, b.state)

    def process(self, frames: Sequence[Any], now: float, out: bytearray) -> None:
        self.no_backend += self.lb.pick_into(classify_batch(frames, None, "ip"), now, out, self.port_of, Verdict.DROP)

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
             "no_backend": self.no_backend}
        for s in self.lb.status():
            c[f"backend_{s['backend']}_flows"] = s["flows"]
        return c
