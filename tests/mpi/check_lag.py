"""Bounded lag under a randomly sleeping rank, with every element verified.

usage: check_lag.py PROVIDER BOUND ITERS [RING_SLOTS]

The last rank sleeps 0-5 ms in a third of the iterations. Element k of the
message from s to d in iteration i is encode(i, s, d, k), checked on receipt.
The bound is checked twice: by the engine's own lead counter, and from the
outside, since when ialltoallv(i) returns iteration i - bound must be complete.
"""

import random
import sys
import time

import numpy as np

import blsfab
from common import expect, world

provider, bound, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ring_slots = int(sys.argv[4]) if len(sys.argv) > 4 else None
rank, size = world.rank, world.size
slow = size - 1


def encode(it, src, dst, k):
    return ((it * 64 + src) * 64 + dst) * 4096 + k


def counts_of(it, src):
    return [(it * 7 + src * 3 + dst * 5) % 37 for dst in range(size)]


rng = random.Random(1234 + rank)
comm = blsfab.Communicator(bound=bound, slot_bytes=1 << 12, provider=provider, timeout=60,
                           ring_slots=ring_slots)
pending = {}
early_seen = 0
for it in range(iters):
    counts = counts_of(it, rank)
    parts = [encode(it, rank, d, np.arange(counts[d], dtype=np.int64)) for d in range(size)]
    buf = np.concatenate(parts)
    if rank == slow and rng.random() < 1 / 3:
        time.sleep(rng.uniform(0, 0.005))
    pending[it] = comm.ialltoallv(buf, counts)
    if it - bound >= 0 and it - bound in pending:
        expect(pending[it - bound].test(),
               f"iteration {it - bound} incomplete after ialltoallv({it}) returned (bound {bound})")
    if not pending[it].test():
        early_seen += 1  # this rank is ahead of someone right now
    # Consume in FIFO order, keeping at most bound + 1 outstanding.
    while len(pending) > bound + 1 or (pending and it == iters - 1):
        old = min(pending)
        req = pending.pop(old)
        out = req.wait()
        expect(req.recvcounts == [counts_of(old, s)[rank] for s in range(size)],
               f"iteration {old}: recvcounts {req.recvcounts}")
        want = np.concatenate([encode(old, s, rank, np.arange(counts_of(old, s)[rank],
                                                               dtype=np.int64))
                               for s in range(size)])
        expect(np.array_equal(out, want), f"iteration {old}: corrupt or misplaced data")
st = comm.stats()
comm.close()
leads = world.gather((st["max_lead"], st["mean_lead"], st["blocked_posts"]), root=0)
expect(st["max_lead"] <= bound, f"max_lead {st['max_lead']} exceeds bound {bound}")
if rank == 0:
    fast_max = max(l[0] for r, l in enumerate(leads) if r != slow)
    if bound >= 1:
        expect(fast_max > 0, f"fast ranks never ran ahead (leads {leads}); engine is synchronous")
    print(f"OK lag bound={bound} iters={iters} leads={leads}")
