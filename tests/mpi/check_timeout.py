"""A wait on a rank that never posts raises blsfab.TimeoutError naming it.
usage: check_timeout.py PROVIDER"""

import sys
import time

import numpy as np

import blsfab
from common import expect, world

rank, size = world.rank, world.size
silent = size - 1
comm = blsfab.Communicator(bound=1, slot_bytes=4096, provider=sys.argv[1], timeout=20)
buf = np.arange(size, dtype=np.int64) + 10 * rank
if rank != silent:
    req = comm.ialltoallv(buf, [1] * size)  # bound 1: iteration 0 does not block
    t0 = time.monotonic()
    try:
        req.wait(timeout=1.0)
    except blsfab.TimeoutError as e:
        took = time.monotonic() - t0
        expect(0.9 < took < 5, f"timeout after {took:.2f} s")
        expect(e.ranks == [silent], f"ranks {e.ranks}")
        expect(f"[{silent}]" in str(e) and "iteration 0" in str(e), str(e))
        expect(isinstance(e, TimeoutError), "not a builtin TimeoutError")
    else:
        expect(False, "no timeout")
    # The bound wait times out the same way and names the silent rank.
    try:
        comm.engine.wait_heard(1, 0.5)
    except blsfab.TimeoutError as e:
        expect(e.ranks == [silent], f"bound wait ranks {e.ranks}")
    else:
        expect(False, "no bound timeout")
# Now the silent rank speaks and everything completes normally.
world.Barrier()
if rank == silent:
    req = comm.ialltoallv(buf, [1] * size)
out = req.wait(timeout=20)
expect(np.array_equal(out, np.arange(size) * 10 + rank), f"data {out}")
comm.close()
if rank == 0:
    print("OK timeout")
