"""How the ranks of one job find each other: ``mpirun`` (MPI) or a torch-style launcher.

``--launcher mpi``
    ``mpirun -np N python -m dlrm_adapter``, or one plain process (an MPI
    singleton). The control plane (barriers, gathering results) is
    ``MPI.COMM_WORLD``. Every backend is available. The torch backends
    (``torch-bls``, ``gloo``) initialise ``torch.distributed`` on first use,
    through ``blsfab.torch.init_process_group`` (rank 0 picks an address and a
    port and shares them over MPI).

``--launcher torch``
    torchrun, or processes started by hand (``ip netns exec``, ssh, ...) with
    ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. Rank 0
    hosts a TCPStore (or torchrun's agent does); ``dist.rendezvous("env://")``
    connects every rank to it. The default process group is gloo and is the
    control plane. MPI is never initialised, so the ``mpi`` and ``mpi-bls``
    backends are unavailable; ``bls`` bootstraps ``blsfab.Communicator`` from
    the store (``Communicator(store=..., rank=..., size=...)``).

``--launcher auto`` (the default) is ``mpi`` when an MPI launcher's variables
are set (``OMPI_COMM_WORLD_SIZE``, ``PMIX_RANK``, ``PMI_RANK``, ...), else
``torch`` when ``RANK`` and ``WORLD_SIZE`` are set, else ``mpi``.
"""
from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta
from typing import Any, Dict, List, Mapping, Optional, Sequence

LAUNCHERS = ("auto", "mpi", "torch")
# Backends that need MPI itself (not only a launcher).
MPI_BACKENDS = ("mpi", "mpi-bls")
TORCH_BACKENDS = ("torch-bls", "gloo")
TORCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Variables that say "this process was started by an MPI launcher".
MPI_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE",
                     "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE", "I_MPI_HYDRA_HOST_FILE")
# Control-plane waits (barriers, gathering results, group creation) may cover a
# slow rank's model set-up, so they get at least this long.
MIN_CONTROL_TIMEOUT_S = 600.0


class LaunchError(RuntimeError):
    """The launcher cannot start, or cannot run a requested backend."""


def resolve_launcher(name: str, environ: Optional[Mapping[str, str]] = None) -> str:
    """``auto`` -> ``mpi`` or ``torch`` from the environment; others unchanged."""
    if name not in LAUNCHERS:
        raise LaunchError(f"--launcher must be one of {', '.join(LAUNCHERS)}; got {name!r}")
    if name != "auto":
        return name
    env = os.environ if environ is None else environ
    if any(env.get(v) for v in MPI_LAUNCHER_VARS):
        return "mpi"
    if env.get("RANK") and env.get("WORLD_SIZE"):
        return "torch"
    return "mpi"


def check_backends(launcher: str, backends: Sequence[str], auto: bool = False) -> None:
    """Raise LaunchError naming the launcher when it cannot run one of ``backends``."""
    bad = [b for b in backends if launcher == "torch" and b in MPI_BACKENDS]
    if bad:
        how = " (chosen by --launcher auto because RANK and WORLD_SIZE are set)" if auto else ""
        raise LaunchError(
            f"--backend {','.join(bad)} needs MPI, which is not initialised under "
            f"--launcher torch{how}; use --backend torch-bls, gloo or bls with this launcher, "
            f"or start the job with mpirun (--launcher mpi)")


def torch_env(environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; LaunchError naming any that is missing."""
    env = os.environ if environ is None else environ
    missing = [v for v in TORCH_VARS if not env.get(v)]
    if missing:
        raise LaunchError(f"--launcher torch needs {', '.join(TORCH_VARS)} in the environment "
                          f"(torchrun sets them); missing: {', '.join(missing)}")
    out = {v: env[v] for v in TORCH_VARS}
    try:
        rank, size, port = int(out["RANK"]), int(out["WORLD_SIZE"]), int(out["MASTER_PORT"])
    except ValueError:
        raise LaunchError(f"--launcher torch: RANK, WORLD_SIZE and MASTER_PORT must be integers; "
                          f"got {out}") from None
    if size < 1 or not 0 <= rank < size or not 0 < port < 65536:
        raise LaunchError(f"--launcher torch: RANK={rank}, WORLD_SIZE={size}, "
                          f"MASTER_PORT={port} are inconsistent")
    return out


def env_rank(environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """This process's rank from any launcher's variables, before anything is initialised."""
    env = os.environ if environ is None else environ
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        text = env.get(var)
        if text not in (None, ""):
            try:
                return int(text)
            except ValueError:
                return None
    return None


class TorchControl:
    """The part of an mpi4py communicator the adapter uses (rank, size, barrier,
    gather to the root, abort), over a torch.distributed gloo group."""

    def __init__(self, rank: int, size: int, group: Any = None) -> None:
        self._rank, self._size, self.group = rank, size, group

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's spelling
        return self._rank

    def Get_size(self) -> int:  # noqa: N802
        return self._size

    def Barrier(self) -> None:  # noqa: N802
        import torch.distributed as dist
        dist.barrier(group=self.group)

    def gather(self, obj: Any, root: int = 0) -> Optional[List[Any]]:
        import torch.distributed as dist
        out: Optional[List[Any]] = [None] * self._size if self._rank == root else None
        dist.gather_object(obj, out, dst=root, group=self.group)
        return out

    def Abort(self, code: int = 1) -> None:  # noqa: N802
        # No collective abort without MPI: leave at once. Peers blocked on us see
        # their connections drop (gloo, blsfab) or time out; torchrun stops them.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class Launch:
    """The started job: control-plane ``comm``, and what the backends build on.

    ``store`` is the c10d store of ``--launcher torch`` (None under MPI);
    ``torch_ready()`` makes sure ``torch.distributed`` is initialised (default
    group gloo), which the torch backends need under either launcher.
    """

    def __init__(self, name: str, comm: Any, timeout_s: float, store: Any = None,
                 mpi_comm: Any = None) -> None:
        self.name = name
        self.comm = comm
        self.store = store
        self.mpi_comm = mpi_comm
        self.timeout_s = timeout_s
        self._stores = 0
        self._own_torch = False  # we initialised torch.distributed, so we tear it down

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def size(self) -> int:
        return self.comm.Get_size()

    def control_timeout(self) -> timedelta:
        return timedelta(seconds=max(self.timeout_s, MIN_CONTROL_TIMEOUT_S))

    # ---- torch.distributed -------------------------------------------------------

    def torch_ready(self) -> None:
        """Initialise torch.distributed if nobody did (collective the first time)."""
        import torch.distributed as dist
        if dist.is_initialized():
            return
        if self.name == "torch":  # done in start_torch; only reached after a teardown
            raise LaunchError("torch.distributed was shut down before a torch backend ran")
        rank, size = self.rank, self.size
        try:
            import blsfab.torch as bt  # rank 0 shares MASTER_ADDR/PORT over MPI
        except ImportError:
            bt = None
        if bt is not None:
            bt.init_process_group("gloo", rank=rank, world_size=size,
                                  timeout=self.control_timeout())
        else:  # gloo only, blsfab missing: the same, by hand
            addr = port = None
            if rank == 0:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("", 0))
                    port = s.getsockname()[1]
                addr = os.environ.get("MASTER_ADDR") or socket.gethostname()
                port = int(os.environ.get("MASTER_PORT") or port)
            addr, port = self.mpi_comm.bcast((addr, port), root=0)
            dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank,
                                    world_size=size, timeout=self.control_timeout())
        self._own_torch = True

    def new_store(self, purpose: str) -> Any:
        """A fresh key space on the job's store, for one store-bootstrapped Communicator."""
        import torch.distributed as dist
        if self.store is None:
            raise LaunchError("no c10d store: only --launcher torch has one")
        self._stores += 1
        return dist.PrefixStore(f"dlrm_adapter/{purpose}/{self._stores}", self.store)

    def close(self) -> None:
        if not self._own_torch:
            return
        import torch.distributed as dist
        self._own_torch = False
        if dist.is_initialized():
            dist.destroy_process_group()


def start_mpi(timeout_s: float) -> Launch:
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    return Launch("mpi", comm, timeout_s, mpi_comm=comm)


def start_torch(timeout_s: float, environ: Optional[Mapping[str, str]] = None) -> Launch:
    """Rendezvous over env:// (torchrun's variables) and make gloo the default group."""
    torch_env(environ)  # clear error before torch tries
    import torch.distributed as dist
    launch = Launch("torch", TorchControl(0, 1), timeout_s)
    timeout = launch.control_timeout()
    store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
    store.set_timeout(timeout)
    dist.init_process_group("gloo", store=dist.PrefixStore("dlrm_adapter/default_pg", store),
                            rank=rank, world_size=size, timeout=timeout)
    launch.comm = TorchControl(rank, size)
    launch.store = store
    launch._own_torch = True
    return launch


def start(name: str, timeout_s: float) -> Launch:
    return start_torch(timeout_s) if name == "torch" else start_mpi(timeout_s)
