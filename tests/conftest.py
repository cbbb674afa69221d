"""Helpers to run real multi-rank jobs under mpirun from pytest."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
MPI_DIR = os.path.join(HERE, "mpi")


def mpi_env(extra=None):
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1",
               # loopback only for tcp; warnings surface misaddressed writes
               FI_TCP_IFACE="lo", FI_LOG_LEVEL=os.environ.get("FI_LOG_LEVEL", "warn"),
               PYTHONUNBUFFERED="1")
    env.pop("FI_PROVIDER", None)
    if extra:
        env.update(extra)
    return env


def run_mpi(nprocs, script, *args, env=None, timeout=240, mca_btl="vader,self"):
    """Run tests/mpi/<script> on ``nprocs`` ranks; fail the test on a non-zero exit."""
    cmd = ["mpirun", "--oversubscribe", "--mca", "btl", mca_btl, "-np", str(nprocs),
           sys.executable, os.path.join(MPI_DIR, script), *map(str, args)]
    try:
        proc = subprocess.run(cmd, env=mpi_env(env), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} hung for {timeout} s\n{exc.stdout}\n{exc.stderr}")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}"
                    f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc.stdout
