"""Reused receive states and pieces (the per-call fast path) never mix iterations."""

import pytest

from conftest import run_mpi


@pytest.mark.parametrize("provider,local,progress", [
    ("shm", "shared", "poll"), ("shm", "fabric", "poll"), ("tcp", "fabric", "poll"),
    # the progress thread takes states and pieces under the engine's lock too
    ("shm", "shared", "thread")])
def test_recycled_states_and_pieces_keep_iterations_apart(provider, local, progress):
    out = run_mpi(3, "check_recycling.py", provider,
                  env={"BLSFAB_LOCAL": local, "BLSFAB_PROGRESS": progress})
    assert "OK recycling" in out
