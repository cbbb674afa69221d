"""Per-call cost of a tiny ialltoallv + wait, by kind of sendcounts.

    python bench/call_overhead.py                 # P=1: argument checks + engine, no network
    mpirun -np 2 python bench/call_overhead.py

Prints the best mean over ``--reps`` runs of ``--iters`` calls, for counts
given as a list of int and as an int64 numpy array.
"""

import argparse
import time

import numpy as np

import blsfab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--provider", default="shm")
    ap.add_argument("--iters", type=int, default=10000)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    with blsfab.Communicator(bound=1, slot_bytes=4096, provider=args.provider,
                             timeout=30) as comm:
        size = comm.size
        buf = np.arange(8 * size, dtype=np.float32)
        for name, counts in (("list", [8] * size), ("int64", np.full(size, 8, np.int64))):
            best = float("inf")
            for _ in range(args.reps):
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    comm.ialltoallv(buf, counts).wait()
                best = min(best, (time.perf_counter() - t0) / args.iters)
            if comm.rank == 0:
                print(f"P={size} {args.provider} counts={name}: {best * 1e6:.2f} us per "
                      "ialltoallv + wait", flush=True)


if __name__ == "__main__":
    main()
