"""End-to-end tests of `shmfabric create | inspect | destroy | demo` output."""
from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import types
import uuid

import pytest

from shmfabric.fabric import Fabric


def sf(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmfabric", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def name():
    n = f"cli-{uuid.uuid4().hex[:8]}"
    yield n
    Fabric.destroy(n)


def test_create_inspect_destroy(name):
    r = sf("create", name, "--networks", "1500:1024,9000:256", "--max-nodes", "8", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["name"] == name
    fab = Fabric.open(name)
    a, b = fab.attach("a"), fab.attach("b")
    assert a.send_batch(b.id, [b"x" * 100] * 5) == 5
    info = json.loads(sf("inspect", name, "--json").stdout)
    assert [n["mtu"] for n in info["networks"]] == [1500, 9000]
    assert [n["name"] for n in info["nodes"]] == ["a", "b"]
    ring = [r for r in info["rings"] if r["src"] == a.id and r["dst"] == b.id][0]
    assert ring["enqueued"] == 5 and ring["depth"] == 5
    text = sf("inspect", name).stdout
    assert name in text and "networks" in text and "rings" in text
    fab.close()
    assert sf("destroy", name).returncode == 0
    r = sf("inspect", name)
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_create_errors_are_one_line(name):
    r = sf("create", name, "--ring-size", "1000")
    assert r.returncode == 2
    assert "--ring-size 1000 is not a power of two" in r.stderr and "Traceback" not in r.stderr
    r = sf("create", name, "--networks", "abc")
    assert r.returncode == 2 and "MTU[:SLOTS]" in r.stderr
    r = sf("create", name, "--networks", "100000")
    assert r.returncode == 2 and "mtu=100000 is out of range" in r.stderr


def test_inspect_rejects_a_foreign_file(tmp_path):
    p = tmp_path / "not-a-region"
    p.write_bytes(b"\x00" * 8192)
    r = sf("inspect", str(p))
    assert r.returncode == 2
    assert "not a shmfabric region" in r.stderr and "Traceback" not in r.stderr


def test_demo_delivers_every_frame_once():
    r = sf("demo", "--seconds", "1", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is True
    assert out["sink_received"] == sum(out["sent"].values()) > 0
    assert out["corrupt"] == 0 and out["duplicates"] == 0
    assert out["pool"]["free"] == out["pool"]["total"]


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def test_create_refuses_a_bad_mode_in_one_line(name):
    _one_line_error(sf("create", name, "--mode", "999"), "--mode '999' is not an octal file mode")
    _one_line_error(sf("create", name, "--mode", "abc"), "--mode 'abc' is not an octal file mode")
    _one_line_error(sf("create", name, "--mode", "1777"), "out of range", "000 to 777")


def test_demo_refuses_seconds_that_are_not_positive():
    _one_line_error(sf("demo", "--seconds", "-1", timeout=30), "--seconds -1", "above 0")
    _one_line_error(sf("demo", "--seconds", "0", timeout=30), "--seconds 0", "above 0")


class _ThreadProcess(threading.Thread):
    """A stand-in for a spawned process, so the demo's workers can be replaced in this process."""

    def __init__(self, target, args, daemon=True):
        super().__init__(target=target, args=args, daemon=daemon)

    def kill(self) -> None:
        pass


def _worker_that_sends_nothing(role, fabric, seconds, size, results) -> None:
    results.put({"role": role, "sent": 0, "received": 0, "forwarded": 0, "corrupt": 0, "dupes": 0, "gaps": 0,
                 "heartbeats": 0})


def test_demo_is_not_ok_when_no_frame_was_sent(monkeypatch, capsys):
    from shmfabric.cli import demo
    from shmfabric.cli.main import main

    monkeypatch.setattr(demo, "_worker", _worker_that_sends_nothing)
    monkeypatch.setattr(demo.mp, "get_context", lambda method: types.SimpleNamespace(Queue=queue.Queue,
                                                                                   Process=_ThreadProcess))
    assert main(["demo", "--seconds", "0.5", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["sent"] == {"gen-a": 0, "gen-b": 0}


def test_demo_summary_starts_on_its_own_line():
    # not a terminal: rich ends the live view's last line (the pool caption) without a newline
    r = sf("demo", "--seconds", "1", timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(ln.startswith("sent ") for ln in lines), r.stdout
    assert not any("(MTU 1500)" in ln and "sent " in ln for ln in lines), r.stdout


def test_create_refuses_a_name_with_a_slash_saying_the_rule():
    for bad in ("a/b", ".hidden", "has space"):
        _one_line_error(sf("create", bad), f"fabric name {bad!r} is not valid",
                        "letters, digits, '_', '.', '-'", "no '/'")
    _one_line_error(sf("create", "x" * 40), "longer than 31 bytes")


def test_every_create_inspect_and_demo_flag_has_help():
    import argparse

    from shmfabric.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for verb in ("create", "inspect", "demo", "capture"):
        for action in sub.choices[verb]._actions:
            if action.option_strings or action.dest != "help":
                assert action.help, f"{verb} {action.option_strings or action.dest} has no help text"
    out = " ".join(sf("create", "--help").stdout.split())
    assert "--tape-entry-size TAPE_ENTRY_SIZE bytes of one tape entry" in out, out


def test_destroy_removes_only_regions(tmp_path, name):
    # `destroy PATH` unlinked any file named by a path, fabric or not (`destroy examples/edge.yaml`
    # deleted the config; the tool runs as root).
    victim = tmp_path / "edge.yaml"
    victim.write_text("fabric: {name: edge}\n")
    r = sf("destroy", str(victim))
    assert r.returncode == 2 and "not a shmfabric region" in r.stderr and "not removed" in r.stderr, r.stderr
    assert victim.read_text() == "fabric: {name: edge}\n"
    r = sf("destroy", str(tmp_path))
    assert r.returncode == 2 and "is a directory" in r.stderr and "Traceback" not in r.stderr
    # a real region, by its path, goes; by its name too, even half made (a creation that died)
    assert sf("create", name).returncode == 0
    path = json.loads(sf("inspect", name, "--json").stdout)["path"]
    r = sf("destroy", path, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["path"] == path
    half = f"{name}-half"
    with open(f"/dev/shm/shmfabric-{half}", "wb"):
        pass
    r = sf("inspect", half)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert sf("destroy", half).returncode == 0
    r = sf("destroy", half)
    assert r.returncode == 2 and "no fabric named" in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["inspect", "x", "--watch", "-1"], "--watch -1"),
    (["inspect", "x", "--watch", "nan"], "--watch nan"),
    (["inspect", "x", "--watch", "inf", "--count", "1"], "--watch inf"),
    (["inspect", "x", "--count", "3"], "with --watch"),
    (["bench", "chain", "--sizes", "x"], "--sizes 'x'"),
    (["bench", "chain", "--sizes", "10"], "10 is out of range"),
    (["bench", "chain", "--seconds", "-1"], "--seconds -1"),
])
def test_bad_watch_and_bench_arguments_are_one_line_errors(args, needle):
    # each was a traceback (ValueError, OverflowError), a table of zeros, or (a size the
    # generator refuses) a bench that hung for ever
    r = sf(*args)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_create_refuses_a_region_larger_than_the_free_space(name):
    # A sparse file is created fine at any size: 17.6 TB on a 24 GB /dev/shm was accepted, and
    # its nodes would have died of SIGBUS once the pages ran out.
    r = sf("create", name, "--max-nodes", "1024", "--ring-size", "1048576")
    assert r.returncode == 2 and "free" in r.stderr and "smaller ring_size" in r.stderr, r.stderr
    assert not Fabric.destroy(name)  # nothing was left behind


def test_argument_errors_are_one_line_in_the_flags_words(name):
    # argparse printed its usage block before the error, and range errors named the Python
    # parameter (max_nodes=1) instead of the flag the user typed
    r = sf("create", name, "--max-nodes", "abc")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--max-nodes: invalid int value: 'abc'" in r.stderr and "shmfabric create --help" in r.stderr
    r = sf("create", name, "--max-nodes", "1")
    assert r.returncode == 2 and "--max-nodes 1 is out of range" in r.stderr, r.stderr
