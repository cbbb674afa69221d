"""Peer failures at construction, mid-run and close, on shm and tcp: every
surviving rank ends within timeout + 1 s with an error naming the failing rank.

The jobs run under ``mpirun --enable-recovery`` so that a killed rank does not
make mpirun kill the survivors first; tests/mpi/check_peer_failures.py checks the
errors and timings on each rank and prints one OK line per survivor.
"""

import os
import subprocess
import sys

import pytest

from conftest import MPI_DIR, mpi_env

NPROCS = 3
DEATHS = {"die_before", "die_during", "die_mid_run", "die_in_close"}
SCENARIOS = ["geometry", "alloc", "late", "die_before", "die_during", "die_mid_run",
             "close_early", "die_in_close"]


def run_failure(provider, scenario, timeout=90):
    cmd = ["mpirun", "--oversubscribe", "--enable-recovery", "--mca", "btl", "vader,self",
           "-np", str(NPROCS), sys.executable, os.path.join(MPI_DIR, "check_peer_failures.py"),
           provider, scenario]
    try:
        proc = subprocess.run(cmd, env=mpi_env(), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} hung for {timeout} s\n{exc.stdout}\n{exc.stderr}")
    return proc


@pytest.mark.parametrize("provider", ["shm", "tcp"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_failure_ends_on_every_survivor_naming_the_rank(provider, scenario):
    proc = run_failure(provider, scenario)
    survivors = range(NPROCS - 1) if scenario in DEATHS else range(NPROCS)
    report = f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"
    assert "FAIL" not in proc.stdout, report
    for r in survivors:
        assert f"OK rank {r} {scenario}" in proc.stdout, report
