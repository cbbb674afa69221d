"""Ring and staging memory per path, from stats(), with the data checked."""

import pytest

from conftest import run_mpi


@pytest.mark.parametrize("mode, env", [
    ("shared", {}),
    ("fabric", {}),
    ("fabric-full-staging", {"BLSFAB_ZERO_COPY_BYTES": "0"}),
])
def test_rings_and_staging_are_sized_for_what_they_carry(mode, env):
    out = run_mpi(3, "check_memory.py", mode, env=env)
    assert f"OK memory {mode}" in out
