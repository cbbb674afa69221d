"""One rank of the multi-host check that scripts/netns-multihost.sh runs in each namespace.

Reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (torchrun's variables),
FI_TCP_IFACE (the namespace's veth) and BLSFAB_PROVIDER. Rank 0 hosts a TCPStore
on MASTER_ADDR; then:

1. a blsfab.Communicator bootstrapped from that store runs uneven alltoallvs,
   every iteration posted before any is waited on, and checks every byte
   against what each peer deterministically sent;
2. the torch backend (init_process_group("blsfab") on the same store) runs
   dist.all_to_all_single with uneven splits and all_reduce, checked the same way;
3. it reports the bytes its veth carried, so the traffic visibly crossed the bridge.

It also runs anywhere else with those variables set, e.g. on real hosts.
"""

import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

import blsfab
import blsfab.torch  # noqa: F401 - registers the "blsfab" backend

ITERATIONS = 40
BOUND = 2


def inputs(rank, size, it):
    rng = np.random.default_rng(10007 * it + rank)
    counts = rng.integers(0, 2000, size)
    counts[rng.random(size) < 0.25] = 0
    if it % 10 == 9:
        counts[(rank + 1) % size] = 12000          # 48 KB: several TCP segments
    return rng.standard_normal(int(counts.sum())).astype(np.float32), counts.tolist()


def expected(rank, size, it):
    pieces = []
    for src in range(size):
        data, counts = inputs(src, size, it)
        off = sum(counts[:rank])
        pieces.append(data[off:off + counts[rank]])
    return np.concatenate(pieces), [len(p) for p in pieces]


def iface_bytes(iface):
    base = f"/sys/class/net/{iface}/statistics"
    try:
        with open(f"{base}/tx_bytes") as tx, open(f"{base}/rx_bytes") as rx:
            return int(tx.read()), int(rx.read())
    except OSError:
        return None


def iface_address(iface):
    try:
        out = subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", iface],
                             capture_output=True, text=True, timeout=5).stdout.split()
        return out[3].split("/")[0] if len(out) > 3 else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def main():
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    iface = os.environ.get("FI_TCP_IFACE", "")
    provider = os.environ.get("BLSFAB_PROVIDER", "tcp")
    where = f"rank {rank} ({iface_address(iface)} on {iface or '?'}, host {socket.gethostname()})"
    before = iface_bytes(iface)
    t0 = time.monotonic()

    store = dist.TCPStore(host, port, size, rank == 0, timeout=timedelta(seconds=60))

    # 1. the Communicator on the store bootstrap
    with blsfab.Communicator(store=store, rank=rank, size=size, bound=BOUND,
                             slot_bytes=64 << 10, provider=provider, timeout=60) as comm:
        reqs = [comm.ialltoallv(*inputs(rank, size, it)) for it in range(ITERATIONS)]
        for it in reversed(range(ITERATIONS)):  # newest first
            got = reqs[it].wait()
            want, counts = expected(rank, size, it)
            if reqs[it].recvcounts != counts or not np.array_equal(got, want):
                raise SystemExit(f"{where}: alltoallv iteration {it} differs")
        stats = comm.stats()
        if stats["max_lead"] > BOUND:
            raise SystemExit(f"{where}: max_lead {stats['max_lead']} > bound {BOUND}")
        used = comm.provider
    print(f"{where}: alltoallv OK, {ITERATIONS} iterations, provider {used}, bound {BOUND}, "
          f"max_lead {stats['max_lead']}, {stats['bytes_sent']} B sent", flush=True)

    # 2. the torch backend on the same store
    dist.init_process_group("blsfab", store=dist.PrefixStore("torch", store), rank=rank,
                            world_size=size, timeout=timedelta(seconds=60),
                            pg_options={"provider": provider, "bound": BOUND})
    works, outs = [], []
    for it in range(4):
        data, counts = inputs(rank, size, 100 + it)
        recv = expected(rank, size, 100 + it)[1]
        out = torch.empty(sum(recv))
        works.append(dist.all_to_all_single(out, torch.from_numpy(data), recv, counts,
                                            async_op=True))
        outs.append(out)
    for it, (w, out) in enumerate(zip(works, outs)):
        w.wait()
        if not np.array_equal(out.numpy(), expected(rank, size, 100 + it)[0]):
            raise SystemExit(f"{where}: all_to_all_single {it} differs")
    t = torch.full((1000,), float(rank + 1))
    dist.all_reduce(t)
    if not torch.equal(t, torch.full((1000,), size * (size + 1) / 2)):
        raise SystemExit(f"{where}: all_reduce differs")
    dist.barrier()
    backend = dist.get_backend()
    dist.destroy_process_group()
    print(f"{where}: torch backend {backend!r} OK: all_to_all_single (uneven, async) and "
          "all_reduce", flush=True)

    after = iface_bytes(iface)
    if before and after:
        print(f"{where}: {iface} carried {(after[0] - before[0]) / 1e6:.2f} MB out, "
              f"{(after[1] - before[1]) / 1e6:.2f} MB in, in {time.monotonic() - t0:.1f} s",
              flush=True)
    if rank == 0:
        time.sleep(0.5)  # this process hosts the store: let the others hang up first


if __name__ == "__main__":
    sys.exit(main())
