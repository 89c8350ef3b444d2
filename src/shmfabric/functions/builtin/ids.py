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
from shmfabric.net.flow import classify_batch, l4_payload_span

# IPv4 without options at fixed offsets: (version/IHL, total length, UDP length | TCP data offset)
_UDP4 = struct.Struct("!BxH20xH").unpack_from
_TCP4 = struct.Struct("!BxH28xB").unpack_from


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
        flags: list[int] = []
        keys = classify_batch(frames, None, "ip", flags=flags)
        self.seen += len(frames)
        payloads: list[bytes] = []
        idx: list[int] = []
        for i, f in enumerate(frames):
            if keys[i].__class__ is not tuple:
                self.no_5tuple += 1
                continue
            proto = keys[i][2]
            n = len(f)
            if proto == 17 and n >= 28:
                vihl, tlen, ulen = _UDP4(f)
                span = (28, 20 + ulen) if vihl == 0x45 and 8 <= ulen <= tlen - 20 and tlen <= n else l4_payload_span(f, "ip")
            elif proto == 6 and n >= 40:
                vihl, tlen, doff = _TCP4(f)
                hl = (doff >> 4) * 4
                span = (20 + hl, tlen) if vihl == 0x45 and 20 <= hl and 20 + hl <= tlen <= n else l4_payload_span(f, "ip")
            else:
                span = l4_payload_span(f, "ip")
            if span is None:
                continue
            payloads.append(bytes(f)[span[0]:span[1]])
            idx.append(i)
        if not payloads:
            return
        hits = self.ids.inspect_batch(payloads, [keys[i] for i in idx], now, [flags[i] for i in idx])
        log = self.ctx.log if self.cfg.log_alerts else None
        for p, verdict, alerts in hits:
            if log is not None:
                for a in alerts:
                    log("alert", {"node": self.ctx.node, **a.as_dict()})
            if verdict is IdsVerdict.DROP:
                out[idx[p]] = Verdict.DROP

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
