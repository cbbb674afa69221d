"""Worker: what the rings and staging cost, per path, and that data still
flows through the smaller layouts. Run under mpirun with 3 ranks on one host."""

import sys

import numpy as np

from common import expect, reference_alltoallv, world

import blsfab
from blsfab import _core

PAGE = 4096
BOUND = 4
SLOTS = 2 * BOUND + 2
SLOT = 1 << 20


def pages(n):
    return (n + PAGE - 1) // PAGE * PAGE


def exchange(comm, sizes, chained):
    """Alltoallvs of every size in ``sizes`` (bytes per peer, varying by
    rank), chained or not, each checked against MPI_Alltoallv."""
    reqs, refs = [], []
    with comm.chain() if chained else _nothing():
        for i, n in enumerate(sizes):
            counts = [n + 8 * ((world.rank + dst + i) % 3) for dst in range(world.size)]
            send = (np.arange(sum(counts), dtype=np.uint64) * 7 + 1000 * world.rank + i).astype(np.uint8)
            reqs.append(comm.ialltoallv(send, counts))
            refs.append((send, counts))
    for req, (send, counts) in zip(reqs, refs):
        expected, _ = reference_alltoallv(send, counts)
        got = req.wait()
        expect(np.array_equal(got, expected), f"sizes {sizes}: wrong data")


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main(mode):
    peers = world.size - 1
    local = "fabric" if mode.startswith("fabric") else "shared"
    comm = blsfab.Communicator(bound=BOUND, slot_bytes=SLOT, provider="shm", local=local)
    # Records around the zero-copy threshold, and chains of small records that
    # fill more than one shrunken staging slot.
    exchange(comm, [8, 1000, 16000, 16384, 20000, 300000], chained=False)
    exchange(comm, [1000] * 40, chained=True)
    exchange(comm, [600, 200000, 900, 17000, 5], chained=True)
    s = comm.stats()
    if mode == "shared":
        expect(s["paths"].count("shared") == peers, f"paths {s['paths']}")
        # Same-host peers write into shared rings: their fabric rings only
        # take bare notifications (one word, one page), and need no staging.
        expect(s["staging_bytes"] == 0, f"staging for shared-ring peers: {s}")
        expect(s["ring_bytes"] == peers * PAGE, f"fabric rings of shared-ring peers: {s}")
        expect(s["shared_bytes"] == _core.shm_segment_bytes(peers, SLOTS, SLOT), f"{s}")
    elif mode == "fabric":
        # Zero-copy sends (16 KiB and up) take only headers from staging.
        stage_slot = _core.SLOT_OVERHEAD + 16384
        expect(s["zero_copy"] > 0, f"no zero-copy write: {s}")
        expect(s["staging_bytes"] == pages(peers * SLOTS * stage_slot), f"staging: {s}")
        expect(s["ring_bytes"] == peers * pages(SLOTS * SLOT + 64), f"rings: {s}")
    else:  # fabric, zero-copy off: full staging
        expect(s["zero_copy"] == 0, f"zero-copy write with the threshold at 0: {s}")
        expect(s["staging_bytes"] == pages(peers * SLOTS * SLOT), f"staging: {s}")
    expect(s["memory_bytes"] == s["ring_bytes"] + s["staging_bytes"] + s["shared_bytes"], f"{s}")
    if mode == "shared":
        # A shared-ring peer never announces slots through the fabric.
        victim = (world.rank + 1) % world.size
        try:
            comm.engine._handle_notification(_core.imm_encode(0, victim, 0))
            expect(False, "a data notification from a shared-ring peer was accepted")
        except blsfab.FabricError as exc:
            expect("through shared rings" in str(exc), f"wrong error: {exc}")
    comm.close()
    if world.rank == 0:
        print(f"OK memory {mode} {s['memory_bytes']}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
