"""The BLS engine under real mpirun jobs, on shm and tcp;ofi_rxm."""

import pytest

from conftest import run_mpi

PROVIDERS = ["shm", "tcp"]

# The ways data can travel and be taken, each run through the engine's checks:
# the worker scripts read these variables.
# fabric: every peer through the provider (what a forced provider means on one
# host); shared: same-host peers through node-local shared rings.
PATHS = {
    "fabric": {"BLSFAB_LOCAL": "fabric"},
    "fabric-out": {"BLSFAB_LOCAL": "fabric", "BLSFAB_TEST_RECEIVE": "out"},
    "shared": {"BLSFAB_LOCAL": "shared"},
    "shared-out": {"BLSFAB_LOCAL": "shared", "BLSFAB_TEST_RECEIVE": "out"},
    "shared-views": {"BLSFAB_LOCAL": "shared", "BLSFAB_TEST_RECEIVE": "views"},
    "fabric-views": {"BLSFAB_LOCAL": "fabric", "BLSFAB_TEST_RECEIVE": "views"},
    # every non-empty record to a fabric peer straight from the send buffer
    "zero-copy": {"BLSFAB_LOCAL": "fabric", "BLSFAB_ZERO_COPY_BYTES": "1"},
}


@pytest.fixture(params=list(PATHS))
def path_env(request):
    return PATHS[request.param]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("nprocs", [2, 4])
def test_matches_mpi_alltoallv(provider, nprocs, path_env):
    out = run_mpi(nprocs, "check_alltoallv.py", provider, "0,1,4", env=path_env)
    assert "OK" in out


@pytest.mark.parametrize("provider,bound,iters", [("shm", 4, 1000), ("shm", 1, 1000),
                                                  ("tcp", 4, 1000), ("shm", 0, 300)])
def test_bounded_lag_with_a_sleeping_rank(provider, bound, iters, path_env):
    out = run_mpi(4, "check_lag.py", provider, bound, iters, env=path_env)
    assert f"OK lag bound={bound}" in out


@pytest.mark.parametrize("provider", PROVIDERS)
def test_one_slot_rings_wait_for_credits_and_stay_correct(provider, path_env):
    # A single slot per ring forces posts to wait for credits every iteration.
    out = run_mpi(4, "check_lag.py", provider, 4, 300, 1, env=path_env)
    assert "OK lag" in out


@pytest.mark.parametrize("provider", PROVIDERS)
def test_bad_inputs_raise_and_leave_the_communicator_usable(provider):
    assert "OK errors" in run_mpi(2, "check_errors.py", provider)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_wait_on_a_silent_rank_times_out_naming_it(provider):
    assert "OK timeout" in run_mpi(3, "check_timeout.py", provider)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("nprocs", [2, 4])
def test_chained_matches_mpi_alltoallv(provider, nprocs, path_env):
    # The engine's correctness check again, with iterations issued in chains.
    assert "chained=True" in run_mpi(nprocs, "check_alltoallv.py", provider, "0,1,4", "chain",
                                     env=path_env)


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
    assert "OK" in run_mpi(4, "check_alltoallv.py", provider, "0,4",
                           env=dict(env, BLSFAB_LOCAL="shared"))
    assert "OK lag" in run_mpi(4, "check_lag.py", provider, 4, 600, "-", "chain", env=env)
    assert "OK lag" in run_mpi(4, "check_lag.py", provider, 2, 300, 1, env=env)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_large_messages_read_in_place_survive_lag_and_credit_waits(provider, path_env):
    # 8 KB to 290 KB messages take the in-place receive path; one-slot rings
    # force credit requests, which must spill in-place data correctly.
    for ring_slots in ("-", 1):
        assert "OK lag" in run_mpi(4, "check_lag.py", provider, 2, 200, ring_slots, "-", 100,
                                   env=path_env)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_wait_out_validates_the_buffer_and_fills_it(provider):
    assert "OK out" in run_mpi(2, "check_out.py", provider)


@pytest.mark.parametrize("local", ["shared", "fabric"])
def test_views_outlive_release_and_held_views_time_out_naming_peers(local):
    assert "OK views" in run_mpi(2, "check_views.py", local)
