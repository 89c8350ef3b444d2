"""Key placement for the Redis splicer: twemproxy-compatible ketama (and modula) distribution.

This is twemproxy's `src/hashkit/nc_ketama.c` and the key hashes of `src/hashkit/` done over in
Python, so a pool moved from twemproxy (`distribution: ketama`) to the splicer keeps every key on
the same server, given the same server list, weights, names, `hash` and `hash_tag`:

* each server gets ``floorf(pct * 160 / 4 * nlive + 1e-10) * 4`` points, where pct is its share
  of the total weight, computed in C `float` (single precision; emulated below so rounding
  matches), i.e. 160 points per server when weights are equal;
* the points of a server are md5("<name>-<i>") for i = 0, 1, ..., each digest giving 4 points
  (its four little-endian 32-bit words);
* a server's name is the optional name after its address in twemproxy's config
  (``127.0.0.1:6379:1 redis1``), else ``host:port`` (just ``host`` when the port is 11211, a
  libmemcached tradition twemproxy keeps);
* a key goes to the first point whose value is >= hash(key), wrapping to the first point; the
  key hash is the pool's `hash` (twemproxy's default is fnv1a_64, which, as in twemproxy, is
  truncated to 32 bits); with `hash_tag` ("{}") only the part between the tags is hashed.

`distribution: modula` (twemproxy's `nc_modula.c`) is offered too: one slot per unit of weight
and a key goes to slot ``hash % nslots``. The slots follow twemproxy's *server array* order,
which is not the config order: `conf_validate_server` sorts the servers by name (shorter names
first, then bytewise) to find duplicates, and the array stays sorted. Ketama placement does not
depend on that order (points come from names); modula does, so it is reproduced here.

Like twemproxy, the hashes read key bytes as C `char`, which is signed on x86 and ARM64 Linux,
so bytes >= 0x80 are sign-extended; `test_redis_ketama` checks placement against a running
nutcracker.

Pure: no I/O.
"""
from __future__ import annotations

import bisect
import hashlib
import math
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["KetamaServer", "Ketama", "HASHES", "hash_key", "server_name", "check_ketama_names"]

POINTS_PER_SERVER = 160
POINTS_PER_HASH = 4

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


_KETAMA_MAX_LABEL = 85  # KETAMA_MAX_HOSTLEN (86) less the NUL


def _f32(x: float) -> float:
    """Round a double to the nearest C float, as a float-typed C expression would."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _schar(b: int) -> int:
    """A key byte as C `char` (signed), the way twemproxy's hashes read it."""
    return b - 256 if b >= 128 else b


try:
    # CPython's own md5 (HACL*) costs half of OpenSSL's through hashlib, whose per-call setup
    # dominates for short keys; a key's first placement pays for it.
    from _md5 import md5 as _md5_new
except ImportError:  # a CPython built without its builtin hashes
    _md5_new = hashlib.md5


def _md5(key: bytes, _new=_md5_new, _word=struct.Struct("<I").unpack_from) -> int:
    return _word(_new(key).digest())[0]


def _fnv1_64(key: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in key:
        h = (h * 0x100000001B3) & _M64
        h ^= _schar(b) & _M64
    return h & _M32


def _fnv1a_64(key: bytes) -> int:
    # twemproxy keeps only 32 bits of both the offset basis and the prime here (hash_fnv1a_64).
    h = 0xCBF29CE484222325 & _M32
    for b in key:
        h ^= _schar(b) & _M32
        h = (h * (0x100000001B3 & _M32)) & _M32
    return h


def _fnv1_32(key: bytes) -> int:
    h = 2166136261
    for b in key:
        h = (h * 16777619) & _M32
        h ^= _schar(b) & _M32
    return h


def _fnv1a_32(key: bytes) -> int:
    h = 2166136261
    for b in key:
        h ^= _schar(b) & _M32
        h = (h * 16777619) & _M32
    return h


def _crc32a(key: bytes) -> int:
    return zlib.crc32(key) & _M32


def _crc32(key: bytes) -> int:
    return (zlib.crc32(key) >> 16) & 0x7FFF


def _one_at_a_time(key: bytes) -> int:
    v = 0
    for b in key:
        v = (v + (_schar(b) & _M32)) & _M32
        v = (v + (v << 10)) & _M32
        v ^= v >> 6
    v = (v + (v << 3)) & _M32
    v ^= v >> 11
    v = (v + (v << 15)) & _M32
    return v


def _murmur(key: bytes) -> int:
    # twemproxy's hash_murmur: MurmurHash2 seeded with 0xdeadbeef * length; bytes read unsigned.
    m = 0x5BD1E995
    n = len(key)
    h = ((0xDEADBEEF * n) & _M32) ^ n
    i = 0
    while n - i >= 4:
        k = int.from_bytes(key[i : i + 4], "little")
        k = (k * m) & _M32
        k ^= k >> 24
        k = (k * m) & _M32
        h = (h * m) & _M32
        h ^= k
        i += 4
    rest = n - i
    if rest == 3:
        h ^= key[i + 2] << 16
    if rest >= 2:
        h ^= key[i + 1] << 8
    if rest >= 1:
        h ^= key[i]
        h = (h * m) & _M32
    h ^= h >> 13
    h = (h * m) & _M32
    h ^= h >> 15
    return h


def _crc16_table() -> list[int]:
    # nc_crc16.c's table in twemproxy 0.5: CRC-16/XMODEM (polynomial 0x1021, not reflected).
    table = []
    for n in range(256):
        c = n << 8
        for _ in range(8):
            c = ((c << 1) ^ 0x1021) & 0xFFFF if c & 0x8000 else (c << 1) & 0xFFFF
        table.append(c)
    return table


_CRC16 = _crc16_table()


def _crc16(key: bytes) -> int:
    # nc_crc16.c hash_crc16 as twemproxy 0.5 has it: the running value is a uint32_t that is never
    # cut to 16 bits, so its high bits feed the table index of later bytes (keys of more than two
    # bytes hash past 0xFFFF). twemproxy's master branch later replaced this with CRC-16/ARC,
    # which places keys elsewhere; 0.5.0 is the release, and the one matched here.
    crc = 0
    for b in key:
        crc = ((crc << 8) & _M32) ^ _CRC16[((crc >> 8) ^ b) & 0xFF]
    return crc


def _hsieh(key: bytes) -> int:
    # nc_hsieh.c hash_hsieh (Paul Hsieh's SuperFastHash, seed 0): 16-bit little-endian reads of
    # unsigned bytes, except the third byte of a 3-byte tail, read as C `char` (sign-extended).
    n = len(key)
    h = 0
    i = 0
    for _ in range(n >> 2):
        h = (h + (key[i] | key[i + 1] << 8)) & _M32
        tmp = (((key[i + 2] | key[i + 3] << 8) << 11) ^ h) & _M32
        h = ((h << 16) & _M32) ^ tmp
        i += 4
        h = (h + (h >> 11)) & _M32
    rem = n & 3
    if rem == 3:
        h = (h + (key[i] | key[i + 1] << 8)) & _M32
        h ^= (h << 16) & _M32
        h ^= ((_schar(key[i + 2]) & _M32) << 18) & _M32
        h = (h + (h >> 11)) & _M32
    elif rem == 2:
        h = (h + (key[i] | key[i + 1] << 8)) & _M32
        h ^= (h << 11) & _M32
        h = (h + (h >> 17)) & _M32
    elif rem == 1:
        h = (h + key[i]) & _M32
        h ^= (h << 10) & _M32
        h = (h + (h >> 1)) & _M32
    h ^= (h << 3) & _M32
    h = (h + (h >> 5)) & _M32
    h ^= (h << 4) & _M32
    h = (h + (h >> 17)) & _M32
    h ^= (h << 25) & _M32
    h = (h + (h >> 6)) & _M32
    return h


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


# lookup3's mix() and final(): (which of a, b, c changes, from which two, the rotation), in order.
_JENKINS_MIX = ((0, 2, 1, 4), (1, 0, 2, 6), (2, 1, 0, 8), (0, 2, 1, 16), (1, 0, 2, 19), (2, 1, 0, 4))
_JENKINS_FINAL = ((2, 1, 14), (0, 2, 11), (1, 0, 25), (2, 1, 16), (0, 2, 4), (1, 0, 14), (2, 1, 24))


def _jenkins(key: bytes) -> int:
    # nc_jenkins.c hash_jenkins (Bob Jenkins' lookup3 hashlittle, initval 13); its three read
    # paths (aligned words, half-words, bytes) agree on a little-endian machine: unsigned bytes,
    # little-endian 32-bit words, the last block zero-padded, no mixing for an empty key.
    n = len(key)
    s = [(0xDEADBEEF + n + 13) & _M32] * 3
    if n == 0:
        return s[2]
    i = 0
    while True:
        block = key[i : i + 12]
        if n - i <= 12:
            block += bytes(12 - len(block))
        for j in range(3):
            s[j] = (s[j] + int.from_bytes(block[4 * j : 4 * j + 4], "little")) & _M32
        if n - i <= 12:
            break
        for x, y, z, r in _JENKINS_MIX:  # x -= y; x ^= rot(y, r); y += z
            s[x] = ((s[x] - s[y]) & _M32) ^ _rot(s[y], r)
            s[y] = (s[y] + s[z]) & _M32
        i += 12
    for x, y, r in _JENKINS_FINAL:  # x ^= y; x -= rot(y, r)
        s[x] = ((s[x] ^ s[y]) - _rot(s[y], r)) & _M32
    return s[2]


#: Key hashes by twemproxy's names (every one it offers).
HASHES: dict[str, Callable[[bytes], int]] = {
    "md5": _md5,
    "fnv1_64": _fnv1_64,
    "fnv1a_64": _fnv1a_64,
    "fnv1_32": _fnv1_32,
    "fnv1a_32": _fnv1a_32,
    "crc32": _crc32,
    "crc32a": _crc32a,
    "one_at_a_time": _one_at_a_time,
    "murmur": _murmur,
    "crc16": _crc16,
    "hsieh": _hsieh,
    "jenkins": _jenkins,
}


def hash_key(key: bytes, hash_name: str = "md5", hash_tag: bytes = b"") -> int:
    """The 32-bit hash twemproxy computes for `key` (after applying `hash_tag`)."""
    key = _tagged(key, hash_tag)
    return HASHES[hash_name](key) if key else 0


def _tagged(key: bytes, hash_tag: bytes) -> bytes:
    # nc_server.c server_pool_idx: hash only what is between the first opening tag and the next
    # closing tag after it, if that part is not empty.
    if hash_tag:
        a = key.find(hash_tag[0:1])
        if a >= 0:
            b = key.find(hash_tag[1:2], a + 1)
            if b - a > 1:
                return key[a + 1 : b]
    return key


def server_name(host: str, port: int, name: str | None = None) -> str:
    """The name twemproxy hashes for a server (see the module docstring); a given name is used
    even when empty (`host:port:1 ` with its trailing space names the server "" in twemproxy)."""
    if name is not None:
        return name
    return host if port == 11211 else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class KetamaServer:
    """One server on the continuum: its hashed name and weight (>= 1)."""

    name: str
    weight: int = 1

    def __post_init__(self) -> None:
        if self.weight < 1:
            raise ValueError(f"server {self.name!r}: weight must be at least 1")


def check_ketama_names(servers: Sequence[KetamaServer]) -> None:
    """ValueError if a name is too long for twemproxy's ketama.

    twemproxy labels point i of a server "name-i" in a KETAMA_MAX_HOSTLEN (86) buffer but hashes
    snprintf's untruncated length, so a longer label hashes bytes past the buffer: no placement
    can match it. i stays below 40 * servers (however servers are ejected), so a name is refused
    when that label could overflow.
    """
    longest = len(str(POINTS_PER_SERVER // POINTS_PER_HASH * len(servers) - 1))
    for s in servers:
        if len(s.name.encode()) + 1 + longest > _KETAMA_MAX_LABEL:
            raise ValueError(f"server name {s.name!r} is too long for ketama: twemproxy hashes "
                             f"'NAME-N' in {_KETAMA_MAX_LABEL} bytes, so with {len(servers)} servers "
                             f"a name may have {_KETAMA_MAX_LABEL - 1 - longest} bytes; fix: shorten it")


class Ketama:
    """A ketama continuum over `servers`; `locate(key)` gives the index of the key's server.

    Args:
        servers: the servers in config order (indexes refer to this order).
        live: which servers take part (twemproxy's auto-eject); default all.
        hash_name: key hash, one of `HASHES`.
        hash_tag: two characters, e.g. b"{}", or b"" for none.
        distribution: "ketama" (consistent hashing) or "modula" (hash modulo the weight slots).
    """

    __slots__ = ("servers", "live", "hash_name", "hash_tag", "distribution", "modula", "_hash", "_values", "_index")

    def __init__(
        self,
        servers: Sequence[KetamaServer],
        live: Sequence[bool] | None = None,
        hash_name: str = "md5",
        hash_tag: bytes = b"",
        distribution: str = "ketama",
    ) -> None:
        if not servers:
            raise ValueError("ketama needs at least one server")
        if hash_name not in HASHES:
            raise ValueError(f"unknown hash {hash_name!r}; choose one of {', '.join(sorted(HASHES))}")
        if hash_tag and len(hash_tag) != 2:
            raise ValueError("hash_tag must be two characters, e.g. '{}'")
        self.servers = list(servers)
        self.live = list(live) if live is not None else [True] * len(servers)
        if len(self.live) != len(self.servers):
            raise ValueError("live must have one flag per server")
        self.hash_name = hash_name
        self.hash_tag = hash_tag
        self._hash = HASHES[hash_name]
        if distribution not in ("ketama", "modula"):
            # twemproxy's `random` sends each request of a key to any server: reads would miss
            # what writes stored, and one key's commands could not keep their order.
            raise ValueError(f"distribution {distribution!r} is not supported by the Redis splicer; "
                             "use ketama or modula")
        self.distribution = distribution
        self.modula = distribution == "modula"
        if not self.modula:
            check_ketama_names(self.servers)
        if self.modula:
            # Slot n holds a server index; `_values` is only the slot count's stand-in, kept
            # non-empty exactly when a server is live (callers test it for "no live server").
            self._index = self._build_modula()
            self._values = list(range(len(self._index)))
        else:
            points = self._build()
            self._values = [v for v, _ in points]
            self._index = [i for _, i in points]

    def _build(self) -> list[tuple[int, int]]:
        nlive = sum(self.live)
        if nlive == 0:
            return []
        total = sum(s.weight for s, ok in zip(self.servers, self.live) if ok)
        points: list[tuple[int, int]] = []
        for idx, (server, ok) in enumerate(zip(self.servers, self.live)):
            if not ok:
                continue
            # C: pct = (float)weight / (float)total_weight;
            #    floorf((float)(pct * 160 / 4 * (float)nlive + 0.0000000001)) * 4
            # pct*160, /4 and *(float)nlive are float operations; adding the double literal
            # promotes to double, and the cast takes it back to float.
            pct = _f32(_f32(float(server.weight)) / _f32(float(total)))
            x = _f32(_f32(_f32(pct * POINTS_PER_SERVER) / 4) * _f32(float(nlive)))
            per_server = int(math.floor(_f32(x + 0.0000000001))) * 4
            name = server.name.encode()
            for i in range(per_server // POINTS_PER_HASH):
                d = hashlib.md5(b"%s-%d" % (name, i)).digest()
                for a in range(POINTS_PER_HASH):
                    o = a * 4
                    points.append((d[o] | (d[o + 1] << 8) | (d[o + 2] << 16) | (d[o + 3] << 24), idx))
        # twemproxy sorts with qsort, which leaves the order of equal values unspecified; a
        # stable sort by value keeps config order. Equal 32-bit points are vanishingly rare.
        points.sort(key=lambda p: p[0])
        return points

    def _build_modula(self) -> list[int]:
        # nc_modula.c modula_update, over the server array as twemproxy orders it (sorted by
        # name with string_compare: length first, then bytes; see the module docstring).
        order = sorted(range(len(self.servers)), key=lambda i: (len(n := self.servers[i].name.encode()), n))
        return [i for i in order if self.live[i] for _ in range(self.servers[i].weight)]

    @property
    def npoints(self) -> int:
        """Points on the continuum (160 per live server when weights are equal)."""
        return len(self._values)

    def dispatch(self, h: int) -> int:
        """Server index for a 32-bit key hash (ketama_dispatch: first point >= h, wrapping;
        modula_dispatch: slot h % nslots)."""
        values = self._values
        if not values:
            raise LookupError("no live server")
        if self.modula:
            return self._index[h % len(values)]
        i = bisect.bisect_left(values, h)
        return self._index[i if i < len(values) else 0]

    def key_hash(self, key: bytes) -> int:
        """The key's 32-bit hash, after the hash tag is applied."""
        if self.hash_tag:
            key = _tagged(key, self.hash_tag)
        if not key:  # server_pool_hash: an empty key hashes to 0 whatever the hash function
            return 0
        return self._hash(key)

    def locate(self, key: bytes) -> int:
        """Index (into `servers`) of the server that holds `key`."""
        if len(self.servers) == 1:  # twemproxy skips hashing for a single server
            return 0
        return self.dispatch(self.key_hash(key))
