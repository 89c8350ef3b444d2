"""INFO through the Redis splicer: the servers' INFO merged into one, as one server holding every
key would answer, with the splicer's own process in the Server and Clients sections (sans-IO).

Job queues and monitoring read INFO: RQ and Sidekiq check `redis_version` before they start,
`redis-cli --stat` and Prometheus's redis_exporter read the counters; twemproxy refuses INFO.
The splicer sends INFO (with the client's sections) to every server in the pool and merges:

* figures that add up across servers are summed: keys, memory, commands, hits and misses,
  connections, CPU seconds, `instantaneous_*` rates; `*_human` fields are recomputed from the
  summed bytes, as redis-server prints them;
* figures that do not (maxima, ratios, percentages, times, offsets, the number of scripts
  and functions, which the splicer loads on every server): the largest (`maxmemory` is
  summed: the servers' room together; so are peaks, an upper bound that stays above the
  summed current figure);
* `# Keyspace`: keys, expires and subexpiry summed per database, `avg_ttl` weighted by expires;
* `# Commandstats` and `# Errorstats`: counts and microseconds summed, `usec_per_call`
  recomputed; `# Latencystats` (percentiles do not merge): the largest, an upper bound;
* text that differs between servers: the first server's, except `redis_version`, the oldest
  (a client checking for a feature must not find it missing on one server);
* `# Server`: the process fields are the splicer's (process_id, run_id, tcp_port, uptime),
  with `splicer_version` and `splicer_servers` added; `# Clients`: `connected_clients` is the
  splicer's own (the servers count the splicer's pooled connections).

Pure: `merge_info` takes the replies and the splicer's fields.
"""
from __future__ import annotations

from typing import Callable, Sequence

__all__ = ["parse_info", "format_info", "merge_sections", "merge_info", "info_reply", "human_bytes", "version_key"]

Sections = list[tuple[str, list[tuple[str, str]]]]

# Fields whose servers' values do not add up: the largest is given.
_NOT_ADDITIVE = ("max", "ratio", "perc", "time", "uptime", "lru_clock", "port", "process_id",
                 "hz", "arch_bits", "total_system_memory", "offset", "repl_backlog", "io_threads", "latest_fork",
                 "enabled", "loading", "in_progress", "current_", "last_", "_size_age",
                 "number_of_")  # scripts and functions: loaded on every server through the splicer


def human_bytes(n: int) -> str:
    """Bytes as redis-server prints them in `*_human` fields (bytesToHuman)."""
    for unit, scale in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40), ("P", 1 << 50)):
        if n < scale * 1024:
            return f"{n}B" if unit == "K" and n < 1024 else f"{n / scale:.2f}{unit}"
    return f"{n}B"


def version_key(v: str) -> tuple:
    """`7.0.15` -> (7, 0, 15), for "the oldest version"; text that is not a version sorts last."""
    try:
        return tuple(int(x) for x in v.split("."))
    except ValueError:
        return (1 << 30,)


def parse_info(text: str) -> Sections:
    """INFO's text as [(section, [(field, value)])], in order."""
    sections: Sections = []
    fields: list[tuple[str, str]] | None = None
    for line in text.split("\r\n"):
        if line.startswith("# "):
            fields = []
            sections.append((line[2:].strip(), fields))
        elif line and fields is not None:
            key, sep, value = line.partition(":")
            if sep:
                fields.append((key, value))
    return sections


def format_info(sections: Sections) -> str:
    """Sections back to INFO's text (sections apart by an empty line, CRLF line ends)."""
    return "\r\n".join(f"# {name}\r\n" + "".join(f"{k}:{v}\r\n" for k, v in fields) for name, fields in sections)


def _number(v: str) -> int | float | None:
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return None


def _scalar(key: str, values: list[str]) -> str:
    first = values[0]
    if all(v == first for v in values):
        return first
    if key == "redis_version":
        return min(values, key=version_key)
    pct = all(v.endswith("%") for v in values)
    nums = [_number(v[:-1] if pct else v) for v in values]
    if any(n is None for n in nums):
        return first
    if pct or (any(p in key for p in _NOT_ADDITIVE) and not key.startswith("maxmemory")):
        best = max(nums)  # type: ignore[type-var]
    else:
        best = sum(nums)  # type: ignore[arg-type]
    if isinstance(best, float):
        text = f"{best:.2f}"
    else:
        text = str(best)
    return text + "%" if pct else text


def _pairs(value: str) -> list[tuple[str, str]]:
    return [tuple(item.split("=", 1)) for item in value.split(",") if "=" in item]  # type: ignore[misc]


def _subfields(section: str, key: str, values: list[str]) -> str:
    """`k=v,...` values (Keyspace, Commandstats, Errorstats, Latencystats) merged field by field."""
    rows = [dict(_pairs(v)) for v in values]
    names = list(dict.fromkeys(k for r in rows for k in r))
    out: dict[str, str] = {}
    for n in names:
        present = [r[n] for r in rows if n in r]
        nums = [_number(x) for x in present]
        if any(x is None for x in nums):
            out[n] = present[0]
        elif section == "Latencystats":
            out[n] = f"{max(nums):.3f}"  # type: ignore[type-var]
        elif n == "avg_ttl":
            weights = [int(r.get("expires", "0")) for r in rows if n in r]
            total = sum(weights)
            out[n] = str(sum(int(x) * w for x, w in zip(nums, weights)) // total if total else 0)  # type: ignore[arg-type]
        elif n == "usec_per_call":
            continue  # recomputed below
        else:
            s = sum(nums)  # type: ignore[arg-type]
            out[n] = f"{s:.2f}" if isinstance(s, float) else str(s)
    if "usec_per_call" in names:
        calls = int(out.get("calls", "0"))
        per = float(out.get("usec", "0")) / calls if calls else 0.0
        merged = {}
        for n in names:  # in Redis's order: usec_per_call after usec
            merged[n] = f"{per:.2f}" if n == "usec_per_call" else out[n]
        out = merged
    return ",".join(f"{k}={v}" for k, v in out.items())


_SUBFIELD_SECTIONS = frozenset({"Keyspace", "Commandstats", "Errorstats", "Latencystats"})


def merge_sections(servers: Sequence[Sections]) -> Sections:
    """Every server's sections merged (module docstring), in the first server's order (sections
    and fields only some servers have come after)."""
    order: list[str] = []
    by_name: dict[str, list[dict[str, str]]] = {}
    field_order: dict[str, list[str]] = {}
    for sections in servers:
        for name, fields in sections:
            if name not in by_name:
                order.append(name)
                by_name[name] = []
                field_order[name] = []
            d = dict(fields)
            by_name[name].append(d)
            seen = field_order[name]
            seen.extend(k for k in d if k not in seen)
    out: Sections = []
    for name in order:
        rows = by_name[name]
        fields: list[tuple[str, str]] = []
        for key in field_order[name]:
            values = [r[key] for r in rows if key in r]
            if name in _SUBFIELD_SECTIONS and "=" in values[0]:
                fields.append((key, _subfields(name, key, values)))
            else:
                fields.append((key, _scalar(key, values)))
        # `*_human` figures from the merged bytes, as redis-server prints them
        merged = dict(fields)
        fields = [(k, human_bytes(int(merged[k[:-6]])) if k.endswith("_human") and merged.get(k[:-6], "").isdigit()
                   else v) for k, v in fields]
        out.append((name, fields))
    return out


def merge_info(texts: Sequence[str], own: dict[str, dict[str, str]]) -> str:
    """The servers' INFO texts merged, then `own` (section -> fields) laid over them: a field of
    `own` replaces the servers' value or is added at the end of its section; a field given as
    "" is dropped. Sections of `own` that the servers did not send are not added (the client
    asked for others)."""
    merged = merge_sections([parse_info(t) for t in texts])
    out: Sections = []
    for name, fields in merged:
        mine = own.get(name)
        if mine:
            d = dict(fields)
            d.update(mine)
            fields = [(k, v) for k, v in d.items() if v != ""]
        out.append((name, fields))
    return format_info(out)


def info_reply(replies: Sequence[bytes], own: Callable[[], dict[str, dict[str, str]]] | None,
               unexpected: Callable[[], bytes]) -> bytes:
    """The client's reply from the servers' INFO replies (bulk strings, or RESP3 verbatim)."""
    texts = []
    proto3 = False
    for reply in replies:
        head, _, body = reply.partition(b"\r\n")
        if head[:1] == b"=" and body[:4] == b"txt:":
            proto3 = True
            body = body[4:]
        elif head[:1] != b"$":
            return unexpected()
        texts.append(body[:-2].decode(errors="replace"))
    text = merge_info(texts, own() if own is not None else {}).encode()
    if proto3:
        return b"=%d\r\ntxt:%s\r\n" % (len(text) + 4, text)
    return b"$%d\r\n%s\r\n" % (len(text), text)

