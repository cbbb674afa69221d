"""Bounded lag under a randomly sleeping rank, with every element verified.

usage: check_lag.py PROVIDER BOUND ITERS [RING_SLOTS|-] [chain|-] [SCALE]

The last rank sleeps 0-5 ms in a third of the iterations. Element k of the
message from s to d in iteration i is encode(i, s, d, k), checked on receipt.
The bound is checked twice: by the engine's own lead counter, and from the
outside, since when ialltoallv(i) returns iteration i - bound must be complete.
"""

import contextlib
import random
import sys
import time

import numpy as np

import blsfab
from common import check_paths, expect, receive, scribble, world

provider, bound, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ring_slots = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] != "-" else None
chained = len(sys.argv) > 5 and sys.argv[5] == "chain"  # post iterations in pairs
scale = int(sys.argv[6]) if len(sys.argv) > 6 else 1     # message size multiplier
rank, size = world.rank, world.size
slow = size - 1


def encode(it, src, dst, k):
    return ((it * 64 + src) * 64 + dst) * 262144 + k


def counts_of(it, src):
    return [((it * 7 + src * 3 + dst * 5) % 37) * scale for dst in range(size)]


rng = random.Random(1234 + rank)
comm = blsfab.Communicator(bound=bound, slot_bytes=(1 << 12) * scale, provider=provider, timeout=60,
                           ring_slots=ring_slots)
pending = {}
sent = {}  # send buffers, scribbled over once their request completes
group = 2 if chained else 1
for first in range(0, iters, group):
    its = range(first, min(first + group, iters))
    bufs = []
    for it in its:
        counts = counts_of(it, rank)
        bufs.append((np.concatenate([encode(it, rank, d, np.arange(counts[d], dtype=np.int64))
                                     for d in range(size)]), counts))
    if rank == slow and rng.random() < 1 / 3:
        time.sleep(rng.uniform(0, 0.005))
    with comm.chain() if chained else contextlib.nullcontext():
        for it, (buf, counts) in zip(its, bufs):
            pending[it] = comm.ialltoallv(buf, counts)
            sent[it] = buf
    last = its[-1]
    # Outside view of the bound: iteration last - bound must be complete now.
    if last - bound in pending:
        expect(pending[last - bound].test(),
               f"iteration {last - bound} incomplete after ialltoallv({last}) returned (bound {bound})")
    # Consume in FIFO order, keeping at most bound + 1 outstanding.
    while len(pending) > bound + 1 or (pending and last == iters - 1):
        old = min(pending)
        req = pending.pop(old)
        out = receive(req, sum(counts_of(old, s)[rank] for s in range(size)), sent[old])
        scribble(sent.pop(old))
        expect(req.recvcounts == [counts_of(old, s)[rank] for s in range(size)],
               f"iteration {old}: recvcounts {req.recvcounts}")
        want = np.concatenate([encode(old, s, rank, np.arange(counts_of(old, s)[rank],
                                                               dtype=np.int64))
                               for s in range(size)])
        expect(np.array_equal(out, want), f"iteration {old}: corrupt or misplaced data")
st = comm.stats()
check_paths(st)
comm.close()
leads = world.gather((st["max_lead"], st["mean_lead"], st["blocked_posts"]), root=0)
paths = world.gather((st["in_place"], st["spilled"]), root=0)
expect(st["max_lead"] <= bound, f"max_lead {st['max_lead']} exceeds bound {bound}")
if rank == 0:
    fast_max = max(l[0] for r, l in enumerate(leads) if r != slow)
    if bound >= 1:
        expect(fast_max > 0, f"fast ranks never ran ahead (leads {leads}); engine is synchronous")
    print(f"OK lag bound={bound} iters={iters} leads={leads} in_place,spilled={paths}")
