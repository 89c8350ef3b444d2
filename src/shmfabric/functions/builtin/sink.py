"""`sink`: the end of a chain. Counts what arrives and verifies generator stamps.

The generator numbers all its frames with one counter from 0. A number seen before is a
duplicate, a number below the highest seen that never arrived is missing (a loss); order is not
checked. The CRC covers the sequence number and the rest of the payload. The numbers seen are
kept in a set (about 65 bytes each), so use `verify: false` for long runs at high rates. The
config reference is docs/functions.md, "`sink`: the end of a chain".
"""
from __future__ import annotations

import struct
import zlib
from typing import Any, ClassVar, Sequence

from pydantic import BaseModel, ConfigDict, Field

from shmfabric.functions.api import FunctionContext
from shmfabric.functions.builtin.generator import MAGIC, STAMP

_IHL = struct.Struct("!B8xB").unpack_from  # version/IHL, protocol


class SinkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    verify: bool = Field(True, description="check generator stamps (sequence and CRC)")


class Sink:
    name: ClassVar[str] = "sink"
    version: ClassVar[str] = "1"
    Config = SinkConfig

    def __init__(self, config: SinkConfig, ctx: FunctionContext | None = None):
        self.cfg = config
        self.frames = 0
        self.bytes = 0
        self.stamped = 0
        self.corrupt = 0
        self.seqs: set[int] = set()
        self.duplicates = 0

    def reconfigure(self, config: SinkConfig) -> None:
        self.cfg = config

    def process(self, frames: Sequence[Any], now: float, out: bytearray) -> None:
        self.frames += len(frames)
        if not self.cfg.verify:
            total = getattr(frames, "payload_bytes", None)  # a fabric batch sums its lengths in C
            self.bytes += total if total is not None else sum(map(len, frames))
            return
        for f in frames:
            n = len(f)
            self.bytes += n
            if n < 28:
                continue
            vihl, proto = _IHL(f)
            at = (vihl & 0xF) * 4 + (20 if proto == 6 else 8)
            if n < at + STAMP.size:
                continue
            magic, seq, crc = STAMP.unpack_from(f, at)
            if magic != MAGIC:
                continue
            self.stamped += 1
            data = bytes(f)
            if zlib.crc32(data[at + 4: at + 12] + data[at + STAMP.size:]) != crc:
                self.corrupt += 1
                continue
            if seq in self.seqs:
                self.duplicates += 1
            else:
                self.seqs.add(seq)
        # every verdict stays NEXT: at the end of a chain that means consumed

    def missing(self) -> int:
        """Sequence numbers below the highest seen that never arrived."""
        return (max(self.seqs) + 1 - len(self.seqs)) if self.seqs else 0

    def counters(self) -> dict[str, int]:
        return {"frames": self.frames, "bytes": self.bytes, "stamped": self.stamped, "corrupt": self.corrupt,
                "duplicates": self.duplicates, "unique": len(self.seqs), "missing": self.missing()}
