"""A BLS alltoallv loop with jittery ranks and one deliberately slow rank.

    mpirun -np 4 python -m blsfab.demo [--iters 400] [--bounds 0,4]

Every rank "computes" for 0.5 ms plus a random 0-1 ms per iteration; the last
rank also stalls 3 ms in one iteration of four. For each bound, the demo
prints the time per iteration, the time blocked in waits, and how far ahead
of the slowest peer the fast ranks got.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

import blsfab


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def run(bound: int, iters: int, nbytes: int, provider) -> dict:
    world = MPI.COMM_WORLD
    rank, size = world.rank, world.size
    rng = random.Random(42 + rank)
    per_peer = max(1, nbytes // 4)
    send = np.full(per_peer * size, rank, dtype=np.float32)
    counts = [per_peer] * size
    with blsfab.Communicator(bound=bound, slot_bytes=per_peer * 4 + 64,
                             provider=provider) as comm:
        fifo, blocked = [], 0.0
        world.Barrier()
        t0 = time.perf_counter()
        for it in range(iters):
            work = 0.0005 + rng.uniform(0, 0.001)
            if rank == size - 1 and it % 4 == 0:
                work += 0.003
            spin(work)
            tb = time.perf_counter()
            fifo.append(comm.ialltoallv(send, counts))
            while len(fifo) > bound:
                out = fifo.pop(0).wait()
                assert out[0] == 0 and out[-1] == size - 1
            blocked += time.perf_counter() - tb
        for req in fifo:
            req.wait()
        elapsed = time.perf_counter() - t0
        stats = comm.stats()
        provider_name = comm.provider
    rows = world.gather((elapsed / iters * 1e3, blocked / iters * 1e3,
                         stats["max_lead"], stats["mean_lead"]), root=0)
    return {"rows": rows, "provider": provider_name}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=400)
    ap.add_argument("--bounds", default="0,4")
    ap.add_argument("--bytes", type=int, default=4096, help="bytes per peer per iteration")
    ap.add_argument("--provider", default=None)
    args = ap.parse_args(argv)
    world = MPI.COMM_WORLD
    results = {}
    for bound in [int(b) for b in args.bounds.split(",")]:
        results[bound] = run(bound, args.iters, args.bytes, args.provider)
    if world.rank == 0:
        size = world.size
        print(f"\nBLS alltoallv demo: {size} ranks, {args.iters} iterations, "
              f"{args.bytes} B per peer, provider {results[bound]['provider']}; "
              f"rank {size - 1} is the slow one")
        print(f"{'bound':>5} {'ms/iter':>8} {'blocked ms/iter':>16} "
              f"{'max lead (fast ranks)':>22} {'mean lead':>10}")
        for bound, res in results.items():
            rows = res["rows"]
            fast = rows[:-1] or rows
            print(f"{bound:>5} {statistics.median(r[0] for r in rows):>8.3f} "
                  f"{statistics.median(r[1] for r in fast):>16.3f} "
                  f"{max(r[2] for r in fast):>22d} "
                  f"{statistics.mean(r[3] for r in fast):>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
