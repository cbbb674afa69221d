"""The replicating collectives on ``ialltoallv``: every rank sends its whole
tensor (or its share, for reduce_scatter) to the ranks that need it, and each
receiver combines the ``size`` copies in rank order, so every rank gets
bit-identical results. Tensors larger than a slot travel in several rounds.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .reductions import reduce_op, reduce_rows, reducer
from .rounds import post_even, post_replicated, received_rows, requests
from .tensors import Sink, check_same_dtype, check_tensor, concat, flat, tensor_list, write_back
from .work import Work


def allreduce(pg, tensors, opts=None) -> Work:
    tensors = tensor_list(tensors, "all_reduce")
    return _reduce(pg, "all_reduce", tensors, reduce_op(opts), opts=opts)


def allreduce_coalesced(pg, tensors, opts=None) -> Work:
    tensors = tensor_list(tensors, "all_reduce_coalesced")
    return _reduce(pg, "all_reduce_coalesced", tensors, reduce_op(opts), opts=opts)


def reduce(pg, tensors, opts=None) -> Work:
    tensors = tensor_list(tensors, "reduce")
    root = _root(opts, pg._size, "reduce")
    return _reduce(pg, "reduce", tensors, reduce_op(opts), root=root, opts=opts)


def _reduce(pg, name: str, tensors: List[torch.Tensor], op, root: Optional[int] = None,
            opts=None) -> Work:
    """all_reduce (``root`` None) or reduce to ``root``."""
    dtype = check_same_dtype(tensors, name)
    size, rank = pg._size, pg._rank
    accumulate, finalize = reducer(op, dtype, size)
    payload = concat(tensors)
    n = payload.numel()
    dests = list(range(size)) if root is None else [root]
    receives = root is None or rank == root

    def error(got, expect):
        return (f"blsfab: {name}: rank {rank} received {got} elements in a round, expected "
                f"{expect}; do all ranks pass tensors of the same size?")

    def post():
        rounds = post_replicated(pg, payload, n, dtype, tensors[0].element_size(), dests)

        def finish(results):
            if not receives:
                return list(tensors)
            acc = torch.empty(n, dtype=dtype)
            for lo, m, rows in received_rows(rounds, results, size, error):
                reduce_rows(rows, acc[lo:lo + m], accumulate)
            finalize(acc)
            write_back(acc, tensors)
            return list(tensors)
        return requests(rounds), finish

    return pg._launch(name, post, opts)


def broadcast(pg, tensors, opts=None) -> Work:
    tensors = tensor_list(tensors, "broadcast")
    root = _root(opts, pg._size, "broadcast")
    rank, size = pg._rank, pg._size
    dtype = check_same_dtype(tensors, "broadcast")
    n = sum(t.numel() for t in tensors)
    payload = concat(tensors) if rank == root else None
    dests = [d for d in range(size) if d != root]

    def error(got, expect):
        return (f"blsfab: broadcast: rank {rank} received {got} elements from root {root}, "
                f"expected {expect}; do all ranks pass the same sizes?")

    def post():
        rounds = post_replicated(pg, payload, n, dtype, tensors[0].element_size(), dests)

        def finish(results):
            if rank != root:
                # One round: its result is the whole tensor already.
                acc = results[0] if len(rounds) == 1 else torch.empty(n, dtype=dtype)
                for lo, m, rows in received_rows(rounds, results, 1, error):
                    if len(rounds) > 1:
                        acc[lo:lo + m].copy_(rows[0])
                write_back(acc, tensors)
            return list(tensors)
        return requests(rounds), finish

    return pg._launch("broadcast", post, opts)


def allgather(pg, output_tensors, input_tensors, opts=None) -> Work:
    inputs = tensor_list(input_tensors, "all_gather")
    if len(inputs) != 1 or len(output_tensors) != 1:
        raise NotImplementedError("blsfab: all_gather takes one input tensor per rank "
                                  "(multi-tensor all_gather is not supported)")
    outs = list(output_tensors[0])
    size = pg._size
    if len(outs) != size:
        raise ValueError(f"blsfab: all_gather needs {size} output tensors; got {len(outs)}")
    inp = inputs[0]
    for t in outs:
        check_tensor(t, "all_gather output")
        if t.numel() != inp.numel() or t.dtype != inp.dtype:
            raise ValueError("blsfab: all_gather output tensors must match the input's "
                             "size and dtype")
    sinks = [Sink(t) for t in outs]
    return _gather(pg, "all_gather", inp, [s.buf for s in sinks], sinks,
                   list(output_tensors), opts)


def all_gather_single(pg, output, input, opts=None) -> Work:
    check_tensor(output, "all_gather_into_tensor output")
    check_tensor(input, "all_gather_into_tensor input")
    size = pg._size
    n = input.numel()
    if output.numel() != size * n or output.dtype != input.dtype:
        raise ValueError(f"blsfab: all_gather_into_tensor output must hold {size} x the "
                         f"input ({n} elements of {input.dtype}); got {output.numel()} "
                         f"of {output.dtype}")
    sink = Sink(output)
    rows = [sink.buf[r * n:(r + 1) * n] for r in range(size)]
    return _gather(pg, "all_gather_into_tensor", input, rows, [sink], [output], opts)


def _gather(pg, name, inp, rows, sinks, value, opts=None) -> Work:
    """Every rank's ``inp`` into ``rows[rank]``; then flush ``sinks``. The
    work's value is ``value``."""
    payload = flat(inp)
    n = payload.numel()
    size = pg._size

    def error(got, expect):
        return (f"blsfab: {name}: received {got} elements in a round, expected {expect}; "
                "do all ranks pass tensors of the same size?")

    def post():
        rounds = post_replicated(pg, payload, n, inp.dtype, inp.element_size(),
                                 list(range(size)))

        def finish(results):
            for lo, m, parts in received_rows(rounds, results, size, error):
                for r in range(size):
                    rows[r][lo:lo + m].copy_(parts[r])
            for s in sinks:
                s.flush()
            return value
        return requests(rounds), finish

    return pg._launch(name, post, opts)


def reduce_scatter_single(pg, output, input, opts=None) -> Work:
    check_tensor(output, "reduce_scatter_tensor output")
    check_tensor(input, "reduce_scatter_tensor input")
    size = pg._size
    n = output.numel()
    if input.numel() != size * n or output.dtype != input.dtype:
        raise ValueError(f"blsfab: reduce_scatter_tensor input must hold {size} x the "
                         f"output ({n} elements of {output.dtype}); got {input.numel()} "
                         f"of {input.dtype}")
    accumulate, finalize = reducer(reduce_op(opts), output.dtype, size)
    payload = flat(input)
    sink = Sink(output)

    def error(got, expect):
        return f"blsfab: reduce_scatter_tensor: received {got} elements, expected {expect}"

    def post():
        rounds = post_even(pg, payload, n, output.element_size())

        def finish(results):
            for lo, m, rows in received_rows(rounds, results, size, error):
                reduce_rows(rows, sink.buf[lo:lo + m], accumulate)
            finalize(sink.buf)
            sink.flush()
            return [output]
        return requests(rounds), finish

    return pg._launch("reduce_scatter_tensor", post, opts)


def reduce_scatter(pg, output_tensors, input_tensors, opts=None) -> Work:
    outs = tensor_list(output_tensors, "reduce_scatter")
    if len(outs) != 1 or len(input_tensors) != 1:
        raise NotImplementedError("blsfab: reduce_scatter takes one output tensor per rank")
    ins = list(input_tensors[0])
    if len(ins) != pg._size:
        raise ValueError(f"blsfab: reduce_scatter needs {pg._size} input tensors")
    for t in ins:
        check_tensor(t, "reduce_scatter input")
    work = reduce_scatter_single(pg, outs[0], concat(ins), opts)
    work._name = "reduce_scatter"
    return work


def barrier(pg, opts=None) -> Work:
    empty = torch.empty(0, dtype=torch.uint8)
    zeros = [0] * pg._size

    def post():
        return [pg._comm.ialltoallv(empty, zeros)], _no_value

    return pg._launch("barrier", post, opts)


def _no_value(results) -> list:
    return []


def _root(opts, size: int, name: str) -> int:
    """The root rank of torch's options (0 when none are given), checked."""
    root = int(opts.rootRank) if opts is not None else 0
    if not 0 <= root < size:
        raise ValueError(f"blsfab: {name} root {root} is not a rank of this {size}-rank group")
    return root
