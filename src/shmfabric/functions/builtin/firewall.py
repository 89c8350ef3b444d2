"""`firewall`: ordered nftables-style rules with connection tracking (logic in functions.rules)."""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shmfabric.functions.api import FunctionContext, Verdict
from shmfabric.functions.rules import ConntrackTable, Firewall, RuleSet, RuleSyntaxError
from shmfabric.functions.tcp_track import BatchSegments
from shmfabric.net.flow import classify_batch

#: Entries `ConntrackTable.reap` may examine per batch (plus four per frame) and per timer call.
REAP_PER_BATCH = 64
REAP_PER_TIMER = 8192

class FirewallConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: str = Field("policy accept", description="rule text (see docs/functions.md#firewall-rules-shmfabricfunctionsrules)")
    rules_file: str | None = Field(None, description="read the rules from this file instead")
    max_connections: int = Field(262_144, ge=16)
    tcp_window: Literal["strict", "liberal", "off"] = Field(
        "strict", description="TCP window tracking: strict drops segments out of their connection's window "
                              "(as Linux conntrack), liberal only learns, off lets any RST close (docs/functions.md#firewall-rules-shmfabricfunctionsrules)")

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
        self.fw = Firewall(config.ruleset, ConntrackTable(max_entries=config.max_connections,
                                                          tcp_window=config.tcp_window))
        self.passed = self.dropped = 0

    def reconfigure(self, config: FirewallConfig) -> None:
        """New rules and TCP window mode; established connections are kept (with the window
        mode they started under)."""
        self.fw.ruleset = config.ruleset
        self.fw.conntrack.tcp_window = config.tcp_window

    def process(self, frames: Sequence[Any], now: float, out: bytearray) -> None:
        flags: list[int] = []
        keys = classify_batch(frames, None, "ip", flags=flags)  # TCP flags: conntrack sees FIN/RST
        # each TCP segment's numbers, for window tracking, read only for the packets that need them
        segs = BatchSegments(frames) if self.fw.conntrack.tcp_window != "off" else None
        rejected = self.fw.check_many(keys, now, flags, frames, segs)
        for i in rejected:
            out[i] = Verdict.DROP
        self.dropped += len(rejected)
        self.passed += len(frames)
        # Expiry under continuous traffic: the runtime calls on_timer only once its timer is set,
        # which first happens when a poll comes back empty. Reaping looks at an entry about
        # once per idle timeout in which it saw packets, plus when it goes (and once in the
        # early-drop queue), so 1-3 looks per packet on average: this budget keeps up and
        # bounds one batch's extra work.
        self.fw.conntrack.reap(now, REAP_PER_BATCH + 4 * len(frames))

    def on_timer(self, now: float) -> float | None:
        """Reap expired connections (bounded); returns when there is more to look at."""
        ct = self.fw.conntrack
        ct.reap(now, REAP_PER_TIMER)
        return ct.next_due()  # may be <= now: more is due, call again at once

    def counters(self) -> dict[str, int]:
        c = {"seen": self.passed, "dropped": self.dropped, "established": self.fw.established, "related": self.fw.related, "icmp_invalid": self.fw.icmp_invalid,
             "policy_hits": self.fw.policy_hits, "no_5tuple": self.fw.no_key, "connections": len(self.fw.conntrack),
             "ct_full_drops": self.fw.conntrack.full_drops, "ct_early_drops": self.fw.conntrack.early_drops,
             "tcp_invalid": self.fw.conntrack.tcp_invalid, "rst_ignored": self.fw.conntrack.rst_ignored}
        for n, r in enumerate(self.fw.ruleset.rules, 1):
            c[f"rule{n}_packets"] = r.packets
        return c
