"""The node-local transport's set-up: shared receive rings among same-host ranks.

Each rank creates one POSIX shared segment (blsfab._core.SharedSegment) that
holds a ring for every node-local sender, under a name unique to the job;
the senders map it; once every rank of the host has mapped what it needs,
every name is unlinked. From then on the memory lives only in the mappings,
so a rank that dies, however it dies, leaves nothing in /dev/shm. If set-up
fails anywhere (a peer dead or late, /dev/shm full), every surviving rank
unlinks every name of the job on its host before raising.

The ring protocol on these segments is the fabric path's: same slots, same
credits, same bound. Ordering is in include/blsfab/shm.h.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import threading
from typing import Callable, Dict, List, Optional, Sequence

from . import _core

PREFIX = "/blsfab-"


def same_host_groups(hosts: Sequence[str]) -> List[List[int]]:
    """Ranks grouped by host name, each group in rank order."""
    groups: Dict[str, List[int]] = {}
    for r, h in enumerate(hosts):
        groups.setdefault(h, []).append(r)
    return list(groups.values())


def new_job_token() -> str:
    """A name fragment for this job's segments, unlikely to collide with any
    other job on the host: this process's pid and random bits. Rank 0's is used."""
    return f"{os.getpid():x}-{secrets.token_hex(6)}"


def check_job_token(token) -> str:
    """Rank 0's token as received (it is untrusted: it becomes a file name)."""
    if not (isinstance(token, str) and 0 < len(token) <= 64
            and all(c in "0123456789abcdef-" for c in token)):
        raise ValueError(f"rank 0 sent the job token {token!r}; expected up to 64 hex digits")
    return token


def job_token(boot) -> str:
    """Rank 0's token, shared with every rank through ``boot``."""
    mine = new_job_token().encode() if boot.rank == 0 else b""
    token = boot.allgather(mine)[0]
    try:
        return check_job_token(token.decode())
    except UnicodeDecodeError:
        raise ValueError(f"rank 0 sent the job token {token[:64]!r}; expected hex digits") from None


def segment_name(token: str, rank: int) -> str:
    return f"{PREFIX}{token}-{rank}"


def endpoint_region_name(token: str, rank: int) -> str:
    """The name the shm provider gives ``rank``'s endpoint region in /dev/shm
    (without the leading '/'). Derived from the job token, so that survivors
    of a failed set-up can remove a dead rank's region too."""
    return f"{PREFIX[1:]}{token}-ep{rank}"


class NodeLocalRings:
    """This rank's shared receive segment and its mappings of its local peers'.

    ``local`` are the same-host ranks (this one included), in rank order. Ring
    i of rank d's segment belongs to d's i-th local sender (local ranks in
    order, d skipped). ``own`` is this rank's segment, ``peers[r]`` rank r's.

    Set-up has three phases, each collective among ``local``: construction
    creates our segment; ``attach()`` maps every peer's, once all exist;
    ``unlink_own()`` drops our name, once every peer has mapped it. If any
    phase fails anywhere, ``abandon()`` removes every name of the job on this
    host. ``establish()`` runs the phases with barriers in between; the
    Communicator runs them inside its own collective construction steps.
    """

    def __init__(self, rank: int, local: Sequence[int], token: str, ring_slots: int,
                 slot_bytes: int):
        self.rank = rank
        self.local = list(local)
        if self.rank not in self.local:
            raise ValueError(f"rank {self.rank} is not in its own local group {self.local}")
        self.ring_slots, self.slot_bytes = ring_slots, slot_bytes
        self.token = check_job_token(token)
        self.own: Optional[_core.SharedSegment] = None
        self.peers: Dict[int, _core.SharedSegment] = {}
        self.own = _core.SharedSegment.create(segment_name(self.token, self.rank), self.rank,
                                              self.nrings, ring_slots, slot_bytes)

    @property
    def nrings(self) -> int:
        return len(self.local) - 1

    def attach(self) -> None:
        """Map every local peer's segment (they must all exist)."""
        for r in self.local:
            if r != self.rank and r not in self.peers:
                self.peers[r] = _core.SharedSegment.attach(segment_name(self.token, r), r,
                                                           self.nrings, self.ring_slots,
                                                           self.slot_bytes)

    def unlink_own(self) -> None:
        """Every local peer has mapped our segment: from now on it lives only
        in the mappings, so no death can leave it behind."""
        self.own.unlink()

    def abandon(self) -> None:
        """Set-up failed somewhere: a peer may have died between creating its
        segment and unlinking it, so remove every name of the job on this
        host, not only ours, then unmap."""
        unlink_job(self.token, self.local)
        self.close()

    def __del__(self):
        self.close()

    def ring_index(self, receiver: int, sender: int) -> int:
        """Which ring of ``receiver``'s segment ``sender`` writes into."""
        i = self.local.index(sender)
        return i if i < self.local.index(receiver) else i - 1

    @property
    def mapped_bytes(self) -> int:
        """Shared memory this rank owns (its receive rings)."""
        return self.own.nbytes if self.own is not None else 0

    def close(self) -> None:
        for seg in self.peers.values():
            seg.close()
        self.peers = {}
        if self.own is not None:
            self.own.unlink()
            self.own.close()
            self.own = None


def unlink_job(token: str, local: Sequence[int]) -> None:
    """Remove every name of this job's ``local`` ranks that still exists in
    /dev/shm: their node-local segments and their shm endpoint regions."""
    for r in local:
        for name in (segment_name(token, r), "/" + endpoint_region_name(token, r)):
            try:
                _core.unlink_segment(name)
            except OSError:
                pass


def establish(boot, local: Sequence[int], ring_slots: int, slot_bytes: int, timeout: float,
              progress: Callable[[], int] = lambda: 0) -> NodeLocalRings:
    """The whole node-local set-up as one collective call over ``boot``."""
    token = job_token(boot)
    rings = None
    with sigterm_raises():
        try:
            rings = NodeLocalRings(boot.rank, local, token, ring_slots, slot_bytes)
            boot.barrier(progress, timeout)  # every segment exists
            rings.attach()
            boot.barrier(progress, timeout)  # every segment is mapped by all who need it
        except BaseException:
            if rings is not None:
                rings.abandon()
            else:
                unlink_job(token, local)
            raise
    rings.unlink_own()
    return rings


class Terminated(BaseException):
    """SIGTERM arrived while shared segments had names."""


@contextlib.contextmanager
def sigterm_raises():
    """While names of this job exist, turn mpirun's SIGTERM (sent when a rank
    dies) into an exception, so the clean-up runs; re-send it afterwards."""
    restore = _raise_on_sigterm()
    try:
        yield
    finally:
        restore()


def _raise_on_sigterm() -> Callable[[], None]:
    """Make SIGTERM raise Terminated until the returned function is called;
    that function restores the old handler and, if SIGTERM came, re-sends it
    so the process still ends as it was asked to. A no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    hit = []

    def handler(signum, frame):
        hit.append(signum)
        raise Terminated(f"signal {signum} during node-local set-up")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return lambda: None

    def restore():
        signal.signal(signal.SIGTERM, previous)
        if hit:
            os.kill(os.getpid(), signal.SIGTERM)

    return restore
