"""``Work``: the handle torch gets for one blsfab collective."""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch
import torch.distributed as dist

from .options import seconds


class WorkOwner(Protocol):
    """What a Work needs from the process group that issued it. Typing the
    owner as this protocol, not as ProcessGroupBlsfab, keeps work.py below
    group.py: the group imports Work, never the reverse."""

    def _wait_work(self, work: "Work", timeout: Optional[float]) -> None: ...

    def _future_of(self, work: "Work") -> torch.futures.Future: ...

    def _poll(self) -> bool: ...


class Work(dist._Work):
    """The handle of one blsfab collective: ``wait()``, ``get_future()``,
    ``is_completed()``. Its future completes as soon as any poll of the process
    group finds the data complete: every backend call, every wait and
    is_completed, and the progress thread while someone holds the future."""

    # Class-level defaults keep construction cheap (it is on every call's path).
    _future: Optional[torch.futures.Future] = None  # made on demand
    _done = False
    _published = False  # done, and seen by whoever completes the future
    _exc: Optional[BaseException] = None
    _value: Optional[list] = None

    def __init__(self, pg: WorkOwner, name: str, requests: list,
                 finish: Callable[[list], list]):
        super().__init__()
        self._pg = pg
        self._name = name
        self._requests = requests
        self._finish = finish

    # The methods below up to _complete_future run with the process group's lock held.

    def _try_complete(self) -> bool:
        """Progress; finish and return True once every iteration has arrived."""
        try:
            for req in self._requests:
                if not req.test():
                    return False
            self._set_done([req.wait() for req in self._requests])
        except Exception as exc:  # noqa: BLE001 - handed to wait() and the future
            self._set_failed(exc)
        return True

    def _wait_locked(self, timeout: Optional[float] = None) -> None:
        """Block until every iteration has arrived, then finish. A TimeoutError
        propagates and leaves the work unfinished (a later wait may resume it)."""
        try:
            results = [req.wait(timeout) for req in self._requests]
        except TimeoutError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to wait() and the future
            self._set_failed(exc)
        else:
            self._set_done(results)

    def _set_done(self, results: list) -> None:
        self._requests = ()
        try:
            self._value = self._finish(results)
        except Exception as exc:  # noqa: BLE001
            self._set_failed(exc)
            return
        self._done = True

    def _set_failed(self, exc: BaseException) -> None:
        self._requests = ()
        self._exc = exc
        self._done = True

    def _complete_future(self) -> None:
        """Set the future (outside the lock: its callbacks may call the group)."""
        fut = self._future
        if self._exc is not None:
            fut.set_exception(self._exc)
        else:
            fut.set_result(self._value)

    # ---- the torch Work interface ---------------------------------------------------

    def wait(self, timeout=None) -> bool:
        if not self._done:
            self._pg._wait_work(self, seconds(timeout))
        if self._exc is not None:
            raise self._exc
        return True

    def get_future(self) -> torch.futures.Future:
        return self._pg._future_of(self)

    def is_completed(self) -> bool:
        if not self._done:
            self._pg._poll()
        return self._done

    def is_success(self) -> bool:
        return self.is_completed() and self._exc is None

    def exception(self):
        return self._exc

    def result(self) -> list:
        self.wait()
        return list(self._value or [])

    def synchronize(self) -> None:
        pass

    def __repr__(self) -> str:
        state = "failed" if self._exc else "complete" if self._done else "pending"
        return f"<blsfab.torch.Work {self._name} {state}>"


def done_work(pg: WorkOwner, name: str, value: list) -> Work:
    """A Work that is already complete with ``value``."""
    work = Work(pg, name, (), None)
    work._value = value
    work._done = work._published = True
    return work
