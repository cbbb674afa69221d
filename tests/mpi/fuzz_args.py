"""Property-based fuzzing of ialltoallv arguments under mpirun.

usage: fuzz_args.py PROVIDER EXAMPLES

Every rank runs the same derandomized hypothesis search, so every rank sees the
same case: one count matrix (rank r sends row r), one dtype, one buffer layout
and one kind of count container, with at most one fault applied on every rank.
Each call must either succeed with the data verified, or raise ValueError or
TypeError before anything is sent; all ranks must agree which (checked with an
MPI allgather of the outcome, a test harness luxury), and the next valid
exchange must still verify.
"""

import hashlib
import sys

import numpy as np
import torch
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

import blsfab
from common import expect, world

rank, size = world.rank, world.size
provider, examples = sys.argv[1], int(sys.argv[2])
SLOT = 2048
comm = blsfab.Communicator(bound=2, slot_bytes=SLOT, provider=provider, timeout=30)
PAYLOAD = SLOT - blsfab._core.SLOT_OVERHEAD   # largest message to one peer, in bytes

DTYPES = ["int8", "uint8", "int16", "int32", "int64", "uint64", "float16", "float32",
          "float64", "complex64", "complex128", "bool", "S3", "V5", "object"]
LAYOUTS = ["contiguous", "tensor", "strided", "2-D", "list", "tensor-strided", "0-D"]
CONTAINERS = ["list", "tuple", "int64", "int32", "uint16", "uint64", "np-scalars",
              "strided-int64", "float-list", "float-array", "bool-list", "str-list",
              "2-D-array"]
FAULTS = ["none", "none", "none", "negative", "too-long", "too-short", "beyond-buffer",
          "beyond-slot", "wraps", "2**63", "huge"]
TORCH = {"int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16,
         "int32": torch.int32, "int64": torch.int64, "float16": torch.float16,
         "float32": torch.float32, "float64": torch.float64, "complex64": torch.complex64,
         "complex128": torch.complex128, "bool": torch.bool}


def content(src, n, dtype):
    """What rank ``src`` sends: n deterministic elements of ``dtype``."""
    raw = ((np.arange(n, dtype=np.int64) * 7 + 13 * src + 1) % 97)
    if dtype == "S3":
        return np.array([b"%03d" % v for v in raw], dtype="S3")
    if dtype in ("V5", "object"):
        base = np.repeat(raw.astype(np.uint8), 5)
        return base.view("V5") if dtype == "V5" else raw.astype(object)
    return raw.astype(dtype)


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    itemsize = np.dtype(dtype).itemsize
    most = PAYLOAD // itemsize
    count = st.one_of(st.just(0), st.integers(0, 8), st.integers(max(most - 2, 0), most),
                      st.integers(0, most))
    matrix = draw(st.lists(st.lists(count, min_size=size, max_size=size),
                           min_size=size, max_size=size))
    return dict(dtype=dtype, matrix=matrix, layout=draw(st.sampled_from(LAYOUTS)),
                container=draw(st.sampled_from(CONTAINERS)), fault=draw(st.sampled_from(FAULTS)),
                fault_at=draw(st.integers(0, size - 1)), slack=draw(st.integers(0, 3)))


def build(case):
    """This rank's (sendbuf, sendcounts) and whether the call must be accepted."""
    dtype, fault, j = case["dtype"], case["fault"], case["fault_at"]
    row = list(case["matrix"][rank])
    valid = dtype != "object"
    if fault == "negative":
        row[j] = -1 - row[j]
    elif fault == "beyond-slot":
        row[j] = PAYLOAD // np.dtype(dtype).itemsize + 1
    elif fault == "wraps":      # c * itemsize wraps in 64 bits
        row[j] = 2**64 // np.dtype(dtype).itemsize + 1 if np.dtype(dtype).itemsize > 1 else 2**62
    elif fault == "2**63":
        row[j] = 2**63
    elif fault == "huge":
        row[j] = 2**70
    elif fault == "beyond-buffer":
        row[j] = max(row[j], 1)   # something to overrun on every rank
    n = sum(max(c, 0) for c in row) + case["slack"]
    if fault == "beyond-buffer":
        n = sum(row) - 1
    if case["layout"] in ("strided", "tensor-strided"):
        n += 2                    # never a 0- or 1-element view, which is contiguous
    n = min(n, 4 * PAYLOAD)
    valid = valid and fault == "none"
    data = content(rank, n, dtype)
    layout = case["layout"]
    if layout == "contiguous":
        buf = data
    elif layout == "strided":
        buf, valid = np.repeat(data, 2)[::2], False
    elif layout == "2-D":
        buf, valid = data.reshape(1, n), False
    elif layout == "0-D":
        buf, valid = data[:1].reshape(()) if n else np.zeros((), dtype=data.dtype), False
    elif layout == "list":
        buf, valid = data.tolist(), False
    else:
        if dtype not in TORCH:   # no torch equivalent: the numpy array instead
            buf = data if layout == "tensor" else np.repeat(data, 2)[::2]
            valid = valid and layout == "tensor"
        else:
            buf = torch.from_numpy(np.ascontiguousarray(data)).to(TORCH[dtype])
            if layout == "tensor-strided":
                buf, valid = buf.repeat_interleave(2)[::2], False
    counts, container = row, case["container"]
    if fault == "too-long":
        counts = row + [0]
    elif fault == "too-short":
        counts = row[:-1]
    fits64 = all(0 <= c < 2**63 for c in counts)
    if container == "tuple":
        counts = tuple(counts)
    elif container in ("int64", "int32", "uint16", "uint64", "strided-int64", "2-D-array"):
        kind = {"strided-int64": "int64", "2-D-array": "int64"}.get(container, container)
        info = np.iinfo(kind)
        if not all(info.min <= c <= info.max for c in counts):
            counts, container = list(counts), "list"   # not representable: stay a list
        else:
            arr = np.array(counts, dtype=kind)
            if container == "strided-int64":
                arr = np.repeat(arr, 2)[::2]
            elif container == "2-D-array":
                arr, valid = arr.reshape(1, -1), False
            counts = arr
    elif container == "np-scalars":
        counts = [np.int64(c) if fits64 else c for c in counts]
    elif container == "float-list":
        counts, valid = [float(c) for c in counts], False
    elif container == "float-array":
        counts, valid = np.array(counts, dtype=np.float64), False
    elif container == "bool-list":
        counts, valid = [bool(c) for c in counts], False
    elif container == "str-list":
        counts, valid = [str(c) for c in counts], False
    return buf, counts, valid


def expected(case):
    want = []
    for src in range(size):
        row = case["matrix"][src]
        full = content(src, sum(row) + case["slack"], case["dtype"])
        off = sum(row[:rank])
        want.append(full[off:off + row[rank]])
    return np.concatenate(want), [case["matrix"][s][rank] for s in range(size)]


def check_next_exchange():
    buf = np.arange(3 * size, dtype=np.float32) + 100 * rank
    out = comm.alltoallv(buf, [3] * size)
    want = np.concatenate([np.arange(3) + 3 * rank + 100 * r for r in range(size)])
    expect(np.array_equal(out, want), "the valid exchange after a fuzz case failed")


stats = {"ok": 0, "ValueError": 0, "TypeError": 0}


@settings(max_examples=examples, derandomize=True, database=None, deadline=None,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(cases())
def fuzz(case):
    digest = hashlib.sha1(repr(case).encode()).hexdigest()
    buf, counts, valid = build(case)
    before, puts = comm.iteration, comm.stats()["puts"]
    try:
        req = comm.ialltoallv(buf, counts)
    except (ValueError, TypeError) as exc:
        outcome = type(exc).__name__
        expect(comm.iteration == before and comm.stats()["puts"] == puts,
               f"{case}: {outcome} after something was sent")
        expect(not valid, f"{case}: valid case refused: {exc!r}")
    else:
        outcome = "ok"
        expect(valid, f"{case}: invalid case accepted")
        got = req.wait()
        want, recvcounts = expected(case)
        got_np = got.numpy() if isinstance(got, torch.Tensor) else got
        expect(req.recvcounts == recvcounts, f"{case}: recvcounts {req.recvcounts}")
        expect(got_np.dtype == want.dtype and got_np.tobytes() == want.tobytes(),
               f"{case}: wrong data")
    views = world.allgather((digest, outcome))
    expect(len(set(views)) == 1, f"ranks disagree on the case or its outcome: {views}")
    stats[outcome] += 1
    check_next_exchange()


fuzz()
comm.close()
if rank == 0:
    print(f"OK fuzz {examples} examples {stats}", flush=True)
