"""Construct / exchange / close cycles leave RSS and open descriptors flat.
The full 1,000-cycle figure comes from bench/leak.py (see docs/protocol.md)."""

import os

import pytest

from conftest import HERE, run_mpi

LEAK = os.path.join(os.path.dirname(HERE), "bench", "leak.py")


@pytest.mark.parametrize("provider", ["shm", "tcp"])
def test_construct_exchange_close_cycles_do_not_leak(provider):
    # 150 cycles after a 20-cycle warm-up; each cycle registers fresh rings, so
    # a leaked region or endpoint would grow RSS by tens of KiB per cycle.
    out = run_mpi(2, LEAK, "--provider", provider, "--cycles", 150, "--warmup", 20,
                  "--max-rss-kib", 1024, "--max-fds", 0, timeout=300)
    assert "OK leak" in out, out
