"""Argument and construction validation under mpirun: counts, geometry, no pickle."""

import pytest

from conftest import run_mpi


@pytest.mark.parametrize("provider", ["shm", "tcp"])
def test_counts_are_integral_and_never_wrap(provider):
    # [2**61 + 64, 3 * 2**61 + 64] int64 once wrapped to a 512-byte message of heap.
    assert "OK counts" in run_mpi(2, "check_counts.py", provider)
