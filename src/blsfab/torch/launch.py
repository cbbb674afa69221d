"""``init_process_group`` under mpirun or srun, not only torchrun."""

from __future__ import annotations

import os
import socket
from typing import Dict, Optional

import torch.distributed as dist

from .options import BACKEND_NAME

_RANK_VARS = (("RANK", "WORLD_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
              ("PMIX_RANK", "PMIX_SIZE"), ("PMI_RANK", "PMI_SIZE"),
              ("SLURM_PROCID", "SLURM_NTASKS"))


def launcher_rank_size(environ: Optional[Dict[str, str]] = None) -> Optional[tuple]:
    """(rank, world_size) from torchrun, Open MPI, PMIx/PMI or Slurm variables, or None."""
    env = os.environ if environ is None else environ
    for rank_var, size_var in _RANK_VARS:
        if env.get(rank_var) not in (None, "") and env.get(size_var) not in (None, ""):
            return int(env[rank_var]), int(env[size_var])
    return None


def init_process_group(backend: str = BACKEND_NAME, **kwargs) -> None:
    """``dist.init_process_group`` that also works under mpirun or srun.

    Under torchrun it is the plain call. Otherwise the rank and world size come
    from the launcher's variables (Open MPI, PMIx, PMI, Slurm), and when
    MASTER_ADDR or MASTER_PORT is unset, rank 0 picks its host name and a free
    port and shares them through MPI (mpi4py). The store torch then builds is
    what the blsfab backend bootstraps from; MPI is not used after this.
    """
    if "store" not in kwargs and kwargs.get("init_method") in (None, "env://"):
        found = launcher_rank_size()
        if found is not None:
            kwargs.setdefault("rank", found[0])
            kwargs.setdefault("world_size", found[1])
        if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
            addr, port = _agree_on_master()
            os.environ.setdefault("MASTER_ADDR", addr)
            os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group(backend, **kwargs)


def _agree_on_master() -> tuple:
    """(address, port) chosen by rank 0 and broadcast through MPI."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError("blsfab.torch.init_process_group: MASTER_ADDR/MASTER_PORT are unset "
                           "and mpi4py is missing; set them, or launch with torchrun") from None
    comm = MPI.COMM_WORLD
    choice = None
    if comm.Get_rank() == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        choice = (os.environ.get("MASTER_ADDR") or socket.gethostname(),
                  int(os.environ.get("MASTER_PORT") or port))
    return comm.bcast(choice, root=0)
