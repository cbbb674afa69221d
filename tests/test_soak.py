"""The reduced soak: bench/soak.py at 20,000 verified per-peer messages over
shm and tcp, bounds 0/1/4/8, random counts (zeros and near-slot sizes), dtypes
and delays. The full run (1,000,000 messages) is quoted in docs/protocol.md."""

import os

from conftest import HERE, run_mpi

SOAK = os.path.join(os.path.dirname(HERE), "bench", "soak.py")


def test_reduced_soak_verifies_every_message():
    out = run_mpi(3, SOAK, "--messages", 20000, timeout=300)
    assert "OK soak" in out, out
