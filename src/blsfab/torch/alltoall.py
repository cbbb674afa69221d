"""``all_to_all_single`` and ``all_to_all``: a personalized exchange is one
``ialltoallv`` iteration, or several when the splits are even and a share
exceeds a slot."""

from __future__ import annotations

from typing import List, Sequence

import torch

from .. import _core
from .rounds import post_even, requests
from .tensors import Sink, check_same_dtype, check_tensor, flat, write_back
from .work import Work, done_work


def all_to_all_single(pg, output, input, output_split_sizes, input_split_sizes,
                      opts=None) -> Work:
    check_tensor(output, "all_to_all_single output")
    check_tensor(input, "all_to_all_single input")
    dtype = input.dtype
    if output.dtype != dtype:
        raise TypeError(f"blsfab: all_to_all_single output is {output.dtype} but input is "
                        f"{dtype}")
    size, rank = pg._size, pg._rank
    in_counts = _split_counts("input", input, input_split_sizes, size)
    out_counts = _split_counts("output", output, output_split_sizes, size)
    payload = flat(input)
    sink = Sink(output)
    even = not input_split_sizes and not output_split_sizes
    if even and in_counts[0] != out_counts[0]:
        raise ValueError(f"blsfab: all_to_all_single with even splits sends {in_counts[0]} "
                         f"elements to each rank but the output holds {out_counts[0]} per "
                         "rank; pass split sizes")
    item = input.element_size()
    if not even and max(in_counts) * item > pg._cap:
        big = in_counts.index(max(in_counts))
        need = in_counts[big] * item
        raise ValueError(
            f"blsfab: all_to_all_single sends {need} bytes to rank {big} but one message "
            f"holds at most {pg._cap} (slot_bytes={pg._comm.slot_bytes}); set "
            f"BLSFAB_SLOT_BYTES (or pg_options slot_bytes) >= {need + _core.SLOT_OVERHEAD} "
            "on every rank")

    def receive(req, result) -> None:
        _check_counts("all_to_all_single", req.recvcounts, out_counts, rank)
        if result is not sink.buf:
            sink.fill(result)
        elif not sink.direct:
            sink.flush()


    if (opts is not None and not opts.asyncOp and not pg._pending
            and (not even or in_counts[0] * item <= pg._cap)):
        # Fast path: dist.all_to_all_single(async_op=False) waits at once, and
        # nothing else is in flight: one iteration, waited here.
        with pg._lock:
            if not pg._pending:
                pg._check_open("all_to_all_single")
                req = pg._comm.ialltoallv(payload, in_counts)
                receive(req, WaitInto(req, sink.buf).wait())
                return done_work(pg, "all_to_all_single", [output])

    def post():
        if even:
            rounds = post_even(pg, payload, in_counts[0], item)
            reqs = requests(rounds)
        else:
            reqs = [pg._comm.ialltoallv(payload, in_counts)]
        if len(reqs) == 1:
            reqs = [WaitInto(reqs[0], sink.buf)]

        def finish(results):
            if len(reqs) == 1:
                receive(reqs[0], results[0])
                return [output]
            grid = sink.buf.view(size, out_counts[0])
            for (req, lo, n), res in zip(rounds, results):
                _check_counts("all_to_all_single", req.recvcounts, [n] * size, rank)
                grid[:, lo:lo + n].copy_(res.view(size, n))
            sink.flush()
            return [output]
        return reqs, finish

    return pg._launch("all_to_all_single", post, opts)


def alltoall(pg, output_tensors, input_tensors, opts=None) -> Work:
    size = pg._size
    if len(output_tensors) != size or len(input_tensors) != size:
        raise ValueError(f"blsfab: all_to_all needs {size} input and {size} output tensors; "
                         f"got {len(input_tensors)} and {len(output_tensors)}")
    everything = list(output_tensors) + list(input_tensors)
    for t in everything:
        check_tensor(t, "all_to_all tensor")
    check_same_dtype(everything, "all_to_all")
    counts = [t.numel() for t in input_tensors]
    expect = [t.numel() for t in output_tensors]
    item = input_tensors[0].element_size()
    if max(counts) * item > pg._cap:
        big = counts.index(max(counts))
        raise ValueError(f"blsfab: all_to_all sends {counts[big] * item} bytes to rank "
                         f"{big}; one message holds at most {pg._cap}; raise "
                         "BLSFAB_SLOT_BYTES")
    payload = torch.cat([flat(t) for t in input_tensors])
    outs = list(output_tensors)
    rank = pg._rank

    def post():
        req = pg._comm.ialltoallv(payload, counts)

        def finish(results):
            _check_counts("all_to_all", req.recvcounts, expect, rank)
            write_back(results[0], outs)
            return list(output_tensors)
        return [req], finish

    return pg._launch("all_to_all", post, opts)


class WaitInto:
    """A Request whose wait() assembles the data straight into ``buf`` (the
    output), no copy afterwards; when the ranks' splits disagree it returns
    the data as a new tensor, and the caller reports the disagreement."""

    __slots__ = ("req", "buf")

    def __init__(self, req, buf: torch.Tensor):
        self.req, self.buf = req, buf

    def test(self) -> bool:
        return self.req.test()

    def wait(self, timeout=None):
        try:
            return self.req.wait(timeout, out=self.buf)
        except ValueError:
            return self.req.wait(timeout)

    @property
    def recvcounts(self):
        return self.req.recvcounts


def _split_counts(what: str, t: torch.Tensor, splits, size: int) -> List[int]:
    """Elements to (input) or from (output) each rank; splits are in dim-0 rows."""
    if not splits and t.dim() == 1:
        n = t.numel()
        if n % size == 0:
            return [n // size] * size
    if t.dim() == 0:
        rows, row = 1, 1
    else:
        rows = t.shape[0]
        row = t.numel() // rows if rows else 0
    if not splits:
        if rows % size:
            raise ValueError(f"blsfab: all_to_all_single {what} has {rows} rows, not divisible "
                             f"by the group size {size}; pass split sizes")
        return [rows // size * row] * size
    if len(splits) != size:
        raise ValueError(f"blsfab: all_to_all_single {what}_split_sizes has {len(splits)} "
                         f"entries; the group has {size} ranks")
    splits = [int(s) for s in splits]
    if min(splits) < 0 or sum(splits) != rows:
        raise ValueError(f"blsfab: all_to_all_single {what}_split_sizes {splits} must be "
                         f"non-negative and sum to the {what}'s {rows} rows")
    return [s * row for s in splits] if row != 1 else splits


def _check_counts(name: str, got: Sequence[int], expect: Sequence[int], rank: int) -> None:
    """Raise when the elements received from each rank are not what the output expects."""
    if got != expect:
        raise ValueError(f"blsfab: {name} on rank {rank} received {list(got)} elements from "
                         f"ranks 0..n-1 but the output expects {list(expect)}; the ranks' "
                         "split sizes disagree")
