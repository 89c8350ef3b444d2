"""Region files are private (0600) by default; a mode and a group can be given."""
from __future__ import annotations

import grp
import os
import stat
import uuid

import pytest

from shmfabric.fabric import Fabric, RegionCreateError


@pytest.fixture
def name():
    n = f"mode-{uuid.uuid4().hex[:8]}"
    yield n
    Fabric.destroy(n)


def test_default_mode_is_0600(name):
    old = os.umask(0)
    try:
        fab = Fabric.create(name)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(fab.path).st_mode) == 0o600
    fab.close()


def test_group_and_mode(name):
    gid = os.getgid()
    group = grp.getgrgid(gid).gr_name
    fab = Fabric.create(name, mode=0o660, group=group)
    st = os.stat(fab.path)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == gid
    fab.close()


def test_unknown_group_is_a_clear_error(name):
    with pytest.raises(RegionCreateError, match="group .no-such-group-shmfabric. does not exist"):
        Fabric.create(name, group="no-such-group-shmfabric")
    assert not os.path.exists(f"/dev/shm/shmfabric-{name}")


def test_create_twice_names_the_fix(name):
    Fabric.create(name).close()
    with pytest.raises(RegionCreateError, match="already exists.*destroy"):
        Fabric.create(name)
