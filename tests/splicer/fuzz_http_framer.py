"""Coverage-guided fuzzing of the HTTP framers with atheris (optional: `pip install atheris`).

    python tests/splicer/fuzz_http_framer.py -runs=200000        # or -max_total_time=60

The input's first byte chooses how the rest is split into receive_data() calls; both framers
must only ever return events or raise RemoteProtocolError, and must agree with themselves
whatever the split. test_http_framer.py runs a short smoke of this harness when atheris is
installed.
"""
from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from shmfabric.splicer.http_framer import (
        NEED_DATA, PAUSED, ConnectionClosed, Data, RemoteProtocolError, RequestFramer, ResponseFramer,
    )


def _events(framer, data: bytes, step: int) -> list:
    out: list = []
    for i in range(0, len(data), step):
        framer.receive_data(data[i:i + step])
        while True:
            try:
                ev = framer.next_event()
            except RemoteProtocolError as exc:
                assert 400 <= exc.status <= 599
                out.append(("error", exc.status))
                return out
            if ev is NEED_DATA or ev is PAUSED or isinstance(ev, ConnectionClosed):
                break
            out.append(ev.data if isinstance(ev, Data) else ev)
    return out


def _normalise(evs: list) -> list:
    merged: list = []
    for ev in evs:
        if isinstance(ev, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] += ev
        else:
            merged.append(ev)
    return merged


def test_one_input(buf: bytes) -> None:
    if not buf:
        return
    step, data = buf[0] % 17 + 1, buf[1:]
    if not data:
        return
    a = _normalise(_events(RequestFramer(max_head_bytes=4096, max_headers=32, max_url_bytes=512), data, len(data)))
    b = _normalise(_events(RequestFramer(max_head_bytes=4096, max_headers=32, max_url_bytes=512), data, step))
    # a 431 for an over-long head may come one read later when split; otherwise identical
    if not (a and b and a[-1] == b[-1] == ("error", 431)):
        assert a == b, (a, b)
    r = ResponseFramer(max_head_bytes=4096, max_headers=32)
    r.expect(b"HEAD" if buf[0] & 0x80 else b"GET")
    r.expect(b"GET")
    _events(r, data, step)


def main() -> None:
    atheris.instrument_all()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
