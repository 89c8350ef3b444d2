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
    #: taken by the function: replaced by a frame it emitted, or copied into a queue it holds
    #: (shaping). The slot goes back to the pool as with DROP, but it is counted as `consumed`,
    #: not as a loss. Codes 203..228 are reserved; 230.. are the runtime's own.
    CONSUMED = 229

    @staticmethod
    def port(k: int) -> int:
        """The verdict that sends a frame to the function's k-th port (0-based)."""
        if not 0 <= k < 200:
            raise ValueError(f"port index {k} out of range 0..199")
        return 3 + k


@dataclass
class FunctionContext:
    """What a function knows about where it runs (set by the runtime).

    `emit()` is how a function sends a frame it made (a tunnel's outer packet, a frame a shaper
    held): the runtime copies each emitted frame into a slot and sends it, before it dispatches
    the batch being processed. Emitting stays sans-IO: it only appends to `emitted`, which a unit
    test reads directly.
    """

    node: str = "test"
    fabric: str = ""
    ports: list[str] = field(default_factory=list)  # names of the nodes behind Verdict.port(k)
    log: Callable[[str, dict], None] = lambda event, fields: None  # structured log line
    mtu: int = 65535  # largest frame payload on the node's network (the runtime sets the real one)
    emitted: list[tuple[int, Any]] = field(default_factory=list)  # (verdict, buffer), drained by the runtime

    def emit(self, data: Any, verdict: int = Verdict.NEXT) -> None:
        """Send `data` (any buffer; copied by the runtime) to NEXT or `Verdict.port(k)`.

        The buffer must stay unchanged until the runtime sends it (after process() or on_timer()
        returns); pass `bytes` unless you know better. A function that replaces a frame by an
        emitted one gives the original `Verdict.CONSUMED`.

        TypeError (raised here, in the function's own frame) for `data` that is not a buffer
        (a str, None, an int, a list) or a verdict that is not a code 0..255.
        """
        cls = data.__class__
        if cls is not bytes and cls is not bytearray and cls is not memoryview:  # the usual ones: no view needed
            try:
                memoryview(data).release()
            except TypeError:
                raise TypeError(f"ctx.emit() takes a buffer (bytes, bytearray, memoryview), not "
                                f"{type(data).__name__}") from None
        if verdict.__class__ is not Verdict:  # a Verdict member is a code already
            if verdict.__class__ is bool or not isinstance(verdict, int):
                raise TypeError(f"ctx.emit() verdict must be an int (Verdict.NEXT or Verdict.port(k)), "
                                f"not {type(verdict).__name__}")
            if not 0 <= verdict <= 255:
                raise ValueError(f"ctx.emit() verdict {verdict} is not a verdict code (0..255)")
        self.emitted.append((verdict, data))


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

    # Optional hooks (the runtime checks with hasattr, so a function that needs none stays this
    # small; docs/functions.md, "Functions that make frames", describes them):
    #   reconfigure(config) -> None          live config push
    #   on_timer(now) -> float | None        housekeeping; returns when to be called next
    #   next_deadline(now) -> float | None   "I hold frames: call on_timer at this time"; None = holds
    #                                        nothing. Asked after each batch; a graceful stop waits
    #                                        (bounded) until it is None, so held frames are not lost.
    #   close() -> None                      the runner is closing (flush files)


class SourceFunction(Protocol):
    """A function that produces frames instead of receiving them (the traffic generator)."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]

    def produce(self, now: float, max_frames: int) -> Sequence[bytes]:
        """Frames to send now (maybe none); the runtime sends them down the chain."""

    #: optional: the Ethernet type of every frame produce() makes (0x0800 or 0x86DD); without
    #: it the runtime reads each frame's IP version
    ethertype: int | None

    def next_deadline(self, now: float) -> float | None:
        """When produce() has something again; None when done for good. Optional: without
        it, a produce() that returned nothing is asked again a millisecond later."""


#: what the manager shows in place of a secret field's value (see `secret_fields`)
REDACTED = "<redacted>"


def secret_fields(model_cls: Any) -> frozenset[str]:
    """The names of a function's config fields that hold secrets (an AES key, a password): the
    manager shows them as `REDACTED` wherever it shows a config (status, API, errors). A field is
    secret when its pydantic `Field` has `repr=False` or `json_schema_extra={"secret": True}`.
    `model_cls` is the config model, or a function class (its `Config` is read); a field's alias
    is named too (a config dict is keyed by it). Top-level fields only."""
    model = model_cls if hasattr(model_cls, "model_fields") else getattr(model_cls, "Config", None)
    fields = getattr(model, "model_fields", None)
    if not isinstance(fields, dict):
        return frozenset()
    out: set[str] = set()
    for name, info in fields.items():
        extra = getattr(info, "json_schema_extra", None)
        if getattr(info, "repr", True) is False or (isinstance(extra, dict) and extra.get("secret") is True):
            out.add(name)
            for alias in (getattr(info, "alias", None), getattr(info, "validation_alias", None)):
                if isinstance(alias, str):
                    out.add(alias)
    return frozenset(out)


class FunctionConfigError(ValueError):
    """A function's configuration is invalid; the message (one line) names each field and the problem."""


# prefixes pydantic puts before the message of a ValueError / assert raised in a validator
_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")


def _clean_loc(loc: tuple) -> tuple:
    # pydantic adds union branch names ("str", "list[str]", "function-after[...]") to locations
    return tuple(p for p in loc if isinstance(p, int) or not (
        str(p).startswith(("function-", "list[", "dict[", "tuple[")) or p in ("str", "int", "float", "bool", "none")))


def config_error_text(exc: ValidationError, where: str = "config") -> str:
    """The problems of a failed `Config.model_validate` on one line: `where.field: problem`, joined
    by "; ". A model-level validator's error (no field) reads `where: problem`; list items are
    `.N` (`config.classes.0.rate`). Pydantic's "Value error, " prefix is left out."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in (where, *_clean_loc(tuple(err.get("loc", ())))))
        msg = str(err.get("msg", "invalid"))
        for prefix in _PYDANTIC_PREFIXES:
            msg = msg.removeprefix(prefix)
        parts.append(f"{loc}: {' '.join(msg.splitlines())}")  # a message with newlines stays on the line
    return "; ".join(parts)


def validate_config(cls: type, data: dict | None, where: str = "config") -> BaseModel:
    """Validate `data` with cls.Config; FunctionConfigError is one line naming each field
    (see `config_error_text`)."""
    try:
        return cls.Config.model_validate(data or {})
    except ValidationError as e:
        raise FunctionConfigError(f"invalid configuration for function {cls.name!r}: "
                                  f"{config_error_text(e, where)}") from None
