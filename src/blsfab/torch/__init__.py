"""The torch.distributed backend "blsfab".

``import blsfab.torch`` registers it; then

    dist.init_process_group("blsfab")          # torchrun: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
    dist.all_to_all_single(out, inp, out_splits, in_splits, async_op=True)

Every collective is built on ``Communicator.ialltoallv`` and posts all of its
iterations when it is called, so every rank issues the same iterations in the
same order, which the bounded-lag engine requires. Consequences:

* ``all_to_all_single`` is one iteration (split into several only when the
  splits are even and a message exceeds a slot), so up to ``bound`` of them can
  be in flight before a call waits for the slowest peer;
* ``all_reduce`` sends the whole tensor to every rank and each rank reduces the
  ``size`` copies in rank order, so every rank gets bit-identical results;
* ``broadcast``, ``all_gather``, ``all_gather_into_tensor``, ``reduce``,
  ``reduce_scatter_tensor``, ``all_to_all`` and ``barrier`` work the same way;
  tensors larger than a slot travel in several iterations;
* point-to-point calls (``send``, ``recv``), ``gather``, ``scatter`` and the
  coalesced variants raise NotImplementedError naming the call.

Options: ``pg_options`` (an :class:`Options` or a dict) or the environment
(``BLSFAB_BOUND``, ``BLSFAB_SLOT_BYTES``, ``BLSFAB_PROVIDER``, ``BLSFAB_TIMEOUT``);
``pg_options`` wins. See docs/torch.md.

Modules: ``options`` (pg_options and variables), ``group`` (the ProcessGroup),
``alltoall`` and ``collectives`` (each collective on ``ialltoallv``), ``rounds``
(payloads larger than a slot), ``reductions``, ``tensors``, ``work`` (the Work
handle), ``progress`` (pending works, futures, progress thread), ``launch``
(init_process_group under mpirun).
"""

from __future__ import annotations

import torch.distributed as dist

from .group import ProcessGroupBlsfab
from .launch import init_process_group, launcher_rank_size
from .options import ENV_PREFIX  # noqa: F401 - public, outside __all__ as before
from .options import BACKEND_NAME, Options, parse_bytes
from .progress import IDLE_SLEEP  # noqa: F401 - public, outside __all__ as before
from .work import Work


def _create_process_group(dist_options, pg_options) -> ProcessGroupBlsfab:
    """The creator torch calls (extended API): store, rank, size and timeout
    come from init_process_group / new_group; ``pg_options`` from the caller."""
    return ProcessGroupBlsfab(dist_options.store, dist_options.group_rank,
                              dist_options.group_size, dist_options.timeout, pg_options)


def register() -> None:
    """Register "blsfab" with torch.distributed (done on import; idempotent)."""
    if BACKEND_NAME.upper() in getattr(dist.Backend, "_plugins", {}):
        return
    dist.Backend.register_backend(BACKEND_NAME, _create_process_group, extended_api=True,
                                  devices=["cpu"])


register()

__all__ = ["BACKEND_NAME", "Options", "ProcessGroupBlsfab", "Work", "init_process_group",
           "launcher_rank_size", "parse_bytes", "register"]
