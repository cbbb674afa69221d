"""Receive states and small pieces are reused from one iteration to the next:
records that cross size classes, chains longer than the spare lists, requests
dropped unwaited and views held across later chains must all still see exactly
their own bytes.
usage: check_recycling.py PROVIDER"""

import sys

import numpy as np

import blsfab
from common import expect, world

rank, size = world.rank, world.size
# Bytes per record, chosen around the piece size classes (64 B to 4 KiB).
SIZES = [1, 63, 64, 65, 128, 129, 4095, 4096, 4097, 0, 8, 2000]
comm = blsfab.Communicator(bound=1, slot_bytes=16384, provider=sys.argv[1], timeout=30)


def nbytes(it, src, dst):
    return SIZES[(it + src + 2 * dst) % len(SIZES)]


def payload(it, src, dst):
    n = nbytes(it, src, dst)
    return ((np.arange(n) + it * 131 + src * 31 + dst * 7) % 251).astype(np.uint8)


def issue(it):
    parts = [payload(it, rank, dst) for dst in range(size)]
    return comm.ialltoallv(np.concatenate(parts), [len(p) for p in parts])


def expected(it):
    return np.concatenate([payload(it, src, rank) for src in range(size)])


def check(it, data, how):
    want = expected(it)
    expect(np.array_equal(np.asarray(data), want),
           f"iteration {it} ({how}): received data differ from what was sent")


rng = np.random.default_rng(7)  # the same schedule on every rank
it = 0
kept = []    # (iteration, arrays of views() released long ago)
for round_ in range(40):
    length = int(rng.integers(1, 90))   # sometimes beyond the 64-call chain limit
    chained = bool(rng.integers(0, 4))
    first = it
    if chained:
        with comm.chain():
            reqs = [issue(first + k) for k in range(length)]
    else:
        reqs = [issue(first + k) for k in range(length)]
    it += length
    for k, req in enumerate(reqs):
        how = int(rng.integers(0, 4))
        if how == 0:
            check(first + k, req.wait(), "wait")
            expect(req.recvcounts == [nbytes(first + k, s, rank) for s in range(size)],
                   f"iteration {first + k}: recvcounts {req.recvcounts}")
        elif how == 1:
            out = np.empty(sum(nbytes(first + k, s, rank) for s in range(size)), np.uint8)
            expect(req.wait(out=out) is out, "wait(out=) returned another buffer")
            check(first + k, out, "out=")
        elif how == 2:
            # Arrays taken from views outlive release(): their memory must not
            # be handed to a later iteration.
            with req.views() as parts:
                kept.append((first + k, list(parts)))
        # else: dropped without waiting; its state is freed when it completes
    for kit, parts in kept:
        check(kit, np.concatenate(parts), "views kept past release()")
    kept = kept[-8:]

# views() gives its receive state and, once its arrays are gone, its pieces
# back to the engine for reuse, like wait() does; the spares stay bounded.
kept = None
for k in range(100):
    with issue(it).views() as parts:
        check(it, np.concatenate(parts), "views")
    it += 1
spare = comm.stats()["spare_bytes"]
expect(0 < spare <= 64 * 4096 + 7 * 64 * 4096, f"spare_bytes={spare} after 100 views() calls")
comm.close()
if rank == 0:
    print("OK recycling")
