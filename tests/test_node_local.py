"""The node-local transport's shared segments: exchange, naming and clean-up."""

import os
import re
import subprocess
import sys

import pytest

from conftest import MPI_DIR, mpi_env, run_mpi

blsfab_core = pytest.importorskip("blsfab._core")


@pytest.mark.parametrize("nprocs", [2, 3])
def test_ranks_exchange_through_shared_rings_and_leave_no_names(nprocs):
    out = run_mpi(nprocs, "check_node_local.py", "exchange")
    assert f"OK node-local exchange P={nprocs}" in out


@pytest.mark.parametrize("mode", ["kill-running", "kill-setup", "kill-communicator",
                                  "kill-construction"])
def test_a_killed_rank_leaves_nothing_in_dev_shm(mode):
    cmd = ["mpirun", "--oversubscribe", "--mca", "btl", "vader,self", "-np", "3",
           sys.executable, os.path.join(MPI_DIR, "check_node_local.py"), mode]
    proc = subprocess.run(cmd, env=mpi_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, "rank 1 was meant to die"
    tokens = set(re.findall(r"TOKEN (\S+)", proc.stdout))
    pids = set(re.findall(r"PID ([0-9a-f]+)", proc.stdout))
    assert tokens and len(pids) == 3, proc.stdout + proc.stderr[-3000:]
    # The job's names: its segments and shm endpoint regions (named after the
    # token), and any random name of one of its processes.
    left = [n for n in os.listdir("/dev/shm") if n.startswith("blsfab-") and
            (any(t in n for t in tokens) or n.split("-")[1] in pids)]
    assert not left, f"{mode}: names left behind in /dev/shm: {left}"


def test_segment_rejects_bad_names_and_mismatched_layouts():
    seg = blsfab_core.SharedSegment.create(f"/blsfab-unit-{os.getpid()}", 0, 2, 4, 128)
    try:
        with pytest.raises(ValueError, match="disagree on ring sizes"):
            blsfab_core.SharedSegment.attach(seg.name, 0, 3, 4, 128)
        with pytest.raises(ValueError, match="rank 1's rings"):
            blsfab_core.SharedSegment.attach(seg.name, 1, 2, 4, 128)
        with pytest.raises(OSError, match="O_EXCL"):
            blsfab_core.SharedSegment.create(seg.name, 0, 2, 4, 128)
        peer = blsfab_core.SharedSegment.attach(seg.name, 0, 2, 4, 128)
        peer.publish(1, 6, b"abc")
        assert seg.landed(1, 6, 3) == b"abc" and seg.landed(1, 2, 3) is None
        seg.set_consumed(1, 7)
        assert peer.consumed(1) == 7
        peer.close()
    finally:
        seg.unlink()
        seg.close()
    assert not os.path.exists("/dev/shm" + seg.name)
    with pytest.raises(ValueError, match="name"):
        blsfab_core.SharedSegment.create("/../etc/x", 0, 1, 1, 64)
    with pytest.raises(ValueError, match="valid shared segment"):
        blsfab_core.SharedSegment.create("/blsfab-huge", 0, 1 << 30, 1 << 14, 1 << 40)
