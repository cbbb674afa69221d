"""Every bad input raises its documented error, sends nothing, and the next
valid call still succeeds. usage: check_errors.py PROVIDER"""

import sys

import numpy as np
import torch

import blsfab
from common import expect, world

rank, size = world.rank, world.size
comm = blsfab.Communicator(bound=1, slot_bytes=1024, provider=sys.argv[1], timeout=30)
good = np.arange(size * 2, dtype=np.float32)
good_counts = [2] * size

BAD = [
    ("wrong length", good, [2] * (size + 1), ValueError, "one per rank"),
    ("negative", good, [-1] + [1] * (size - 1), ValueError, "sendcounts[0] = -1"),
    ("overrun", good, [3] * size, ValueError, "sendbuf holds only"),
    ("strided", np.arange(size * 4, dtype=np.float32)[::2], good_counts, ValueError, "contiguous"),
    ("2-D", good.reshape(size, 2), good_counts, ValueError, "1-D"),
    ("object dtype", np.array([object()] * (2 * size)), good_counts, TypeError, "dtype"),
    ("list buffer", list(range(2 * size)), good_counts, TypeError, "numpy.ndarray"),
    ("strided tensor", torch.arange(size * 4.0)[::2], good_counts, ValueError, "contiguous"),
    ("meta tensor", torch.empty(2 * size, device="meta"), good_counts, ValueError, "CPU"),
    ("too big", np.zeros(size * 300, dtype=np.float32), [300] * size, ValueError,
     "slot_bytes=1024"),
    ("counts not a sequence", good, 5, TypeError, "sendcounts"),
]
for name, buf, counts, exc, words in BAD:
    before = comm.iteration
    try:
        comm.ialltoallv(buf, counts)
    except exc as e:
        expect(words in str(e), f"{name}: message {e!r} lacks {words!r}")
    else:
        expect(False, f"{name}: no {exc.__name__}")
    expect(comm.iteration == before, f"{name}: iteration advanced, something was issued")
    # and the communicator still works
    out = comm.alltoallv(good, good_counts)
    expect(np.array_equal(out, np.concatenate([good[2 * rank: 2 * rank + 2]] * size)),
           f"after {name}: wrong data")
expect(comm.stats()["puts"] == (size - 1) * len(BAD), f"puts {comm.stats()['puts']}")

# the message names both numbers and the option
try:
    comm.ialltoallv(np.zeros(size * 300, dtype=np.float32), [300] * size)
except ValueError as e:
    expect("1200 bytes" in str(e) and "slot_bytes" in str(e), str(e))

comm.close()
comm.close()  # idempotent
try:
    comm.ialltoallv(good, good_counts)
except blsfab.ClosedError as e:
    expect("closed" in str(e), str(e))
else:
    expect(False, "closed communicator accepted a call")
try:
    comm.stats()
except blsfab.ClosedError:
    pass
else:
    expect(False, "closed communicator gave stats")

for kwargs, words in [({"bound": -1}, "bound=-1"), ({"slot_bytes": 8}, "slot_bytes=8"),
                      ({"timeout": 0}, "timeout=0"), ({"provider": "nonesuch"}, "nonesuch")]:
    try:
        blsfab.Communicator(**kwargs)
    except ValueError as e:
        expect(words in str(e), f"{kwargs}: {e}")
    else:
        expect(False, f"{kwargs} accepted")

# Ranks that disagree on the provider all get the error.
try:
    blsfab.Communicator(provider="shm" if rank == 0 else "tcp")
except ValueError as e:
    expect("disagree" in str(e), str(e))
else:
    expect(False, "provider mismatch accepted")
if rank == 0:
    print("OK errors")
