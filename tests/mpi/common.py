"""Shared pieces of the worker scripts that tests run under mpirun."""

import os
import sys

import numpy as np
from mpi4py import MPI

world = MPI.COMM_WORLD


def fail(msg):
    print(f"rank {world.rank}: FAIL: {msg}", file=sys.stderr, flush=True)
    world.Abort(1)


def expect(cond, msg):
    if not cond:
        fail(msg)


def reference_alltoallv(sendbuf, sendcounts, comm=world):
    """MPI_Alltoallv on the same input, for comparison (numpy, byte-wise)."""
    size = comm.size
    item = sendbuf.itemsize
    raw = np.ascontiguousarray(sendbuf).view(np.uint8)
    scounts = np.asarray(sendcounts, dtype=np.int64) * item
    rcounts = np.empty(size, dtype=np.int64)
    comm.Alltoall(scounts, rcounts)
    sdispl = np.concatenate([[0], np.cumsum(scounts)[:-1]])
    rdispl = np.concatenate([[0], np.cumsum(rcounts)[:-1]])
    out = np.empty(int(rcounts.sum()), dtype=np.uint8)
    comm.Alltoallv([raw, (scounts, sdispl), MPI.BYTE], [out, (rcounts, rdispl), MPI.BYTE])
    return out, (rcounts // item).tolist()


# How workers take delivery, so every receive path runs the same checks:
# BLSFAB_TEST_RECEIVE=plain (wait()), out (wait(out=...)), views (views()).
RECEIVE = os.environ.get("BLSFAB_TEST_RECEIVE", "plain")


def receive(req, nelems, like):
    """The data of ``req`` (``nelems`` elements of ``like``'s kind and dtype),
    taken the way BLSFAB_TEST_RECEIVE says; always a buffer the caller owns."""
    if RECEIVE == "plain":
        return req.wait()
    if RECEIVE == "out":
        if isinstance(like, np.ndarray):
            buf = np.full(nelems, 0x5A, dtype=like.dtype)
        else:
            import torch
            buf = torch.full((nelems,), 90, dtype=like.dtype)
        got = req.wait(out=buf)
        expect(got is buf, "wait(out=buf) did not return buf")
        return buf
    if RECEIVE == "views":
        with req.views() as parts:
            expect(len(parts) == world.size, f"{len(parts)} views for {world.size} ranks")
            if isinstance(like, np.ndarray):
                expect(all(not p.flags.writeable for p in parts), "a view is writable")
                data = np.concatenate(parts) if parts else np.empty(0, like.dtype)
            else:
                import torch
                data = torch.cat(parts)
        expect(len(data) == nelems, f"views hold {len(data)} elements, expected {nelems}")
        return data
    fail(f"unknown BLSFAB_TEST_RECEIVE={RECEIVE!r}")


def scribble(buf):
    """Overwrite a send buffer whose request completed: nothing received may change."""
    if isinstance(buf, np.ndarray):
        buf.view(np.uint8)[:] = 0xEE
    else:
        buf.view(-1).zero_().add_(-7) if buf.dtype.is_floating_point or buf.dtype.is_signed else buf.zero_()


def check_paths(stats):
    """Every peer took the path BLSFAB_LOCAL asked for (one host: all of them)."""
    local = os.environ.get("BLSFAB_LOCAL")
    want = {"shared": "shared", "fabric": "fabric"}.get(local)
    if want is None:
        return
    peers = [p for r, p in enumerate(stats["paths"]) if r != world.rank]
    expect(all(p == want for p in peers), f"BLSFAB_LOCAL={local} but paths are {stats['paths']}")
    if want == "fabric" and os.environ.get("BLSFAB_ZERO_COPY_BYTES") == "1":
        expect(stats["zero_copy"] > 0, f"no zero-copy write: {stats}")
