"""Forged notifications from a hostile peer. usage: check_forged.py PROVIDER poll|thread

Rank 1 sends rank 0 real bare notifications (fi_inject_writedata) carrying
values an honest peer never sends. Each must end in a protocol error that
names rank 1, and leave rank 0's communicator broken rather than corrupt;
with progress="thread" the progress thread finds it and the next call
raises it as BrokenError.
"""

import sys
import time

import numpy as np

import blsfab
from blsfab import _core
from common import expect, world

provider, progress = sys.argv[1], sys.argv[2]
rank, size = world.rank, world.size
CREDIT, DATA = 1, 0
CASES = [
    ("credit beyond what was sent", _core.imm_encode(CREDIT, 1, 50), "reported consuming 50"),
    ("WANT beyond what was sent", _core.imm_encode(CREDIT, 1, 40) | _core.IMM_WANT,
     "asked for a credit of 40"),
    ("data in a slot never written", _core.imm_encode(DATA, 1, 1), "header check"),
    ("a rank outside the job", _core.imm_encode(DATA, 7, 0), "rank 7, which is not a peer"),
]
base = blsfab.Communicator(bound=1, slot_bytes=4096, provider=provider, timeout=10,
                           progress=progress)
buf = np.arange(2 * size, dtype=np.int32) + 100 * rank
for name, imm, words in CASES:
    comm = base.dup()
    out = comm.alltoallv(buf, [2] * size)
    expect(np.array_equal(out, np.concatenate([[2 * rank + 100 * s, 2 * rank + 1 + 100 * s]
                                               for s in range(size)])), f"{name}: {out}")
    world.Barrier()
    if rank == 1:
        comm.engine._send_notification(0, imm)
    else:
        deadline = time.monotonic() + 10
        first = None
        while first is None and time.monotonic() < deadline:
            try:
                if progress == "thread":
                    time.sleep(0.05)  # the thread polls; this call only reports
                comm.progress()
            except blsfab.BrokenError as e:
                expect(progress == "thread", f"{name}: BrokenError before the error itself")
                first = e.cause
            except blsfab.FabricError as e:
                first = e
        expect(first is not None, f"{name}: the forgery went unnoticed")
        text = str(first)
        expect("protocol error" in text and words in text, f"{name}: {text}")
        expect("rank 1" in text or "rank 7" in text, f"{name}: names no rank: {text}")
        for call in (comm.progress, lambda: comm.alltoallv(buf, [2] * size)):
            try:
                call()
            except blsfab.BrokenError as e:
                expect(words in str(e), f"{name}: BrokenError lacks the cause: {e}")
            else:
                expect(False, f"{name}: broken communicator accepted a call")
    world.Barrier()
    comm.close()
base.close()
if rank == 0:
    print(f"OK forged {progress}")
