"""Worker: Communicator.heard() and the DLRM server's BLS.peers_waiting() see a
peer's post before this rank posts the same iteration, and stop seeing one once
it has. Run under mpirun with 3 ranks; argv[1] is the provider."""

import os
import sys
import time

import numpy as np
from mpi4py import MPI

from common import expect, world

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from dlrm_adapter.backends import BLS  # noqa: E402

provider = sys.argv[1]
backend = BLS(world, bound=2, slot_bytes=4096, provider=provider, timeout=5.0)
comm = backend.comm
rank, size = comm.rank, comm.size
send = np.full(size, rank, dtype=np.int64)
counts = [1] * size


def poll_until(cond, what, seconds=5.0):
    """Progress (the Ibarrier and blsfab) until ``cond()``; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not cond():
        comm.progress()
        expect(time.monotonic() < deadline, f"{what}: not within {seconds} s")


expect(comm.heard() == [0] * size, f"before any post, heard() is {comm.heard()}")
expect(not backend.peers_waiting(), "peers_waiting() before any post")
world.Barrier()
if rank == 0:
    first = comm.ialltoallv(send, counts)  # within the bound: returns at once
    expect(comm.heard()[0] == 1, f"own entry after one post: {comm.heard()}")
    expect(not backend.peers_waiting(), "rank 0 is ahead, nobody waits for it")
else:
    poll_until(lambda: comm.heard()[0] >= 1, "rank 0's post seen here")
    expect(comm.iteration == 0, "this rank has posted nothing yet")
    expect(backend.peers_waiting(), f"rank 0 waits for this rank; heard() {comm.heard()}")
# Everyone has looked; now the others post too.
done = world.Ibarrier()
poll_until(done.Test, "the barrier")
if rank != 0:
    first = comm.ialltoallv(send, counts)
got = first.wait()
expect(np.array_equal(got, np.arange(size, dtype=np.int64)), f"data {got}")
poll_until(lambda: min(comm.heard()) == 1, "every rank's post seen here")
expect(not backend.peers_waiting(), f"all at iteration 1, nobody waits: {comm.heard()}")
backend.close()
print(f"rank {rank}: ok")
