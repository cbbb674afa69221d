"""A Communicator serves one thread; dup() gives another thread its own.
usage: check_threads.py PROVIDER ITERS

With one-slot rings every post waits for a credit, so two threads progress
only if a waiting post lets the other thread run (it releases the GIL).
"""

import sys
import threading
import time

import numpy as np

import blsfab
from common import expect, world

provider, iters = sys.argv[1], int(sys.argv[2])
rank, size = world.rank, world.size
comm = blsfab.Communicator(bound=2, ring_slots=1, slot_bytes=4096, provider=provider,
                           timeout=20)
other = comm.dup()
expect(other.bound == comm.bound and other.engine.ring_slots == 1, "dup changed options")


def message(tag, it, dst_count=3):
    return np.arange(size * dst_count, dtype=np.int64) + ((tag * 100000 + it) * 64 + rank) * 64


def expected(tag, it):
    return np.concatenate([np.arange(3 * rank, 3 * rank + 3)
                           + ((tag * 100000 + it) * 64 + s) * 64 for s in range(size)])


comm.alltoallv(message(0, 0), [3] * size)  # this thread now owns comm
errors = []


def intruder():
    try:
        comm.ialltoallv(message(0, 1), [3] * size)
    except RuntimeError as e:
        errors.append(e)


t = threading.Thread(target=intruder)
t.start()
t.join()
expect(len(errors) == 1 and "dup()" in str(errors[0]) and "thread" in str(errors[0]),
       f"a call from another thread gave {errors!r}")
expect(comm.iteration == 1, "the refused call issued an iteration")

# While this thread blocks (rank 1 posts late, so rank 0's post waits for a
# credit, then its wait for data), another thread's poll is refused rather
# than racing it.
errors.clear()


def poller():
    time.sleep(0.3)
    try:
        comm.progress()
    except RuntimeError as e:
        errors.append(e)


if rank == 0:
    t = threading.Thread(target=poller)
    t.start()
    out = comm.ialltoallv(message(0, 1), [3] * size).wait()
    t.join()
    expect(np.array_equal(out, expected(0, 1)), f"iteration 1: {out}")
    expect(len(errors) == 1 and "inside a call" in str(errors[0]),
           f"a poll during another thread's wait gave {errors!r}")
else:
    time.sleep(1.0)
    comm.ialltoallv(message(0, 1), [3] * size).wait()


def worker(c, tag):
    try:
        for it in range(iters):
            out = c.ialltoallv(message(tag, it), [3] * size).wait()
            if not np.array_equal(out, expected(tag, it)):
                raise AssertionError(f"thread {tag} iteration {it}: {out}")
    except BaseException as e:  # reported by the main thread
        errors.append(e)


errors.clear()
t = threading.Thread(target=worker, args=(other, 1))
t.start()
worker_main = worker(comm, 2)
t.join()
expect(not errors, f"two threads with their own communicators: {errors!r}")
expect(comm.stats()["blocked_posts"] > 0 or other.stats()["blocked_posts"] > 0,
       "no post waited for a credit; the test did not exercise the wait")

# Each closes its own communicator, in orders that differ between the ranks.
# close() is collective per communicator: rank 0's other.close() must wait for
# rank 1's, which starts a second late, not pair with rank 1's comm.close().
took = {}


def close_timed(c, name, delay):
    time.sleep(delay)
    t0 = time.monotonic()
    c.close()
    took[name] = time.monotonic() - t0


if rank == 0:
    plan = [(other, "other", 0.0), (comm, "comm", 0.3)]
else:
    plan = [(comm, "comm", 0.0), (other, "other", 1.0)]
closers = [threading.Thread(target=close_timed, args=args) for args in plan]
for t in closers:
    t.start()
for t in closers:
    t.join()
if rank == 0:
    expect(took["other"] > 0.7, f"other.close() returned after {took['other']:.2f} s, before "
           "rank 1 called it: the two communicators' closes were paired with each other")
if rank == 0:
    print(f"OK threads {iters}")
