"""`firewall`: ordered nftables-style rules with connection tracking (logic in functions.rules)."""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shmfabric.functions.api import FunctionContext, Verdict
from shmfabric.functions.rules import ConntrackTable, Firewall, RuleSet, RuleSyntaxError
from shmfabric.net.flow import classify_batch

class FirewallConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: str = Field("policy accept", description="rule text (see docs/functions.md#firewall)")
    rules_file: str | None = Field(None, description="read the rules from this file instead")
    max_connections: int = Field(262_144, ge=16)

    @model_validator(mode="after")
    def _parse(self) -> "FirewallConfig":
        text, source = self.rules, "rules"
        if self.rules_file:
            try:
                with open(self.rules_file) as f:
                    text, source = f.read(), self.rules_file
            except OSError as e:
                raise ValueError(f"cannot read rules_file {self.rules_file!r}: {e.strerror}") from None
        try:
            object.__setattr__(self, "_ruleset", RuleSet.parse(text, source))
        except RuleSyntaxError as e:
            raise ValueError(str(e)) from None
        return self

    @property
    def ruleset(self) -> RuleSet:
        return self._ruleset  # type: ignore[attr-defined]


class FirewallFunction:
    name: ClassVar[str] = "firewall"
    version: ClassVar[str] = "1"
    Config = FirewallConfig

    def __init__(self, config: FirewallConfig, ctx: FunctionContext | None = None):
        self.fw = Firewall(config.ruleset, ConntrackTable(max_entries=config.max_connections))
        self.passed = self.dropped = 0

    def reconfigure(self, config: FirewallConfig) -> None:
        """New rules; established connections are kept."""
        self.fw.ruleset = config.ruleset

    def process(self, frames: Sequence[Any], now: float, out: bytearray) -> None:
        flags: list[int] = []
        keys = classify_batch(frames, None, "ip", flags=flags)  # TCP flags: conntrack sees FIN/RST
        rejected = self.fw.check_many(keys, now, flags, frames)
        for i in rejected:
            out[i] = Verdict.DROP
        self.dropped += len(rejected)
        self.passed += len(frames)

    def on_timer(self, now: float) -> None:
        self.fw.conntrack.expire(now)

    def counters(self) -> dict[str, int]:
        c = {"seen": self.passed, "dropped": self.dropped, "established": self.fw.established,
             "policy_hits": self.fw.policy_hits, "no_5tuple": self.fw.no_key, "connections": len(self.fw.conntrack)}
        for n, r in enumerate(self.fw.ruleset.rules, 1):
            c[f"rule{n}_packets"] = r.packets
        return c
