"""Soak: verify every per-peer message of a long randomized alltoallv run.

    mpirun -np 4 python bench/soak.py                          # 1,000,000 messages
    mpirun -np 3 python bench/soak.py --messages 20000         # the CI version

For every provider (default shm and tcp) and every bound (default 0, 1, 4, 8)
one Communicator runs its share of the iterations, keeping up to ``bound``
requests in flight. All ranks derive each iteration's count matrix and dtype
from a shared seed: counts are zero, small, medium or within a few elements of
a full slot; dtypes range over 1- to 16-byte types. Now and then a random rank
sleeps (``--delay-prob``, up to ``--max-delay`` s), so ranks run ahead and lag.
Every received message is compared with what its sender must have sent: a
"message" is one (iteration, sender, receiver) triple with sender != receiver,
zero-length ones included. Exits 1 on the first mismatch.
"""

import argparse
import math
import sys
import time

import numpy as np
from mpi4py import MPI

import blsfab

DTYPES = [np.int8, np.uint16, np.int32, np.float32, np.float64, np.float16, np.complex64,
          np.uint64, np.complex128]


def plan(seed: int, it: int, size: int, most_bytes: int):
    """(count matrix [src][dst], dtype, sleeper rank or -1, delay) of iteration ``it``."""
    rng = np.random.default_rng([seed, it])
    dtype = np.dtype(DTYPES[rng.integers(len(DTYPES))])
    most = most_bytes // dtype.itemsize
    kind = rng.choice(4, size=(size, size), p=[0.3, 0.4, 0.2, 0.1])
    counts = np.where(kind == 0, 0,
             np.where(kind == 1, rng.integers(1, 17, (size, size)),
             np.where(kind == 2, rng.integers(17, max(most // 2, 18), (size, size)),
                      rng.integers(max(most - 3, 0), most + 1, (size, size)))))
    counts = np.minimum(counts, most)
    sleeper = int(rng.integers(size)) if rng.random() < plan.delay_prob else -1
    return counts, dtype, sleeper, float(rng.random()) * plan.max_delay


plan.delay_prob = 0.01
plan.max_delay = 0.002


def message(it: int, src: int, dst: int, n: int, dtype) -> np.ndarray:
    return ((np.arange(n, dtype=np.int64) + 31 * src + 7 * dst + it) % 251).astype(dtype)


def run(provider: str, bound: int, iterations: int, seed: int, slot_bytes: int,
        world) -> int:
    """Run one configuration; return the per-peer messages this rank verified."""
    rank, size = world.rank, world.size
    verified = 0
    with blsfab.Communicator(bound=bound, slot_bytes=slot_bytes, provider=provider,
                             timeout=60) as comm:
        most = slot_bytes - blsfab._core.SLOT_OVERHEAD
        inflight = []

        def check(it, req):
            counts, dtype, _, _ = plan(seed, it, size, most)
            got = req.wait()
            if req.recvcounts != counts[:, rank].tolist():
                raise AssertionError(f"rank {rank} iteration {it}: recvcounts "
                                     f"{req.recvcounts} != {counts[:, rank].tolist()}")
            off = 0
            for src in range(size):
                n = int(counts[src, rank])
                want = message(it, src, rank, n, dtype)
                if got.dtype != dtype or not np.array_equal(got[off:off + n], want):
                    raise AssertionError(f"rank {rank} iteration {it}: message from rank "
                                         f"{src} ({n} x {dtype}) differs")
                off += n
            return size - 1

        for it in range(iterations):
            counts, dtype, sleeper, delay = plan(seed, it, size, most)
            if sleeper == rank:
                time.sleep(delay)
            row = counts[rank]
            send = np.concatenate([message(it, rank, dst, int(row[dst]), dtype)
                                   for dst in range(size)])
            inflight.append((it, comm.ialltoallv(send, row.tolist())))
            while len(inflight) > bound:
                verified += check(*inflight.pop(0))
        for it, req in inflight:
            verified += check(it, req)
    return verified


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--providers", default="shm,tcp")
    ap.add_argument("--bounds", default="0,1,4,8")
    ap.add_argument("--messages", type=int, default=1_000_000,
                    help="per-peer messages to verify in total (sum over ranks)")
    ap.add_argument("--slot-bytes", type=int, default=4096)
    ap.add_argument("--delay-prob", type=float, default=0.01)
    ap.add_argument("--max-delay", type=float, default=0.002)
    ap.add_argument("--seed", type=int, default=2512)
    args = ap.parse_args()
    plan.delay_prob, plan.max_delay = args.delay_prob, args.max_delay
    world = MPI.COMM_WORLD
    size = world.size
    if size < 2:
        print("soak needs at least 2 ranks", file=sys.stderr)
        return 2
    configs = [(p, int(b)) for p in args.providers.split(",") for b in args.bounds.split(",")]
    per_config = math.ceil(args.messages / (size * (size - 1)) / len(configs))
    total, t_all = 0, time.perf_counter()
    for n, (provider, bound) in enumerate(configs):
        t0 = time.perf_counter()
        mine = run(provider, bound, per_config, args.seed + n, args.slot_bytes, world)
        got = world.allreduce(mine)
        total += got
        if world.rank == 0:
            print(f"{provider:>4} bound={bound}: {per_config} iterations, {got} messages "
                  f"verified in {time.perf_counter() - t0:.1f} s", flush=True)
    if world.rank == 0:
        print(f"OK soak: {total} per-peer messages verified on {size} ranks in "
              f"{time.perf_counter() - t_all:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
