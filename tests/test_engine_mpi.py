"""The BLS engine under real mpirun jobs, on shm and tcp;ofi_rxm."""

import pytest

from conftest import run_mpi

PROVIDERS = ["shm", "tcp"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("nprocs", [2, 4])
def test_matches_mpi_alltoallv(provider, nprocs):
    out = run_mpi(nprocs, "check_alltoallv.py", provider, "0,1,4")
    assert "OK" in out


@pytest.mark.parametrize("provider,bound,iters", [("shm", 4, 1000), ("shm", 1, 1000),
                                                  ("tcp", 4, 1000), ("shm", 0, 300)])
def test_bounded_lag_with_a_sleeping_rank(provider, bound, iters):
    out = run_mpi(4, "check_lag.py", provider, bound, iters)
    assert f"OK lag bound={bound}" in out


@pytest.mark.parametrize("provider", PROVIDERS)
def test_one_slot_rings_wait_for_credits_and_stay_correct(provider):
    # A single slot per ring forces posts to wait for credits every iteration.
    out = run_mpi(4, "check_lag.py", provider, 4, 300, 1)
    assert "OK lag" in out


@pytest.mark.parametrize("provider", PROVIDERS)
def test_bad_inputs_raise_and_leave_the_communicator_usable(provider):
    assert "OK errors" in run_mpi(2, "check_errors.py", provider)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_wait_on_a_silent_rank_times_out_naming_it(provider):
    assert "OK timeout" in run_mpi(3, "check_timeout.py", provider)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("nprocs", [2, 4])
def test_chained_matches_mpi_alltoallv(provider, nprocs):
    # The engine's correctness check again, with iterations issued in chains.
    assert "chained=True" in run_mpi(nprocs, "check_alltoallv.py", provider, "0,1,4", "chain")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_chain_mixed_sizes_splitting_and_exceptions(provider):
    assert "OK chain" in run_mpi(3, "check_chain.py", provider)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_bounded_lag_with_chained_pairs(provider):
    assert "OK lag bound=4" in run_mpi(4, "check_lag.py", provider, 4, 1000, "-", "chain")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_progress_thread_keeps_every_guarantee(provider):
    env = {"BLSFAB_PROGRESS": "thread"}
    assert "OK" in run_mpi(4, "check_alltoallv.py", provider, "0,4", env=env)
    assert "OK lag" in run_mpi(4, "check_lag.py", provider, 4, 600, "-", "chain", env=env)
    assert "OK lag" in run_mpi(4, "check_lag.py", provider, 2, 300, 1, env=env)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_large_messages_read_in_place_survive_lag_and_credit_waits(provider):
    # 8 KB to 290 KB messages take the in-place receive path; one-slot rings
    # force credit requests, which must spill in-place data correctly.
    assert "OK lag" in run_mpi(4, "check_lag.py", provider, 2, 200, "-", "-", 100)
    assert "OK lag" in run_mpi(4, "check_lag.py", provider, 2, 200, 1, "-", 100)
