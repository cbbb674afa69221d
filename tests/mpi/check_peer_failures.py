"""Failures at construction, mid-run and at close end on every surviving rank
within timeout + 1 s, with an error naming the failing rank.

usage: check_peer_failures.py PROVIDER SCENARIO  (run with mpirun --enable-recovery)

The last rank is the one that misbehaves. Every survivor prints
"OK rank R SCENARIO <seconds>"; the test checks that each one did. Workers leave
with os._exit, since MPI_Finalize would wait for a dead rank.
"""

import os
import resource
import signal
import sys
import time

import numpy as np

import blsfab
from mpi4py import MPI

world = MPI.COMM_WORLD
rank, size = world.rank, world.size
provider, scenario = sys.argv[1], sys.argv[2]
T = 3.0                      # the communicators' timeout
SLACK = 1.0                  # every survivor must end within T + SLACK
odd = size - 1               # the rank that misbehaves


def done(took, note=""):
    print(f"OK rank {rank} {scenario} {took:.2f} s {note}", flush=True)
    os._exit(0)


def fail(msg):
    print(f"rank {rank}: FAIL {scenario}: {msg}", flush=True)
    os._exit(1)


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def make(**kw):
    args = dict(bound=2, slot_bytes=4096, provider=provider, timeout=T)
    args.update(kw)
    return blsfab.Communicator(**args)


def expect_error(fn, kinds, names, limit=T + SLACK):
    """Run fn; it must raise one of ``kinds`` within ``limit`` s, naming ``names``."""
    t0 = time.monotonic()
    try:
        fn()
    except kinds as exc:
        took = time.monotonic() - t0
        if took > limit:
            fail(f"{type(exc).__name__} after {took:.2f} s > {limit} s: {exc}")
        for word in names:
            if word not in str(exc):
                fail(f"{type(exc).__name__} does not name {word!r}: {exc}")
        return exc, took
    fail(f"no error from {fn} (expected {kinds})")


def exchange(comm, iterations, stop_at=None):
    buf = np.arange(4 * size, dtype=np.int64) + 100 * rank
    for it in range(iterations):
        if it == stop_at:
            return
        out = comm.alltoallv(buf, [4] * size)
        want = np.concatenate([np.arange(4) + 4 * rank + 100 * r for r in range(size)])
        if not np.array_equal(out, want):
            fail(f"iteration {it}: wrong data")


blsfab.providers()   # libfabric start-up is local work, not waiting on a peer
world.Barrier()      # everyone is up; from here on no blocking MPI call

if scenario == "geometry":
    # Every rank raises ValueError naming each rank's values, before allocating.
    exc, took = expect_error(lambda: make(slot_bytes=4096 * (1 + (rank == odd))), ValueError,
                             ["slot_bytes=4096", f"rank {odd}: slot_bytes=8192"])
    expect_error(lambda: make(bound=1 + (rank == odd)), ValueError,
                 ["bound=1", f"rank {odd}: bound=2"])
    comm = make()   # and the next construction works
    exchange(comm, 5)
    comm.close()
    done(took, str(exc))

if scenario == "alloc":
    # One rank cannot allocate its rings: every rank raises naming it and its error.
    if rank == odd:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/statm") as f:
            vm = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (vm + (96 << 20), hard))
    exc, took = expect_error(lambda: make(slot_bytes=64 << 20, bound=0), (MemoryError,
                             blsfab.FabricError), [f"rank {odd}"])
    if rank == odd:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    comm = make()
    exchange(comm, 5)
    comm.close()
    done(took, f"{type(exc).__name__}: {exc}")

if scenario == "late":
    # A rank that arrives after the others gave up: they name it; it learns why.
    if rank == odd:
        time.sleep(T + 1.5)
        exc, took = expect_error(make, blsfab.TimeoutError, [f"[{odd}]"], limit=SLACK)
        done(took, f"(the late rank) {exc}")
    exc, took = expect_error(make, blsfab.TimeoutError, [f"[{odd}]"])
    if exc.ranks != [odd]:
        fail(f"ranks {exc.ranks}")
    done(took, str(exc))

if scenario == "die_before":
    if rank == odd:
        die()
    exc, took = expect_error(make, blsfab.TimeoutError, [f"[{odd}]"])
    done(took, str(exc))

if scenario == "die_during":
    # The odd rank dies between the address exchange and the connection step.
    # Survivors time it from there, the moment it dies.
    import blsfab.communicator as c
    step, started = c.run_step, []

    def run_step(boot, what, *args):
        if "connections" in what:
            if rank == odd:
                die()
            started.append(time.monotonic())
        return step(boot, what, *args)

    c.run_step = run_step
    exc, _ = expect_error(make, blsfab.TimeoutError, [f"{odd}"], limit=1e9)
    took = time.monotonic() - started[0]
    if took > T + SLACK:
        fail(f"{took:.2f} s after the death: {exc}")
    if odd not in exc.ranks:
        fail(f"ranks {exc.ranks}")
    done(took, str(exc))

comm = make()

if scenario == "die_mid_run":
    if rank == odd:
        exchange(comm, 1000, stop_at=50)
        die()
    t0 = time.monotonic()
    exc, took = expect_error(lambda: exchange(comm, 1000), blsfab.TimeoutError,
                             [f"[{odd}]"], limit=1e9)
    if odd not in exc.ranks:
        fail(f"ranks {exc.ranks}")
    # close() then names it too, within the timeout, and frees everything.
    expect_error(comm.close, blsfab.TimeoutError, [f"[{odd}]"])
    expect_error(lambda: comm.ialltoallv(np.zeros(size), [1] * size), blsfab.ClosedError, [])
    done(took, str(exc))

if scenario == "close_early":
    # The odd rank closes at once; the others find out within the timeout.
    if rank == odd:
        t0, note = time.monotonic(), ""
        try:
            comm.close()
        except blsfab.TimeoutError as exc:
            if odd in exc.ranks:
                fail(f"names itself: {exc}")
            note = str(exc)
        took = time.monotonic() - t0
        if took > T + SLACK:
            fail(f"close took {took:.2f} s")
        done(took, f"(closed early) {note}")
    exc, took = expect_error(lambda: exchange(comm, 1000), blsfab.TimeoutError, [f"[{odd}]"])
    try:
        comm.close()
    except blsfab.TimeoutError:
        pass
    done(took, str(exc))

if scenario == "die_in_close":
    exchange(comm, 20)
    if rank == odd:
        comm._boot.barrier = lambda *a: die()
        comm.close()
    exc, took = expect_error(comm.close, blsfab.TimeoutError, [f"[{odd}]"])
    if exc.ranks != [odd]:
        fail(f"ranks {exc.ranks}")
    expect_error(lambda: comm.ialltoallv(np.zeros(size), [1] * size), blsfab.ClosedError, [])
    done(took, str(exc))

fail(f"unknown scenario {scenario!r}")
