"""A function's configuration errors are one line: `config.FIELD: problem`, joined by "; "."""
from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from shmfabric.fabric import Fabric
from shmfabric.functions.api import FunctionConfigError, validate_config
from shmfabric.functions.builtin.firewall import FirewallFunction
from shmfabric.functions.builtin.generator import Generator
from shmfabric.functions.builtin.monitor import Monitor
from shmfabric.functions.builtin.ratelimit import RateLimiter

SADR = "invalid configuration for function 'firewall': config: rules:2: unknown word 'sadr' (did you mean 'saddr'?)"


def message(cls, config: dict) -> str:
    with pytest.raises(FunctionConfigError) as e:
        validate_config(cls, config)
    return str(e.value)


@pytest.mark.parametrize("cls, config, expected", [
    # a model-level validator (the firewall parses its rules there): no field, so `config: ...`
    (FirewallFunction, {"rules": "policy drop\nip sadr 10.0.0.0/8 accept"}, SADR),
    (Generator, {"tcp_share": 0.5, "size": 60},
     "invalid configuration for function 'generator': config: size 60 is too small for TCP flows; "
     "use size >= 70 or tcp_share 0"),
    # a field validator's ValueError: the field, without pydantic's "Value error, "
    (Generator, {"dst_ports": [0]},
     "invalid configuration for function 'generator': config.dst_ports: dst_ports must be a non-empty list "
     "of ports 1..65535"),
    (Monitor, {"capture": {"path": "/nonexistent-dir/x.pcap"}},
     "invalid configuration for function 'monitor': config.capture.path: directory '/nonexistent-dir' of the "
     "capture file does not exist; create it first"),
    # several problems: one line, "; " between them
    (Generator, {"rate": -1, "size": 10},
     "invalid configuration for function 'generator': config.rate: Input should be greater than or equal to 0; "
     "config.size: Input should be greater than or equal to 58"),
    (RateLimiter, {"classes": [{"name": "a", "rate": "10pps", "colour": 1}]},
     "invalid configuration for function 'ratelimit': config.classes.0.colour: Extra inputs are not permitted"),
], ids=["model-validator", "model-validator-generator", "field-validator", "nested-field", "several", "list-item"])
def test_config_error_is_exactly_one_line(cls, config, expected):
    msg = message(cls, config)
    assert msg == expected
    assert "\n" not in msg and "Value error" not in msg


def test_the_runtime_prints_the_same_one_line_and_exits_2(tmp_path):
    name = f"cfe-{uuid.uuid4().hex[:8]}"
    Fabric.create(name).close()
    try:
        p = subprocess.run([sys.executable, "-m", "shmfabric.functions.run", "--fabric", name, "--node", "fw",
                            "--function", "firewall", "--duration", "1",
                            "--config", json.dumps({"rules": "policy drop\nip sadr 10.0.0.0/8 accept"})],
                           capture_output=True, text=True, timeout=60)
    finally:
        Fabric.destroy(name)
    assert p.returncode == 2
    assert p.stderr == f"shmfabric.functions.run: {SADR}\n"
