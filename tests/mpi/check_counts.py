"""Counts are integral and range-checked before anything is sent; byte sizes
never wrap. usage: check_counts.py PROVIDER"""

import sys

import numpy as np

import blsfab
from common import expect, world

rank, size = world.rank, world.size
comm = blsfab.Communicator(bound=1, slot_bytes=1024, provider=sys.argv[1], timeout=30)
buf = np.arange(64 * size, dtype=np.int64) + 1000 * rank
P = size
BAD = [
    # c * 8 wraps to 512 and the total wraps negative: must not leak heap
    ("wrapping byte size", [2**61 + 64, 3 * 2**61 + 64] + [0] * (P - 2), ValueError,
     f"sendcounts[0] = {2**61 + 64}"),
    ("second count wraps", [1, 2**61 + 64] + [0] * (P - 2), ValueError,
     f"sendcounts[1] = {2**61 + 64}"),
    ("2**63", [2**63] + [0] * (P - 1), ValueError, f"sendcounts[0] = {2**63}"),
    ("2**64 - 1 as uint64", np.array([2**64 - 1] + [0] * (P - 1), dtype=np.uint64), ValueError,
     "sendcounts[0]"),
    ("huge numpy scalar", [np.uint64(2**64 - 1)] + [0] * (P - 1), ValueError, "sendcounts[0]"),
    ("float", [1.5] * P, TypeError, "sendcounts[0] = 1.5"),
    ("integral float", [4.0] * P, TypeError, "sendcounts[0] = 4.0"),
    ("float array", np.array([4.0] * P), TypeError, "float64"),
    ("bool", [True] * P, TypeError, "sendcounts[0] = True"),
    ("bool array", np.array([True] * P), TypeError, "bool"),
    ("string", ["4"] * P, TypeError, "sendcounts[0] = '4'"),
    ("None", [1] * (P - 1) + [None], TypeError, f"sendcounts[{P - 1}] = None"),
    ("2-D array", np.ones((P, 1), dtype=np.int64), ValueError, "1-D"),
    ("larger than a slot", [0] * (P - 1) + [200], ValueError,
     f"sendcounts[{P - 1}] = 200"),
    ("negative int", [-1] + [0] * (P - 1), ValueError, "sendcounts[0] = -1"),
    ("negative numpy", np.array([-3] + [0] * (P - 1), dtype=np.int32), ValueError,
     "sendcounts[0] = -3"),
]
for name, counts, exc, words in BAD:
    before, puts = comm.iteration, comm.stats()["puts"]
    try:
        comm.ialltoallv(buf, counts)
    except exc as e:
        expect(words in str(e), f"{name}: message {e!r} lacks {words!r}")
    except Exception as e:  # noqa: BLE001
        expect(False, f"{name}: {type(e).__name__} {e} instead of {exc.__name__}")
    else:
        expect(False, f"{name}: accepted")
    expect(comm.iteration == before and comm.stats()["puts"] == puts,
           f"{name}: something was issued")

# Every integral form that is valid is accepted and exchanges the same data.
expected = np.concatenate([np.arange(3) + 3 * rank + 1000 * r for r in range(size)])
GOOD = [[3] * P, tuple([3] * P), np.full(P, 3, dtype=np.int64), np.full(P, 3, dtype=np.int32),
        np.full(P, 3, dtype=np.uint16), np.full(2 * P, 3, dtype=np.int64)[::2],
        np.full(P, 3, dtype=">i8"), [np.int64(3)] * P, [np.uint8(3)] * P]
for counts in GOOD:
    out = comm.alltoallv(buf, counts)
    expect(np.array_equal(out, expected), f"{counts!r}: wrong data {out}")
comm.close()
if rank == 0:
    print("OK counts")
