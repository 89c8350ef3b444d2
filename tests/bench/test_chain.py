"""`shmfabric bench chain`: every transport runs the whole chain and loses no frame, the rows
carry the average batch of each stage, the seqpacket baseline is not held to tiny queues. Runs
are short; timings are never asserted."""
from __future__ import annotations

import json
import multiprocessing
import socket
from pathlib import Path

import pytest

from shmfabric.bench import chain
from shmfabric.cli import main as cli_main


def _queued_until_full(sender: socket.socket, size: int) -> int:
    sender.setblocking(False)
    n = 0
    try:
        while n < 100_000:
            sender.send(b"x" * size)
            n += 1
    except BlockingIOError:
        pass
    return n


@pytest.mark.parametrize("size", [64, 1500])
def test_seqpacket_link_is_bounded_by_bytes_not_max_dgram_qlen(tmp_path: Path, size: int) -> None:
    # the earlier baseline's senders blocked after max_dgram_qlen (10) queued datagrams; a
    # connected seqpacket sender is bounded by its send buffer only
    path = str(tmp_path / "s.sock")
    lsock = chain.seqpacket_listener(path)
    tx = chain.seqpacket_connect(path)
    rx = chain.seqpacket_accept(lsock)
    try:
        n = _queued_until_full(tx, size)
        sndbuf = tx.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    finally:
        tx.close()
        rx.close()
    qlen = chain.max_dgram_qlen() or 10
    assert n > qlen
    if sndbuf >= 2 * chain.SOCK_BUF:  # the 4 MiB asked for was granted (net.core.wmem_max >= 4 MiB)
        assert n >= chain.BATCH, f"{n} frames of {size} B fill a {sndbuf} B send buffer"


def _check_row(r: dict) -> None:
    assert r["received"] == r["sent"] > 0, r  # backpressure, no loss, on every transport
    assert r["frames_per_s"] > 0
    assert set(r["avg_batch"]) == set(chain.NAMES) | {"sinks"}
    for n, b in r["avg_batch"].items():
        assert 1 <= b <= chain.BATCH, (n, b)
    assert r["avg_batch"]["gen"] == chain.BATCH  # the generator always produces full batches
    assert r["batch_limit"] == chain.BATCH
    assert r["cpu_ns_per_frame_total"] > 0


def test_json_rows_for_every_transport(capsys: pytest.CaptureFixture[str]) -> None:
    assert chain.main(["--sizes", "64", "--seconds", "0.3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by = {r["transport"]: r for r in rows}
    assert set(by) == {"fabric", "unix-seqpacket", "unix-dgram",
                       "ratio fabric/unix-seqpacket", "ratio fabric/unix-dgram"}, [r.get("error") for r in rows]
    for t in ("fabric", "unix-seqpacket", "unix-dgram"):
        _check_row(by[t])
    assert by["unix-dgram"]["max_dgram_qlen"] == chain.max_dgram_qlen()
    assert by["unix-seqpacket"]["so_sndbuf"] > 0
    assert by["ratio fabric/unix-seqpacket"]["ratio"] > 0
    assert multiprocessing.active_children() == []


def test_cli_table_and_transport_choice(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main.main(["bench", "chain", "--sizes", "1500", "--seconds", "0.2", "--transports", "unix-seqpacket"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "unix-seqpacket" in out and "fabric" not in out.replace("fabric/", "")
    assert "avg batch" in out
    assert cli_main.main(["bench", "chain", "--sizes", "64", "--seconds", "0.2", "--transports",
                          "unix-seqpacket", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["transport"] for r in rows] == ["unix-seqpacket"]
    _check_row(rows[0])


def test_cli_rejects_an_unknown_transport(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        chain.main(["--transports", "tcp"])
    assert e.value.code == 2
    assert "--transports" in capsys.readouterr().err
