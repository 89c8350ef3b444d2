"""`ids`: Snort-subset signatures matched with Aho-Corasick (logic in functions.snort).

In `alert` mode every packet passes and matches are reported; in `drop` mode (inline IPS) a packet
that fires a drop/reject rule is dropped. Each alert is one structured log line (JSON) plus
counters per sid.
"""
from __future__ import annotations

import struct
from typing import Any, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shmfabric.functions.api import FunctionContext, Verdict
from shmfabric.functions.snort import Ids, IdsVerdict, SignatureSet, SnortSyntaxError, load
from shmfabric.net.flow import parse_5tuple_ip

_V4 = struct.Struct("!B8xB").unpack_from  # version/IHL, protocol


class IdsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: str = Field("", description="Snort rules, one per line")
    rules_files: list[str] = Field(default_factory=list)
    variables: dict[str, str] = Field(default_factory=lambda: {"HOME_NET": "any", "EXTERNAL_NET": "any"})
    mode: Literal["alert", "drop"] = "alert"
    log_alerts: bool = Field(True, description="one JSON line per alert on stderr")

    @model_validator(mode="after")
    def _parse(self) -> "IdsConfig":
        texts = [("rules", self.rules)] if self.rules.strip() else []
        for path in self.rules_files:
            try:
                with open(path) as f:
                    texts.append((path, f.read()))
            except OSError as e:
                raise ValueError(f"cannot read rules file {path!r}: {e.strerror}") from None
        try:
            object.__setattr__(self, "_sigs", load(texts, self.variables) if texts else SignatureSet([]))
        except SnortSyntaxError as e:
            raise ValueError(str(e)) from None
        return self

    @property
    def signatures(self) -> SignatureSet:
        return self._sigs  # type: ignore[attr-defined]


def l4_payload(f: Any) -> tuple[bytes, int]:
    """(L4 payload, TCP flags) of an IP packet; (b'', 0) when there is none to look at."""
    data = bytes(f)
    if len(data) < 20:
        return b"", 0
    vihl, proto = _V4(data)
    if vihl >> 4 == 4:
        at = (vihl & 0xF) * 4
    elif vihl >> 4 == 6 and len(data) >= 40:
        at, proto = 40, data[6]
    else:
        return b"", 0
    if proto == 6 and len(data) >= at + 20:
        return data[at + ((data[at + 12] >> 4) * 4):], data[at + 13]
    if proto == 17:
        return data[at + 8:], 0
    return data[at:], 0


class IdsFunction:
    name: ClassVar[str] = "ids"
    version: ClassVar[str] = "1"
    Config = IdsConfig

    def __init__(self, config: IdsConfig, ctx: FunctionContext | None = None):
        self.ctx = ctx or FunctionContext()
        self.cfg = config
        self.ids = Ids(config.signatures, mode=config.mode)
        self.seen = self.no_5tuple = 0

    def reconfigure(self, config: IdsConfig) -> None:
        """New signatures or mode; flow state is kept."""
        self.cfg = config
        self.ids.signatures = config.signatures
        self.ids.mode = config.mode

    def process(self, frames: Sequence[Any], now: float, out: bytearray) -> None:
        inspect = self.ids.inspect
        log = self.ctx.log if self.cfg.log_alerts else None
        self.seen += len(frames)
        for i, f in enumerate(frames):
            key = parse_5tuple_ip(f)
            if key.__class__ is not tuple:
                self.no_5tuple += 1
                continue
            payload, flags = l4_payload(f)
            verdict, alerts = inspect(payload, key, now, flags)
            if alerts and log is not None:
                for a in alerts:
                    log("alert", {"node": self.ctx.node, **a.as_dict()})
            if verdict is IdsVerdict.DROP:
                out[i] = Verdict.DROP

    def on_timer(self, now: float) -> None:
        self.ids.flows.expire(now)

    def counters(self) -> dict[str, int]:
        c = {"seen": self.seen, "alerts": self.ids.alerts, "dropped": self.ids.dropped, "passed": self.ids.passed,
             "no_5tuple": self.no_5tuple, "patterns": self.ids.signatures.patterns,
             "rules": len(self.ids.signatures.rules)}
        for sid, hits in self.ids.counters().items():
            if hits:
                c[f"sid{sid}"] = hits
        return c
