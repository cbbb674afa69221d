"""Set-up exchange through a torch c10d Store (TCPStore, FileStore, PrefixStore, ...).

This is the MPI-free bootstrap: ``Communicator(store=store, rank=r, size=n)``
builds on it, and so does the torch backend (``blsfab.torch``), which receives
its store from ``torch.distributed.init_process_group``.

Two rules shape it:

* Every operation is collective and every rank calls them in the same order.
  Keys carry a per-call sequence number, so repeated calls never collide, and
  each rank deletes its own key of call ``n - 1`` once call ``n`` is complete
  (by then every rank has written its key of call ``n``, so every rank has
  finished reading call ``n - 1``).
* Fabric progress is manual and a peer may be gone, so no call blocks inside
  the store: each polls with ``store.check`` between calls to ``progress()``
  until its deadline, and only then reads the keys that exist.
* Values are ``bytes`` in a fixed envelope (see blsfab.bootstrap). Nothing
  read from the store is unpickled: a TCPStore has no authentication, so its
  values are untrusted; a malformed one raises ValueError naming its key.

Several bootstraps may share one store: the n-th StoreBootstrap a rank creates
on a store uses the key space ``<prefix>/<n>/``. The counter is per rank
(``store.add``), so ranks that create their communicators in the same order
agree on it, even with fresh store client objects.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Callable, List, Optional, Sequence

from .bootstrap import PollLoop, seal, unseal
from .errors import TimeoutError

# Seconds between two store queries while polling. Store queries are network
# round trips on a TCPStore; fabric progress is polled in between.
POLL_INTERVAL = 0.0005
DEFAULT_TIMEOUT = 300.0


def _store_timeout(store) -> Optional[float]:
    value = getattr(store, "timeout", None)
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
        return seconds if seconds > 0 else None
    return None


class StoreBootstrap:
    """Bootstrap over a torch c10d ``store`` for ``rank`` of ``size``.

    ``timeout`` bounds ``allgather`` (``barrier`` takes its own); by default it
    is the store's timeout, else 300 s. ``prefix`` namespaces the keys.
    """

    def __init__(self, store, rank: int, size: int, *, timeout: Optional[float] = None,
                 prefix: str = "blsfab"):
        for name, value in (("rank", rank), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int; got {value!r}")
        if size < 1:
            raise ValueError(f"size={size} must be at least 1")
        if not 0 <= rank < size:
            raise ValueError(f"rank={rank} is not in [0, {size})")
        for method in ("set", "get", "add", "check"):
            if not callable(getattr(store, method, None)):
                raise TypeError(f"store must be a torch.distributed Store (TCPStore, FileStore, "
                                f"...); {type(store).__name__} has no {method}()")
        if timeout is None:
            timeout = _store_timeout(store) or DEFAULT_TIMEOUT
        if not timeout > 0:
            raise ValueError(f"timeout={timeout!r} must be a positive number of seconds")
        self.store = store
        self.rank = rank
        self.size = size
        self.timeout = float(timeout)
        self._prefix = prefix
        # This rank's how-many-th bootstrap on this store: 1, 2, ...
        generation = store.add(f"{prefix}/generation/rank{rank}", 1)
        self._ns = f"{prefix}/{generation}"
        self._seq = 0
        self._mine: List[str] = []   # our keys of the previous call, deleted after this one

    # ---- helpers -------------------------------------------------------------

    def _keys(self, kind: str, seq: int) -> List[str]:
        return [f"{self._ns}/{seq}/{kind}/{r}" for r in range(self.size)]

    def _await_keys(self, keys: Sequence[str], what: str, timeout: float,
                    progress: Optional[Callable[[], int]] = None,
                    ranks: Optional[Sequence[int]] = None) -> None:
        """Poll until every key exists (``keys[i]`` is written by ``ranks[i]``);
        keep the fabric progressing meanwhile."""
        keys = list(keys)
        ranks = list(range(len(keys))) if ranks is None else list(ranks)
        loop = PollLoop(timeout, progress, POLL_INTERVAL)
        next_check = 0.0
        while True:
            now = time.monotonic()
            if now >= next_check:
                if self.store.check(keys):
                    return
                if now > loop.deadline:
                    missing = [r for r, k in zip(ranks, keys) if not self.store.check([k])]
                    if not missing:
                        return
                    raise TimeoutError(
                        f"rank {self.rank}: {what} not reached by ranks {missing} within "
                        f"{timeout:g} s (store bootstrap)", ranks=missing)
                next_check = now + POLL_INTERVAL
            loop.pause()

    def _retire(self, new_keys: List[str]) -> None:
        """Delete our keys of the previous call; remember this call's."""
        for key in self._mine:
            try:
                self.store.delete_key(key)
            except Exception:  # noqa: BLE001 - a store without delete_key just keeps them
                pass
        self._mine = new_keys

    # ---- the bootstrap interface -----------------------------------------------

    def allgather(self, payload: bytes, progress: Optional[Callable[[], int]] = None,
                  timeout: Optional[float] = None) -> List[bytes]:
        """Every rank's ``payload`` (bytes), in rank order."""
        self._seq += 1
        keys = self._keys("allgather", self._seq)
        self.store.set(keys[self.rank], seal(payload))
        self._await_keys(keys, f"allgather #{self._seq}",
                         self.timeout if timeout is None else timeout, progress)
        multi_get = getattr(self.store, "multi_get", None)
        values = multi_get(keys) if multi_get is not None else [self.store.get(k) for k in keys]
        self._retire([keys[self.rank]])
        return [unseal(v, f"store key {k!r} (rank {r})")
                for r, (k, v) in enumerate(zip(keys, values))]

    def post_ahead(self, payload: bytes) -> None:
        """Write our value of the next allgather now, without waiting: ranks
        that finished this call and wait in the next one then read it."""
        self.store.set(self._keys("allgather", self._seq + 1)[self.rank], seal(payload))

    def barrier(self, progress: Callable[[], int], timeout: float) -> None:
        """Wait for every rank while calling ``progress()``; never blocks in the store.

        Two phases: after every rank has arrived, ranks other than 0 say they
        are leaving, and rank 0 returns only after hearing that. Rank 0 usually
        hosts the TCPStore, so it must not exit while a peer still polls it.
        """
        self._seq += 1
        arrive = self._keys("arrive", self._seq)
        leave = self._keys("leave", self._seq)
        self.store.set(arrive[self.rank], b"1")
        self._await_keys(arrive, f"barrier #{self._seq}", timeout, progress)
        mine = [arrive[self.rank]]
        if self.rank != 0:
            self.store.set(leave[self.rank], b"1")
            mine.append(leave[self.rank])
        elif self.size > 1:
            self._await_keys(leave[1:], f"barrier #{self._seq} (leaving)", timeout, progress,
                             ranks=range(1, self.size))
        self._retire(mine)

    def dup(self) -> "StoreBootstrap":
        """The next key space on the same store (collective, like every call)."""
        return StoreBootstrap(self.store, self.rank, self.size, timeout=self.timeout,
                              prefix=self._prefix)

    def __repr__(self) -> str:
        return (f"<blsfab.StoreBootstrap rank={self.rank}/{self.size} keys={self._ns!r} "
                f"calls={self._seq}>")
