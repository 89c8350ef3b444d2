"""Pub/sub through the Redis splicer: who subscribes where, and what the client is told (sans-IO).

twemproxy closes the connection on SUBSCRIBE, so Celery's events, RQ's worker commands,
Django Channels and every cache-invalidation bus need a connection around the proxy. The
splicer places a *channel* as it places a key (ketama, hash tags and all), so:

* ``PUBLISH channel message`` (and ``SPUBLISH``) goes, like a one-key command, to the channel's
  server over the pooled connections, and its reply (how many received it) is that server's;
* ``SUBSCRIBE`` / ``SSUBSCRIBE`` subscribe on each channel's server, ``PSUBSCRIBE`` on every
  configured server (a pattern can match channels anywhere). A subscribing client gets a
  connection of its own to each server it subscribes on (a subscribed connection cannot be
  shared: the server pushes messages down it at any time); messages are relayed as the
  server sends them. A pattern subscriber gets a message once, from the channel's server, so
  PUBLISH's count is right too.

Channels are placed over every configured server even when `auto_eject` takes one out of the
keys' continuum (`Router.channel_place`): moved to the others, a subscription made meanwhile
would be left behind when the server returns, and its messages would stop without a word.
So while a server is ejected, PUBLISH to its channels is refused and subscribing there fails.

Confirmations. Redis confirms each channel with the client's total number of subscriptions.
Each server only knows its share, so `Subscriptions` keeps the client's sets and writes the
confirmations itself, and the shell sends them once every server involved has confirmed its
part: a message published after the client saw "subscribe" reaches it, as with Redis.
Only subscriptions that change something are sent (a channel subscribed twice, or
unsubscribed without having been subscribed, is confirmed without asking a server), so each
server confirms exactly the names it was sent.

Pure: the I/O shell (`redis_proxy`) owns the connections.
"""
from __future__ import annotations

from typing import Callable, Sequence

from .redis_resp import encode_command

__all__ = ["Subscriptions", "ALLOWED_IN_RESP2", "SUBSCRIBING", "push_kind", "MESSAGE_KINDS", "CONFIRM_KINDS",
           "subscribed_ping", "resp2_context_error", "message_run"]

#: What a RESP2 connection may send while it has subscriptions (Redis's own rule).
ALLOWED_IN_RESP2 = frozenset({b"SUBSCRIBE", b"UNSUBSCRIBE", b"PSUBSCRIBE", b"PUNSUBSCRIBE", b"SSUBSCRIBE",
                              b"SUNSUBSCRIBE", b"PING", b"QUIT", b"RESET"})

#: Pushes a server sends down a subscribed connection: messages are relayed, confirmations
#: are counted against what was asked of it.
MESSAGE_KINDS = frozenset({b"message", b"pmessage", b"smessage"})
CONFIRM_KINDS = frozenset({b"subscribe", b"unsubscribe", b"psubscribe", b"punsubscribe", b"ssubscribe",
                           b"sunsubscribe"})

# command -> (which set, subscribing?, the confirmation's kind)
_COMMANDS = {
    b"SUBSCRIBE": (0, True, b"subscribe"),
    b"UNSUBSCRIBE": (0, False, b"unsubscribe"),
    b"PSUBSCRIBE": (1, True, b"psubscribe"),
    b"PUNSUBSCRIBE": (1, False, b"punsubscribe"),
    b"SSUBSCRIBE": (2, True, b"ssubscribe"),
    b"SUNSUBSCRIBE": (2, False, b"sunsubscribe"),
}


#: The commands that add subscriptions (their confirmations go ahead of the messages a server
#: sends meanwhile; an unsubscription's go after them).
SUBSCRIBING = frozenset(name for name, (_, subscribing, _) in _COMMANDS.items() if subscribing)


def _push(kind: bytes, name: bytes | None, count: int, proto: int) -> bytes:
    head = b">3\r\n" if proto == 3 else b"*3\r\n"
    if name is None:
        item = b"_\r\n" if proto == 3 else b"$-1\r\n"
    else:
        item = b"$%d\r\n%s\r\n" % (len(name), name)
    return head + b"$%d\r\n%s\r\n" % (len(kind), kind) + item + b":%d\r\n" % count


def subscribed_ping(args: list[bytes]) -> bytes:
    """PING's reply on a RESP2 connection with subscriptions: ``["pong", message or ""]``."""
    msg = args[1] if len(args) > 1 else b""
    return b"*2\r\n$4\r\npong\r\n$%d\r\n%s\r\n" % (len(msg), msg)


# Commands Redis names with their subcommand in errors ("config|get").
_CONTAINERS = frozenset(b"ACL CLIENT CLUSTER COMMAND CONFIG FUNCTION LATENCY MEMORY MODULE OBJECT PUBSUB SCRIPT "
                        b"SLOWLOG XGROUP XINFO".split())


def resp2_context_error(args: list[bytes]) -> str:
    """Redis's refusal of a command a subscribed RESP2 connection may not send."""
    name = args[0]
    if name.upper() in _CONTAINERS and len(args) > 1:
        name += b"|" + args[1]
    return (f"ERR Can't execute '{name.decode(errors='replace').lower()}': only (P|S)SUBSCRIBE / "
            "(P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context")


def push_kind(frame: bytes) -> bytes | None:
    """The kind of a push a server sent down a subscribed connection (b"message",
    b"subscribe"...), read from its first element; None if it is not such a push."""
    if frame[:1] not in (b"*", b">"):
        return None
    nl = frame.find(b"\r\n")
    if frame[nl + 2 : nl + 3] != b"$":
        return None
    nl2 = frame.find(b"\r\n", nl + 2)
    try:
        n = int(frame[nl + 3 : nl2])
    except ValueError:
        return None
    return frame[nl2 + 2 : nl2 + 2 + n]


# The start of each push that carries a message, through the '$' of its second element, and
# how many bulk strings follow from there (the channel, [the channel matched,] the payload).
_MESSAGE = b"*3\r\n$7\r\nmessage\r\n$"
_OTHER_MESSAGES = (
    (b">3\r\n$7\r\nmessage\r\n$", 2),
    (b"*4\r\n$8\r\npmessage\r\n$", 3),
    (b">4\r\n$8\r\npmessage\r\n$", 3),
    (b"*3\r\n$8\r\nsmessage\r\n$", 2),
    (b">3\r\n$8\r\nsmessage\r\n$", 2),
)


def message_run(buf: bytes, pos: int = 0) -> int:
    """The offset just past the run of whole message pushes ("message", "pmessage", "smessage",
    RESP2 or RESP3) that starts at `pos` in `buf`; `pos` itself if there is none.

    What a subscribed connection mostly carries, framed without a slice or a Python call per
    element (the general `ReplyScanner` walk costs about 2.5 us a message, this 0.3-0.7). The
    run stops before anything else: a confirmation, an error, an incomplete push, or a push of
    an unusual shape (a length that is not plain digits); those are framed the general way,
    which also reports what is malformed.
    """
    end = len(buf)
    find = buf.find
    startswith = buf.startswith
    # The last push's bytes up to its payload's length: a run is mostly of one channel, whose
    # pushes then cost one comparison and one length each.
    same = b""
    while pos < end:
        if same and startswith(same, pos):
            p = pos + len(same)
            left = 1
        else:
            if startswith(_MESSAGE, pos):
                p = pos + 18
                left = 2
            else:
                for head, left in _OTHER_MESSAGES:
                    if startswith(head, pos):
                        p = pos + len(head)
                        break
                else:
                    return pos
            same = b""
        while True:  # at the digits of a bulk string's length
            nl = find(b"\r\n", p)
            if nl < 0:
                return pos
            digits = buf[p:nl]
            if not digits.isdigit() or len(digits) > 18:  # (past 4300 digits int() raises: the
                return pos                                    # general path reports the length)
            if left == 1 and not same:
                same = buf[pos:p]
            p = nl + 4 + int(digits)
            if p > end:
                return pos
            left -= 1
            if not left:
                break
            if p >= end or buf[p] != 0x24:  # '$'
                return pos
            p += 1
        pos = p
    return pos


class Subscriptions:
    """One client's channels, patterns and shard channels, each with the servers it is on.

    `change(name, names, proto)` applies a (P|S)(UN)SUBSCRIBE and returns what to do:
    ``(reply, sends)``: `reply` is the confirmations to give the client once every send is
    confirmed, `sends` is ``[(server, payload, count)]``: the command for each server and how
    many confirmations it will answer.
    """

    __slots__ = ("sets", "place", "everywhere")

    def __init__(self, place: Callable[[bytes], int], everywhere: Callable[[], Sequence[int]]) -> None:
        # name -> the servers it is subscribed on (one for a channel, the pool for a pattern)
        self.sets: tuple[dict[bytes, tuple[int, ...]], ...] = ({}, {}, {})
        self.place = place  # channel -> server index
        self.everywhere = everywhere  # the servers a pattern goes to

    @property
    def active(self) -> bool:
        """Has the client any subscription (a RESP2 client is then in subscribed mode)?"""
        return bool(self.sets[0] or self.sets[1] or self.sets[2])

    def count(self, which: int) -> int:
        """Redis's count in a confirmation: shard channels apart, channels and patterns together."""
        s = self.sets
        return len(s[2]) if which == 2 else len(s[0]) + len(s[1])

    def servers(self) -> set[int]:
        """Every server the client is subscribed on."""
        return {srv for s in self.sets for where in s.values() for srv in where}

    def clear(self) -> None:
        """Forget every subscription (RESET; the shell closes the connections)."""
        for s in self.sets:
            s.clear()

    def change(self, command: bytes, names: list[bytes], proto: int) -> tuple[bytes, list[tuple[int, bytes, int]]]:
        which, subscribing, kind = _COMMANDS[command]
        current = self.sets[which]
        replies: list[bytes] = []
        per_server: dict[int, list[bytes]] = {}
        if not subscribing and not names:
            names = list(current)
            if not names:  # nothing to unsubscribe from: Redis still answers once
                return _push(kind, None, self.count(which), proto), []
        for name in names:
            if subscribing:
                if name not in current:
                    where = tuple(self.everywhere()) if which == 1 else (self.place(name),)
                    current[name] = where
                    for srv in where:
                        per_server.setdefault(srv, []).append(name)
            else:
                where = current.pop(name, ())
                for srv in where:
                    per_server.setdefault(srv, []).append(name)
            replies.append(_push(kind, name, self.count(which), proto))
        sends = [(srv, encode_command([command, *group]), len(group)) for srv, group in per_server.items()]
        return b"".join(replies), sends
