"""Issue 8, engine side: the failure model, untrusted peers, dtypes, threads
and spill liveness, under real mpirun jobs on shm and tcp;ofi_rxm."""

import pytest

from conftest import run_mpi

PROVIDERS = ["shm", "tcp"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_post_failing_before_any_write_leaves_the_communicator_usable(provider):
    assert "OK unsent" in run_mpi(2, "check_failure.py", provider, "unsent")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_post_failing_after_some_writes_breaks_the_communicator(provider):
    assert "OK broken" in run_mpi(3, "check_failure.py", provider, "partial")


@pytest.mark.parametrize("progress", ["poll", "thread"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_forged_notifications_are_protocol_errors_naming_the_rank(provider, progress):
    nprocs = 3 if progress == "poll" else 2
    assert f"OK forged {progress}" in run_mpi(nprocs, "check_forged.py", provider, progress)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_dtype_mismatch_names_the_rank_and_both_dtypes(provider):
    assert "OK dtype" in run_mpi(2, "check_dtype.py", provider)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_one_thread_per_communicator_and_dup_with_one_slot_rings(provider):
    assert "OK threads" in run_mpi(2, "check_threads.py", provider, 300)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_want_handled_before_its_slot_lands_does_not_hold_the_slot(provider):
    assert "OK spill" in run_mpi(3, "check_spill.py", provider)


def test_a_stale_shm_region_left_by_a_dead_process_does_not_block_construction():
    assert "OK stale shm" in run_mpi(2, "check_stale_shm.py")
