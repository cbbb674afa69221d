"""``ProcessGroupBlsfab``: the torch ProcessGroup, mapping torch's method
names onto the collectives and unsupported calls onto NotImplementedError."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from .. import _core
from ..communicator import Communicator
from ..store_bootstrap import StoreBootstrap
from . import alltoall as a2a
from . import collectives
from .options import BACKEND_NAME, Options, seconds
from .progress import PendingWorks


def _unsupported(name: str, why: str = ""):
    def method(self, *args, **kwargs):
        raise NotImplementedError(
            f"blsfab backend does not support {name}{why}; use a gloo group for it "
            "(dist.new_group(backend='gloo'))")
    method.__name__ = name
    return method


_P2P = " (point-to-point does not fit the bounded-lag collective)"


class ProcessGroupBlsfab(PendingWorks, dist.ProcessGroup):
    """A torch ProcessGroup whose collectives run over a blsfab Communicator.

    Normally created by ``dist.init_process_group("blsfab")`` or
    ``dist.new_group(backend="blsfab")``; it can also be built directly from a
    c10d ``store`` (TCPStore, FileStore) with ``rank`` and ``size``.
    ``communicator`` is the underlying :class:`blsfab.Communicator`.
    """

    def __init__(self, store, rank: int, size: int, timeout=None, options: Any = None):
        # ProcessGroup(store, rank, size) is broken for Python subclasses in torch 2.13.
        super().__init__(rank, size)
        opts = Options.resolve(options)
        wait = opts.timeout if opts.timeout is not None else seconds(timeout)
        if wait is None:
            wait = 60.0
        self.options = opts
        self._rank, self._size = rank, size
        self._group_name = ""
        self._group_desc = ""
        boot = StoreBootstrap(store, rank, size, timeout=wait)
        self._comm = Communicator(bootstrap=boot, bound=opts.bound, slot_bytes=opts.slot_bytes,
                                  provider=opts.provider, timeout=wait)
        # The largest message to one peer in one iteration, in bytes.
        self._cap = self._comm.slot_bytes - _core.SLOT_OVERHEAD
        self._init_progress()

    # ---- identity (torch 2.13 needs these overridden on Python groups) ---------------

    def getBackendName(self) -> str:
        return BACKEND_NAME

    def getGroupName(self) -> str:
        return self._group_name

    def setGroupName(self, name: str) -> None:
        self._group_name = name

    def getGroupDesc(self) -> str:
        return self._group_desc

    def setGroupDesc(self, desc: str) -> None:
        self._group_desc = desc

    @property
    def communicator(self) -> Communicator:
        return self._comm

    def __repr__(self) -> str:
        return (f"<blsfab.torch.ProcessGroupBlsfab rank={self._rank}/{self._size} "
                f"bound={self._comm.bound} provider={getattr(self._comm, 'provider', '?')!r}>")

    # ---- collectives (torch's names, several per collective) -------------------------

    all_to_all_single = alltoall_base = a2a.all_to_all_single
    alltoall = a2a.alltoall
    allreduce = collectives.allreduce
    allreduce_coalesced = collectives.allreduce_coalesced
    reduce = collectives.reduce
    broadcast = collectives.broadcast
    allgather = collectives.allgather
    all_gather_single = _allgather_base = allgather_into_tensor = collectives.all_gather_single
    reduce_scatter_single = _reduce_scatter_base = collectives.reduce_scatter_single
    reduce_scatter = collectives.reduce_scatter
    barrier = collectives.barrier

    # ---- not supported ------------------------------------------------------------------

    send = _unsupported("send", _P2P)
    recv = _unsupported("recv", _P2P)
    recv_anysource = _unsupported("recv_anysource", " (point-to-point)")
    gather = _unsupported("gather")
    scatter = _unsupported("scatter")
    allgather_coalesced = _unsupported("all_gather_coalesced")
    all_gather_single_coalesced = _unsupported("all_gather_into_tensor_coalesced")
    allgather_into_tensor_coalesced = all_gather_single_coalesced
    reduce_scatter_single_coalesced = _unsupported("reduce_scatter_tensor_coalesced")
    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced
    monitored_barrier = _unsupported("monitored_barrier")
    split_group = _unsupported("split_group")
    merge_remote_group = _unsupported("merge_remote_group")

    # ---- lifetime --------------------------------------------------------------------

    def shutdown(self) -> None:
        """Collective: finish pending works, then close the communicator."""
        if self._closed:
            return
        self._stop_thread()
        self._wait_all_pending()
        with self._lock:
            self._closed = True
            self._comm.close()

    def abort(self) -> None:
        """Close at once, without the closing barrier (peers may be gone)."""
        self._stop_thread()
        with self._lock:
            self._closed = True
            self._comm.__exit__(RuntimeError, None, None)
