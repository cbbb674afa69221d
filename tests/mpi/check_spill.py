"""Spill-path liveness. usage: check_spill.py PROVIDER

3 ranks, one-slot rings, 32 KiB messages (read in place when awaited).
Rank 0 handles rank 1's WANT (count 1) before rank 1's slot lands: the
order this test forces with the engine's test hook. Rank 2 keeps polling but
posts late, so rank 0's iteration 0 cannot complete. If rank 0 held rank
1's slot in place, rank 1's next post would wait for a credit that comes
only after rank 2 posts; its real WANT repeats the same count, so nothing
would free the slot and rank 1 would time out.
"""

import sys
import time

import numpy as np

import blsfab
from blsfab import _core
from common import expect, world

rank, size = world.rank, world.size
expect(size == 3, "run with 3 ranks")
n = 4096  # int64 elements: 32 KiB per peer
comm = blsfab.Communicator(bound=4, ring_slots=1, slot_bytes=64 << 10, provider=sys.argv[1],
                           timeout=2.5)


def message(it):
    return np.arange(size * n, dtype=np.int64) + (it * 8 + rank) * (1 << 32)


def expected(it):
    return np.concatenate([np.arange(rank * n, rank * n + n) + (it * 8 + s) * (1 << 32)
                           for s in range(size)])


reqs = []
if rank == 0:
    reqs.append(comm.ialltoallv(message(0), [n] * size))
    comm.engine._handle_notification(_core.imm_encode(1, 1, 1) | _core.IMM_WANT)
world.Barrier()
if rank == 1:
    for it in range(2):
        reqs.append(comm.ialltoallv(message(it), [n] * size))  # times out if held
elif rank == 2:
    t_end = time.monotonic() + 4.0
    while time.monotonic() < t_end:
        comm.progress()
    for it in range(2):
        reqs.append(comm.ialltoallv(message(it), [n] * size))
else:
    reqs.append(comm.ialltoallv(message(1), [n] * size))
for it, req in enumerate(reqs):
    out = req.wait(20)
    expect(np.array_equal(out, expected(it)), f"iteration {it} wrong")
comm.close()
if rank == 0:
    print("OK spill")
