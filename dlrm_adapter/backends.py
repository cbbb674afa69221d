"""Exchange backends for the pooled-embedding alltoallv.

All backends expose the same small interface used by the runner::

    handle = backend.start(send, sendcounts, recvcounts)   # may block (mpi)
    backend.poke(handle)                                  # optional progress
    recv = backend.finish(handle)                         # 1-D float32, source-rank order

``send`` is a 1-D contiguous float32 CPU tensor; ``sendcounts[j]`` elements go to
rank ``j``, laid out in rank order.  ``recvcounts`` is what the runner expects
to receive (MPI needs it; blsfab learns it from the messages and we check it).
"""
from __future__ import annotations

import importlib
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

BACKENDS = ("mpi", "mpi-bls", "bls")


def _displs(counts: Sequence[int]) -> List[int]:
    out, acc = [], 0
    for c in counts:
        out.append(acc)
        acc += int(c)
    return out


class Backend:
    """Common interface; ``synchronous`` backends complete inside ``start``."""

    name = "base"
    synchronous = True

    def start(self, send: torch.Tensor, sendcounts: Sequence[int],
              recvcounts: Sequence[int]) -> Any:
        raise NotImplementedError

    def poke(self, handle: Any) -> None:
        """Give the library a chance to progress ``handle`` (no-op by default)."""

    def finish(self, handle: Any) -> torch.Tensor:
        raise NotImplementedError

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
        from mpi4py import MPI
        self._float = MPI.FLOAT
        self.comm = comm.Dup()

    def start(self, send: torch.Tensor, sendcounts: Sequence[int],
              recvcounts: Sequence[int]) -> torch.Tensor:
        recv = torch.empty(int(sum(recvcounts)), dtype=torch.float32)
        sc, rc = [int(c) for c in sendcounts], [int(c) for c in recvcounts]
        self.comm.Alltoallv([send.numpy(), (sc, _displs(sc)), self._float],
                            [recv.numpy(), (rc, _displs(rc)), self._float])
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
        from mpi4py import MPI
        self._float = MPI.FLOAT
        self.comm = comm.Dup()
        self.poll_s = poll_s

    def start(self, send: torch.Tensor, sendcounts: Sequence[int],
              recvcounts: Sequence[int]) -> Tuple[Any, torch.Tensor, torch.Tensor]:
        recv = torch.empty(int(sum(recvcounts)), dtype=torch.float32)
        sc, rc = [int(c) for c in sendcounts], [int(c) for c in recvcounts]
        req = self.comm.Ialltoallv([send.numpy(), (sc, _displs(sc)), self._float],
                                   [recv.numpy(), (rc, _displs(rc)), self._float])
        return req, recv, send  # keep ``send`` alive until completion

    def poke(self, handle: Tuple[Any, torch.Tensor, torch.Tensor]) -> None:
        handle[0].Test()

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
                 timeout: float, poll_s: float = 0.0, progress: Optional[str] = None) -> None:
        blsfab = import_blsfab()
        kwargs: Dict[str, Any] = dict(bound=bound, slot_bytes=slot_bytes, provider=provider,
                                      timeout=timeout)
        if progress is not None:  # only when asked: older blsfab has no progress= option
            kwargs["progress"] = progress
        try:
            self.comm = blsfab.Communicator(comm, **kwargs)
        except Exception as exc:  # noqa: BLE001 - add what we asked for, keep the cause
            args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            raise RuntimeError(f"blsfab.Communicator({args}) failed: "
                               f"{type(exc).__name__}: {exc}") from exc
        self.timeout = timeout
        self.poll_s = poll_s
        self._closed = False

    def start(self, send: torch.Tensor, sendcounts: Sequence[int],
              recvcounts: Sequence[int]) -> Tuple[Any, List[int]]:
        req = self.comm.ialltoallv(send, [int(c) for c in sendcounts])
        return req, [int(c) for c in recvcounts]

    def poke(self, handle: Tuple[Any, List[int]]) -> None:
        handle[0].test()

    def finish(self, handle: Tuple[Any, List[int]]) -> torch.Tensor:
        req, expected = handle
        if self.poll_s > 0:
            deadline = time.monotonic() + self.timeout
            while not req.test():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rank {self.comm.rank}: blsfab exchange incomplete "
                                       f"after {self.timeout:g} s (raise --timeout if peers "
                                       f"are merely slow)")
                time.sleep(self.poll_s)
        data = req.wait()
        got = [int(c) for c in req.recvcounts]
        if got != expected:
            raise RuntimeError(f"blsfab delivered counts {got} per source, expected {expected}")
        if isinstance(data, np.ndarray):
            data = torch.from_numpy(data)
        return data

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


def make_backend(name: str, comm: Any, bound: int, slot_bytes: int,
                 provider: Optional[str], timeout: float, poll_s: float = 0.0,
                 bls_progress: Optional[str] = None) -> Backend:
    """``poll_s`` > 0 makes the nonblocking backends wait by test-and-sleep;
    ``bls_progress`` is blsfab's ``progress=`` ("poll" or "thread"; None: its default)."""
    if name == "mpi":
        return MPIBlocking(comm)
    if name == "mpi-bls":
        return MPINonblocking(comm, poll_s)
    if name == "bls":
        return BLS(comm, bound, slot_bytes, provider, timeout, poll_s, bls_progress)
    raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}; got {name!r}")
