"""Out-of-band exchange used only at set-up and close: endpoint names, ring
addresses, keys, and each rank's verdict on every step.

A bootstrap moves ``bytes`` only. Nothing read from a peer or a store is ever
unpickled: values travel in a fixed envelope (magic, length) and the call sites
encode their content with struct or json. A bootstrap offers

* ``allgather(payload, progress=None, timeout=None)``: every rank's bytes, in
  rank order, or blsfab.TimeoutError naming the ranks not heard from;
* ``post_ahead(payload)``: contribute to the next allgather without waiting
  (a rank that gave up on a step tells the ranks already in the next one);
* ``barrier(progress, timeout)``;
* ``dup()``: a new bootstrap over the same ranks with its own message space
  (collective: every rank calls it, in the same order). Each Communicator
  needs its own, since its close() is collective for it alone.

None of them blocks: they poll with a deadline and call ``progress()`` in
between, since fabric progress is manual and a peer may be waiting on our
writes, or gone.

``run_step`` builds the collective steps of construction on top: a rank whose
local work failed still takes part in the step, carrying its error, so every
rank raises the same error naming the failing ranks instead of waiting.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Callable, Dict, List, Optional, Sequence

from .errors import ClosedError, FabricError, TimeoutError

# Envelope of every bootstrap value: magic, payload length, payload.
ENVELOPE = struct.Struct("<4sI")
MAGIC = b"BLS1"
# No set-up value comes near this (an endpoint name is tens of bytes).
MAX_PAYLOAD = 1 << 20

Progress = Optional[Callable[[], int]]


def seal(payload: bytes) -> bytes:
    if not isinstance(payload, (bytes, bytearray)):
        raise TypeError(f"bootstrap values are bytes; got {type(payload).__name__}")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"bootstrap value of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return ENVELOPE.pack(MAGIC, len(payload)) + bytes(payload)


def unseal(data: bytes, source: str) -> bytes:
    """The payload of an envelope read from ``source``, or ValueError naming it."""
    data = bytes(data)
    if len(data) >= ENVELOPE.size:
        magic, length = ENVELOPE.unpack_from(data)
        if magic == MAGIC and length == len(data) - ENVELOPE.size:
            return data[ENVELOPE.size:]
    raise ValueError(f"{source} holds {len(data)} bytes that are not a blsfab bootstrap value "
                     f"(starts {data[:12]!r}); refusing it. Is another program or blsfab "
                     "version writing there?")


class PollLoop:
    """Deadline bookkeeping shared by the bootstraps' waits: progress the
    fabric if there is one, else yield the core briefly."""

    __slots__ = ("deadline", "progress", "idle")

    def __init__(self, timeout: float, progress: Progress, idle: float):
        self.deadline = time.monotonic() + timeout
        self.progress = progress
        self.idle = idle

    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def pause(self) -> None:
        if self.progress is None:
            time.sleep(self.idle)
        elif self.progress() == 0:
            time.sleep(0)


# ---------------------------------------------------------------------------- MPI

# Per MPI communicator, how many MPIBootstraps this process has made on it.
# Ranks that create their Communicators in the same order agree on it, and it
# keeps the tags of a failed construction away from later ones.
_generations: Dict[int, int] = {}
STEPS_PER_GENERATION = 64


class MPIBootstrap:
    """Bootstrap over an mpi4py communicator (default: COMM_WORLD).

    Point-to-point messages with tags from the top half of the tag space, one
    tag per call, so each rank knows exactly who has not arrived; every wait
    is an Improbe loop with a deadline, never a blocking MPI call.
    """

    def __init__(self, comm=None, timeout: float = 60.0):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.timeout = float(timeout)
        tag_ub = self.comm.Get_attr(MPI.TAG_UB) or 32767
        self._tag_base = tag_ub // 2 + 1
        self._tag_span = tag_ub - self._tag_base
        key = self.comm.py2f()
        self._generation = _generations.get(key, 0)
        _generations[key] = self._generation + 1
        self._seq = 0
        self._sends: List = []   # keeps send buffers alive until delivered

    def _tag(self, seq: int) -> int:
        return self._tag_base + (self._generation * STEPS_PER_GENERATION + seq) % self._tag_span

    def _send_all(self, seq: int, payload: bytes) -> bytes:
        frame = seal(payload)
        tag = self._tag(seq)
        self._sends = [s for s in self._sends if not s.Test()]
        for r in range(self.size):
            if r != self.rank:
                self._sends.append(self.comm.Isend([frame, self.MPI.BYTE], r, tag))
        return frame

    def post_ahead(self, payload: bytes) -> None:
        self._send_all(self._seq + 1, payload)

    def allgather(self, payload: bytes, progress: Progress = None,
                  timeout: Optional[float] = None) -> List[bytes]:
        MPI = self.MPI
        self._seq += 1
        tag = self._tag(self._seq)
        got: Dict[int, bytes] = {self.rank: self._send_all(self._seq, payload)}
        missing = [r for r in range(self.size) if r != self.rank]
        status = MPI.Status()
        limit = self.timeout if timeout is None else timeout
        loop = PollLoop(limit, progress, 0.0002)
        while True:
            for r in list(missing):
                msg = self.comm.Improbe(r, tag, status)
                if msg is None:
                    continue
                n = status.Get_count(MPI.BYTE)
                if not 0 <= n <= MAX_PAYLOAD + ENVELOPE.size:
                    raise ValueError(f"rank {r} sent a bootstrap message of {n} bytes; "
                                     f"at most {MAX_PAYLOAD + ENVELOPE.size} are expected")
                buf = bytearray(n)
                msg.Recv([buf, MPI.BYTE])
                got[r] = bytes(buf)
                missing.remove(r)
            if not missing:
                break
            if loop.expired():
                raise TimeoutError(
                    f"rank {self.rank}: bootstrap call {self._seq} not reached by ranks "
                    f"{missing} within {limit:.3g} s (MPI bootstrap)", ranks=missing)
            loop.pause()
        return [unseal(got[r], f"rank {r}'s bootstrap message") for r in range(self.size)]

    def barrier(self, progress: Progress, timeout: float) -> None:
        self.allgather(b"", progress, timeout)

    def dup(self) -> "MPIBootstrap":
        return MPIBootstrap(self.comm, self.timeout)

    def __repr__(self) -> str:
        return (f"<blsfab.MPIBootstrap rank={self.rank}/{self.size} "
                f"generation={self._generation} calls={self._seq}>")


def hostname() -> str:
    return socket.gethostname()


# ---------------------------------------------------------------------- collective steps

# Step verdicts: OK + payload, or FAILED + json {"type", "message", "ranks"}.
OK, FAILED = b"\x00", b"\x01"

# The error types a failure is re-raised as on every rank; anything else is a
# FabricError (the type name is peer-controlled text, never looked up freely).
_ERROR_TYPES = {"ValueError": ValueError, "TypeError": TypeError, "MemoryError": MemoryError,
                "TimeoutError": TimeoutError, "FabricError": FabricError,
                "BrokenError": FabricError, "ClosedError": ClosedError}


def failure(exc: BaseException) -> bytes:
    """The step verdict of a rank whose local work raised ``exc``."""
    name = type(exc).__name__ if type(exc).__name__ in _ERROR_TYPES else "FabricError"
    if isinstance(exc, TimeoutError):
        name = "TimeoutError"
    return FAILED + json.dumps({"type": name, "message": f"{type(exc).__name__}: {exc}",
                                "ranks": list(getattr(exc, "ranks", []) or [])}).encode()


def _read_failure(verdict: bytes, rank: int) -> dict:
    try:
        info = json.loads(verdict[1:].decode())
        if (isinstance(info, dict) and isinstance(info.get("type"), str)
                and isinstance(info.get("message"), str)
                and all(isinstance(r, int) for r in info.get("ranks", []))):
            return info
    except (UnicodeDecodeError, ValueError):
        pass
    raise ValueError(f"rank {rank} sent a malformed failure report {verdict[:40]!r}")


def run_step(boot, what: str, work: Callable[[], bytes], timeout: float,
             progress: Progress = None, deadline: Optional[float] = None) -> List[bytes]:
    """One collective step: run ``work()`` here, then exchange its result (or
    its error) with every rank for at most ``timeout`` seconds (or until
    ``deadline``, when the local work itself waited on peers). Returns every
    rank's payload, or raises on every rank an error naming each failing rank
    and its own error text; ranks never heard from are named as such."""
    local_error = None
    try:
        verdict = OK + work()
    except Exception as exc:  # noqa: BLE001 - carried to every rank, then raised
        local_error, verdict = exc, failure(exc)
    if deadline is None:
        deadline = time.monotonic() + timeout
    try:
        try:
            verdicts = boot.allgather(verdict, progress, max(deadline - time.monotonic(), 0.0))
        except TimeoutError as exc:
            if local_error is not None:
                raise local_error from None   # ours says more than the silence
            raise TimeoutError(f"rank {boot.rank}: {what}: no word from ranks {exc.ranks} "
                               "before the timeout; are they running, and did they make "
                               "the same call?", ranks=exc.ranks) from None
        verdicts[boot.rank] = verdict
        for r, v in enumerate(verdicts):
            if not v or v[:1] not in (OK, FAILED):
                raise ValueError(f"rank {r} sent a malformed {what} verdict {v[:40]!r}")
    except Exception as exc:  # noqa: BLE001
        # We give up on this step: ranks that finished it wait in the next one.
        post_ahead = getattr(boot, "post_ahead", None)
        if post_ahead is not None:
            try:
                post_ahead(failure(exc))
            except Exception:  # noqa: BLE001 - best effort; our own error matters more
                pass
        raise
    failed = {r: _read_failure(v, r) for r, v in enumerate(verdicts) if v[:1] == FAILED}
    if failed:
        raise _combined_error(what, boot.rank, failed)
    return [v[1:] for v in verdicts]


def _combined_error(what: str, me: int, failed: Dict[int, dict]) -> Exception:
    by_text: Dict[str, List[int]] = {}
    for r, info in failed.items():
        by_text.setdefault(info["message"], []).append(r)
    detail = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {rs if len(rs) > 1 else rs[0]}: "
                       f"{text}" for text, rs in by_text.items())
    types = {info["type"] for info in failed.values()}
    cls = _ERROR_TYPES.get(types.pop(), FabricError) if len(types) == 1 else FabricError
    message = f"rank {me}: {what} failed on {detail}"
    if cls is TimeoutError:
        named = sorted({r for info in failed.values() for r in info.get("ranks", [])}
                       or set(failed))
        return TimeoutError(message, ranks=named)
    return cls(message)


def geometry_mismatch(geometries: Sequence[dict]) -> Optional[str]:
    """None if every rank has the same geometry, else a text naming each
    rank's values of the keys that differ."""
    first = geometries[0]
    differ = sorted({k for g in geometries for k in set(g) | set(first) if g.get(k) != first.get(k)})
    if not differ:
        return None
    detail = "; ".join(f"rank {r}: " + ", ".join(f"{k}={g.get(k)}" for k in differ)
                       for r, g in enumerate(geometries))
    return (f"ranks disagree on the ring geometry ({detail}); pass the same "
            f"{', '.join(k + '=' for k in differ)} on every rank")


__all__ = ["MPIBootstrap", "run_step", "seal", "unseal", "hostname", "geometry_mismatch"]
