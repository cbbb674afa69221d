"""dist.all_to_all_single on the "blsfab" backend against gloo and MPI_Alltoallv,
and the Python dispatch overhead the torch layer adds to blsfab.

    python bench/torch_alltoall.py                  # mpirun -np 2, then -np 4, by itself
    python bench/torch_alltoall.py --np 4 --provider tcp --quick
    mpirun -np 4 python bench/torch_alltoall.py     # or under your own mpirun

Contenders, in the same job, on the same bytes, each call waited before the next:
  MPI_Alltoallv        mpi4py, numpy buffers
  gloo                 dist.all_to_all_single on a gloo group
  blsfab torch         dist.all_to_all_single on the default ("blsfab") group
  blsfab pg            the group's own all_to_all_single(...).wait(), without torch's
                       dist.* wrapper (argument checks, logging decorator)
  blsfab raw           comm.ialltoallv(tensor, counts).wait() on that group's own Communicator
overhead = blsfab torch - blsfab raw (medians): what the torch layer costs per call;
"pg part" = blsfab pg - blsfab raw: the share of blsfab's ProcessGroup code (the rest is
torch's dist.* wrapper).

A repeat's time is the slowest rank's mean per call; the table gives medians over
repeats. JSON goes to bench/results/torch_alltoall.json. On a 2-core machine, 4 ranks
share the cores, so the P=4 figures include time slicing; P=2 isolates the per-call cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SIZES = [8, 512, 4096, 32768, 262144]
QUICK_SIZES = [8, 4096, 65536]
CONTENDERS = ("MPI_Alltoallv", "gloo", "blsfab torch", "blsfab pg", "blsfab raw")


def calls_for(nbytes: int, size: int) -> int:
    return int(min(1000, max(20, 300000 // (nbytes * size + 2000))))


def run_torch_section(sizes=SIZES, repeats: int = 7, provider=None, bound: int = 4,
                      log=None) -> dict:
    """Measure every contender on every size (bytes per peer). Call on every rank
    of an MPI job; initialises (and destroys) the torch default group itself.
    Returns the results (identical on every rank)."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    import blsfab.torch
    from blsfab.bootstrap import MPIBootstrap

    world = MPI.COMM_WORLD
    rank, size = world.rank, world.size
    torch.set_num_threads(1)
    slot_bytes = max(4096, max(sizes) + 64)
    blsfab.torch.init_process_group(pg_options={"bound": bound, "slot_bytes": slot_bytes,
                                                "provider": provider, "timeout": 120.0})
    gloo = dist.new_group(backend="gloo")
    pg = dist.distributed_c10d._get_default_group()
    comm = pg.communicator
    mpi_boot = MPIBootstrap(world)

    def settle():
        """Everyone here, blsfab writes landed: an Ibarrier polled with fabric progress
        (a blocking MPI call while a peer needs our progress could hang)."""
        mpi_boot.barrier(comm.progress, 120.0)

    def timed(fn, n):
        settle()
        world.Barrier()
        t0 = time.perf_counter()
        fn(n)
        dt = time.perf_counter() - t0
        settle()
        return world.allreduce(dt, op=MPI.MAX) / n

    rows = []
    for nbytes in sizes:
        elems = max(1, nbytes // 4)
        send_np = np.full(elems * size, rank, dtype=np.float32)
        recv_np = np.empty_like(send_np)
        counts = np.full(size, elems, dtype=np.int64)
        displs = np.arange(size, dtype=np.int64) * elems
        sspec = [send_np, (counts, displs), MPI.FLOAT]
        rspec = [recv_np, (counts, displs), MPI.FLOAT]
        send_t = torch.from_numpy(send_np.copy())
        recv_t = torch.empty_like(send_t)
        raw_counts = [elems] * size

        def mpi(n):
            for _ in range(n):
                world.Alltoallv(sspec, rspec)

        def gloo_a2a(n):
            for _ in range(n):
                dist.all_to_all_single(recv_t, send_t, group=gloo)

        def bls_torch(n):
            for _ in range(n):
                dist.all_to_all_single(recv_t, send_t)

        a2a_opts = dist.distributed_c10d.AllToAllOptions()
        a2a_opts.asyncOp = False

        def bls_pg(n):
            for _ in range(n):
                pg.all_to_all_single(recv_t, send_t, [], [], a2a_opts).wait()

        def bls_raw(n):
            for _ in range(n):
                comm.ialltoallv(send_t, raw_counts).wait()

        fns = dict(zip(CONTENDERS, (mpi, gloo_a2a, bls_torch, bls_pg, bls_raw)))
        n = calls_for(elems * 4, size)
        for fn in fns.values():
            fn(max(2, n // 5))  # warm-up
        samples = {k: [] for k in fns}
        for _ in range(repeats):  # interleaved, so drift hits every contender alike
            for name, fn in fns.items():
                samples[name].append(timed(fn, n) * 1e6)
        # the data is right, too
        dist.all_to_all_single(recv_t, send_t)
        expect = np.repeat(np.arange(size, dtype=np.float32), elems)
        assert np.array_equal(recv_t.numpy(), expect), "blsfab all_to_all_single gave wrong data"
        med = {k: statistics.median(v) for k, v in samples.items()}
        row = {"bytes_per_peer": elems * 4, "calls": n, "us": med,
               "overhead_us": med["blsfab torch"] - med["blsfab raw"],
               "pg_part_us": med["blsfab pg"] - med["blsfab raw"],
               "samples_us": samples}
        rows.append(row)
        if log and rank == 0:
            log(format_row(row))
    settle()
    dist.destroy_process_group()
    return {"P": size, "provider": comm.provider, "bound": bound, "slot_bytes": slot_bytes,
            "repeats": repeats, "torch": torch.__version__, "python": platform.python_version(),
            "cpus": os.cpu_count(), "loadavg_1min_at_end": os.getloadavg()[0], "rows": rows}


def header() -> str:
    cols = "".join(f"{c:>15}" for c in CONTENDERS)
    return f"{'bytes/peer':>10}{cols}{'overhead':>11}{'pg part':>11}{'torch/raw':>11}"


def format_row(row: dict) -> str:
    us = row["us"]
    cols = "".join(f"{us[c]:>12.1f} us" for c in CONTENDERS)
    ratio = us["blsfab torch"] / us["blsfab raw"] if us["blsfab raw"] else float("nan")
    return (f"{row['bytes_per_peer']:>10}{cols}{row['overhead_us']:>8.1f} us"
            f"{row['pg_part_us']:>8.1f} us{ratio:>10.2f}x")


def format_table(result: dict) -> str:
    lines = [f"dist.all_to_all_single, P={result['P']}, provider {result['provider']}, "
             f"median of {result['repeats']} repeats (slowest rank's mean per call)",
             header()]
    lines += [format_row(r) for r in result["rows"]]
    over = [r["overhead_us"] for r in result["rows"]]
    part = [r["pg_part_us"] for r in result["rows"]]
    lines.append(f"torch-layer overhead per call (blsfab torch - blsfab raw): median "
                 f"{statistics.median(over):.1f} us (range {min(over):.1f} .. {max(over):.1f} us); "
                 f"of which blsfab's ProcessGroup: median {statistics.median(part):.1f} us")
    return "\n".join(lines)


def worker(args) -> None:
    from mpi4py import MPI
    sizes = QUICK_SIZES if args.quick else [int(s) for s in args.sizes.split(",")]
    result = run_torch_section(sizes, args.repeats, args.provider, args.bound,
                               log=lambda m: print(m, file=sys.stderr, flush=True))
    if MPI.COMM_WORLD.rank == 0:
        if args.part:  # launched by this script: the launcher merges and prints
            with open(args.part, "w") as f:
                json.dump(result, f)
            return
        print(format_table(result), flush=True)
        write_json(args.json, [result])


def write_json(path: str, runs: list) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"benchmark": "torch_alltoall", "runs": runs}, f, indent=1)
    print(f"wrote {os.path.relpath(path)}", flush=True)


def launch(args, argv) -> int:
    """One mpirun job per rank count; merge their results into one table and JSON."""
    import tempfile
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1", FI_TCP_IFACE=os.environ.get("FI_TCP_IFACE", "lo"))
    btl = "tcp,self" if args.provider and args.provider.startswith("tcp") else "vader,self"
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for np_ in [int(n) for n in str(args.np).split(",")]:
            part = os.path.join(tmp, f"P{np_}.json")
            cmd = ["mpirun", "--oversubscribe", "--mca", "btl", btl, "-np", str(np_),
                   sys.executable, os.path.abspath(__file__), *argv, "--part", part]
            print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
            rc = subprocess.call(cmd, env=env)
            if rc != 0:
                print(f"mpirun -np {np_} exited {rc}", file=sys.stderr)
                return rc
            with open(part) as f:
                runs.append(json.load(f))
    for result in runs:
        print(format_table(result) + "\n", flush=True)
    write_json(args.json, runs)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--np", default="2,4",
                   help="rank counts, one mpirun job each, when not already under mpirun (2,4)")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="bytes per peer")
    p.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, 3 repeats")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--provider", default=None, help="shm or tcp (library default)")
    p.add_argument("--bound", type=int, default=4)
    p.add_argument("--json", default=os.path.join(RESULTS, "torch_alltoall.json"))
    p.add_argument("--part", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 3)
    if "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ:
        worker(args)
        return 0
    return launch(args, argv)


if __name__ == "__main__":
    sys.exit(main())
