"""A stale libfabric shm region whose name this process would get by default
(left by a killed process whose pid was reused) must not stop construction."""

import os

import numpy as np

import blsfab
from common import expect, world

# shm's default region name is "<pid>:<domain index>:<endpoint index>".
stale = [f"/dev/shm/{os.getpid()}:{d}:{e}" for d in range(4) for e in range(4)]
for path in stale:
    with open(path, "wb") as f:
        f.write(b"\0" * 4096)
try:
    with blsfab.Communicator(bound=1, slot_bytes=4096, provider="shm", local="fabric",
                             timeout=20) as comm:
        send = np.arange(4 * comm.size, dtype=np.int64) + 100 * comm.rank
        got = comm.alltoallv(send, [4] * comm.size)
        want = np.concatenate([np.arange(4 * comm.rank, 4 * comm.rank + 4) + 100 * r
                               for r in range(comm.size)])
        expect(np.array_equal(got, want), f"got {got}, want {want}")
finally:
    for path in stale:
        os.unlink(path)
print(f"rank {world.rank}: OK stale shm", flush=True)
