"""A dtype mismatch across ranks is an error naming the rank and both
dtypes, never reinterpreted data. usage: check_dtype.py PROVIDER"""

import sys

import numpy as np

import blsfab
from common import expect, world

rank, size = world.rank, world.size
comm = blsfab.Communicator(bound=1, slot_bytes=4096, provider=sys.argv[1], timeout=20)
# Same byte counts, different element types: only the header tells them apart.
if rank == 0:
    buf, counts = np.arange(2 * size, dtype=np.float64), [2] * size
else:
    buf, counts = np.arange(4 * size, dtype=np.float32), [4] * size
req = comm.ialltoallv(buf, counts)
try:
    req.wait()
except TypeError as e:
    mine, theirs = ("float64", "float32") if rank == 0 else ("float32", "float64")
    other = 1 if rank == 0 else 0
    expect(f"rank {other} sent {theirs}" in str(e) and mine in str(e), str(e))
else:
    expect(False, "dtype mismatch accepted")
# The exchange itself was sound, so the communicator goes on.
good = np.arange(2 * size, dtype=np.float64) + 10 * rank
out = comm.alltoallv(good, [2] * size)
expect(np.array_equal(out, np.concatenate([good[2 * rank:2 * rank + 2] - 10 * rank + 10 * s
                                           for s in range(size)])), f"{out}")
comm.close()
if rank == 0:
    print("OK dtype")
