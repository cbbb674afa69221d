"""Reused receive states and pieces (the per-call fast path) never mix iterations."""

import pytest

from conftest import run_mpi


@pytest.mark.parametrize("provider,local", [("shm", "shared"), ("shm", "fabric"),
                                            ("tcp", "fabric")])
def test_recycled_states_and_pieces_keep_iterations_apart(provider, local):
    out = run_mpi(3, "check_recycling.py", provider, env={"BLSFAB_LOCAL": local})
    assert "OK recycling" in out
