"""Compare blsfab's alltoallv with MPI_Alltoallv on random inputs.

usage: check_alltoallv.py PROVIDER BOUND[,BOUND...] [chain]
"""

import sys

import numpy as np
import torch

import blsfab
from common import check_paths, expect, receive, reference_alltoallv, scribble, world

provider = sys.argv[1]
bounds = [int(b) for b in sys.argv[2].split(",")]
chained = len(sys.argv) > 3 and sys.argv[3] == "chain"
ITERS = 12
rank, size = world.rank, world.size

CASES = [
    ("numpy", np.float32), ("numpy", np.float16), ("numpy", np.int64),
    ("torch", torch.bfloat16), ("torch", torch.float32), ("torch", torch.int64),
]


def make_input(kind, dtype, it, seed):
    rng = np.random.default_rng(seed * 7919 + it * 31 + rank)
    counts = rng.integers(0, 400, size).tolist()
    for j in range(size):
        if rng.random() < 0.3:
            counts[j] = 0
    if it % 5 == 4:
        counts[(rank + 1) % size] = 1900  # larger than every inject size
    if it % 4 == 1:
        counts[(rank + 2) % size] = 3000  # 6 to 24 KB: read in place from the ring
    raw = rng.integers(-1000, 1000, sum(counts) + 3)  # spare tail: counts need not cover it
    if kind == "numpy":
        return np.asarray(raw, dtype=dtype), counts
    return torch.tensor(raw, dtype=torch.float32).to(dtype), counts


def as_bytes(buf):
    if isinstance(buf, torch.Tensor):
        return buf.contiguous().view(torch.uint8).numpy() if buf.numel() else np.empty(0, np.uint8)
    return np.ascontiguousarray(buf).view(np.uint8)


for bound in bounds:
    with blsfab.Communicator(bound=bound, slot_bytes=1 << 15, provider=provider,
                             timeout=60) as comm:
        expect(comm.provider == blsfab.communicator._provider.canonical(provider),
               f"provider {comm.provider}")
        for case, (kind, dtype) in enumerate(CASES):
            inputs = [make_input(kind, dtype, it, case) for it in range(ITERS)]
            # References first: no blocking MPI while fabric writes are outstanding.
            refs = []
            for buf, counts in inputs:
                ref_bytes = as_bytes(buf)[: sum(counts) * buf.itemsize if kind == "numpy"
                                         else sum(counts) * buf.element_size()]
                item = buf.itemsize if kind == "numpy" else buf.element_size()
                refs.append(reference_alltoallv(ref_bytes.view(np.uint8).view(
                    {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[item]), counts))
            world.Barrier()
            reqs = []
            if chained:  # groups of 1, 2, 3, ... iterations, each group one chain
                it, group = 0, 1
                while it < ITERS:
                    with comm.chain():
                        for buf, counts in inputs[it: it + group]:
                            reqs.append(comm.ialltoallv(buf, counts))
                    it, group = it + group, group + 1
            else:
                for buf, counts in inputs:
                    reqs.append(comm.ialltoallv(buf, counts))
            # Wait newest first: a later request may be waited on before an earlier one.
            results = [None] * ITERS
            for it in reversed(range(ITERS)):
                results[it] = receive(reqs[it], sum(refs[it][1]), inputs[it][0])
                scribble(inputs[it][0])  # complete here: changing it changes nothing
            for it, out in enumerate(results):
                kind_ok = isinstance(out, torch.Tensor) if kind == "torch" else isinstance(out, np.ndarray)
                expect(kind_ok, f"{kind} input gave {type(out)}")
                expect(out.dtype == dtype, f"dtype {out.dtype} != {dtype}")
                ref, refcounts = refs[it]
                expect(reqs[it].recvcounts == refcounts,
                       f"bound {bound} case {case} it {it}: recvcounts {reqs[it].recvcounts} != {refcounts}")
                expect(np.array_equal(as_bytes(out), ref),
                       f"bound {bound} case {case} ({kind} {dtype}) iteration {it}: data differ")
        st = comm.stats()
        check_paths(st)
        expect(st["max_lead"] <= bound, f"max_lead {st['max_lead']} > bound {bound}")
if rank == 0:
    print(f"OK provider={provider} bounds={bounds} size={size} chained={chained}")
