"""Node-local shared rings: set-up, ordered exchange, and clean-up when a rank dies.

usage: check_node_local.py MODE
  exchange      every rank streams checked slots to every other through the
                shared rings (more slots than the ring holds, so credits wrap)
  kill-running  as exchange, but rank 1 is killed (SIGKILL) mid-run
  kill-setup    rank 1 is killed after creating its segment, before the others map it
  kill-communicator  a Communicator on the node-local path; rank 1 is killed mid-run
  kill-construction  a Communicator on the shm provider; rank 1 is killed in construction
"""

import json
import os
import signal
import sys

import numpy as np

from blsfab.bootstrap import MPIBootstrap
from blsfab.node_local import establish
from common import expect, world

mode = sys.argv[1]
rank, size = world.rank, world.size
print(f"PID {os.getpid():x}", flush=True)  # a random shm name starts with its owner's pid
RING_SLOTS, SLOT_BYTES, ROUNDS = 4, 4096, 200


class DyingBootstrap(MPIBootstrap):
    """Rank 1 dies at its first barrier: its segment exists, nobody has mapped it.
    Every rank names the job's token first (the first allgather carries it)."""

    token = None

    def allgather(self, payload, *args, **kwargs):
        gathered = super().allgather(payload, *args, **kwargs)
        if self.token is None:
            self.token = gathered[0].decode()
            print(f"TOKEN {self.token}", flush=True)
        return gathered

    def barrier(self, progress, timeout):
        if self.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        super().barrier(progress, timeout)


class DyingInConstruction(MPIBootstrap):
    """Rank 1 dies in a Communicator's last construction step: every shm
    endpoint region exists and none is unlinked yet."""

    steps = 0

    def allgather(self, payload, *args, **kwargs):
        self.steps += 1
        if self.steps == 3 and self.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        gathered = super().allgather(payload, *args, **kwargs)
        if self.steps == 1:  # the hello carries rank 0's job token
            print(f"TOKEN {json.loads(gathered[0][1:])['token']}", flush=True)  # after the OK byte
        return gathered


if mode == "kill-construction":
    import blsfab
    blsfab.Communicator(bound=2, slot_bytes=1 << 16, provider="shm", local="fabric",
                        timeout=30, bootstrap=DyingInConstruction())
    expect(False, "construction should have failed with rank 1")

if mode == "kill-communicator":
    # A whole node-local Communicator; rank 1 dies mid-run.
    import blsfab
    comm = blsfab.Communicator(bound=2, slot_bytes=1 << 16, provider="shm", local="shared",
                               timeout=30)
    expect(comm.stats()["paths"].count("shared") == size - 1, f"paths {comm.stats()['paths']}")
    print(f"TOKEN {comm._rings.token}", flush=True)
    world.Barrier()  # every rank's construction has ended
    # Segments and shm endpoint regions alike are unlinked once construction ends.
    leftovers = [n for n in os.listdir("/dev/shm") if comm._rings.token in n]
    expect(not leftovers, f"names left after construction: {leftovers}")
    send = np.arange(1000 * size, dtype=np.float32)
    for it in range(100):
        if rank == 1 and it == 50:
            os.kill(os.getpid(), signal.SIGKILL)
        comm.ialltoallv(send, [1000] * size).wait()
    expect(False, "the run should have ended with rank 1")

boot = DyingBootstrap() if mode == "kill-setup" else MPIBootstrap()
rings = establish(boot, list(range(size)), RING_SLOTS, SLOT_BYTES, timeout=30)
print(f"TOKEN {rings.token}", flush=True)
world.Barrier()  # every rank has unlinked its own name
leftovers = [n for n in os.listdir("/dev/shm") if rings.token in n]
expect(not leftovers, f"names left after set-up: {leftovers}")


def payload(src, dst, seq):
    n = 8 + (seq * 977 + src * 31 + dst) % (SLOT_BYTES - 8)
    return np.full(n, (src * 7 + dst * 3 + seq) % 251, dtype=np.uint8), n


sent = {p: 0 for p in range(size) if p != rank}
got = {p: 0 for p in range(size) if p != rank}
while min(got.values()) < ROUNDS or min(sent.values()) < ROUNDS:
    if mode == "kill-running" and rank == 1 and sent[0] == ROUNDS // 2:
        os.kill(os.getpid(), signal.SIGKILL)
    for p in sent:
        seg, ring = rings.peers[p], rings.ring_index(p, rank)
        q = sent[p]
        # credit: slot q is free once the receiver has consumed q - RING_SLOTS + 1
        if q < ROUNDS and q < seg.consumed(ring) + RING_SLOTS:
            data, n = payload(rank, p, q)
            head = np.array([n], dtype=np.uint64).view(np.uint8)
            seg.publish(ring, q, np.concatenate([head, data]))
            sent[p] += 1
    for p in got:
        ring = rings.ring_index(rank, p)
        q = got[p]
        if q >= ROUNDS:
            continue
        head = rings.own.landed(ring, q, 8)
        if head is None:
            continue
        n = int(np.frombuffer(head, dtype=np.uint64)[0])
        expect(8 <= n <= SLOT_BYTES - 8, f"slot {q} from {p}: bad length {n}")
        body = np.frombuffer(rings.own.landed(ring, q, 8 + n), dtype=np.uint8)[8:]
        expect(np.array_equal(body, payload(p, rank, q)[0]), f"slot {q} from {p}: wrong bytes")
        got[p] += 1
        rings.own.set_consumed(ring, got[p])
world.Barrier()
rings.close()
if rank == 0:
    print(f"OK node-local exchange P={size} rounds={ROUNDS}", flush=True)
