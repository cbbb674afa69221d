"""Shared pieces of the worker scripts that tests run under mpirun."""

import sys

import numpy as np
from mpi4py import MPI

world = MPI.COMM_WORLD


def fail(msg):
    print(f"rank {world.rank}: FAIL: {msg}", file=sys.stderr, flush=True)
    world.Abort(1)


def expect(cond, msg):
    if not cond:
        fail(msg)


def reference_alltoallv(sendbuf, sendcounts, comm=world):
    """MPI_Alltoallv on the same input, for comparison (numpy, byte-wise)."""
    size = comm.size
    item = sendbuf.itemsize
    raw = np.ascontiguousarray(sendbuf).view(np.uint8)
    scounts = np.asarray(sendcounts, dtype=np.int64) * item
    rcounts = np.empty(size, dtype=np.int64)
    comm.Alltoall(scounts, rcounts)
    sdispl = np.concatenate([[0], np.cumsum(scounts)[:-1]])
    rdispl = np.concatenate([[0], np.cumsum(rcounts)[:-1]])
    out = np.empty(int(rcounts.sum()), dtype=np.uint8)
    comm.Alltoallv([raw, (scounts, sdispl), MPI.BYTE], [out, (rcounts, rdispl), MPI.BYTE])
    return out, (rcounts // item).tolist()
