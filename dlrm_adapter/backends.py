"""Exchange backends for the pooled-embedding alltoallv.

All backends expose the same small interface used by the runner::

    handle = backend.start(send, sendcounts, recvcounts)   # may block (mpi)
    backend.poke(handle)                                  # optional progress
    recv = backend.finish(handle)                         # 1-D float32, source-rank order

``send`` is a 1-D contiguous CPU tensor (float32 embeddings, int64 inputs);
``sendcounts[j]`` elements go to rank ``j``, laid out in rank order.  ``recvcounts``
is what the runner expects to receive (MPI needs it; blsfab learns it from the
messages and we check it).  Input distribution (input_dist.py) sends messages whose
receive counts only the sender knows, through ``start_inputs``/``finish_inputs``.

Backends: ``mpi`` (MPI_Alltoallv), ``mpi-bls`` (MPI_Ialltoallv), ``bls``
(blsfab.Communicator, bootstrapped over MPI or, under ``--launcher torch``, over
the job's c10d store), ``torch-bls`` (``dist.all_to_all_single(async_op=True)``
on a process group of backend "blsfab") and ``gloo`` (the same call on a gloo
group). The last two need torch.distributed, which ``launch.Launch`` sets up.
"""
from __future__ import annotations

import importlib
import os
import time
from datetime import timedelta
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

BACKENDS = ("mpi", "mpi-bls", "bls", "torch-bls", "gloo")


def _displs(counts: Sequence[int]) -> List[int]:
    out, acc = [], 0
    for c in counts:
        out.append(acc)
        acc += int(c)
    return out


def _poll_until(done, poll_s: float, timeout: float, what: str) -> None:
    """Test-and-sleep until ``done()``: leaves the core to ranks still computing
    (``--poll-us``), at the price of up to ``poll_s`` extra latency."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} incomplete after {timeout:g} s (raise --timeout if "
                               "peers are merely slow)")
        time.sleep(poll_s)


# How often ``Backend.wait_until`` tests a request when --poll-us does not say.
WAIT_POLL_S = 50e-6

# Most int64 words a peer may announce for one input message (16 GiB): checked before
# a receive buffer is allocated for it.
MAX_INPUT_COUNT = 1 << 31


def _mpi_type(t: torch.Tensor) -> Any:
    from mpi4py import MPI
    if t.dtype == torch.float32:
        return MPI.FLOAT
    if t.dtype == torch.int64:
        return MPI.INT64_T
    raise TypeError(f"no MPI datatype for {t.dtype}")


class Backend:
    """Common interface; ``synchronous`` backends complete inside ``start``."""

    name = "base"
    synchronous = True

    def start(self, send: torch.Tensor, sendcounts: Sequence[int],
              recvcounts: Sequence[int]) -> Any:
        raise NotImplementedError

    def poke(self, handle: Any) -> None:
        """Give the library a chance to progress ``handle`` (no-op by default)."""

    def done(self, handle: Any) -> bool:
        """Progress ``handle`` and say whether ``finish`` would return without waiting."""
        return self.synchronous

    def wait_until(self, handle: Any, deadline: float) -> bool:
        """Progress ``handle`` until it is done or ``time.perf_counter()`` passes
        ``deadline``; whether it is done.  Between tests the rank sleeps (``--poll-us``,
        or ``WAIT_POLL_S``): with more ranks than cores, the rank waited for may need
        this core, and a sleeper is woken close to its deadline where a rank that
        yields may wait out a whole time slice of the rank it yielded to."""
        poll_s = getattr(self, "poll_s", 0.0) or WAIT_POLL_S
        while not self.done(handle):
            now = time.perf_counter()
            if now >= deadline:
                return False
            time.sleep(min(poll_s, deadline - now))
        return True

    def peers_waiting(self) -> bool:
        """Whether some rank has already posted an exchange this rank has not (it
        waits for this one). A library without one-sided arrivals cannot tell: False."""
        return False

    def quiesce(self) -> None:
        """Called with nothing in flight, before a control-plane barrier: make sure no
        peer still needs this rank's progress (no-op by default)."""

    def finish(self, handle: Any) -> torch.Tensor:
        raise NotImplementedError

    def finish_parts(self, handle: Any) -> Union[torch.Tensor, List[torch.Tensor]]:
        """The received data as per-source pieces where the library can hand
        them out without a copy; by default the flat buffer of ``finish``."""
        return self.finish(handle)

    def start_inputs(self, lengths: torch.Tensor, lcounts: Sequence[int], indices: torch.Tensor,
                     icounts: Sequence[int], chain: bool) -> Any:
        """Start the lengths and indices exchanges of one step (``chain``: post them
        together if the library can).  By default each first exchanges its counts
        (one word per peer), so the data exchanges start in ``finish_inputs``."""
        P = len(lcounts)
        counts = [self.start(torch.tensor([int(c) for c in cs], dtype=torch.int64), [1] * P,
                             [1] * P) for cs in (lcounts, icounts)]
        return counts, (lengths, lcounts), (indices, icounts)

    def finish_inputs(self, handle: Any) -> Tuple[torch.Tensor, List[int], torch.Tensor, List[int]]:
        """Wait for ``start_inputs``: ``(lengths, their counts per source, indices, ...)``."""
        counts, *data = handle
        recv = [[int(c) for c in self.finish(h)] for h in counts]
        for rc in recv:
            bad = [(src, c) for src, c in enumerate(rc) if not 0 <= c <= MAX_INPUT_COUNT]
            if bad:
                raise RuntimeError(f"(rank, count) {bad}: announced input counts must lie in "
                                   f"[0, {MAX_INPUT_COUNT}]")
        started = [self.start(send, sc, rc) for (send, sc), rc in zip(data, recv)]
        lengths, indices = (self.finish(h) for h in started)
        return lengths, recv[0], indices, recv[1]

    def max_lag(self) -> Optional[int]:
        """Largest lag the library itself observed, if it tracks one."""
        return None

    def stats(self) -> Dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class MPIBlocking(Backend):
    """``MPI_Alltoallv``: every step is a global synchronisation point."""

    name = "mpi"
    synchronous = True

    def __init__(self, comm: Any) -> None:
        self.comm = comm.Dup()

    def start(self, send: torch.Tensor, sendcounts: Sequence[int],
              recvcounts: Sequence[int]) -> torch.Tensor:
        recv = torch.empty(int(sum(recvcounts)), dtype=send.dtype)
        sc, rc = [int(c) for c in sendcounts], [int(c) for c in recvcounts]
        self.comm.Alltoallv([send.numpy(), (sc, _displs(sc)), _mpi_type(send)],
                            [recv.numpy(), (rc, _displs(rc)), _mpi_type(send)])
        return recv

    def finish(self, handle: torch.Tensor) -> torch.Tensor:
        return handle

    def close(self) -> None:
        self.comm.Free()


class MPINonblocking(Backend):
    """``MPI_Ialltoallv`` driven through the same bounded FIFO as blsfab."""

    name = "mpi-bls"
    synchronous = False

    def __init__(self, comm: Any, poll_s: float = 0.0) -> None:
        self.comm = comm.Dup()
        self.poll_s = poll_s

    def start(self, send: torch.Tensor, sendcounts: Sequence[int],
              recvcounts: Sequence[int]) -> Tuple[Any, torch.Tensor, torch.Tensor]:
        recv = torch.empty(int(sum(recvcounts)), dtype=send.dtype)
        sc, rc = [int(c) for c in sendcounts], [int(c) for c in recvcounts]
        req = self.comm.Ialltoallv([send.numpy(), (sc, _displs(sc)), _mpi_type(send)],
                                   [recv.numpy(), (rc, _displs(rc)), _mpi_type(send)])
        return req, recv, send  # keep ``send`` alive until completion

    def poke(self, handle: Tuple[Any, torch.Tensor, torch.Tensor]) -> None:
        handle[0].Test()

    def done(self, handle: Tuple[Any, torch.Tensor, torch.Tensor]) -> bool:
        return bool(handle[0].Test())

    def finish(self, handle: Tuple[Any, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        req, recv, _ = handle
        if self.poll_s > 0:
            while not req.Test():
                time.sleep(self.poll_s)
        else:
            req.Wait()
        return recv

    def close(self) -> None:
        self.comm.Free()


def import_blsfab() -> Any:
    """Import blsfab lazily, with an error that says what to do when it is missing."""
    try:
        return importlib.import_module("blsfab")
    except ImportError as exc:
        raise RuntimeError(f"backend 'bls' needs the blsfab package, which failed to import "
                           f"({exc}); build and install it from the repository root "
                           f"(pip install -e .) or choose --backend mpi / mpi-bls") from None


def blsfab_available() -> bool:
    try:
        import_blsfab()
        return True
    except RuntimeError:
        return False


def slot_bytes_for(max_message_bytes: int) -> int:
    """blsfab slot size: the largest per-peer message + 64 header bytes, rounded to 4 KiB."""
    need = int(max_message_bytes) + 64
    return max(4096, (need + 4095) // 4096 * 4096)


class BLS(Backend):
    """blsfab's bounded-lag alltoallv over libfabric."""

    name = "bls"
    synchronous = False

    def __init__(self, comm: Any, bound: int, slot_bytes: int, provider: Optional[str],
                 timeout: float, poll_s: float = 0.0, progress: Optional[str] = None,
                 store: Any = None) -> None:
        """``comm``: an mpi4py communicator (MPI bootstrap); or None with ``store``, a
        ``(c10d store, rank, size)`` triple (store bootstrap, no MPI)."""
        blsfab = import_blsfab()
        kwargs: Dict[str, Any] = dict(bound=bound, slot_bytes=slot_bytes, provider=provider,
                                      timeout=timeout)
        if progress is not None:  # only when asked: older blsfab has no progress= option
            kwargs["progress"] = progress
        boot: Dict[str, Any] = {}
        if store is not None:
            boot = dict(store=store[0], rank=store[1], size=store[2])
        try:
            self.comm = blsfab.Communicator(comm, **boot, **kwargs)
        except Exception as exc:  # noqa: BLE001 - add what we asked for, keep the cause
            args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            how = " (store bootstrap)" if store is not None else ""
            raise RuntimeError(f"blsfab.Communicator({args}){how} failed: "
                               f"{type(exc).__name__}: {exc}") from exc
        self.timeout = timeout
        self.poll_s = poll_s
        self._closed = False

    def start(self, send: torch.Tensor, sendcounts: Sequence[int],
              recvcounts: Sequence[int]) -> Tuple[Any, List[int]]:
        req = self.comm.ialltoallv(send, [int(c) for c in sendcounts])
        return req, None if recvcounts is None else [int(c) for c in recvcounts]

    def start_inputs(self, lengths: torch.Tensor, lcounts: Sequence[int], indices: torch.Tensor,
                     icounts: Sequence[int], chain: bool) -> Any:
        # blsfab learns receive counts from the messages: both start now, in one
        # write per peer when chained.
        if chain:
            with self.comm.chain():
                return self.start(lengths, lcounts, None), self.start(indices, icounts, None)
        return self.start(lengths, lcounts, None), self.start(indices, icounts, None)

    def finish_inputs(self, handle: Any) -> Tuple[torch.Tensor, List[int], torch.Tensor, List[int]]:
        lh, ih = handle
        lengths, indices = self.finish(lh), self.finish(ih)
        return lengths, list(lh[0].recvcounts), indices, list(ih[0].recvcounts)

    def poke(self, handle: Tuple[Any, List[int]]) -> None:
        handle[0].test()

    def done(self, handle: Tuple[Any, List[int]]) -> bool:
        return bool(handle[0].test())

    def finish(self, handle: Tuple[Any, List[int]]) -> torch.Tensor:
        parts = self.finish_parts(handle)
        return torch.cat(parts) if parts else torch.empty(0)

    def finish_parts(self, handle: Tuple[Any, List[int]]) -> List[torch.Tensor]:
        """Per-source views into the rings, no copy: the consumer gathers them
        once, straight into its own layout. A live view keeps its ring slot
        held, so use them and drop them. This rank's own part is lent from the
        send tensor, which nothing writes once the step has posted it."""
        req, expected = handle
        if self.poll_s > 0:
            _poll_until(req.test, self.poll_s, self.timeout,
                        f"rank {self.comm.rank}: blsfab exchange")
        with req.views(copy_self=False) as parts:
            got = [int(c) for c in req.recvcounts]
            if expected is not None and got != expected:
                raise RuntimeError(f"blsfab delivered counts {got} per source, expected "
                                   f"{expected}")
            return [torch.from_numpy(p) if isinstance(p, np.ndarray) else p for p in parts]

    def peers_waiting(self) -> bool:
        # A peer's write lands before this rank posts the same iteration.
        return max(self.comm.heard()) > self.comm.iteration

    def quiesce(self) -> None:
        # One empty exchange, waited on (what blsfab's torch barrier does): with manual
        # progress (tcp), a rank that stops polling could strand its last writes.
        self.comm.alltoallv(torch.empty(0, dtype=torch.float32), [0] * self.comm.size)

    def max_lag(self) -> Optional[int]:
        return int(self.stats().get("max_lead", 0))

    def stats(self) -> Dict[str, Any]:
        try:
            return dict(self.comm.stats())
        except Exception as exc:  # noqa: BLE001 - report, never fail a finished run on stats
            return {"error": str(exc)}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.comm.close()


class TorchCollective(Backend):
    """``dist.all_to_all_single(..., async_op=True)`` on a process group of its own,
    driven through the same FIFO: up to ``bound`` exchanges stay in flight."""

    synchronous = False

    def __init__(self, group: Any, poll_s: float, timeout: float) -> None:
        self.group = group
        self.poll_s = poll_s
        self.timeout = timeout
        self._closed = False

    def start(self, send: torch.Tensor, sendcounts: Sequence[int],
              recvcounts: Sequence[int]) -> Tuple[Any, torch.Tensor, torch.Tensor]:
        import torch.distributed as dist
        rc = [int(c) for c in recvcounts]
        recv = torch.empty(sum(rc), dtype=send.dtype)
        work = dist.all_to_all_single(recv, send, output_split_sizes=rc,
                                      input_split_sizes=[int(c) for c in sendcounts],
                                      group=self.group, async_op=True)
        return work, recv, send  # keep ``send`` alive until completion

    def poke(self, handle: Tuple[Any, torch.Tensor, torch.Tensor]) -> None:
        handle[0].is_completed()

    def done(self, handle: Tuple[Any, torch.Tensor, torch.Tensor]) -> bool:
        return bool(handle[0].is_completed())

    def finish(self, handle: Tuple[Any, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        work, recv, _ = handle
        if self.poll_s > 0:
            _poll_until(work.is_completed, self.poll_s, self.timeout,
                        f"{self.name}: all_to_all_single")
        work.wait()
        return recv

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            import torch.distributed as dist
            dist.destroy_process_group(self.group)


class TorchBLS(TorchCollective):
    """blsfab through torch.distributed: a process group of backend "blsfab"
    (``import blsfab.torch``) with the run's bound, slot size and provider."""

    name = "torch-bls"

    def __init__(self, bound: int, slot_bytes: int, provider: Optional[str], timeout: float,
                 poll_s: float = 0.0, progress: Optional[str] = None) -> None:
        import_blsfab()
        try:
            importlib.import_module("blsfab.torch")  # registers the "blsfab" backend
        except ImportError as exc:
            raise RuntimeError(f"backend 'torch-bls' needs blsfab.torch, which failed to "
                               f"import ({exc})") from None
        import torch.distributed as dist
        options: Dict[str, Any] = dict(bound=bound, slot_bytes=slot_bytes, timeout=timeout)
        if provider:
            options["provider"] = provider
        # The group's Communicator reads its progress mode from BLSFAB_PROGRESS.
        saved = os.environ.get("BLSFAB_PROGRESS")
        if progress is not None:
            os.environ["BLSFAB_PROGRESS"] = progress
        try:
            group = dist.new_group(backend="blsfab", pg_options=options,
                                   timeout=timedelta(seconds=max(timeout, 60.0)))
        except Exception as exc:  # noqa: BLE001 - name what we asked for, keep the cause
            raise RuntimeError(f"dist.new_group(backend='blsfab', pg_options={options!r}) "
                               f"failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if progress is not None:
                if saved is None:
                    os.environ.pop("BLSFAB_PROGRESS", None)
                else:
                    os.environ["BLSFAB_PROGRESS"] = saved
        super().__init__(group, poll_s, timeout)

    def quiesce(self) -> None:
        import torch.distributed as dist
        dist.barrier(group=self.group)  # an empty blsfab iteration, waited on

    def max_lag(self) -> Optional[int]:
        return int(self.stats().get("max_lead", 0))

    def stats(self) -> Dict[str, Any]:
        try:
            return dict(self.group.communicator.stats())
        except Exception as exc:  # noqa: BLE001 - report, never fail a finished run on stats
            return {"error": str(exc)}


class Gloo(TorchCollective):
    """gloo's ``all_to_all_single`` with ``async_op=True`` (what the reference DLRM
    calls), on a gloo group of its own; bound 0 waits in the same step."""

    name = "gloo"

    def __init__(self, timeout: float, poll_s: float = 0.0) -> None:
        import torch.distributed as dist
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=max(timeout, 60.0)))
        super().__init__(group, poll_s, timeout)


def make_backend(name: str, launch: Any, bound: int, slot_bytes: int,
                 provider: Optional[str], timeout: float, poll_s: float = 0.0,
                 bls_progress: Optional[str] = None) -> Backend:
    """``launch`` is the started job (``dlrm_adapter.launch.Launch``); ``poll_s`` > 0 makes
    the nonblocking backends wait by test-and-sleep; ``bls_progress`` is blsfab's
    ``progress=`` ("poll" or "thread"; None: its default)."""
    if name in ("mpi", "mpi-bls") and launch.mpi_comm is None:
        raise RuntimeError(f"backend {name!r} needs MPI, which --launcher {launch.name} does "
                           f"not initialise; use torch-bls, gloo or bls, or start with mpirun")
    if name == "mpi":
        return MPIBlocking(launch.mpi_comm)
    if name == "mpi-bls":
        return MPINonblocking(launch.mpi_comm, poll_s)
    if name == "bls":
        if launch.mpi_comm is not None:
            return BLS(launch.mpi_comm, bound, slot_bytes, provider, timeout, poll_s,
                       bls_progress)
        store = (launch.new_store("bls"), launch.rank, launch.size)
        return BLS(None, bound, slot_bytes, provider, timeout, poll_s, bls_progress, store)
    if name in ("torch-bls", "gloo"):
        launch.torch_ready()
        if name == "gloo":
            return Gloo(timeout, poll_s)
        return TorchBLS(bound, slot_bytes, provider, timeout, poll_s, bls_progress)
    raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}; got {name!r}")
