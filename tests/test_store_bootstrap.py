"""The c10d-store bootstrap: unit tests in one process (threads on a HashStore),
real multi-process Communicators on a FileStore and a TCPStore without mpirun,
and one mpirun job showing the MPI and store bootstraps give the same results.

Run as a script, this file is the worker of the multi-process tests:
    python tests/test_store_bootstrap.py worker KIND ADDRESS RANK SIZE PROVIDER
"""

import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import torch.distributed as dist

import blsfab
from blsfab.store_bootstrap import StoreBootstrap

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- in-process

def run_threads(size, fn):
    """Run fn(rank) on ``size`` threads; return results, re-raise the first error."""
    results, errors = [None] * size, []

    def body(r):
        try:
            results[r] = fn(r)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    return results


def test_allgather_returns_every_rank_in_order_and_calls_do_not_collide():
    store = dist.HashStore()

    def rank_fn(r):
        boot = StoreBootstrap(store, r, 3, timeout=10)
        first = boot.allgather(b"a%d" % r)
        second = boot.allgather(bytes([r]) * 1000)
        third = boot.allgather(b"")
        return first, second, third

    for first, second, third in run_threads(3, rank_fn):
        assert first == [b"a0", b"a1", b"a2"]
        assert second == [bytes([r]) * 1000 for r in range(3)]
        assert third == [b""] * 3


def test_second_bootstrap_on_the_same_store_gets_its_own_keys():
    store = dist.HashStore()

    def rank_fn(r):
        out = []
        for generation in range(3):
            boot = StoreBootstrap(store, r, 2, timeout=10)
            out.append(boot.allgather(b"%d/%d" % (generation, r)))
        return out

    for out in run_threads(2, rank_fn):
        assert out == [[b"%d/0" % g, b"%d/1" % g] for g in range(3)]


def test_a_dup_has_its_own_channel_so_its_calls_never_pair_with_the_parents():
    store = dist.HashStore()

    def rank_fn(r):
        boot = StoreBootstrap(store, r, 2, timeout=10)
        dup = boot.dup()
        # The ranks use the two in opposite orders: each call must still meet
        # the same bootstrap's call on the other rank.
        order = [(boot, b"parent"), (dup, b"dup")] if r == 0 else [(dup, b"dup"), (boot, b"parent")]
        got = {}
        threads = [threading.Thread(target=lambda b=b, tag=tag: got.__setitem__(
            tag, b.allgather(tag + b"%d" % r))) for b, tag in order]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(20)
        return got

    for got in run_threads(2, rank_fn):
        assert got == {b"parent": [b"parent0", b"parent1"], b"dup": [b"dup0", b"dup1"]}


def test_old_keys_are_deleted_once_every_rank_moved_on():
    store = dist.HashStore()

    def rank_fn(r):
        boot = StoreBootstrap(store, r, 2, timeout=10)
        boot.allgather(b"%d" % r)
        boot.allgather(b"%d" % r)
        boot.barrier(lambda: 0, 10)
        return boot

    boots = run_threads(2, rank_fn)
    ns = boots[0]._ns
    assert not store.check([f"{ns}/1/allgather/0"])  # retired after call 2
    assert not store.check([f"{ns}/2/allgather/1"])  # retired after call 3 (the barrier)
    assert store.check([f"{ns}/3/arrive/0"])          # the last call's keys remain


def test_barrier_keeps_calling_progress_while_it_waits():
    store = dist.HashStore()
    calls = [0, 0]

    def rank_fn(r):
        boot = StoreBootstrap(store, r, 2, timeout=10)

        def progress():
            calls[r] += 1
            return 0

        if r == 1:
            time.sleep(0.3)  # rank 0 must keep progressing meanwhile
        boot.barrier(progress, 10)
        return True

    run_threads(2, rank_fn)
    assert calls[0] > 50, calls


def test_barrier_timeout_names_the_missing_ranks():
    store = dist.HashStore()
    boots = {r: StoreBootstrap(store, r, 3, timeout=5) for r in range(3)}
    boots[2].store.set(f"{boots[2]._ns}/1/arrive/2", b"1")  # rank 2 arrived; rank 1 never does
    t0 = time.monotonic()
    with pytest.raises(blsfab.TimeoutError) as info:
        boots[0].barrier(lambda: 0, 0.5)
    assert time.monotonic() - t0 < 5
    assert info.value.ranks == [1]
    assert "[1]" in str(info.value) and "barrier" in str(info.value)
    assert isinstance(info.value, TimeoutError)  # the built-in one too


def test_allgather_timeout_names_the_missing_ranks():
    store = dist.HashStore()
    boot = StoreBootstrap(store, 0, 2, timeout=0.3)
    with pytest.raises(blsfab.TimeoutError) as info:
        boot.allgather(b"x")
    assert info.value.ranks == [1]


def test_allgather_takes_bytes_only():
    boot = StoreBootstrap(dist.HashStore(), 0, 1, timeout=1)
    with pytest.raises(TypeError, match="bytes"):
        boot.allgather({"not": "bytes"})


class RunsCode:
    """Unpickling this runs code: it records that it ran."""
    ran = []

    def __reduce__(self):
        return (RunsCode.ran.append, ("unpickled",))


def test_a_store_value_that_would_run_code_is_refused_naming_its_key():
    import pickle
    store = dist.HashStore()
    boots = [StoreBootstrap(store, r, 2, timeout=5) for r in range(2)]
    # A hostile client writes rank 1's value of the first allgather as a pickle.
    key = f"{boots[1]._ns}/1/allgather/1"
    store.set(key, pickle.dumps(RunsCode()))
    with pytest.raises(ValueError) as info:
        boots[0].allgather(b"mine")
    assert key in str(info.value) and "not a blsfab bootstrap value" in str(info.value)
    assert RunsCode.ran == []


def test_a_hostile_step_value_fails_construction_on_every_rank_naming_the_rank():
    # Well-formed envelope, garbage inside: the step layer names the rank.
    from blsfab.bootstrap import run_step, seal
    store = dist.HashStore()
    boots = [StoreBootstrap(store, r, 2, timeout=5) for r in range(2)]
    store.set(f"{boots[1]._ns}/1/allgather/1", seal(b"\x07garbage"))
    with pytest.raises(ValueError, match="rank 1 sent a malformed"):
        run_step(boots[0], "test step", lambda: b"ok", 5.0)


@pytest.mark.parametrize("rank,size,exc", [(2, 2, ValueError), (-1, 2, ValueError),
                                           (0, 0, ValueError), ("0", 2, TypeError)])
def test_bad_rank_or_size_is_rejected(rank, size, exc):
    with pytest.raises(exc):
        StoreBootstrap(dist.HashStore(), rank, size)


def test_a_non_store_is_rejected():
    with pytest.raises(TypeError, match="Store"):
        StoreBootstrap(object(), 0, 1)


def test_construction_names_a_rank_that_never_arrives_within_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(blsfab.TimeoutError) as info:
        blsfab.Communicator(store=dist.HashStore(), rank=0, size=2, timeout=1.0,
                            provider="shm", slot_bytes=4096)
    assert time.monotonic() - t0 < 2.0
    assert info.value.ranks == [1] and "[1]" in str(info.value)


def test_geometry_mismatch_raises_on_every_rank_naming_each_ranks_values():
    store = dist.HashStore()

    def rank_fn(r):
        try:
            blsfab.Communicator(store=store, rank=r, size=2, timeout=10, provider="shm",
                                slot_bytes=4096 * (r + 1))
        except ValueError as exc:
            return str(exc)
        return "accepted"

    for text in run_threads(2, rank_fn):
        assert "rank 0: slot_bytes=4096" in text and "rank 1: slot_bytes=8192" in text, text


def test_communicator_needs_rank_and_size_with_a_store():
    with pytest.raises(ValueError, match="rank"):
        blsfab.Communicator(store=dist.HashStore())


# ----------------------------------------------------------------------------- processes

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(size, argv_for_rank, env_extra=None, timeout=90):
    """Start ``size`` worker processes; fail with every rank's output if any fails."""
    env = dict(os.environ, FI_TCP_IFACE="lo", PYTHONUNBUFFERED="1",
               FI_LOG_LEVEL=os.environ.get("FI_LOG_LEVEL", "warn"))
    env.pop("FI_PROVIDER", None)
    env.update(env_extra or {})
    procs = [subprocess.Popen([sys.executable, *argv_for_rank(r)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(size)]
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for p in procs:
            try:
                out, _ = p.communicate(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                out = "(timed out)"
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    if any(codes):
        report = "\n".join(f"--- rank {r} exit {c}\n{o[-4000:]}"
                           for r, (c, o) in enumerate(zip(codes, outs)))
        pytest.fail(f"worker failed:\n{report}")
    return outs


def expected_receive(rank, size, it):
    """What ``rank`` receives in iteration ``it`` of worker_exchanges."""
    pieces = []
    for src in range(size):
        data, counts = worker_input(src, size, it)
        off = sum(counts[:rank])
        pieces.append(data[off:off + counts[rank]])
    return np.concatenate(pieces), [len(p) for p in pieces]


def worker_input(rank, size, it):
    rng = np.random.default_rng(1000 * it + rank)
    counts = rng.integers(0, 50, size)
    counts[rng.random(size) < 0.25] = 0
    return rng.standard_normal(int(counts.sum())).astype(np.float32), counts.tolist()


def worker_exchanges(comm, iterations=20):
    """Post every iteration before waiting (up to ``bound`` ahead), then check all."""
    reqs = [comm.ialltoallv(*worker_input(comm.rank, comm.size, it)) for it in range(iterations)]
    for it in reversed(range(iterations)):
        got = reqs[it].wait()
        want, counts = expected_receive(comm.rank, comm.size, it)
        assert reqs[it].recvcounts == counts, (it, reqs[it].recvcounts, counts)
        assert np.array_equal(got, want), f"iteration {it} differs"


def worker_main(kind, address, rank, size, provider):
    if kind == "file":
        store = dist.FileStore(address, size)
    else:
        host, port = address.rsplit(":", 1)
        store = dist.TCPStore(host, int(port), size, rank == 0)
    for repeat in range(2):  # two communicators in turn on one store
        with blsfab.Communicator(store=store, rank=rank, size=size, bound=3,
                                 slot_bytes=1 << 12, provider=provider, timeout=30) as comm:
            assert (comm.rank, comm.size) == (rank, size)
            worker_exchanges(comm)
            assert comm.stats()["max_lead"] <= 3
            used = comm.provider
    print(f"OK rank {rank} provider={used}", flush=True)


@pytest.mark.parametrize("kind,size,provider", [("file", 2, "shm"), ("tcp", 3, "tcp")])
def test_store_bootstrap_without_mpirun(tmp_path, kind, size, provider):
    address = (str(tmp_path / "store") if kind == "file" else f"127.0.0.1:{free_port()}")
    outs = spawn(size, lambda r: [__file__, "worker", kind, address, str(r), str(size),
                                  provider])
    canonical = {"shm": "shm", "tcp": "tcp;ofi_rxm"}[provider]
    for r, out in enumerate(outs):
        assert f"OK rank {r} provider={canonical}" in out, out


def test_mpi_and_store_bootstraps_give_the_same_results():
    """One mpirun job: MPI_Alltoallv, then blsfab bootstrapped through MPI, then
    through a TCPStore (torch's init_process_group under mpirun), on the same inputs."""
    from conftest import run_mpi
    out = run_mpi(3, "check_torch_bootstrap.py", timeout=120)
    assert "OK mpi == store" in out


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    worker_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
