"""wait(out=...): validation, size mismatch, and every moment out can be given.

usage: check_out.py PROVIDER
"""

import sys

import numpy as np
import torch

import blsfab
from common import expect, world

provider = sys.argv[1]
rank, size = world.rank, world.size


def raises(exc, fn, text):
    try:
        fn()
    except exc as e:
        expect(text in str(e), f"{exc.__name__} without {text!r}: {e}")
        return
    fail_msg = f"expected {exc.__name__} ({text})"
    expect(False, fail_msg)


with blsfab.Communicator(bound=2, slot_bytes=1 << 16, provider=provider, timeout=30) as comm:
    for n in (3, 5000):  # small (assembled by the Request) and large (by the engine)
        send = np.arange(n * size, dtype=np.float32) + 1000 * rank
        want = np.concatenate([np.arange(n * rank, n * (rank + 1), dtype=np.float32) + 1000 * s
                               for s in range(size)])

        req = comm.ialltoallv(send, [n] * size)
        raises(TypeError, lambda: req.wait(out=np.empty(n * size, np.float64)), "dtype")
        raises(ValueError, lambda: req.wait(out=np.empty((n * size, 2), np.float32)[:, 0]),
               "contiguous")
        ro = np.empty(n * size, np.float32)
        ro.flags.writeable = False
        raises(ValueError, lambda: req.wait(out=ro), "read-only")
        raises(TypeError, lambda: req.wait(out=torch.empty(n * size)), "numpy.ndarray")
        # A wrong size still completes the request; wait() then returns the data.
        raises(ValueError, lambda: req.wait(out=np.empty(n * size + 1, np.float32)), "received")
        expect(np.array_equal(req.wait(), want), "data after a size mismatch")

        # Any shape with the right element count; complete before out is given.
        req = comm.ialltoallv(send, [n] * size)
        while not req.test():
            pass
        grid = np.zeros((size, n), np.float32)
        expect(req.wait(out=grid) is grid, "out not returned")
        expect(np.array_equal(grid.ravel(), want), "out given after completion")

        # Torch in, torch out.
        req = comm.ialltoallv(torch.from_numpy(send).to(torch.bfloat16), [n] * size)
        tout = torch.empty(n * size, dtype=torch.bfloat16)
        expect(req.wait(out=tout) is tout, "tensor out not returned")
        expect(torch.equal(tout, torch.from_numpy(want).to(torch.bfloat16)), "tensor out data")
if rank == 0:
    print(f"OK out provider={provider}")
