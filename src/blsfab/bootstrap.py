"""Out-of-band exchange used only at set-up: endpoint names, ring addresses, keys.

A Bootstrap offers ``allgather`` and a nonblocking barrier that the caller
polls while making fabric progress (progress is manual, so blocking in MPI
while a peer waits on our writes could hang).
"""

from __future__ import annotations

import socket
from typing import Any, Callable, List


class MPIBootstrap:
    """Bootstrap over an mpi4py communicator (default: COMM_WORLD)."""

    def __init__(self, comm=None):
        from mpi4py import MPI

        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    def allgather(self, obj: Any) -> List[Any]:
        return self.comm.allgather(obj)

    def barrier(self, progress: Callable[[], int], timeout: float) -> None:
        """An Ibarrier tested in a loop that keeps the fabric progressing."""
        import time

        req = self.comm.Ibarrier()
        deadline = time.monotonic() + timeout
        while not req.Test():
            if progress() == 0:
                if time.monotonic() > deadline:
                    from .errors import TimeoutError
                    raise TimeoutError(f"rank {self.rank}: barrier not reached by every rank "
                                       f"within {timeout:g} s")
                time.sleep(0)


def hostname() -> str:
    return socket.gethostname()
