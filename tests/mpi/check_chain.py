"""Chaining: mixed sizes, chains that overflow a slot, exceptions inside a chain.
usage: check_chain.py PROVIDER"""

import sys

import numpy as np

import blsfab
from common import expect, reference_alltoallv, world

rank, size = world.rank, world.size
SLOT = 4096
comm = blsfab.Communicator(bound=2, slot_bytes=SLOT, provider=sys.argv[1], timeout=30,
                          chain_threshold=256)
rng = np.random.default_rng(rank)

# 1. Mixed sizes in one chain: some under the small-message threshold, some over,
#    together far more than one slot per peer, so the chain splits over slots.
sizes = [1, 900, 3, 1000, 0, 17, 1000, 1000, 2, 5]   # float32 elements per peer
inputs = []
for n in sizes:
    counts = [n] * size
    inputs.append((rng.standard_normal(n * size).astype(np.float32), counts))
refs = [reference_alltoallv(buf, counts) for buf, counts in inputs]
world.Barrier()
puts0 = comm.stats()["puts"]
with comm.chain():
    reqs = [comm.ialltoallv(buf, counts) for buf, counts in inputs]
    expect(comm.stats()["puts"] == puts0, "a chained call was posted before the block ended")
    try:
        reqs[0].test()
    except RuntimeError as e:
        expect("chain" in str(e), str(e))
    else:
        expect(False, "test() inside an open chain did not raise")
for req, (ref, refcounts), (buf, _) in zip(reqs, refs, inputs):
    out = req.wait()
    expect(req.recvcounts == refcounts, f"recvcounts {req.recvcounts} != {refcounts}")
    expect(np.array_equal(out.view(np.uint32), ref.view(np.uint32)), "chained data differ")
puts = comm.stats()["puts"] - puts0
total = sum(8 + ((4 * n + 7) // 8) * 8 for n in sizes)  # record bytes per peer
expect(puts < (size - 1) * len(sizes), f"chain did not combine: {puts} writes")
expect(puts >= (size - 1) * -(-total // SLOT), f"chain over {total} B used only {puts} writes")

# 2. An exception inside the block: calls before it are posted, and the
#    communicator stays usable.
good = np.arange(4 * size, dtype=np.float32) + 100 * rank
try:
    with comm.chain():
        r1 = comm.ialltoallv(good, [4] * size)
        comm.ialltoallv(good, [-1] * size)        # ValueError, nothing issued
except ValueError:
    pass
else:
    expect(False, "bad counts inside a chain did not raise")
out = r1.wait()
expect(np.array_equal(out, np.concatenate([np.arange(4 * rank, 4 * rank + 4) + 100 * s
                                           for s in range(size)]).astype(np.float32)),
       "request issued before the exception lost its data")
try:
    with comm.chain():
        r2 = comm.ialltoallv(good, [4] * size)
        raise KeyError("user error")
except KeyError:
    pass
expect(np.array_equal(r2.wait(), out), "request before a user exception lost its data")
expect(np.array_equal(comm.alltoallv(good, [4] * size), out), "communicator unusable after chain error")

# 3. One message larger than a slot is refused before anything is sent.
before = comm.stats()["puts"]
try:
    with comm.chain():
        comm.ialltoallv(np.zeros(2000 * size, np.float32), [2000] * size)
except ValueError as e:
    expect("slot_bytes" in str(e), str(e))
else:
    expect(False, "oversized message accepted in a chain")
expect(comm.stats()["puts"] == before, "something was sent for a refused chain")

# 4. Long chains (beyond the internal chain limit) still work.
with comm.chain():
    many = [comm.ialltoallv(good, [4] * size) for _ in range(150)]
for r in many:
    expect(np.array_equal(r.wait(), out), "long chain data differ")
expect(comm.stats()["max_lead"] <= 2, f"lead {comm.stats()['max_lead']} > bound")
comm.close()
if rank == 0:
    print("OK chain")
