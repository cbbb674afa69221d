"""Property-based fuzzing of ialltoallv arguments (hypothesis, derandomized so
every rank draws the same cases): every call succeeds with verified data or
raises ValueError/TypeError before sending, on every rank alike, and the next
valid exchange still verifies. The worker is tests/mpi/fuzz_args.py."""

import pytest

from conftest import run_mpi


@pytest.mark.parametrize("provider,nprocs,examples", [("shm", 2, 120), ("tcp", 3, 40)])
def test_any_arguments_succeed_verified_or_raise_before_sending(provider, nprocs, examples):
    out = run_mpi(nprocs, "fuzz_args.py", provider, examples, timeout=400)
    assert f"OK fuzz {examples} examples" in out
