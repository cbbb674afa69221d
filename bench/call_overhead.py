"""Per-call cost of small alltoallvs: one ialltoallv + wait, and chains of them.

    python bench/call_overhead.py                 # P=1: argument checks + engine, no network
    mpirun -np 2 python bench/call_overhead.py

Prints the best mean over ``--reps`` runs of ``--iters`` calls: single calls
with counts given as a list of int and as an int64 numpy array, then the
pattern of bench/alltoallv.py's "batch" section: ``--chain`` calls of
``--chain-bytes`` per peer issued inside ``with comm.chain():``, then waited for
one by one (bound 0, so a step also waits for every peer's chain).
"""

import argparse
import time

import numpy as np

import blsfab


def best_of(comm, reps, iters, step):
    """Seconds per step: the best of ``reps`` timings of ``iters`` steps."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--provider", default="shm")
    ap.add_argument("--iters", type=int, default=10000)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--chain", type=int, default=26, help="calls per chain (0: skip)")
    ap.add_argument("--chain-bytes", type=int, default=512, help="bytes per peer per call")
    args = ap.parse_args()
    with blsfab.Communicator(bound=1, slot_bytes=4096, provider=args.provider,
                             timeout=30) as comm:
        size = comm.size
        buf = np.arange(8 * size, dtype=np.float32)
        for name, counts in (("list", [8] * size), ("int64", np.full(size, 8, np.int64))):
            best = best_of(comm, args.reps, args.iters,
                           lambda counts=counts: comm.ialltoallv(buf, counts).wait())
            if comm.rank == 0:
                print(f"P={size} {args.provider} counts={name}: {best * 1e6:.2f} us per "
                      "ialltoallv + wait", flush=True)
    if args.chain <= 0:
        return
    m, nbytes = args.chain, args.chain_bytes
    # The batch section's configuration: bound 0, one slot holds the whole chain.
    with blsfab.Communicator(bound=0, slot_bytes=max(4096, m * (nbytes + 16) + 64),
                             provider=args.provider, timeout=30) as comm:
        send = np.full(nbytes * comm.size, comm.rank, dtype=np.uint8)
        counts = [nbytes] * comm.size

        def chained():
            with comm.chain():
                reqs = [comm.ialltoallv(send, counts) for _ in range(m)]
            for r in reqs:
                r.wait()

        best = best_of(comm, args.reps, max(1, args.iters // m), chained)
        if comm.rank == 0:
            print(f"P={comm.size} {args.provider} chain of {m} x {nbytes} B: "
                  f"{best * 1e6:.2f} us per chain, {best * 1e6 / m:.3f} us per call "
                  "(ialltoallv + wait)", flush=True)


if __name__ == "__main__":
    main()
