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


def job_token(boot) -> str:
    """A name fragment shared by every rank of this job and unlikely to collide
    with any other job on the host: rank 0's random token and pid."""
    mine = f"{os.getpid():x}-{secrets.token_hex(6)}".encode() if boot.rank == 0 else b""
    token = boot.allgather(mine)[0]
    if not (isinstance(token, bytes) and 0 < len(token) <= 64
            and all(c in b"0123456789abcdef-" for c in token)):
        raise ValueError(f"rank 0 sent the job token {token!r}; expected up to 64 hex digits")
    return token.decode()


def segment_name(token: str, rank: int) -> str:
    return f"{PREFIX}{token}-{rank}"


class NodeLocalRings:
    """This rank's shared receive segment and its mappings of its local peers'.

    ``local`` are the same-host ranks (this one included), in rank order. Ring
    i of rank d's segment belongs to d's i-th local sender (local ranks in
    order, d skipped). ``own`` is this rank's segment, ``peers[r]`` rank r's.
    """

    def __init__(self, boot, local: Sequence[int], ring_slots: int, slot_bytes: int,
                 timeout: float, progress: Callable[[], int] = lambda: 0):
        self.rank = boot.rank
        self.local = list(local)
        if self.rank not in self.local:
            raise ValueError(f"rank {self.rank} is not in its own local group {self.local}")
        self.ring_slots, self.slot_bytes = ring_slots, slot_bytes
        self.own: Optional[_core.SharedSegment] = None
        self.peers: Dict[int, _core.SharedSegment] = {}
        self.token = job_token(boot)
        nrings = len(self.local) - 1
        names = [segment_name(self.token, r) for r in self.local]
        # mpirun ends the job with SIGTERM when a rank dies; during the window
        # in which names exist, turn that into an exception so the cleanup runs.
        restore = _raise_on_sigterm()
        try:
            self.own = _core.SharedSegment.create(segment_name(self.token, self.rank), self.rank,
                                                  nrings, ring_slots, slot_bytes)
            boot.barrier(progress, timeout)  # every segment exists
            for r in self.local:
                if r != self.rank:
                    self.peers[r] = _core.SharedSegment.attach(segment_name(self.token, r), r,
                                                               nrings, ring_slots, slot_bytes)
            boot.barrier(progress, timeout)  # every segment is mapped by all who need it
        except BaseException:
            # A peer may have died between creating its segment and unlinking
            # it: remove every name of the job on this host, not only ours.
            for name in names:
                try:
                    _core.unlink_segment(name)
                except OSError:
                    pass
            self.close()
            raise
        finally:
            restore()
        self.own.unlink()

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


class Terminated(BaseException):
    """SIGTERM arrived while shared segments had names."""


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
