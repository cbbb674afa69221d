"""The failure model of a post. usage: check_failure.py PROVIDER MODE

MODE "unsent" (2 ranks): rank 1 stops polling and rank 0, with one-slot
rings, times out waiting for a credit before any write left. The
communicator stays usable: the iteration is not consumed, and once rank 1
is back the retry and later iterations verify.

MODE "partial" (3 ranks): rank 0 writes iteration 1 to rank 1, then times
out on rank 2, which stopped polling. Its communicator is broken: every
later call raises BrokenError naming the timeout and iteration 1, and
close() still works. Rank 1 times out before its first write of
iteration 1 (it writes to rank 2 first), so it stays usable.
"""

import sys
import time

import numpy as np

import blsfab
from common import expect, world

provider, mode = sys.argv[1], sys.argv[2]
rank, size = world.rank, world.size
comm = blsfab.Communicator(bound=8, ring_slots=1, slot_bytes=4096, provider=provider,
                           timeout=1.5)


def message(it):
    return (np.arange(size * 3, dtype=np.int64) + 1000 * it + 100000 * rank)


def expected(it):
    return np.concatenate([np.arange(3 * rank, 3 * rank + 3) + 1000 * it + 100000 * s
                           for s in range(size)])


stalled = size - 1
# The stalled rank posts first, so the credits in its headers are all 0.
if rank == stalled:
    reqs = [comm.ialltoallv(message(0), [3] * size)]
world.Barrier()
if rank != stalled:
    reqs = [comm.ialltoallv(message(0), [3] * size)]
world.Barrier()
if rank == stalled:
    time.sleep(4.0)  # no polling: its rings stay full
elif mode == "unsent" or rank == 1:
    try:
        comm.ialltoallv(message(1), [3] * size)
    except blsfab.TimeoutError as e:
        expect(not isinstance(e, blsfab.BrokenError), repr(e))
        expect(stalled in e.ranks, f"timeout names {e.ranks}, not rank {stalled}")
    else:
        expect(False, "post into a full ring did not time out")
    expect(comm.iteration == 1, f"iteration advanced to {comm.iteration}")
    expect(not comm.engine.broken, "a post that sent nothing broke the communicator")
    comm.progress()  # still usable
else:
    try:
        comm.ialltoallv(message(1), [3] * size)
    except blsfab.TimeoutError as e:
        first = e
    else:
        expect(False, "partial post did not time out")
    for call in (lambda: comm.ialltoallv(message(1), [3] * size), comm.progress,
                 lambda: comm.engine.wait_heard(0, 1.0), lambda: reqs[0].wait(1.0)):
        try:
            call()
        except blsfab.BrokenError as e:
            expect(e.cause is first, f"cause {e.cause!r} is not the timeout {first!r}")
            expect(e.iteration == 1, f"iteration {e.iteration}")
            expect("iteration 1" in str(e) and "broken" in str(e), str(e))
        else:
            expect(False, "a broken communicator accepted a call")
world.Barrier()
if mode == "unsent":
    for it in range(1, 20):
        reqs.append(comm.ialltoallv(message(it), [3] * size))
    for it, req in enumerate(reqs):
        out = req.wait(20)
        expect(np.array_equal(out, expected(it)), f"iteration {it}: {out}")
    print(f"rank {rank}: OK unsent", flush=True)
comm.close()  # idempotent; on the broken rank it freed everything above
if mode == "partial" and rank == 0:
    try:
        comm.progress()
    except blsfab.ClosedError:
        print("OK broken", flush=True)
