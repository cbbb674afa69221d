"""The torch.distributed backend "blsfab", in real multi-process jobs without mpirun.

Each job starts N processes with torchrun's variables (MASTER_ADDR, MASTER_PORT,
RANK, WORLD_SIZE); every process calls init_process_group("blsfab") and builds a
gloo group alongside, whose results are the reference. Run as a script, this
file is that worker:
    RANK=.. WORLD_SIZE=.. MASTER_ADDR=.. MASTER_PORT=.. python tests/test_torch_backend.py worker
"""

import os
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import blsfab.torch as bt
from test_store_bootstrap import free_port, spawn


# ----------------------------------------------------------------------------- in-process

def test_import_registers_the_backend():
    assert "blsfab" in dist.Backend.backend_list
    assert dist.Backend.BLSFAB == "blsfab"
    bt.register()  # idempotent


def test_options_come_from_pg_options_then_environment_then_defaults():
    env = {"BLSFAB_BOUND": "7", "BLSFAB_SLOT_BYTES": "64K", "BLSFAB_PROVIDER": "tcp",
           "BLSFAB_TIMEOUT": "12.5"}
    o = bt.Options.resolve(None, env)
    assert (o.bound, o.slot_bytes, o.provider, o.timeout) == (7, 65536, "tcp", 12.5)
    o = bt.Options.resolve({"bound": 2, "slot_bytes": 4096}, env)
    assert (o.bound, o.slot_bytes, o.provider) == (2, 4096, "tcp")
    o = bt.Options.resolve(bt.Options(provider="shm"), {})
    assert (o.bound, o.slot_bytes, o.provider, o.timeout) == (4, 1 << 20, "shm", None)
    assert bt.parse_bytes("1M") == 1 << 20 and bt.parse_bytes("2KiB") == 2048


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="bund"):
        bt.Options.resolve({"bund": 3})
    with pytest.raises(ValueError, match="BLSFAB_BOUND"):
        bt.Options.resolve(None, {"BLSFAB_BOUND": "four"})
    with pytest.raises(TypeError, match="pg_options"):
        bt.Options.resolve(42)


def test_launcher_variables():
    assert bt.launcher_rank_size({"RANK": "1", "WORLD_SIZE": "4"}) == (1, 4)
    assert bt.launcher_rank_size({"OMPI_COMM_WORLD_RANK": "2",
                                  "OMPI_COMM_WORLD_SIZE": "3"}) == (2, 3)
    assert bt.launcher_rank_size({}) is None


# ----------------------------------------------------------------------------- jobs

def run_job(size, provider, extra_env=None):
    port = free_port()

    def argv(rank):
        return [__file__, "worker", str(rank), str(size), str(port)]

    env = {"BLSFAB_PROVIDER": provider, "OMP_NUM_THREADS": "1"}
    env.update(extra_env or {})
    outs = spawn(size, argv, env, timeout=150)
    for r, out in enumerate(outs):
        assert f"rank {r}: OK all" in out, out
    return outs


# DDP's first construction costs seconds of CPU per rank, so only the 2-rank job runs it.
@pytest.mark.parametrize("size,provider,ddp", [(2, "shm", True), (4, "tcp", False)])
def test_collectives_match_gloo(size, provider, ddp):
    outs = run_job(size, provider, {"CHECK_DDP": "1" if ddp else "0"})
    for out in outs:
        assert "OK all_to_all_single == gloo" in out
        assert "OK async" in out
        assert "OK all_reduce" in out
        assert ("OK DDP" in out) == ddp


# ----------------------------------------------------------------------------- the worker

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def gen(seed, *shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(*shape, generator=g).to(dtype)
    return torch.randint(-1000, 1000, shape, generator=g).to(dtype)


def uneven_splits(seed, size, rows_hint=6):
    """Per (src, dst) row counts, some zero, equal on every rank."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randint(0, rows_hint, (size, size), generator=g)
    m[torch.rand(size, size, generator=g) < 0.3] = 0
    return m.tolist()


class Ctx:
    def __init__(self, rank, size, gloo):
        self.rank, self.size, self.gloo = rank, size, gloo


def a2a_cases(ctx):
    """(name, input, output, out_splits, in_splits) for every rank's share."""
    r, p = ctx.rank, ctx.size
    cases = []
    for k, dtype in enumerate([torch.float32, torch.int64, torch.bfloat16, torch.float16]):
        x = gen(100 * k + r, 4 * p, 3, dtype=dtype)
        cases.append((f"even {dtype}", x, torch.empty_like(x), None, None))
    for k, (dtype, width) in enumerate([(torch.float32, 5), (torch.int32, 1), (torch.float64, 2)]):
        m = uneven_splits(7 + k, p)
        in_splits = m[r]
        out_splits = [m[s][r] for s in range(p)]
        shape = (sum(in_splits), width) if width > 1 else (sum(in_splits),)
        x = gen(200 * k + r, *shape, dtype=dtype)
        out_shape = (sum(out_splits), width) if width > 1 else (sum(out_splits),)
        cases.append((f"uneven {dtype}x{width}", x, torch.empty(out_shape, dtype=dtype),
                      out_splits, in_splits))
    # a non-contiguous output and an empty exchange
    x = gen(300 + r, 2 * p, 4)
    cases.append(("non-contiguous output", x, torch.empty(4, 2 * p).t(), None, None))
    cases.append(("all empty", torch.empty(0), torch.empty(0), [0] * p, [0] * p))
    return cases


@check
def all_to_all_single_matches_gloo(ctx):
    cases = a2a_cases(ctx)
    refs = []
    for name, x, out, osp, isp in cases:   # gloo first: nothing of ours is in flight
        # (gloo fills a non-contiguous output in memory order; compare logically)
        ref = torch.empty(out.shape, dtype=out.dtype)
        dist.all_to_all_single(ref, x, osp, isp, group=ctx.gloo)
        refs.append(ref)
    for (name, x, out, osp, isp), ref in zip(cases, refs):
        before = out.data_ptr()
        dist.all_to_all_single(out, x, osp, isp)
        assert out.data_ptr() == before
        assert torch.equal(out, ref), f"{name}: {out} != gloo {ref}"
    return "all_to_all_single == gloo"


@check
def async_calls_in_flight(ctx):
    cases = [c for c in a2a_cases(ctx) if c[3] is not None][:2] * 4  # 8 uneven calls
    refs = []
    for name, x, out, osp, isp in cases:
        ref = torch.empty_like(out)
        dist.all_to_all_single(ref, x, osp, isp, group=ctx.gloo)
        refs.append(ref)
    outs = [torch.empty_like(c[2]) for c in cases]
    pg = dist.distributed_c10d._get_default_group()
    works = [dist.all_to_all_single(o, x, osp, isp, async_op=True)
             for o, (name, x, _, osp, isp) in zip(outs, cases)]
    # the bound (pg_options / env) caps how far this rank ran ahead of the slowest
    assert pg.communicator.stats()["max_lead"] <= pg.communicator.bound
    for w in reversed(works):      # newest first
        assert w.wait() is True
        assert w.is_completed() and w.is_success()
    for o, ref in zip(outs, refs):
        assert torch.equal(o, ref)
    # futures complete without wait() (the progress thread), and chain
    x = gen(5, 2 * ctx.size)
    out = torch.empty_like(x)
    ref = torch.empty_like(x)
    dist.all_to_all_single(ref, x, group=ctx.gloo)
    fut = dist.all_to_all_single(out, x, async_op=True).get_future()
    doubled = fut.then(lambda f: f.value()[0] * 2)
    assert torch.equal(doubled.wait(), ref * 2)
    return f"async ({len(works)} in flight, bound {pg.communicator.bound})"


def rank_order_reduce(values, op):
    acc = values[0].clone()
    for v in values[1:]:
        if op == "sum" or op == "avg":
            acc.add_(v)
        elif op == "max":
            torch.maximum(acc, v, out=acc)
        elif op == "min":
            torch.minimum(acc, v, out=acc)
        elif op == "product":
            acc.mul_(v)
    return acc.div_(len(values)) if op == "avg" else acc


@check
def all_reduce_ops(ctx):
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
           "avg": dist.ReduceOp.AVG, "product": dist.ReduceOp.PRODUCT}
    n_big = 3000  # 12 KB: several slot-sized rounds with BLSFAB_SLOT_BYTES=4K
    for name, op in ops.items():
        for n in (7, n_big):
            x = gen(11 * n + ctx.rank, n)
            mine = x.clone()
            dist.all_reduce(mine, op=op)
            # bit-identical on every rank: the same rank-order reduce of everyone's input
            want = rank_order_reduce([gen(11 * n + s, n) for s in range(ctx.size)], name)
            assert torch.equal(mine, want), f"all_reduce {name} n={n}"
    # integers against gloo, exactly
    xi = gen(3 + ctx.rank, 5, 4, dtype=torch.int64)
    a, b = xi.clone(), xi.clone()
    dist.all_reduce(a)
    dist.all_reduce(b, group=ctx.gloo)
    assert torch.equal(a, b)
    # a non-contiguous tensor is reduced in place
    t = gen(9 + ctx.rank, 6, 4).t()
    want = rank_order_reduce([gen(9 + s, 6, 4).t() for s in range(ctx.size)], "sum")
    dist.all_reduce(t)
    assert torch.equal(t, want)
    # async all_reduce, completed through its future only
    fut = dist.all_reduce(torch.ones(3) * ctx.rank, async_op=True).get_future()
    assert torch.equal(fut.wait()[0], torch.full((3,), float(sum(range(ctx.size)))))
    return "all_reduce sum/max/min/avg/product"


@check
def other_collectives(ctx):
    r, p = ctx.rank, ctx.size
    # broadcast, several rounds, from every root
    for root in range(p):
        t = gen(50 + r, 2500) if r == root else torch.zeros(2500)
        dist.broadcast(t, src=root)
        assert torch.equal(t, gen(50 + root, 2500)), f"broadcast from {root}"
    # all_gather_into_tensor and all_gather
    x = gen(60 + r, 1100)
    out = torch.empty(p * 1100)
    dist.all_gather_into_tensor(out, x)
    assert torch.equal(out, torch.cat([gen(60 + s, 1100) for s in range(p)]))
    lst = [torch.empty(3, 2) for _ in range(p)]
    dist.all_gather(lst, torch.full((3, 2), float(r)))
    assert all(torch.equal(t, torch.full((3, 2), float(s))) for s, t in enumerate(lst))
    # reduce_scatter_tensor, reduce, all_to_all (lists)
    inp = gen(70 + r, p * 4)
    out = torch.empty(4)
    dist.reduce_scatter_tensor(out, inp)
    want = rank_order_reduce([gen(70 + s, p * 4)[4 * r:4 * r + 4] for s in range(p)], "sum")
    assert torch.equal(out, want)
    t = gen(80 + r, 5)
    dist.reduce(t, dst=p - 1)
    if r == p - 1:
        assert torch.equal(t, rank_order_reduce([gen(80 + s, 5) for s in range(p)], "sum"))
    ins = [torch.full((j + 1,), float(10 * r + j)) for j in range(p)]
    outs = [torch.empty(r + 1) for _ in range(p)]
    dist.all_to_all(outs, ins)
    assert all(torch.equal(o, torch.full((r + 1,), float(10 * s + r))) for s, o in enumerate(outs))
    dist.barrier()
    # a second blsfab group on a subset of the ranks, with its own options
    members = [0, p - 1]
    sub = dist.new_group(members, backend="blsfab", pg_options={"bound": 1})
    if r in members:
        t = torch.full((3,), float(r))
        dist.all_reduce(t, group=sub)
        assert torch.equal(t, torch.full((3,), float(p - 1))), t
        assert sub.communicator.size == 2 and sub.communicator.bound == 1
    return ("broadcast, all_gather(_into_tensor), reduce_scatter_tensor, reduce, all_to_all, "
            "barrier, subgroup")


@check
def ddp_trains_in_step(ctx):
    torch.manual_seed(ctx.rank)  # different initial weights: DDP must broadcast rank 0's
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.001)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(100 + ctx.rank)
    for _ in range(5):
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 2, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    flat = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    every = [torch.empty_like(flat) for _ in range(ctx.size)]
    dist.all_gather(every, flat)
    assert all(torch.equal(every[0], e) for e in every), "DDP replicas diverged"
    return "DDP"


@check
def unsupported_calls_name_themselves(ctx):
    for name, call in (("send", lambda: dist.send(torch.ones(1), (ctx.rank + 1) % ctx.size)),
                       ("gather", lambda: dist.gather(
                           torch.ones(1), [torch.empty(1) for _ in range(ctx.size)]
                           if ctx.rank == 0 else None, dst=0))):
        try:
            call()
        except NotImplementedError as exc:
            assert name in str(exc) and "blsfab" in str(exc), exc
        else:
            raise AssertionError(f"{name} did not raise")
    # a bad call raises before anything is posted: the group stays usable
    try:
        dist.all_to_all_single(torch.empty(3), torch.empty(3 * ctx.size + 1))
    except ValueError as exc:
        assert "divisible" in str(exc) or "split" in str(exc), exc
    else:
        raise AssertionError("bad split did not raise")
    x = torch.ones(2)
    dist.all_reduce(x)
    assert torch.equal(x, torch.full((2,), float(ctx.size)))
    return "unsupported and bad calls raise"


def worker(rank, size, port):
    t0 = time.perf_counter()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(size))
    torch.set_num_threads(1)
    # bound from the environment, slot size from pg_options (small: forces rounds)
    os.environ.setdefault("BLSFAB_BOUND", "3")
    dist.init_process_group("blsfab", timeout=timedelta(seconds=60),
                            pg_options={"slot_bytes": 4096})
    assert dist.get_backend() == "blsfab"
    pg = dist.distributed_c10d._get_default_group()
    assert pg.communicator.bound == 3 and pg.communicator.slot_bytes == 4096
    wanted = {"shm": "shm", "tcp": "tcp;ofi_rxm"}[os.environ["BLSFAB_PROVIDER"]]
    assert pg.communicator.provider == wanted, pg.communicator.provider
    ctx = Ctx(rank, size, dist.new_group(backend="gloo"))
    print(f"rank {rank}: set-up {time.perf_counter() - t0:.2f} s", flush=True)
    for fn in CHECKS:
        if fn is ddp_trains_in_step and os.environ.get("CHECK_DDP") != "1":
            continue
        t0 = time.perf_counter()
        try:
            what = fn(ctx)
        except Exception as exc:
            print(f"rank {rank}: FAIL {fn.__name__}: {type(exc).__name__}: {exc}", flush=True)
            raise
        print(f"rank {rank}: OK {what} ({time.perf_counter() - t0:.2f} s)", flush=True)
    dist.destroy_process_group()
    print(f"rank {rank}: OK all", flush=True)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
