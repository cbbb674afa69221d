"""Construct / exchange / close cycles leave RSS and open descriptors flat
(bench/leak.py; figures in docs/protocol.md)."""

import os

import pytest

from conftest import HERE, run_mpi

LEAK = os.path.join(os.path.dirname(HERE), "bench", "leak.py")


@pytest.mark.parametrize("provider,cycles", [("shm", 1000), ("tcp", 300)])
def test_construct_exchange_close_cycles_do_not_leak(provider, cycles):
    # Cycles after a 20-cycle warm-up (about 20 s each here); each cycle
    # registers fresh rings, so a leaked region, endpoint or request would grow
    # RSS by kilobytes per cycle, and a leaked endpoint or fabric leaves fds.
    out = run_mpi(2, LEAK, "--provider", provider, "--cycles", cycles, "--warmup", 20,
                  "--max-rss-kib", 1024, "--max-fds", 0, timeout=300)
    assert "OK leak" in out, out
