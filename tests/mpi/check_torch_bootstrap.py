"""The MPI and the c10d-store bootstraps give the same alltoallv results.

usage: mpirun -np N python check_torch_bootstrap.py

1. MPI_Alltoallv on every iteration's input (the reference);
2. a Communicator bootstrapped through MPI;
3. torch's init_process_group("blsfab") under mpirun (blsfab.torch.init_process_group
   agrees on MASTER_ADDR/PORT through MPI; the backend bootstraps from the TCPStore),
   first its raw Communicator, then dist.all_to_all_single.
"""

import numpy as np
import torch
import torch.distributed as dist

import blsfab
from common import expect, reference_alltoallv, world

ITERS = 16
rank, size = world.rank, world.size


def make_input(it):
    rng = np.random.default_rng(7 * it + 1000 * rank)
    counts = rng.integers(0, 300, size)
    counts[rng.random(size) < 0.3] = 0
    return rng.standard_normal(int(counts.sum())).astype(np.float32), counts.tolist()


inputs = [make_input(it) for it in range(ITERS)]
# References first: no blocking MPI while fabric writes are outstanding.
refs = [reference_alltoallv(buf.view(np.uint32), counts) for buf, counts in inputs]


def run(comm):
    reqs = [comm.ialltoallv(buf, counts) for buf, counts in inputs]
    return [(r.wait().view(np.uint8).copy(), r.recvcounts) for r in reqs]


with blsfab.Communicator(bound=4, slot_bytes=1 << 13, provider="tcp", timeout=60) as comm:
    via_mpi = run(comm)

import blsfab.torch  # noqa: E402

blsfab.torch.init_process_group(pg_options={"bound": 4, "slot_bytes": 1 << 13,
                                            "provider": "tcp", "timeout": 60})
expect(dist.get_backend() == "blsfab", f"backend {dist.get_backend()}")
expect((dist.get_rank(), dist.get_world_size()) == (rank, size), "rank/size from mpirun")
pg = dist.distributed_c10d._get_default_group()
via_store = run(pg.communicator)

works, outs = [], []
for it, (buf, counts) in enumerate(inputs):
    recvcounts = refs[it][1]
    out = torch.empty(sum(recvcounts), dtype=torch.float32)
    works.append(dist.all_to_all_single(out, torch.from_numpy(buf), recvcounts, counts,
                                        async_op=True))
    outs.append(out)
for w in works:
    w.wait()
dist.destroy_process_group()

for it in range(ITERS):
    ref, refcounts = refs[it]
    for name, (got, gotcounts) in (("mpi bootstrap", via_mpi[it]), ("store bootstrap", via_store[it])):
        expect(gotcounts == refcounts, f"{name} it {it}: recvcounts {gotcounts} != {refcounts}")
        expect(np.array_equal(got, ref), f"{name} it {it}: data differ from MPI_Alltoallv")
    expect(np.array_equal(outs[it].numpy().view(np.uint8), ref),
           f"all_to_all_single it {it}: data differ from MPI_Alltoallv")
if rank == 0:
    print(f"OK mpi == store == MPI_Alltoallv ({size} ranks, {ITERS} iterations)", flush=True)
