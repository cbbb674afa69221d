"""Pending works of a process group: posting, polling, waiting, futures and
the progress thread.

Every use of the communicator holds the group's lock (one thread at a time in
the engine). Works finish under the lock; their futures are completed after it
is released (their callbacks may call the group again), by the thread that
finished them: see ``_claim_locked`` and ``Work._complete_future``.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from typing import Callable, Iterable, List, Optional

import torch

from ..errors import ClosedError
from .work import Work

# Seconds the progress thread sleeps when a poll finds nothing to complete.
IDLE_SLEEP = 0.0001

_LIVE_GROUPS: "weakref.WeakSet[PendingWorks]" = weakref.WeakSet()


class PendingWorks:
    """Mixed into the process group, which provides ``_rank`` and ``options``."""

    def _init_progress(self) -> None:
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._pending: List[Work] = []
        self._watched = 0        # pending works whose future someone holds
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._closed = False
        _LIVE_GROUPS.add(self)

    def _check_open(self, name: str) -> None:
        if self._closed:
            raise ClosedError(f"blsfab: {name} on a process group that was shut down")

    def _launch(self, name: str, post: Callable[[], tuple], opts=None) -> Work:
        """Under the lock, poll, then run ``post()``, which posts this
        collective's iterations and returns (requests, finish); return its Work.

        ``opts.asyncOp`` False means the caller (torch.distributed with
        async_op=False) waits at once, so the work is completed here."""
        finished: list = []
        with self._lock:
            if self._closed:
                self._check_open(name)
            if self._pending:
                self._poll_locked(finished)
            requests, finish = post()
            work = Work(self, name, requests, finish)
            if opts is not None and not opts.asyncOp:
                try:
                    work._wait_locked()
                except TimeoutError:
                    self._pending.append(work)  # still in flight; wait() may resume it
                    raise
                work._published = True
            else:
                self._pending.append(work)
            settle = self._claim_locked(finished) if finished else ()
        _settle(settle)
        return work

    def _poll_locked(self, finished: list) -> None:
        """Try every pending work once; move the finished ones to ``finished``."""
        pending = self._pending
        if not pending:
            return
        still = []
        for w in pending:
            if w._try_complete():
                finished.append(w)
            else:
                still.append(w)
        if len(still) != len(pending):
            self._pending = still

    def _claim_locked(self, finished: list) -> list:
        """Mark finished works published; return those whose future must be set."""
        out = []
        for w in finished:
            w._published = True
            if w._future is not None:
                self._watched -= 1
                out.append(w)
        return out

    def _poll(self) -> int:
        """Poll once; complete the futures of every finished work. Returns how many."""
        finished: list = []
        with self._lock:
            if self._closed:
                return 0
            self._poll_locked(finished)
            settle = self._claim_locked(finished)
        _settle(settle)
        return len(finished)

    def _wait_work(self, work: Work, timeout: Optional[float]) -> None:
        finished: list = []
        with self._lock:
            if not work._done:
                self._check_open("wait")
                work._wait_locked(timeout)
                self._pending.remove(work)
                finished.append(work)
                self._poll_locked(finished)
            settle = self._claim_locked(finished)
        _settle(settle)

    def _future_of(self, work: Work) -> torch.futures.Future:
        """The work's future, made on first request; a poll will complete it."""
        with self._cond:
            fut = work._future
            if fut is not None:
                return fut
            fut = work._future = torch.futures.Future()
            settle_now = work._published
            if not settle_now:
                self._watched += 1
                if self.options.progress_thread and not self._closed:
                    if self._thread is None:
                        self._thread = threading.Thread(
                            target=_progress_loop, args=(weakref.ref(self),),
                            name=f"blsfab-progress-{self._rank}", daemon=True)
                        self._thread.start()
                    self._cond.notify()
        if settle_now:
            work._complete_future()
        else:
            self._poll()
        return fut

    def _wait_all_pending(self) -> None:
        """Wait for every pending work; errors stay with the works' owners."""
        with self._lock:
            pending = list(self._pending)
        for w in pending:
            try:
                w.wait()
            except Exception:  # noqa: BLE001 - its owner sees the error
                pass

    def _stop_thread(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)


def _settle(works: Iterable[Work]) -> None:
    for w in works:
        w._complete_future()


def _progress_loop(ref) -> None:
    """Complete held futures while nobody else polls (DDP waits on futures in C++)."""
    while True:
        pg = ref()
        if pg is None:
            return
        with pg._cond:
            while not pg._stopping and pg._watched <= 0:
                pg._cond.wait(0.5)
            if pg._stopping:
                return
        try:
            done = pg._poll()
        except Exception:  # noqa: BLE001 - errors surface in the works themselves
            done = 0
        del pg
        if not done:
            time.sleep(IDLE_SLEEP)


@atexit.register
def _stop_all_threads() -> None:
    for pg in list(_LIVE_GROUPS):
        try:
            pg._stop_thread()
        except Exception:  # noqa: BLE001
            pass
