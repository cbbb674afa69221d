"""Communicator: the bounded-lag synchronous (BLS) alltoallv.

The policy lives here: how far a rank may run ahead (``bound``), how large the
rings are, timeouts, and bootstrap. The transport is blsfab._core.RingEngine.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import List, Optional, Sequence

from . import _core
from . import provider as _provider
from .bootstrap import MPIBootstrap, geometry_mismatch, hostname, run_step
from .errors import ClosedError, FabricError, TimeoutError
from .node_local import (NodeLocalRings, check_job_token, endpoint_region_name, new_job_token,
                         sigterm_raises, unlink_job)

Request = _core.Request

# Empty polls before a waiting rank yields its core.
SPIN_POLLS = 4096
SPIN_POLLS_OVERSUBSCRIBED = 1

# Share of the construction timeout kept for the last step after the warm-up.
GREET_RESERVE = 0.2

# Records at least this large go to fabric peers straight from the send buffer
# (2-iov writes, no staging copy); BLSFAB_ZERO_COPY_BYTES overrides, 0 turns it off.
# Not yet tuned: the in-place receive threshold, where copies start to dominate.
ZERO_COPY_BYTES = 16384

# Paths between ranks of one host (Communicator's local=).
LOCAL_MODES = ("auto", "shared", "fabric")

# Iterations one chain may hold before it is posted; sizes the receive window.
MAX_CHAIN = 64


def ring_slots_for(bound: int) -> int:
    """Slots per sender ring that let a rank run ``bound`` iterations ahead
    without ever waiting for a credit: after ialltoallv(i) returns, every peer
    has posted i - bound, and that peer's message reported consuming our
    slots up to i - 2*bound - 1, so iteration i + 1 needs 2*bound + 2 slots."""
    return 2 * bound + 2


_usable: Optional[List[str]] = None


def providers() -> List[str]:
    """The providers usable on this host for blsfab, best first. Queried
    once per process: libfabric reads its environment only when it starts,
    and the queries take a noticeable share of a short construction timeout."""
    global _usable
    if _usable is None:
        _usable = [name for name in _provider.KNOWN if _core.FabricInfo.query(name) is not None]
    return list(_usable)


class Communicator(_core.Collective):
    """A bounded-lag alltoallv over libfabric RMA among the ranks of ``mpi_comm``.

    ``bound`` is how many iterations a rank may post beyond the slowest peer's
    latest post; 0 is a bulk-synchronous collective. ``slot_bytes`` caps one
    message to one peer (its ring slots hold a 40-byte header too). Every wait
    gives up after ``timeout`` seconds with blsfab.TimeoutError naming the ranks
    it is still waiting for.

    Construction and ``close()`` are collective and each of their steps obeys
    ``timeout`` too: if any rank fails or never arrives, every rank raises an
    error naming it.

    Without MPI, pass a torch c10d ``store`` (TCPStore or FileStore) with
    ``rank`` and ``size``. Any object with ``rank``, ``size``,
    ``allgather(payload: bytes, progress, timeout) -> list of bytes`` and
    ``barrier(progress, timeout)`` can also be given as ``bootstrap`` (see
    blsfab.bootstrap).

    ``local`` chooses the path between ranks on the same host: "auto" (the
    default, or $BLSFAB_LOCAL) uses node-local shared-memory rings unless a
    ``provider`` is forced; "shared" always uses them; "fabric" never does,
    so every peer goes through the libfabric provider. Other hosts are always
    reached through the provider. ``stats()["paths"]`` says which path each
    rank uses.

    ``ring_slots`` (advanced) overrides the slots per sender ring, 2*bound + 2 by
    default. Fewer slots save memory, but posts may then wait for credits
    (counted in ``stats()["blocked_posts"]``); correctness does not change.
    """

    def __init__(self, mpi_comm=None, *, bound: int = 4, slot_bytes: int = 1 << 20,
                 provider: Optional[str] = None, timeout: float = 60.0,
                 chain_threshold: Optional[int] = None, progress: Optional[str] = None,
                 ring_slots: Optional[int] = None, store=None, rank: Optional[int] = None,
                 size: Optional[int] = None, bootstrap=None, local: Optional[str] = None):
        self._rings: Optional[NodeLocalRings] = None
        timeout_ok = (isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
                      and timeout > 0 and math.isfinite(timeout))
        # A bad timeout is reported through the first step like any bad
        # argument; the step itself then waits the default.
        self.timeout = float(timeout) if timeout_ok else 60.0
        self._boot = _make_bootstrap(mpi_comm, store, rank, size, bootstrap, self.timeout)
        self.rank = self._boot.rank
        self.size = self._boot.size
        # rxm sizes its queues for this many peers (and warns above 256); it is
        # read when libfabric starts, so set it before the first provider query.
        os.environ.setdefault("FI_UNIVERSE_SIZE", str(self.size))
        self.chain_threshold = chain_threshold
        if progress is None:
            progress = os.environ.get("BLSFAB_PROGRESS", "poll")
        self.progress_mode = progress
        if local is None:
            local = os.environ.get("BLSFAB_LOCAL", "auto")

        # Step 1: arguments, provider and geometry. Every rank reports what it
        # has (or why it failed), so every rank raises the same error.
        def hello() -> bytes:
            if not timeout_ok:
                raise ValueError(f"timeout={timeout!r} must be a positive number of seconds")
            if provider is not None and not isinstance(provider, str):
                raise TypeError(f"provider must be a str such as 'shm'; got {provider!r}")
            if local not in LOCAL_MODES:
                raise ValueError(f"local={local!r}: use one of "
                                 f"{', '.join(map(repr, LOCAL_MODES))}")
            geometry = _geometry(bound, slot_bytes, ring_slots, chain_threshold, progress)
            # Whether same-host peers share rings changes where slots land,
            # so every rank must make the same choice.
            geometry["shared_rings"] = int(local == "shared" or
                                           (local == "auto" and provider is None))
            return json.dumps({"host": hostname(), "usable": providers(),
                               "requested": provider, "env": os.environ.get("FI_PROVIDER"),
                               "geometry": geometry,
                               "token": new_job_token() if self.rank == 0 else None}).encode()

        hellos = [_read_hello(h, r) for r, h in
                  enumerate(run_step(self._boot, "blsfab.Communicator construction (arguments)",
                                     hello, self.timeout))]
        geometry = hellos[self.rank]["geometry"]
        self.bound = geometry["bound"]
        mismatch = geometry_mismatch([h["geometry"] for h in hellos])
        if mismatch:
            raise ValueError(mismatch)
        name = self._agree_on_provider(hellos)
        self.slot_bytes = geometry["slot_bytes"]
        ring_slots = geometry["ring_slots"]
        self.local = "shared" if geometry["shared_rings"] else "fabric"  # resolved: dup() keeps it
        local_group = [r for r, h in enumerate(hellos) if h["host"] == hellos[self.rank]["host"]]
        shared = self.local == "shared" and len(local_group) > 1
        token = check_job_token(hellos[0]["token"])
        # shm endpoints have a region in /dev/shm under a name of this job.
        named_regions = name == "shm"
        zero_copy = _check_int("BLSFAB_ZERO_COPY_BYTES",
                               int(os.environ.get("BLSFAB_ZERO_COPY_BYTES", ZERO_COPY_BYTES)), 0)

        # Step 2: allocate and register the rings (and create our node-local
        # segment); exchange addresses.
        engine = None

        def build() -> bytes:
            nonlocal engine
            info = _core.FabricInfo.query(name)
            if info is None:
                raise FabricError(f"provider {name!r} is not usable on rank {self.rank}")
            engine = _core.RingEngine(
                info, self.rank, self.size, self.slot_bytes, ring_slots, 2 * (bound + MAX_CHAIN) + 8,
                region_name=endpoint_region_name(token, self.rank) if named_regions else None)
            engine.set_zero_copy(zero_copy)
            if shared:
                engine.plan_shared_rings(local_group)
                self._rings = NodeLocalRings(self.rank, local_group, token, ring_slots,
                                             self.slot_bytes)
            return engine.local_address()

        # While names exist in /dev/shm, a SIGTERM from mpirun must still unlink them.
        with sigterm_raises() if shared or named_regions else contextlib.nullcontext():
            try:
                addresses = run_step(self._boot, "blsfab.Communicator construction (rings)",
                                     build, self.timeout)

                # Step 3: connect, map the node-local peers' segments and warm
                # every connection; report the outcome. The warm-up waits on
                # peers, so it shares the step's deadline.
                deadline = time.monotonic() + self.timeout

                def connect() -> bytes:
                    engine.default_timeout = self.timeout
                    oversubscribed = self._ranks_on_host > (os.cpu_count() or 1)
                    engine.set_spin_polls(SPIN_POLLS_OVERSUBSCRIBED if oversubscribed
                                          else SPIN_POLLS)
                    if chain_threshold is not None:
                        engine.set_inject_limit(chain_threshold + _core.SLOT_OVERHEAD)
                    engine.connect(addresses)
                    if self._rings is not None:
                        self._rings.attach()  # step 2 created every segment
                        engine.use_shared_rings(self._rings)
                    # Leave the step a moment to hear why a silent peer is silent.
                    engine.greet(max(deadline - time.monotonic()
                                     - GREET_RESERVE * self.timeout, 0.001))
                    return b""

                run_step(self._boot, "blsfab.Communicator construction (connections)",
                         connect, self.timeout, engine.make_progress, deadline)
            except BaseException:
                if engine is not None:
                    engine.close()
                if self._rings is not None:
                    self._rings.close()
                    self._rings = None
                if shared or named_regions:
                    # A peer may have died between creating a name and
                    # unlinking it: remove every name of the job on this host.
                    unlink_job(token, local_group)
                raise
        if self._rings is not None:
            self._rings.unlink_own()  # every local peer mapped it in step 3
        # Every peer sent to us and heard from us in step 3, so every peer has
        # mapped our endpoint's region: its name is no longer needed.
        engine.unlink_region_name()
        if os.environ.get("BLSFAB_MALLOC_TUNING", "1") != "0":
            _core.tune_malloc(max(256 << 20, 4 * self.size * self.slot_bytes))
        if progress == "thread":
            engine.start_progress_thread()
        self._use_engine(engine, MAX_CHAIN)
        self.provider = name

    def _agree_on_provider(self, hellos: List[dict]) -> str:
        hosts = [h["host"] for h in hellos]
        same_host = len(set(hosts)) == 1
        self._ranks_on_host = hosts.count(hosts[self.rank])
        choices, problems = [], []
        for r, h in enumerate(hellos):
            # select() is a pure function, so every rank computes every rank's choice.
            try:
                choices.append(_provider.select(h["requested"], h["usable"], same_host,
                                                {"FI_PROVIDER": h["env"] or ""}))
            except ValueError as exc:
                problems.append(f"rank {r}: {exc}")
        if problems:
            raise ValueError("; ".join(problems))
        return _provider.check_agreement(choices)

    # ---- the collective ---------------------------------------------------

    @property
    def engine(self) -> "_core.RingEngine":
        if self._engine is None or self._engine.closed:
            raise ClosedError("this communicator is closed; create a new blsfab.Communicator")
        return self._engine

    @property
    def iteration(self) -> int:
        """Iterations issued so far (the next ialltoallv gets this number)."""
        return self.engine.reserved

    # ialltoallv() and chain() are compiled: see _core.Collective.

    def alltoallv(self, sendbuf, sendcounts: Sequence[int]):
        """Blocking alltoallv: the received data, concatenated in rank order."""
        return self.ialltoallv(sendbuf, sendcounts).wait()

    def dup(self) -> "Communicator":
        """A new Communicator over the same ranks with the same options
        (collective: every rank calls it). A Communicator belongs to the thread
        that issues its iterations; give every other thread its own dup().
        The new one sets up and closes through its own bootstrap channel (the
        bootstrap's dup(), where it has one), so closing the two in different
        orders on different threads never pairs one's close with the other's."""
        engine = self.engine
        dup_boot = getattr(self._boot, "dup", None)
        boot = dup_boot() if callable(dup_boot) else self._boot
        return Communicator(bootstrap=boot, bound=self.bound, slot_bytes=self.slot_bytes,
                            provider=self.provider, timeout=self.timeout,
                            chain_threshold=self.chain_threshold, progress=self.progress_mode,
                            ring_slots=engine.ring_slots, local=self.local)

    def progress(self) -> int:
        """Poll completions once; returns how many were handled."""
        return self.engine.make_progress()

    def heard(self) -> List[int]:
        """Iterations each rank has posted, as far as this rank has seen (its
        own entry: iterations it posted), after one progress poll. A rank whose
        entry exceeds ``iteration`` has posted work this rank has not: it is
        waiting for this one."""
        engine = self.engine
        engine.make_progress()
        return engine.heard()

    def stats(self) -> dict:
        s = self.engine.counters_dict()
        s.update(rank=self.rank, size=self.size, bound=self.bound, provider=self.provider,
                 iteration=self.iteration, local=self.local)
        # Rings and staging grow by two slots per unit of bound (2*bound + 2 slots).
        memory = s["ring_bytes"] + s["staging_bytes"] + s["shared_bytes"]
        s["memory_bytes"] = memory
        s["bytes_per_bound_unit"] = 2 * memory // max(1, s["ring_slots"])
        return s

    # ---- lifetime -----------------------------------------------------------

    def close(self) -> None:
        """Wait, progressing, until every rank arrives here (at most ``timeout``;
        then blsfab.TimeoutError names the ranks that did not), then release
        the fabric either way. Idempotent."""
        engine = self._engine
        if engine is None or engine.closed:
            return
        try:
            self._boot.barrier(engine.progress_for_teardown, self.timeout)
        except TimeoutError as exc:
            raise TimeoutError(f"rank {self.rank}: close(): ranks {exc.ranks} did not reach "
                               f"close() within timeout={self.timeout:g} s; this rank's fabric "
                               "is released anyway", ranks=exc.ranks) from None
        finally:
            engine.close()
            self._close_rings()

    def _close_rings(self) -> None:
        if self._rings is not None:
            self._rings.close()
            self._rings = None

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        elif self._engine is not None:
            # Unwinding from an error: peers may be gone, so skip the barrier.
            self._engine.close()
            self._close_rings()

    def __repr__(self) -> str:
        closed = self._engine is None or self._engine.closed
        state = "closed" if closed else f"iteration={self._engine.reserved}"
        return (f"<blsfab.Communicator rank={self.rank}/{self.size} bound={self.bound} "
                f"provider={getattr(self, 'provider', '?')!r} {state}>")


def _make_bootstrap(mpi_comm, store, rank, size, bootstrap, timeout):
    if bootstrap is not None:
        return bootstrap
    if store is not None:
        if rank is None or size is None:
            raise ValueError("a store bootstrap needs rank= and size= as well")
        from .store_bootstrap import StoreBootstrap
        return StoreBootstrap(store, rank, size, timeout=timeout)
    if rank is not None or size is not None:
        raise ValueError("rank= and size= go with store=; under MPI they come from mpi_comm")
    return MPIBootstrap(mpi_comm, timeout)


def _geometry(bound, slot_bytes, ring_slots, chain_threshold, progress) -> dict:
    """Check the arguments; return what every rank must agree on."""
    bound = _check_int("bound", bound, 0)
    slot_bytes = _check_int("slot_bytes", slot_bytes, _core.SLOT_OVERHEAD + 8)
    if ring_slots is None:
        ring_slots = ring_slots_for(bound)
    ring_slots = _check_int("ring_slots", ring_slots, 1)
    if ring_slots > _core.BLS_MAX_RING_SLOTS_PY:
        raise ValueError(f"ring_slots={ring_slots} (2*bound + 2 by default) exceeds "
                         f"{_core.BLS_MAX_RING_SLOTS_PY}; lower bound=")
    if chain_threshold is not None:
        _check_int("chain_threshold", chain_threshold, 0)
    if progress not in ("poll", "thread"):
        raise ValueError(f"progress={progress!r}: use 'poll' (progress inside calls) or "
                         "'thread' (a background thread polls between calls)")
    # Remote ring addresses are computed from these, so they must match
    # everywhere; progress mode and chain_threshold are local choices.
    return {"slot_bytes": (slot_bytes + 7) // 8 * 8, "ring_slots": ring_slots, "bound": bound,
            "max_chain": MAX_CHAIN, "slot_overhead": _core.SLOT_OVERHEAD}


def _read_hello(payload: bytes, rank: int) -> dict:
    """A peer's step-1 message, checked field by field (it is untrusted)."""
    try:
        hello = json.loads(payload.decode())
        ok = (isinstance(hello, dict) and isinstance(hello.get("host"), str)
              and isinstance(hello.get("usable"), list)
              and all(isinstance(u, str) for u in hello["usable"])
              and all(isinstance(hello.get(k), (str, type(None)))
                      for k in ("requested", "env", "token"))
              and isinstance(hello.get("geometry"), dict)
              and all(isinstance(v, int) for v in hello["geometry"].values()))
    except (UnicodeDecodeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"rank {rank} sent a malformed construction message {payload[:60]!r}")
    return hello


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}={value} must be at least {minimum}")
    return value
