"""blsfab against MPI_Alltoallv, side by side in the same mpirun job.

    python bench/alltoallv.py              # the whole sweep: P=2,4 x (shm|vader, tcp|tcp)
    python bench/alltoallv.py --quick      # fewer sizes and repeats
    python bench/alltoallv.py --provider shm --nprocs 2 --sizes 4096,65536 --sections latency
    python bench/alltoallv.py --provider shm --nprocs 4 --sizes 32768 --sections latency \
        --contenders MPI_Alltoallv,blsfab --results /some/dir   # a subset, results elsewhere
    python bench/alltoallv.py --provider tcp --nprocs 2 --sections latency \
        --zero-copy 0,8192,65536 --contenders none    # the zero-copy threshold, side by side

The launcher runs one mpirun job per (P, provider), with Open MPI's matching
transport (blsfab on shm against --mca btl vader,self; blsfab on tcp;ofi_rxm
against --mca btl tcp,self). Inside a job every contender runs in turn for
each configuration, with warm-up and repeats interleaved, and a repeat's time
is the slowest rank's. The launcher prints medians and blsfab/MPI ratios,
and writes bench/results/alltoallv.json and one PNG per (P, provider).

Sections:
  latency    one alltoallv per iteration, 8 B to 1 MiB per peer; blsfab returning a
             new array (wait()), into a given one (wait(out=)), as views (views(), and
             views(copy_self=False): the own part lent from sendbuf), beside the floor:
             the same exchange by a C loop with no Python (bench/floor.c), through a
             direct shared mapping (read in place, or copied out), by a single-copy
             pull from the sender's buffer (CMA, as vader does), and through
             libfabric writedata; the benchmark builds it with mpicc
  batch      m = 1, 8, 26 small alltoallvs per step, chained and unchained
  pipeline   n alltoallvs with at most k outstanding (k = bound), calls per second
  overlap    the same pipeline (k = 2) with compute between calls: progress by
             polling inside calls, or by a background thread (progress="thread")
  breakdown  (only when named) per rank, where one blsfab call's time goes: in
             ialltoallv() (the copies in, the writes and the bound wait) and in
             wait() or views() (the copies out), with in-place, spill and zero-copy
             counts per call; a profiling aid, not part of the sweep

Two latency rows say what the machine did during the run:
  fresh      MPI_Alltoallv and blsfab with a store into every cache line of the send
             buffer before each call, as an application's data would be. The plain
             rows reuse an unchanged send buffer, which stays cached on the reading
             core, and a pull (vader's CMA) gets it cheaply; a push into the peer's
             ring cannot.
  handoff    before and after each size, the one-way time to hand a cache line from
             rank 0's core to rank 1's (floor_handoff_ns). About 25-40 ns when the
             host keeps both vCPUs on one die; 150-190 ns when it does not, and then
             every fresh byte that crosses between ranks costs 4-6x more, for MPI too.
             The targets table lists the rows measured that way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SIZES = [8, 64, 512, 4096, 32768, 65536, 262144, 1 << 20]
QUICK_SIZES = [8, 512, 4096, 65536, 1 << 20]
BATCH_SIZES = [8, 64, 512]
BATCH_M = [1, 8, 26]
PIPE_SIZES = [8, 512, 4096, 65536]
PIPE_K = [0, 1, 4, 8]
OVERLAP = [(8, 10e-6), (4096, 20e-6), (65536, 50e-6)]  # (bytes per peer, compute per call)
JOBS = [("shm", "vader,self"), ("tcp", "tcp,self")]
SECTIONS = ["latency", "batch", "pipeline", "overlap"]
EXTRA_SECTIONS = ["breakdown"]  # run only when asked for
FABRIC_NAMES = {"shm": "shm", "tcp": "tcp;ofi_rxm"}
FLOOR_SOURCE = os.path.join(HERE, "floor.c")
FLOOR_LIBRARY = os.path.join(HERE, "build", "libblsfloor.so")


# Above this one-way handoff between two ranks' cores, the host has placed the
# vCPUs on different dies: every freshly written byte one rank reads from the
# other crosses between them (docs/scaling.md, "Where the host puts the vCPUs").
SLOW_HANDOFF_NS = 100
# Above this, the two probing ranks took turns on one core (more ranks than cores):
# the probe then says nothing about the dies.
SHARED_CORE_NS = 1000

# --------------------------------------------------------------------------- floor

def build_floor() -> str:
    """Compile bench/floor.c into a shared library with mpicc; '' if impossible."""
    os.makedirs(os.path.dirname(FLOOR_LIBRARY), exist_ok=True)
    if (os.path.exists(FLOOR_LIBRARY)
            and os.path.getmtime(FLOOR_LIBRARY) >= os.path.getmtime(FLOOR_SOURCE)):
        return FLOOR_LIBRARY
    cmd = ["mpicc", "-O2", "-shared", "-fPIC", "-o", FLOOR_LIBRARY, FLOOR_SOURCE, "-lfabric"]
    try:
        subprocess.run(cmd, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"no floor rows: {' '.join(cmd)} failed ({exc})", flush=True)
        return ""
    return FLOOR_LIBRARY


class Floor:
    """The C floor loops of bench/floor.c, called through ctypes."""

    def __init__(self, path, comm):
        import ctypes

        lib = ctypes.CDLL(path)
        vp, sz, i = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        for name, res, args in [("floor_direct_open", vp, [i, sz]),
                                ("floor_direct_run", ctypes.c_double, [vp, i, i]),
                                ("floor_direct_close", None, [vp]),
                                ("floor_pull_open", vp, [i, sz]),
                                ("floor_pull_run", ctypes.c_double, [vp, i]),
                                ("floor_pull_error", ctypes.c_char_p, [vp]),
                                ("floor_pull_close", None, [vp]),
                                ("floor_fabric_open", vp, [i, sz, ctypes.c_char_p]),
                                ("floor_fabric_run", ctypes.c_double, [vp, i]),
                                ("floor_fabric_error", ctypes.c_char_p, [vp]),
                                ("floor_fabric_close", None, [vp]),
                                ("floor_handoff_ns", ctypes.c_double, [i, i])]:
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        self.lib, self.fcomm = lib, comm.py2f()
        self.handles = []

    def direct(self, nbytes, copy_out):
        h = self.lib.floor_direct_open(self.fcomm, nbytes)
        self.handles.append((self.lib.floor_direct_close, h))
        return lambda n: self.lib.floor_direct_run(h, n, int(copy_out))

    def pull(self, nbytes):
        h = self.lib.floor_pull_open(self.fcomm, nbytes)
        self.handles.append((self.lib.floor_pull_close, h))

        def run(n):
            if self.lib.floor_pull_run(h, n) < 0:
                raise RuntimeError(f"floor pull: {self.lib.floor_pull_error(h).decode()}")
        return run

    def fabric(self, nbytes, provider):
        h = self.lib.floor_fabric_open(self.fcomm, nbytes, provider.encode())
        self.handles.append((self.lib.floor_fabric_close, h))
        err = self.lib.floor_fabric_error(h)
        if err:
            raise RuntimeError(f"floor on {provider}: {err.decode()}")

        def run(n):
            if self.lib.floor_fabric_run(h, n) < 0:
                raise RuntimeError(f"floor on {provider}: {self.lib.floor_fabric_error(h).decode()}")
        return run

    def handoff_ns(self, comm, iters=1000):
        """One-way cache-line handoff between node ranks 0 and 1, in ns, on every rank."""
        return comm.allreduce(self.lib.floor_handoff_ns(self.fcomm, iters), op=max)

    def close(self):
        for close, h in self.handles:
            close(h)
        self.handles = []


# --------------------------------------------------------------------------- worker

def worker(args) -> None:
    import numpy as np
    from mpi4py import MPI

    import blsfab

    world = MPI.COMM_WORLD
    rank, size = world.rank, world.size
    repeats = args.repeats
    comms = {}

    # One host: blsfab's default there is the node-local path (shared rings);
    # the tcp jobs measure the provider itself.
    default_local = "shared" if args.provider == "shm" else "fabric"

    def comm_for(bound, slot_bytes, progress="poll", local=default_local, zero_copy=None):
        key = (bound, slot_bytes, progress, local) + ((zero_copy,) if zero_copy is not None else ())
        if key not in comms:
            saved = os.environ.get("BLSFAB_ZERO_COPY_BYTES")
            if zero_copy is not None:  # read by the Communicator when it is built
                os.environ["BLSFAB_ZERO_COPY_BYTES"] = str(zero_copy)
            try:
                comms[key] = blsfab.Communicator(bound=bound, slot_bytes=slot_bytes,
                                                 provider=args.provider, timeout=args.timeout,
                                                 chain_threshold=args.chain_threshold,
                                                 progress=progress, local=local)
            finally:
                if zero_copy is not None:
                    if saved is None:
                        os.environ.pop("BLSFAB_ZERO_COPY_BYTES")
                    else:
                        os.environ["BLSFAB_ZERO_COPY_BYTES"] = saved
        return comms[key]

    def log(msg):
        if rank == 0:
            print(msg, file=sys.stderr, flush=True)

    def timed(fn, n):
        """Seconds per unit for n units, the slowest rank's."""
        world.Barrier()
        t0 = time.perf_counter()
        fn(n)
        dt = time.perf_counter() - t0
        return world.allreduce(dt, op=MPI.MAX) / n

    def measure(contenders, n):
        """Interleave contenders over the repeats; return medians (s per unit)."""
        if args.contenders:
            # The baseline stays, and so do thresholds asked for with --zero-copy.
            contenders = {k: v for k, v in contenders.items() if k in args.contenders
                          or k.startswith(("MPI_Alltoallv", "blsfab fabric zc="))}
        for fn in contenders.values():
            fn(max(2, n // 5))  # warm-up
        samples = {name: [] for name in contenders}
        for _ in range(repeats):
            for name, fn in contenders.items():
                samples[name].append(timed(fn, n))
        return {name: statistics.median(v) for name, v in samples.items()}, samples

    def mpi_buffers(nbytes, m=1):
        send = np.full(nbytes * size, rank, dtype=np.uint8)
        counts = np.full(size, nbytes, dtype=np.int64)
        displs = np.arange(size, dtype=np.int64) * nbytes
        recv = np.empty(nbytes * size, dtype=np.uint8)
        return [send, (counts, displs), MPI.BYTE], [recv, (counts, displs), MPI.BYTE], send

    def iterations_for(nbytes):
        return int(min(2000, max(30, 400000 // (nbytes * size + 2000))))

    out = {"P": size, "provider": args.provider, "latency": [], "batch": [], "pipeline": [],
           "overlap": []}
    floor = Floor(args.floor_lib, world) if args.floor_lib else None
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)

    # ---- latency ---------------------------------------------------------------
    for nbytes in (sizes if "latency" in args.sections else []):
        sspec, rspec, send = mpi_buffers(nbytes)
        counts = [nbytes] * size
        bls = comm_for(0, max(4096, nbytes + 64))
        recv = np.empty(nbytes * size, dtype=np.uint8)

        def mpi_blocking(n):
            for _ in range(n):
                world.Alltoallv(sspec, rspec)

        def mpi_nonblocking(n):
            for _ in range(n):
                world.Ialltoallv(sspec, rspec).Wait()

        def blsfab_one(n, comm=bls):
            for _ in range(n):
                comm.ialltoallv(send, counts).wait()

        def blsfab_out(n, comm=bls):
            for _ in range(n):
                comm.ialltoallv(send, counts).wait(out=recv)

        def blsfab_views(n, comm=bls):
            for _ in range(n):
                with comm.ialltoallv(send, counts).views():
                    pass

        def blsfab_views_lent(n, comm=bls):
            for _ in range(n):
                with comm.ialltoallv(send, counts).views(copy_self=False):
                    pass

        def rewrite(i):
            # A store into every cache line of the send buffer: the data is new
            # at each call, as in an application, not left cached since the last.
            send[::64] = i & 0xFF

        def mpi_fresh(n):
            for i in range(n):
                rewrite(i)
                world.Alltoallv(sspec, rspec)

        def blsfab_fresh(n, comm=bls):
            for i in range(n):
                rewrite(i)
                comm.ialltoallv(send, counts).wait()

        contenders = {"MPI_Alltoallv": mpi_blocking, "MPI_Ialltoallv": mpi_nonblocking,
                      "blsfab": blsfab_one, "blsfab out=": blsfab_out,
                      "blsfab views": blsfab_views, "blsfab views lent": blsfab_views_lent,
                      "MPI_Alltoallv fresh": mpi_fresh, "blsfab fresh": blsfab_fresh}
        if args.provider == "shm":
            fab = comm_for(0, max(4096, nbytes + 64), local="fabric")

            def blsfab_fabric(n, comm=fab):
                for _ in range(n):
                    comm.ialltoallv(send, counts).wait()

            contenders["blsfab local=fabric"] = blsfab_fabric
        for threshold in args.zero_copy or []:
            # The same fabric-path exchange with another zero-copy threshold.
            zc = comm_for(0, max(4096, nbytes + 64), local="fabric", zero_copy=threshold)

            def blsfab_threshold(n, comm=zc):
                for _ in range(n):
                    comm.ialltoallv(send, counts).wait()

            contenders[f"blsfab fabric zc={threshold}"] = blsfab_threshold
        if floor is not None:
            if args.provider == "shm":
                contenders["floor direct in place"] = floor.direct(nbytes, False)
                contenders["floor direct copy-out"] = floor.direct(nbytes, True)
                contenders["floor CMA pull"] = floor.pull(nbytes)
            contenders["floor fabric"] = floor.fabric(nbytes, FABRIC_NAMES[args.provider])
        handoff = [floor.handoff_ns(world)] if floor is not None else []
        med, samples = measure(contenders, iterations_for(nbytes))
        if floor is not None:
            floor.close()
            handoff.append(floor.handoff_ns(world))
        row = {"bytes": nbytes, "us": {k: v * 1e6 for k, v in med.items()},
               "samples_us": {k: [x * 1e6 for x in v] for k, v in samples.items()},
               "handoff_ns": handoff}
        out["latency"].append(row)
        log(f"  latency {nbytes:>8} B  " + "  ".join(f"{k} {v:8.2f} us" for k, v in row["us"].items()))

    # ---- batches of small alltoallvs -----------------------------------------------
    for nbytes in (BATCH_SIZES if "batch" in args.sections else []):
        for m in BATCH_M:
            sspec, rspec, send = mpi_buffers(nbytes)
            counts = [nbytes] * size
            # Sized for the packed chain: 26 records of up to 512 B fit one slot.
            bls = comm_for(0, 32768)

            def mpi_batch(n, m=m):
                for _ in range(n):
                    for _ in range(m):
                        world.Alltoallv(sspec, rspec)

            def bls_unchained(n, m=m, comm=bls):
                for _ in range(n):
                    reqs = [comm.ialltoallv(send, counts) for _ in range(m)]
                    for r in reqs:
                        r.wait()

            def bls_chained(n, m=m, comm=bls):
                for _ in range(n):
                    with comm.chain():
                        reqs = [comm.ialltoallv(send, counts) for _ in range(m)]
                    for r in reqs:
                        r.wait()

            med, samples = measure({"MPI_Alltoallv x m": mpi_batch, "blsfab unchained": bls_unchained,
                                    "blsfab chained": bls_chained}, max(20, 600 // m))
            row = {"bytes": nbytes, "m": m, "us": {k: v * 1e6 for k, v in med.items()}}
            out["batch"].append(row)
            log(f"  batch {nbytes:>4} B m={m:>2}  " + "  ".join(f"{k} {v:8.2f} us" for k, v in row["us"].items()))

    # ---- pipelined throughput ----------------------------------------------------------
    for nbytes in ((args.pipe_sizes or PIPE_SIZES) if "pipeline" in args.sections else []):
        sspec, rspec, send = mpi_buffers(nbytes)
        counts = [nbytes] * size
        n = 400

        def mpi_calls(n):
            for _ in range(n):
                world.Alltoallv(sspec, rspec)

        contenders = {"MPI_Alltoallv": mpi_calls}
        for k in PIPE_K:
            bls = comm_for(k, max(4096, nbytes) + 64)

            def bls_pipe(n, k=k, comm=bls):
                fifo = []
                for _ in range(n):
                    fifo.append(comm.ialltoallv(send, counts))
                    if len(fifo) > k:
                        fifo.pop(0).wait()
                for r in fifo:
                    r.wait()

            def mpi_pipe(n, k=k):
                recvs = [np.empty(nbytes * size, dtype=np.uint8) for _ in range(k + 1)]
                fifo = []
                for i in range(n):
                    rs = [recvs[i % (k + 1)], rspec[1], MPI.BYTE]
                    fifo.append(world.Ialltoallv(sspec, rs))
                    if len(fifo) > k:
                        fifo.pop(0).Wait()
                MPI.Request.Waitall(fifo)

            contenders[f"blsfab k={k}"] = bls_pipe
            contenders[f"MPI_Ialltoallv k={k}"] = mpi_pipe
        handoff = [floor.handoff_ns(world)] if floor is not None else []
        med, _ = measure(contenders, n)
        if floor is not None:
            handoff.append(floor.handoff_ns(world))
        row = {"bytes": nbytes, "calls_per_s": {k: 1.0 / v for k, v in med.items()},
               "handoff_ns": handoff}
        out["pipeline"].append(row)
        log(f"  pipeline {nbytes:>5} B  " + "  ".join(f"{k} {v / 1e3:7.1f}k/s" for k, v in row["calls_per_s"].items()))

    # ---- overlap: compute between calls; who makes progress meanwhile? ---------------
    def spin(seconds):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    for nbytes, compute in (OVERLAP if "overlap" in args.sections else []):
        sspec, rspec, send = mpi_buffers(nbytes)
        counts = [nbytes] * size
        k = 2

        def mpi_overlap(n):
            fifo = []
            for _ in range(n):
                fifo.append(world.Ialltoallv(sspec, rspec))
                spin(compute)
                fifo[-1].Test()
                if len(fifo) > k:
                    fifo.pop(0).Wait()
            MPI.Request.Waitall(fifo)

        contenders = {"MPI_Ialltoallv": mpi_overlap}
        for progress in ("poll", "thread"):
            bls = comm_for(k, nbytes + 64, progress)

            def bls_overlap(n, comm=bls):
                fifo = []
                for _ in range(n):
                    fifo.append(comm.ialltoallv(send, counts))
                    spin(compute)
                    if len(fifo) > k:
                        fifo.pop(0).wait()
                for r in fifo:
                    r.wait()

            contenders[f"blsfab {progress}"] = bls_overlap
        med, _ = measure(contenders, 300)
        row = {"bytes": nbytes, "compute_us": compute * 1e6,
               "us": {k2: v * 1e6 for k2, v in med.items()}}
        out["overlap"].append(row)
        log(f"  overlap {nbytes:>6} B +{compute * 1e6:.0f} us  " +
            "  ".join(f"{k2} {v:8.2f} us" for k2, v in row["us"].items()))

    # ---- breakdown: where one blsfab call spends its time ------------------------------
    for nbytes in (sizes if "breakdown" in args.sections else []):
        counts = [nbytes] * size
        send = np.full(nbytes * size, rank, dtype=np.uint8)
        paths = [default_local] + (["fabric"] if default_local == "shared" else [])
        for local in paths:
            bls = comm_for(0, max(4096, nbytes + 64), local=local)
            for how in ("wait", "views"):
                n = iterations_for(nbytes)
                for _ in range(max(2, n // 5)):  # warm-up
                    bls.ialltoallv(send, counts).wait()
                before = bls.stats()
                world.Barrier()
                post = take = 0.0
                t0 = time.perf_counter()
                for _ in range(n):
                    t1 = time.perf_counter()
                    req = bls.ialltoallv(send, counts)
                    t2 = time.perf_counter()
                    if how == "views":
                        with req.views():
                            pass
                    else:
                        req.wait()
                    post += t2 - t1
                    take += time.perf_counter() - t2
                total = time.perf_counter() - t0
                after = bls.stats()
                mine = {"call_us": total / n * 1e6, "post_us": post / n * 1e6,
                        "receive_us": take / n * 1e6}
                mine.update({k: (after[k] - before[k]) / n for k in
                             ("in_place", "spilled", "zero_copy", "eagain_retries",
                              "blocked_posts")})
                rows = world.gather(mine, root=0)
                if rank == 0:
                    row = {"bytes": nbytes, "local": local, "receive": how, "ranks": rows}
                    out.setdefault("breakdown", []).append(row)
                    log(f"  breakdown {nbytes:>8} B {local:>6} {how:>5}: " + "  ".join(
                        f"r{r} {x['call_us']:.1f} us = ialltoallv {x['post_us']:.1f} + "
                        f"{how} {x['receive_us']:.1f}" for r, x in enumerate(rows)))

    stats = {",".join(f"{name}={v}" for name, v in zip(("bound", "slot", "progress", "local",
                                                           "zero_copy"), key)): c.stats()
             for key, c in comms.items()}
    for c in comms.values():
        c.close()
    if rank == 0:
        out["blsfab_stats_rank0"] = stats
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


# --------------------------------------------------------------------------- launcher

def launch(args) -> int:
    results = args.results
    os.makedirs(results, exist_ok=True)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               FI_TCP_IFACE=os.environ.get("FI_TCP_IFACE", "lo"))
    env.pop("FI_PROVIDER", None)
    jobs = []
    t_start = time.time()
    floor_lib = build_floor()
    for provider, btl in JOBS:
        if args.provider and provider != args.provider:
            continue
        for P in args.nprocs:
            path = os.path.join(results, f"alltoallv_{provider}_P{P}.json")
            cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "--mca", "btl", btl,
                   "-np", str(P), sys.executable, os.path.abspath(__file__), "--worker",
                   "--provider", provider, "--json", path, "--repeats", str(args.repeats),
                   "--chain-threshold", str(args.chain_threshold),
                   "--timeout", str(args.timeout), "--sections", ",".join(args.sections),
                   "--floor-lib", floor_lib] + (["--quick"] if args.quick else [])
            if args.sizes:
                cmd += ["--sizes", ",".join(map(str, args.sizes))]
            if args.pipe_sizes:
                cmd += ["--pipe-sizes", ",".join(map(str, args.pipe_sizes))]
            if args.contenders:
                cmd += ["--contenders", ",".join(args.contenders)]
            if args.zero_copy:
                cmd += ["--zero-copy", ",".join(map(str, args.zero_copy))]
            print(f"[{time.time() - t_start:6.0f} s] P={P} blsfab {provider} vs Open MPI btl {btl}",
                  flush=True)
            subprocess.run(cmd, env=env, check=True)
            with open(path) as f:
                jobs.append(json.load(f))
    summary = {"command": " ".join(["python", "bench/alltoallv.py"] + sys.argv[1:]),
               "jobs": jobs}
    with open(os.path.join(results, "alltoallv.json"), "w") as f:
        json.dump(summary, f, indent=1)
    text = report(jobs)
    print(text)
    with open(os.path.join(results, "alltoallv.txt"), "w") as f:
        f.write(f"$ {summary['command']}\n{text}\n")
    plot(jobs, results)
    print(f"\nwrote {os.path.relpath(results)}/alltoallv.json, alltoallv.txt and plots in "
          f"{time.time() - t_start:.0f} s")
    return 0


def report(jobs) -> str:
    lines = []
    say = lines.append
    for job in jobs:
        P, prov = job["P"], job["provider"]
        if job["latency"]:
            names = list(job["latency"][0]["us"])
            say(f"\n== P={P}, blsfab on {prov} vs Open MPI ({'vader' if prov == 'shm' else 'tcp'}): "
                "latency per alltoallv, median us (ratio to MPI_Alltoallv) ==")
            say(f"{'bytes/peer':>10} " + " ".join(f"{n:>22}" for n in names)
                + "  handoff ns (before, after)")
            for row in job["latency"]:
                us = row["us"]
                mpi = us["MPI_Alltoallv"]
                say(f"{row['bytes']:>10} " + " ".join(
                    f"{us[n]:>14.2f} ({us[n] / mpi:5.2f})" for n in names)
                    + "  " + ", ".join(f"{h:.0f}" for h in row.get("handoff_ns", [])))
        if job["batch"]:
            say("-- batches of m small alltoallvs per step, median us per step --")
            say(f"{'bytes':>6} {'m':>3} {'MPI x m':>9} {'unchained':>10} {'chained':>9} "
                f"{'unch/MPI':>9} {'chained/MPI':>12}")
            for row in job["batch"]:
                us = row["us"]
                mpi = us["MPI_Alltoallv x m"]
                unch, ch = us.get("blsfab unchained", float("nan")), us.get("blsfab chained", float("nan"))
                say(f"{row['bytes']:>6} {row['m']:>3} {mpi:>9.2f} {unch:>10.2f} {ch:>9.2f} "
                    f"{unch / mpi:>9.2f} {ch / mpi:>12.2f}")
        if job["pipeline"]:
            say("-- pipelined throughput, thousand calls/s (ratio to blocking MPI_Alltoallv) --")
            for row in job["pipeline"]:
                c = row["calls_per_s"]
                base = c["MPI_Alltoallv"]
                cells = [f"MPI {base / 1e3:.1f}k"] + [
                    f"{name} {v / 1e3:.1f}k ({v / base:.2f}x)" for name, v in c.items()
                    if name != "MPI_Alltoallv"]
                say(f"{row['bytes']:>6} B: " + ", ".join(cells) + "  handoff ns "
                    + ", ".join(f"{h:.0f}" for h in row.get("handoff_ns", [])))
        if job.get("overlap"):
            say("-- overlap: k = 2 outstanding, compute between calls, median us per call --")
            for row in job["overlap"]:
                us = row["us"]
                say(f"{row['bytes']:>6} B + {row['compute_us']:.0f} us compute: " +
                    ", ".join(f"{k} {v:.1f}" for k, v in us.items()) +
                    f"  (thread/poll {us['blsfab thread'] / us['blsfab poll']:.2f})")
    say("\n== targets (issue 9): worst ratio over the sizes each row covers ==")
    for name, target, value, detail in targets(jobs):
        verdict = ("info" if target is None else "n/a " if value is None
                   else "met " if target(value) else "MISS")
        shown = "-" if value is None else f"{value:.2f}"
        say(f"{verdict} {name:<62} {shown:>6}  {detail}")
    return "\n".join(lines)


def targets(jobs):
    """(row, test, worst measured ratio or None, where it came from) per target."""
    def latency_ratio(provider, contender, lo, hi, base="MPI_Alltoallv", nprocs=(2, 4)):
        worst, where = None, ""
        for job in jobs:
            if job["provider"] != provider or job["P"] not in nprocs:
                continue
            for row in job["latency"]:
                us = row["us"]
                if lo <= row["bytes"] <= hi and contender in us:
                    r = us[contender] / us[base]
                    if worst is None or r > worst:
                        worst, where = r, f"P={job['P']} {row['bytes']} B"
        return worst, where

    def pipeline_ratio(hi):
        worst, where = None, ""
        for job in jobs:
            if job["provider"] != "shm":
                continue
            for row in job["pipeline"]:
                c = row["calls_per_s"]
                if row["bytes"] <= hi and "blsfab k=4" in c:
                    r = c["blsfab k=4"] / c["MPI_Alltoallv"]
                    if worst is None or r < worst:
                        worst, where = r, f"P={job['P']} {row['bytes']} B"
        return worst, where

    def chained_26():
        for job in jobs:
            if job["provider"] == "shm" and job["P"] == 2:
                for row in job["batch"]:
                    if row["bytes"] == 512 and row["m"] == 26:
                        us = row["us"]
                        if "blsfab chained" in us:
                            return us["blsfab chained"] / us["MPI_Alltoallv x m"], "P=2 512 B m=26"
        return None, ""

    le = lambda t: (lambda v: v <= t)  # noqa: E731
    rows = [
        ("one host, 4 KiB-1 MiB, zero-copy views <= 0.8", le(0.8),
         *latency_ratio("shm", "blsfab views", 4096, 1 << 20)),
        ("one host, 4 KiB-1 MiB, views(copy_self=False) <= 0.8", le(0.8),
         *latency_ratio("shm", "blsfab views lent", 4096, 1 << 20)),
        ("one host, 4 KiB-1 MiB, plain wait() <= 1.0", le(1.0),
         *latency_ratio("shm", "blsfab", 4096, 1 << 20)),
        ("one host, below 4 KiB, plain wait() <= 1.0", le(1.0),
         *latency_ratio("shm", "blsfab", 0, 4095)),
        ("shm provider forced (local='fabric'), 4 KiB-1 MiB <= 1.2", le(1.2),
         *latency_ratio("shm", "blsfab local=fabric", 4096, 1 << 20)),
        ("tcp;ofi_rxm vs btl tcp, every size, plain wait() <= 1.0", le(1.0),
         *latency_ratio("tcp", "blsfab", 0, 1 << 30)),
        ("pipelined calls/s at k=4, up to 64 KiB, one host >= 1.5x MPI", lambda v: v >= 1.5,
         *pipeline_ratio(65536)),
        ("26 chained 512 B calls, shm P=2 <= 0.3x 26 MPI calls", le(0.3), *chained_26()),
    ]
    def placed(lo, hi):
        return [f"P={job['P']} {section} {row['bytes']} B" for job in jobs
                if job["provider"] == "shm" for section in ("latency", "pipeline")
                for row in job[section] if lo < max(row.get("handoff_ns") or [0]) <= hi]
    slow = placed(SLOW_HANDOFF_NS, SHARED_CORE_NS)
    rows.append((f"(host) shm rows with a handoff of {SLOW_HANDOFF_NS}-{SHARED_CORE_NS} ns "
                 "(vCPUs on two dies)", None, float(len(slow)), ", ".join(slow) or "none"))
    shared = placed(SHARED_CORE_NS, float("inf"))
    rows.append((f"(host) shm rows with a handoff over {SHARED_CORE_NS} ns (ranks 0 and 1 "
                 "shared a core while probed)", None, float(len(shared)), ", ".join(shared) or "none"))
    for prov in ("shm", "tcp"):
        value, where = latency_ratio(prov, "blsfab fresh", 4096, 1 << 20, base="MPI_Alltoallv fresh")
        if value is not None:
            rows.append((f"(fresh data) blsfab/MPI, send buffer rewritten each call, {prov}",
                         None, value, where))
        for name in ("floor direct in place", "floor direct copy-out", "floor CMA pull",
                     "floor fabric"):
            value, where = latency_ratio(prov, name, 0, 1 << 30)
            if value is not None:
                rows.append((f"(limit) {name} on {prov}, worst over sizes", None,
                             value, where))
    return rows


def plot(jobs, results) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plots")
        return
    for job in jobs:
        if not job["latency"]:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        xs = [r["bytes"] for r in job["latency"]]
        for name in job["latency"][0]["us"]:
            ax.plot(xs, [r["us"][name] for r in job["latency"]], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("bytes per peer")
        ax.set_ylabel("median time per alltoallv (us)")
        ax.set_title(f"P={job['P']}, blsfab on {job['provider']} vs Open MPI")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(results, f"alltoallv_{job['provider']}_P{job['P']}.png"), dpi=110)
        plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--provider", choices=["shm", "tcp"], default=None,
                    help="run only this provider's jobs")
    ap.add_argument("--nprocs", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4],
                    help="rank counts, e.g. 2,4")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--chain-threshold", type=int, default=None,
                    help="blsfab chain_threshold (default: the library's)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--timeout", type=float, default=60.0, help="blsfab wait timeout (s)")
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="latency sizes in bytes per peer, e.g. 4096,65536")
    ap.add_argument("--pipe-sizes", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="pipeline sizes in bytes per peer, e.g. 65536")
    ap.add_argument("--contenders", type=lambda s: s.split(","), default=None,
                    help="run only these contenders (by name, e.g. 'blsfab,blsfab views'); "
                         "MPI_Alltoallv, the baseline of every ratio, always runs")
    ap.add_argument("--zero-copy", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="latency: also run the fabric path with these zero-copy thresholds "
                         "(bytes; 0 = off), e.g. 0,4096,65536, to tune ZERO_COPY_BYTES")
    ap.add_argument("--results", default=RESULTS,
                    help="directory for the JSON, text and plots (default bench/results)")
    ap.add_argument("--sections", type=lambda s: s.split(","), default=SECTIONS,
                    help="subset of " + ",".join(SECTIONS + EXTRA_SECTIONS))
    ap.add_argument("--floor-lib", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.chain_threshold is None:
        args.chain_threshold = -1
    if args.worker:
        if args.chain_threshold < 0:
            args.chain_threshold = None
        worker(args)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
