"""The plugin interface of a network function, defined once.

A function is a class; the runtime creates one instance per process and calls `process` with a
batch of frames and the time. A frame is a buffer whose bytes are the frame's payload (an IP
packet for the built-ins): `len(frame)`, `frame[i]`, `struct.unpack_from(fmt, frame)` and
`bytes(frame)` all work, on a fabric frame without copying. The function writes one verdict
byte per frame into `out`; it never reads the clock, touches a socket or the fabric (sans-IO),
so it runs the same behind the fabric, behind sockets, or in a unit test.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable, ClassVar, Protocol, Sequence, runtime_checkable

from pydantic import BaseModel, ValidationError


class Verdict(IntEnum):
    """What happens to a frame after a function saw it. Codes 3.. send to the function's ports."""

    NEXT = 0   #: on along the chain
    DROP = 1   #: gone (its slot goes back to the pool)
    REPLY = 2  #: back to the node that sent it

    @staticmethod
    def port(k: int) -> int:
        """The verdict that sends a frame to the function's k-th port (0-based)."""
        if not 0 <= k < 200:
            raise ValueError(f"port index {k} out of range 0..199")
        return 3 + k


@dataclass
class FunctionContext:
    """What a function knows about where it runs (set by the runtime)."""

    node: str = "test"
    fabric: str = ""
    ports: list[str] = field(default_factory=list)  # names of the nodes behind Verdict.port(k)
    log: Callable[[str, dict], None] = lambda event, fields: None  # structured log line


@runtime_checkable
class NetworkFunction(Protocol):
    """A network function plugin (found through the entry-point group `shmfabric.functions`)."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]

    def __init__(self, config: Any, ctx: FunctionContext) -> None: ...

    def process(self, frames: Sequence[Any], now: float, out: bytearray) -> None:
        """Write a verdict for frames[i] into out[i] (out starts as all NEXT)."""

    def counters(self) -> dict[str, int | float]:
        """Function-specific counters (rule hits, alerts, ...)."""


class SourceFunction(Protocol):
    """A function that produces frames instead of receiving them (the traffic generator)."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]

    def produce(self, now: float, max_frames: int) -> Sequence[bytes]:
        """Frames to send now (maybe none); the runtime sends them down the chain."""

    def next_deadline(self, now: float) -> float | None:
        """When produce() has something again; None when done for good."""


class FunctionConfigError(ValueError):
    """A function's configuration is invalid; the message names each field and the problem."""


def validate_config(cls: type, data: dict | None, where: str = "config") -> BaseModel:
    """Validate `data` with cls.Config; FunctionConfigError lists `where.field: problem` lines."""
    try:
        return cls.Config.model_validate(data or {})
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in (where, *err["loc"]))
            lines.append(f"{loc}: {err['msg']}")
        raise FunctionConfigError(f"invalid configuration for function {cls.name!r}:\n  " + "\n  ".join(lines)) from None
