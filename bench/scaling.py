"""Check the memory and traffic model of docs/scaling.md against stats().

    mpirun -np P python bench/scaling.py [--bound 4] [--slot-bytes 32832] [--local shared|fabric]

Every rank runs a few iterations of a DLRM-sized exchange and compares what
stats() reports (ring, staging and shared bytes; writes per iteration) with
the model; rank 0 prints one line per quantity: model, measured, ratio.
"""

import argparse
import json
import os
import sys

import numpy as np
from mpi4py import MPI

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import blsfab  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def round_up(n, to):
    return (n + to - 1) // to * to


def model(P, local_ranks, bound, slot_bytes, local, zero_copy=16384):
    """Bytes and operations per rank, as docs/scaling.md derives them."""
    k = 2 * bound + 2                             # slots per sender ring
    ring = round_up(k * slot_bytes + 64, PAGE)    # one registered ring + its tail word
    # Same-host peers on shared rings: their fabric ring is the tail word only.
    shared_peers = local_ranks - 1 if local == "shared" else 0
    fabric_peers = P - 1 - shared_peers
    # Staging holds what is copied: records below the zero-copy threshold, and headers.
    stage_slot = min(slot_bytes, 40 + round_up(zero_copy, 8)) if zero_copy else slot_bytes
    out = {
        "ring_slots": k,
        "ring_bytes": fabric_peers * ring + shared_peers * PAGE,
        "staging_bytes": round_up(fabric_peers * k * stage_slot, PAGE),
        "shared_bytes": 0,
        "writes_per_iteration": P - 1,
    }
    if local == "shared":
        control = 64 + round_up(8 * k, 64)
        out["shared_bytes"] = 64 + (local_ranks - 1) * (control + k * slot_bytes)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bound", type=int, default=4)
    ap.add_argument("--slot-bytes", type=int, default=28672 + 64)
    ap.add_argument("--local", default="shared", choices=["shared", "fabric"])
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    world = MPI.COMM_WORLD
    P = world.size
    comm = blsfab.Communicator(bound=args.bound, slot_bytes=args.slot_bytes, provider="shm",
                               local=args.local, timeout=60)
    per_peer = (args.slot_bytes - 64) // 4
    send = np.ones(per_peer * P, dtype=np.float32)
    for _ in range(args.iters):
        comm.ialltoallv(send, [per_peer] * P).wait()
    st = comm.stats()
    comm.close()
    want = model(P, P, args.bound, comm.slot_bytes, args.local, st["zero_copy_bytes"])
    got = {"ring_slots": st["ring_slots"], "ring_bytes": st["ring_bytes"],
           "staging_bytes": st["staging_bytes"], "shared_bytes": st["shared_bytes"],
           "writes_per_iteration": st["puts"] / args.iters}
    if world.rank == 0:
        print(f"P={P} bound={args.bound} slot_bytes={comm.slot_bytes} local={args.local}")
        for key in want:
            ratio = got[key] / want[key] if want[key] else float(got[key] == 0)
            print(f"  {key:<22} model {want[key]:>12}  measured {got[key]:>12}  ({ratio:.3f})")
        print(json.dumps({"P": P, "model": want, "measured": got}))


if __name__ == "__main__":
    main()
