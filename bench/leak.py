"""Construct / exchange / close cycles in one job: RSS and open-FD growth.

    mpirun -np 2 python bench/leak.py --provider shm --cycles 1000

Each cycle builds a Communicator with small rings, runs a few verified
alltoallv iterations and closes it. RSS and open file descriptors are read
after ``--warmup`` cycles (allocator pools, provider caches and lazy imports
settle there) and again at the end; the growth per rank is printed. With
``--max-rss-kib`` / ``--max-fds`` the script exits 1 when a rank grows more.
"""

import argparse
import os
import sys
import time

import numpy as np
from mpi4py import MPI

import blsfab


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def cycle(provider: str, rank: int, size: int, iterations: int) -> None:
    with blsfab.Communicator(bound=1, slot_bytes=1024, provider=provider, timeout=30) as comm:
        buf = np.arange(8 * size, dtype=np.int32) + 1000 * rank
        want = np.concatenate([np.arange(8) + 8 * rank + 1000 * r for r in range(size)])
        for _ in range(iterations):
            if not np.array_equal(comm.alltoallv(buf, [8] * size), want):
                raise AssertionError(f"rank {rank}: wrong data")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--provider", default="shm")
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--iterations", type=int, default=4, help="alltoallv per cycle")
    ap.add_argument("--max-rss-kib", type=int, default=None)
    ap.add_argument("--max-fds", type=int, default=None)
    args = ap.parse_args()
    world = MPI.COMM_WORLD
    rank, size = world.rank, world.size
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        cycle(args.provider, rank, size, args.iterations)
    rss0, fds0 = rss_kib(), open_fds()
    for _ in range(args.cycles):
        cycle(args.provider, rank, size, args.iterations)
    rss1, fds1 = rss_kib(), open_fds()
    took = time.perf_counter() - t0
    growth = world.gather((rss1 - rss0, fds1 - fds0, rss1), root=0)
    ok = True
    if rank == 0:
        for r, (drss, dfds, rss) in enumerate(growth):
            print(f"rank {r}: {args.cycles} cycles on {args.provider} after {args.warmup} "
                  f"warm-up: RSS {drss:+d} KiB (now {rss} KiB), open fds {dfds:+d}", flush=True)
            if args.max_rss_kib is not None and drss > args.max_rss_kib:
                ok = False
            if args.max_fds is not None and dfds > args.max_fds:
                ok = False
        print(f"{'OK' if ok else 'FAIL'} leak: {args.warmup + args.cycles} cycles in "
              f"{took:.1f} s", flush=True)
    return 0 if world.bcast(ok, root=0) else 1


if __name__ == "__main__":
    sys.exit(main())
