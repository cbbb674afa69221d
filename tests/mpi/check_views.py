"""Request.views(): no copy, slots held by live arrays, and what holding too many does.

usage: check_views.py LOCAL     (shared | fabric)
"""

import sys

import numpy as np

import blsfab
from common import expect, world

local = sys.argv[1]
rank, size = world.rank, world.size
peer = 1 - rank
N = 16384  # float32 per peer: 64 KiB records, read in place


def send_for(it):
    return (np.arange(N * size, dtype=np.float32) + it * 1e6 + rank * 1e5)


def want_from(src, it):
    return np.arange(N * rank, N * (rank + 1), dtype=np.float32) + it * 1e6 + src * 1e5


with blsfab.Communicator(bound=2, slot_bytes=1 << 18, provider="shm", local=local,
                         timeout=30) as comm:
    expect(comm.stats()["paths"][peer] == local, f"paths {comm.stats()['paths']}")
    # A view kept past release() keeps its contents while later iterations
    # (fewer than the ring holds) arrive: its slot is not recycled.
    req = comm.ialltoallv(send_for(0), [N] * size)
    with req.views() as parts:
        kept = parts[peer]
        expect(np.array_equal(kept, want_from(peer, 0)), "view contents")
        expect(not kept.flags.writeable, "view is writable")
    for it in range(1, 4):
        got = comm.ialltoallv(send_for(it), [N] * size).wait()
        expect(np.array_equal(got[peer * N:(peer + 1) * N], want_from(peer, it)), f"iteration {it}")
        expect(np.array_equal(kept, want_from(peer, 0)), f"kept view changed at iteration {it}")
    st = comm.stats()
    expect(st["in_place"] > 0, f"nothing was read in place: {st}")
    del kept, parts  # the slot goes back; the rings flow again
    # Our own part: copied by default, so changing sendbuf after views() leaves
    # it alone; lent with copy_self=False, and then it is sendbuf itself.
    # (The barrier keeps this rank from polling a peer's slot before it posts the
    # iteration: a message that arrives early is copied, and the iteration is then
    # assembled, own part included, before views() is called.)
    for copy_self in (True, False):
        send = send_for(50)
        world.Barrier()
        with comm.ialltoallv(send, [N] * size).views(copy_self=copy_self) as parts:
            own = parts[rank]
            expect(np.array_equal(own, want_from(rank, 50)), f"own part, copy_self={copy_self}")
            expect(np.shares_memory(own, send) == (not copy_self),
                   f"copy_self={copy_self}: own part shares sendbuf's memory: "
                   f"{np.shares_memory(own, send)}")
            expect(not own.flags.writeable, "own view is writable")
            send[rank * N] = -1.0
            expect((own[0] == -1.0) == (not copy_self), f"copy_self={copy_self}: own[0] {own[0]}")
        del send  # a lent view keeps the buffer alive
        expect(own[1] == want_from(rank, 50)[1], "own part after its sendbuf was dropped")
        del own, parts
    for it in range(4, 40):
        with comm.ialltoallv(send_for(it), [N] * size).views() as parts:
            expect(np.array_equal(parts[peer], want_from(peer, it)), f"views at iteration {it}")
    world.Barrier()

# A kept view holds its slot: with one-slot rings the next iteration cannot
# reuse it, so both ranks end in a TimeoutError naming the other (never a hang,
# never an overwrite), and the kept view still reads iteration 0, even after
# the communicator is closed.
comm = blsfab.Communicator(bound=0, ring_slots=1, slot_bytes=1 << 18, provider="shm",
                           local=local, timeout=3)
views = comm.ialltoallv(send_for(0), [N] * size).views()
kept = views[peer]
views.release()
try:
    comm.ialltoallv(send_for(1), [N] * size).wait()
    expect(False, "a slot held by a live view was reused")
except blsfab.TimeoutError as exc:
    expect(exc.ranks == [peer], f"TimeoutError names {exc.ranks}, not [{peer}]: {exc}")
expect(np.array_equal(kept, want_from(peer, 0)), "a kept view was overwritten")
comm.engine.close()
expect(np.array_equal(kept, want_from(peer, 0)), "a kept view changed at close")
if rank == 0:
    print(f"OK views local={local}")
