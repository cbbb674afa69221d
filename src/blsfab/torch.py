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
"""

from __future__ import annotations

import atexit
import os
import socket
import threading
import time
import weakref
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from . import _core
from .communicator import Communicator
from .errors import ClosedError
from .store_bootstrap import StoreBootstrap

BACKEND_NAME = "blsfab"
ENV_PREFIX = "BLSFAB_"

# Seconds the progress thread sleeps when a poll finds nothing to complete.
IDLE_SLEEP = 0.0001


# ----------------------------------------------------------------------------- options

@dataclass
class Options:
    """Backend options; ``None`` means: the environment, else the default.

    ``bound`` (default 4) and ``slot_bytes`` (default 1 MiB) are the
    Communicator's. ``provider`` is "shm", "tcp" or "verbs" (default: chosen by
    the library). ``timeout`` (seconds) bounds every wait; by default it is the
    timeout given to init_process_group (30 minutes unless set).
    ``progress_thread`` (default True) lets a helper thread complete the futures
    of works nobody waits on (DDP waits on futures); set it False only when
    every work is waited on with ``work.wait()``.
    """

    bound: Optional[int] = None
    slot_bytes: Optional[int] = None
    provider: Optional[str] = None
    timeout: Optional[float] = None
    progress_thread: Optional[bool] = None

    @classmethod
    def resolve(cls, given: Any = None, environ: Optional[Dict[str, str]] = None) -> "Options":
        """Merge ``given`` (Options, dict or None) over ``BLSFAB_*`` variables and defaults."""
        env = os.environ if environ is None else environ
        if given is None:
            given = cls()
        elif isinstance(given, dict):
            names = {f.name for f in fields(cls)}
            unknown = sorted(set(given) - names)
            if unknown:
                raise ValueError(f"unknown blsfab pg_options {unknown}; known: {sorted(names)}")
            given = cls(**given)
        elif not isinstance(given, cls):
            raise TypeError(f"pg_options for the blsfab backend must be blsfab.torch.Options or "
                            f"a dict; got {type(given).__name__}")
        out = cls(**{f.name: getattr(given, f.name) for f in fields(cls)})
        parsers: Dict[str, Callable[[str], Any]] = {
            "bound": int, "slot_bytes": parse_bytes, "provider": str, "timeout": float,
            "progress_thread": _parse_bool}
        for name, parse in parsers.items():
            if getattr(out, name) is None:
                text = env.get(ENV_PREFIX + name.upper())
                if text not in (None, ""):
                    try:
                        setattr(out, name, parse(text))
                    except ValueError:
                        raise ValueError(f"{ENV_PREFIX}{name.upper()}={text!r} is not a valid "
                                         f"{name}") from None
        if out.bound is None:
            out.bound = 4
        if out.slot_bytes is None:
            out.slot_bytes = 1 << 20
        if out.progress_thread is None:
            out.progress_thread = True
        return out


def parse_bytes(text: str) -> int:
    """'65536', '64K', '64KiB', '1M' -> bytes."""
    t = str(text).strip().upper().replace("IB", "").rstrip("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    if scale != 1:
        t = t[:-1]
    return int(t) * scale


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _seconds(timeout) -> Optional[float]:
    """A torch timeout (timedelta, seconds or None) in seconds; 0 or None means none given."""
    if timeout is None:
        return None
    if isinstance(timeout, timedelta):
        timeout = timeout.total_seconds()
    timeout = float(timeout)
    return timeout if timeout > 0 else None


# ----------------------------------------------------------------------------- tensors
#
# Everything travels in the tensors' own dtype (the engine takes any fixed-size
# dtype), as 1-D contiguous tensors; counts are in elements. Tensor views cost
# microseconds from Python, so the common case (1-D contiguous) makes none.

def _check_tensor(t, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"blsfab: {what} must be a torch.Tensor; got {type(t).__name__}")
    if not t.is_cpu:
        raise TypeError(f"blsfab: {what} is on {t.device}; the blsfab backend moves CPU tensors "
                        "only (use a device-specific backend for the others)")
    if t.layout is not torch.strided:
        raise TypeError(f"blsfab: {what} has layout {t.layout}; only dense tensors are supported")


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements as a 1-D contiguous tensor: ``t`` itself when it is one,
    else a view, else a copy."""
    if t.dim() == 1 and t.is_contiguous():
        return t.detach() if t.requires_grad else t
    view = _flat_view(t)
    return view if view is not None else t.detach().contiguous().reshape(-1).clone()


def _flat_view(t: torch.Tensor) -> Optional[torch.Tensor]:
    """``t`` as a 1-D unit-stride tensor sharing its memory, or None."""
    if not t.is_contiguous():
        return None
    flat = t.detach().reshape(-1)
    return flat if flat.numel() == 0 or flat.stride(0) == 1 else None


class _Sink:
    """Where received elements go: ``buf`` (1-D, the dtype of ``dst``),
    written back to ``dst`` by ``flush()`` when ``dst`` has no 1-D view."""

    __slots__ = ("dst", "buf", "direct")

    def __init__(self, dst: torch.Tensor):
        self.dst = dst
        if dst.dim() == 1 and dst.is_contiguous():
            self.buf = dst.detach() if dst.requires_grad else dst
            self.direct = True
            return
        flat = _flat_view(dst)
        self.direct = flat is not None
        self.buf = flat if flat is not None else torch.empty(dst.numel(), dtype=dst.dtype)

    def flush(self) -> None:
        if not self.direct:
            self.dst.detach().copy_(self.buf.view(self.dst.shape))


# ----------------------------------------------------------------------------- reductions

_INTEGRAL_ONLY = ("BAND", "BOR", "BXOR")


def _op_name(op) -> str:
    for name in ("SUM", "AVG", "PRODUCT", "MIN", "MAX", "BAND", "BOR", "BXOR", "PREMUL_SUM"):
        if op == getattr(dist.ReduceOp, name):
            return name
    return repr(op)


def _reducer(op, dtype: torch.dtype, size: int):
    """(accumulate(acc, part) in place, finalize(acc)) for a ReduceOp; raises before posting."""
    name = _op_name(op)
    if name in _INTEGRAL_ONLY and (dtype.is_floating_point or dtype.is_complex):
        raise ValueError(f"blsfab: ReduceOp.{name} needs an integer or bool tensor; got {dtype}")
    if name == "AVG" and not (dtype.is_floating_point or dtype.is_complex):
        raise ValueError(f"blsfab: ReduceOp.AVG needs a floating-point tensor; got {dtype}")
    table = {
        "SUM": lambda a, b: a.add_(b),
        "AVG": lambda a, b: a.add_(b),
        "PRODUCT": lambda a, b: a.mul_(b),
        "MIN": lambda a, b: torch.minimum(a, b, out=a),
        "MAX": lambda a, b: torch.maximum(a, b, out=a),
        "BAND": lambda a, b: a.bitwise_and_(b),
        "BOR": lambda a, b: a.bitwise_or_(b),
        "BXOR": lambda a, b: a.bitwise_xor_(b),
    }
    if name not in table:
        raise NotImplementedError(f"blsfab: ReduceOp.{name} is not supported (supported: "
                                  f"{', '.join(table)})")
    accumulate = table[name]
    if name == "AVG":
        return accumulate, lambda a: a.div_(size)
    return accumulate, lambda a: a


def _reduce_rows(parts: torch.Tensor, out: torch.Tensor, accumulate) -> None:
    """out = parts[0] (op) parts[1] (op) ... in rank order: the same bits on every rank."""
    out.copy_(parts[0])
    for r in range(1, parts.shape[0]):
        accumulate(out, parts[r])


# ----------------------------------------------------------------------------- work

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

    def __init__(self, pg: "ProcessGroupBlsfab", name: str, requests: list,
                 finish: Callable[[list], list]):
        super().__init__()
        self._pg = pg
        self._name = name
        self._requests = requests
        self._finish = finish

    # The three below run with the process group's lock held.
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
            self._pg._wait_work(self, _seconds(timeout))
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


# ----------------------------------------------------------------------------- process group

_LIVE_GROUPS: "weakref.WeakSet[ProcessGroupBlsfab]" = weakref.WeakSet()


class ProcessGroupBlsfab(dist.ProcessGroup):
    """A torch ProcessGroup whose collectives run over a blsfab Communicator.

    Normally created by ``dist.init_process_group("blsfab")`` or
    ``dist.new_group(backend="blsfab")``; it can also be built directly from a
    c10d ``store`` (TCPStore, FileStore) with ``rank`` and ``size``.
    ``communicator`` is the underlying :class:`blsfab.Communicator`.
    """

    def __init__(self, store, rank: int, size: int, timeout=None, options: Any = None):
        # ProcessGroup(store, rank, size) is broken for Python subclasses in torch 2.13.
        super().__init__(rank, size)
        opts = Options.resolve(options)
        seconds = opts.timeout if opts.timeout is not None else _seconds(timeout)
        if seconds is None:
            seconds = 60.0
        self.options = opts
        self._rank, self._size = rank, size
        self._group_name = ""
        self._group_desc = ""
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._pending: List[Work] = []
        self._watched = 0        # pending works whose future someone holds
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._closed = False
        boot = StoreBootstrap(store, rank, size, timeout=seconds)
        self._comm = Communicator(bootstrap=boot, bound=opts.bound, slot_bytes=opts.slot_bytes,
                                  provider=opts.provider, timeout=seconds)
        # The largest message to one peer in one iteration, in bytes.
        self._cap = self._comm.slot_bytes - _core.SLOT_OVERHEAD
        _LIVE_GROUPS.add(self)

    # ---- identity (torch 2.13 needs these overridden on Python groups) ---------------

    def getBackendName(self) -> str:
        return BACKEND_NAME

    def getGroupName(self) -> str:
        return self._group_name

    def setGroupName(self, name: str) -> None:
        self._group_name = name

    def getGroupDesc(self) -> str:
        return self._group_desc

    def setGroupDesc(self, desc: str) -> None:
        self._group_desc = desc

    @property
    def communicator(self) -> Communicator:
        return self._comm

    def __repr__(self) -> str:
        return (f"<blsfab.torch.ProcessGroupBlsfab rank={self._rank}/{self._size} "
                f"bound={self._comm.bound} provider={getattr(self._comm, 'provider', '?')!r}>")

    # ---- progress ----------------------------------------------------------------------
    #
    # Every use of the communicator holds self._lock (one thread at a time in
    # the engine). Works finish under the lock; their futures are completed
    # after it is released (their callbacks may call the group again), by the
    # thread that finished them: see _claim_locked and Work._complete_future.

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
        for w in settle:
            w._complete_future()
        return len(finished)

    def _wait_work(self, work: Work, timeout: Optional[float]) -> None:
        finished: list = []
        with self._lock:
            if not work._done:
                self._check_open("wait")
                try:
                    results = [req.wait(timeout) for req in work._requests]
                except TimeoutError:
                    raise  # not complete yet: the work stays pending
                except Exception as exc:  # noqa: BLE001
                    work._set_failed(exc)
                else:
                    work._set_done(results)
                self._pending.remove(work)
                finished.append(work)
                self._poll_locked(finished)
            settle = self._claim_locked(finished)
        for w in settle:
            w._complete_future()

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

    # ---- posting -------------------------------------------------------------------------

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
                    results = [req.wait() for req in requests]
                except TimeoutError:
                    self._pending.append(work)  # still in flight; wait() may resume it
                    raise
                except Exception as exc:  # noqa: BLE001
                    work._set_failed(exc)
                else:
                    work._set_done(results)
                work._published = True
            else:
                self._pending.append(work)
            settle = self._claim_locked(finished) if finished else ()
        for w in settle:
            w._complete_future()
        return work

    def _done_work(self, name: str, value: list) -> Work:
        work = Work(self, name, (), None)
        work._value = value
        work._done = work._published = True
        return work

    def _step(self, item: int) -> int:
        """Elements of ``item`` bytes that one message to one peer can hold."""
        step = self._cap // item
        if step <= 0:
            raise ValueError(f"blsfab: one {item}-byte element does not fit a slot of "
                             f"{self._cap} bytes; raise BLSFAB_SLOT_BYTES")
        return step

    def _post_replicated(self, payload: Optional[torch.Tensor], n: int, dtype: torch.dtype,
                         item: int, dests: Sequence[int]) -> List[tuple]:
        """Send ``payload`` (``n`` elements, or None when this rank sends
        nothing) to every rank in ``dests``, in slot-sized rounds. Every rank
        calls this with the same ``n`` and ``dests``, so every rank posts the
        same iterations. Returns [(request, offset, length)] per round."""
        step = self._step(item)
        rounds = max(1, -(-n // step))
        size = self._size
        sends = payload is not None and len(dests) > 0
        out = []
        for k in range(rounds):
            lo, hi = k * step, min(n, (k + 1) * step)
            counts = [0] * size
            if sends:
                chunk = payload if rounds == 1 else payload[lo:hi]
                buf = chunk if len(dests) == 1 else chunk.repeat(len(dests))
                for d in dests:
                    counts[d] = hi - lo
            else:
                buf = torch.empty(0, dtype=dtype)
            out.append((self._comm.ialltoallv(buf, counts), lo, hi - lo))
        return out

    def _post_even(self, payload: torch.Tensor, per_peer: int, item: int) -> List[tuple]:
        """Send segment j of ``payload`` (``size`` segments of ``per_peer``
        elements) to rank j, in slot-sized rounds. Returns [(request, offset, length)]."""
        step = self._step(item)
        size = self._size
        if per_peer <= step:
            return [(self._comm.ialltoallv(payload, [per_peer] * size), 0, per_peer)]
        grid = payload.view(size, per_peer)
        out = []
        for lo in range(0, per_peer, step):
            hi = min(per_peer, lo + step)
            buf = grid[:, lo:hi].contiguous().view(-1)
            out.append((self._comm.ialltoallv(buf, [hi - lo] * size), lo, hi - lo))
        return out

    # ---- collectives -----------------------------------------------------------------

    def all_to_all_single(self, output, input, output_split_sizes, input_split_sizes,
                          opts=None) -> Work:
        _check_tensor(output, "all_to_all_single output")
        _check_tensor(input, "all_to_all_single input")
        dtype = input.dtype
        if output.dtype != dtype:
            raise TypeError(f"blsfab: all_to_all_single output is {output.dtype} but input is "
                            f"{dtype}")
        size = self._size
        in_counts = _split_counts("input", input, input_split_sizes, size)
        out_counts = _split_counts("output", output, output_split_sizes, size)
        payload = _flat(input)
        sink = _Sink(output)
        even = not input_split_sizes and not output_split_sizes
        if even and in_counts[0] != out_counts[0]:
            raise ValueError(f"blsfab: all_to_all_single with even splits sends {in_counts[0]} "
                             f"elements to each rank but the output holds {out_counts[0]} per "
                             "rank; pass split sizes")
        item = input.element_size()
        if not even and max(in_counts) * item > self._cap:
            big = in_counts.index(max(in_counts))
            need = in_counts[big] * item
            raise ValueError(
                f"blsfab: all_to_all_single sends {need} bytes to rank {big} but one message "
                f"holds at most {self._cap} (slot_bytes={self._comm.slot_bytes}); set "
                f"BLSFAB_SLOT_BYTES (or pg_options slot_bytes) >= {need + _core.SLOT_OVERHEAD} "
                "on every rank")
        rank = self._rank

        if (opts is not None and not opts.asyncOp and not self._pending
                and (not even or in_counts[0] * item <= self._cap)):
            # Fast path: dist.all_to_all_single(async_op=False) waits at once, and
            # nothing else is in flight: one iteration, waited here.
            with self._lock:
                if not self._pending:
                    self._check_open("all_to_all_single")
                    req = self._comm.ialltoallv(payload, in_counts)
                    result = req.wait()
                    if req.recvcounts != out_counts:
                        raise ValueError(_mismatch("all_to_all_single", req.recvcounts,
                                                   out_counts, rank))
                    sink.buf.copy_(result)
                    if not sink.direct:
                        sink.flush()
                    return self._done_work("all_to_all_single", [output])

        if not even:
            def post():
                req = self._comm.ialltoallv(payload, in_counts)

                def finish(results):
                    if req.recvcounts != out_counts:
                        raise ValueError(_mismatch("all_to_all_single", req.recvcounts,
                                                   out_counts, rank))
                    sink.buf.copy_(results[0])
                    if not sink.direct:
                        sink.flush()
                    return [output]
                return [req], finish
            return self._launch("all_to_all_single", post, opts)

        per = out_counts[0]

        def post_even():
            rounds = self._post_even(payload, in_counts[0], item)

            def finish(results):
                if len(rounds) == 1:
                    got = rounds[0][0].recvcounts
                    if got != out_counts:
                        raise ValueError(_mismatch("all_to_all_single", got, out_counts, rank))
                    sink.buf.copy_(results[0])
                else:
                    grid = sink.buf.view(size, per)
                    for (req, lo, n), res in zip(rounds, results):
                        if req.recvcounts != [n] * size:
                            raise ValueError(_mismatch("all_to_all_single", req.recvcounts,
                                                       [n] * size, rank))
                        grid[:, lo:lo + n].copy_(res.view(size, n))
                if not sink.direct:
                    sink.flush()
                return [output]
            return [r for r, _, _ in rounds], finish

        return self._launch("all_to_all_single", post_even, opts)

    alltoall_base = all_to_all_single

    def alltoall(self, output_tensors, input_tensors, opts=None) -> Work:
        size = self._size
        if len(output_tensors) != size or len(input_tensors) != size:
            raise ValueError(f"blsfab: all_to_all needs {size} input and {size} output tensors; "
                             f"got {len(input_tensors)} and {len(output_tensors)}")
        for t in list(output_tensors) + list(input_tensors):
            _check_tensor(t, "all_to_all tensor")
        dtype = input_tensors[0].dtype
        if any(t.dtype != dtype for t in list(output_tensors) + list(input_tensors)):
            raise TypeError("blsfab: all_to_all tensors must share one dtype")
        counts = [t.numel() for t in input_tensors]
        expect = [t.numel() for t in output_tensors]
        item = input_tensors[0].element_size()
        if max(counts) * item > self._cap:
            big = counts.index(max(counts))
            raise ValueError(f"blsfab: all_to_all sends {counts[big] * item} bytes to rank "
                             f"{big}; one message holds at most {self._cap}; raise "
                             "BLSFAB_SLOT_BYTES")
        payload = torch.cat([_flat(t) for t in input_tensors])
        sinks = [_Sink(t) for t in output_tensors]
        rank = self._rank

        def post():
            req = self._comm.ialltoallv(payload, counts)

            def finish(results):
                if req.recvcounts != expect:
                    raise ValueError(_mismatch("all_to_all", req.recvcounts, expect, rank))
                off = 0
                for s, n in zip(sinks, expect):
                    s.buf.copy_(results[0][off:off + n])
                    s.flush()
                    off += n
                return list(output_tensors)
            return [req], finish

        return self._launch("all_to_all", post, opts)

    def allreduce(self, tensors, opts=None) -> Work:
        tensors = _tensor_list(tensors, "all_reduce")
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        return self._allreduce("all_reduce", tensors, op, opts=opts)

    def allreduce_coalesced(self, tensors, opts=None) -> Work:
        tensors = _tensor_list(tensors, "all_reduce_coalesced")
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        return self._allreduce("all_reduce_coalesced", tensors, op, opts=opts)

    def _allreduce(self, name: str, tensors: List[torch.Tensor], op, root: Optional[int] = None,
                   opts=None) -> Work:
        dtype = tensors[0].dtype
        if any(t.dtype != dtype for t in tensors):
            raise TypeError(f"blsfab: {name} tensors must share one dtype")
        size, rank = self._size, self._rank
        accumulate, finalize = _reducer(op, dtype, size)
        flat = _concat(tensors)
        n = flat.numel()
        dests = list(range(size)) if root is None else [root]
        receives = root is None or rank == root

        def post():
            rounds = self._post_replicated(flat, n, dtype, tensors[0].element_size(), dests)

            def finish(results):
                if not receives:
                    return list(tensors)
                acc = torch.empty(n, dtype=dtype)
                for (_, lo, m), res in zip(rounds, results):
                    if res.numel() != m * size:
                        raise ValueError(f"blsfab: {name}: rank {rank} received {res.numel()} "
                                         f"elements in a round, expected {m * size}; do all "
                                         "ranks pass tensors of the same size?")
                    if m:
                        _reduce_rows(res.view(size, m), acc[lo:lo + m], accumulate)
                finalize(acc)
                _write_back(acc, tensors)
                return list(tensors)
            return [r for r, _, _ in rounds], finish

        return self._launch(name, post, opts)

    def reduce(self, tensors, opts=None) -> Work:
        tensors = _tensor_list(tensors, "reduce")
        root = int(opts.rootRank) if opts is not None else 0
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        _check_root(root, self._size, "reduce")
        return self._allreduce("reduce", tensors, op, root=root, opts=opts)

    def broadcast(self, tensors, opts=None) -> Work:
        tensors = _tensor_list(tensors, "broadcast")
        root = int(opts.rootRank) if opts is not None else 0
        _check_root(root, self._size, "broadcast")
        rank, size = self._rank, self._size
        dtype = tensors[0].dtype
        if any(t.dtype != dtype for t in tensors):
            raise TypeError("blsfab: broadcast tensors must share one dtype")
        n = sum(t.numel() for t in tensors)
        flat = _concat(tensors) if rank == root else None
        dests = [d for d in range(size) if d != root]

        def post():
            rounds = self._post_replicated(flat, n, dtype, tensors[0].element_size(), dests)

            def finish(results):
                if rank != root:
                    acc = results[0] if len(rounds) == 1 else torch.empty(n, dtype=dtype)
                    for (_, lo, m), res in zip(rounds, results):
                        if res.numel() != m:
                            raise ValueError(f"blsfab: broadcast: rank {rank} received "
                                             f"{res.numel()} elements from root {root}, "
                                             f"expected {m}; do all ranks pass the same sizes?")
                        if len(rounds) > 1:
                            acc[lo:lo + m].copy_(res)
                    _write_back(acc, tensors)
                return list(tensors)
            return [r for r, _, _ in rounds], finish

        return self._launch("broadcast", post, opts)

    def allgather(self, output_tensors, input_tensors, opts=None) -> Work:
        inputs = _tensor_list(input_tensors, "all_gather")
        if len(inputs) != 1 or len(output_tensors) != 1:
            raise NotImplementedError("blsfab: all_gather takes one input tensor per rank "
                                      "(multi-tensor all_gather is not supported)")
        outs = list(output_tensors[0])
        size = self._size
        if len(outs) != size:
            raise ValueError(f"blsfab: all_gather needs {size} output tensors; got {len(outs)}")
        inp = inputs[0]
        for t in outs:
            _check_tensor(t, "all_gather output")
            if t.numel() != inp.numel() or t.dtype != inp.dtype:
                raise ValueError("blsfab: all_gather output tensors must match the input's "
                                 "size and dtype")
        sinks = [_Sink(t) for t in outs]
        return self._gather_like("all_gather", inp, [s.buf for s in sinks], sinks,
                                 list(output_tensors), opts)

    def all_gather_single(self, output, input, opts=None) -> Work:
        _check_tensor(output, "all_gather_into_tensor output")
        _check_tensor(input, "all_gather_into_tensor input")
        size = self._size
        n = input.numel()
        if output.numel() != size * n or output.dtype != input.dtype:
            raise ValueError(f"blsfab: all_gather_into_tensor output must hold {size} x the "
                             f"input ({n} elements of {input.dtype}); got {output.numel()} "
                             f"of {output.dtype}")
        sink = _Sink(output)
        rows = [sink.buf[r * n:(r + 1) * n] for r in range(size)]
        return self._gather_like("all_gather_into_tensor", input, rows, [sink], [output], opts)

    _allgather_base = all_gather_single
    allgather_into_tensor = all_gather_single

    def _gather_like(self, name, inp, rows, sinks, value, opts=None) -> Work:
        _check_tensor(inp, f"{name} input")
        flat = _flat(inp)
        n = flat.numel()
        size = self._size

        def post():
            rounds = self._post_replicated(flat, n, inp.dtype, inp.element_size(),
                                           list(range(size)))

            def finish(results):
                for (_, lo, m), res in zip(rounds, results):
                    if res.numel() != m * size:
                        raise ValueError(f"blsfab: {name}: received {res.numel()} elements in "
                                         f"a round, expected {m * size}; do all ranks pass "
                                         "tensors of the same size?")
                    if m:
                        parts = res.view(size, m)
                        for r in range(size):
                            rows[r][lo:lo + m].copy_(parts[r])
                for s in sinks:
                    s.flush()
                return value
            return [r for r, _, _ in rounds], finish

        return self._launch(name, post, opts)

    def reduce_scatter_single(self, output, input, opts=None) -> Work:
        _check_tensor(output, "reduce_scatter_tensor output")
        _check_tensor(input, "reduce_scatter_tensor input")
        size = self._size
        n = output.numel()
        if input.numel() != size * n or output.dtype != input.dtype:
            raise ValueError(f"blsfab: reduce_scatter_tensor input must hold {size} x the "
                             f"output ({n} elements of {output.dtype}); got {input.numel()} "
                             f"of {input.dtype}")
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        dtype = output.dtype
        accumulate, finalize = _reducer(op, dtype, size)
        payload = _flat(input)
        sink = _Sink(output)

        def post():
            rounds = self._post_even(payload, n, output.element_size())

            def finish(results):
                for (_, lo, m), res in zip(rounds, results):
                    if res.numel() != m * size:
                        raise ValueError(f"blsfab: reduce_scatter_tensor: received "
                                         f"{res.numel()} elements, expected {m * size}")
                    if m:
                        _reduce_rows(res.view(size, m), sink.buf[lo:lo + m], accumulate)
                finalize(sink.buf)
                sink.flush()
                return [output]
            return [r for r, _, _ in rounds], finish

        return self._launch("reduce_scatter_tensor", post, opts)

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter(self, output_tensors, input_tensors, opts=None) -> Work:
        outs = _tensor_list(output_tensors, "reduce_scatter")
        if len(outs) != 1 or len(input_tensors) != 1:
            raise NotImplementedError("blsfab: reduce_scatter takes one output tensor per rank")
        ins = list(input_tensors[0])
        if len(ins) != self._size:
            raise ValueError(f"blsfab: reduce_scatter needs {self._size} input tensors")
        for t in ins:
            _check_tensor(t, "reduce_scatter input")
        work = self.reduce_scatter_single(outs[0], _concat(ins), opts)
        work._name = "reduce_scatter"
        return work

    def barrier(self, opts=None) -> Work:
        empty = torch.empty(0, dtype=torch.uint8)
        zeros = [0] * self._size

        def post():
            return [self._comm.ialltoallv(empty, zeros)], _no_value

        return self._launch("barrier", post, opts)

    # ---- not supported -------------------------------------------------------------

    def _unsupported(name: str, why: str = ""):  # noqa: N805 - used at class creation
        def method(self, *args, **kwargs):
            raise NotImplementedError(
                f"blsfab backend does not support {name}{why}; use a gloo group for it "
                "(dist.new_group(backend='gloo'))")
        method.__name__ = name
        return method

    send = _unsupported("send", " (point-to-point does not fit the bounded-lag collective)")
    recv = _unsupported("recv", " (point-to-point does not fit the bounded-lag collective)")
    recv_anysource = _unsupported("recv_anysource", " (point-to-point)")
    gather = _unsupported("gather")
    scatter = _unsupported("scatter")
    allgather_coalesced = _unsupported("all_gather_coalesced")
    all_gather_single_coalesced = _unsupported("all_gather_into_tensor_coalesced")
    allgather_into_tensor_coalesced = all_gather_single_coalesced
    reduce_scatter_single_coalesced = _unsupported("reduce_scatter_tensor_coalesced")
    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced
    monitored_barrier = _unsupported("monitored_barrier")
    split_group = _unsupported("split_group")
    merge_remote_group = _unsupported("merge_remote_group")
    del _unsupported

    # ---- lifetime ----------------------------------------------------------------

    def _stop_thread(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def shutdown(self) -> None:
        """Collective: finish pending works, then close the communicator."""
        if self._closed:
            return
        self._stop_thread()
        with self._lock:
            pending = list(self._pending)
        for w in pending:
            try:
                w.wait()
            except Exception:  # noqa: BLE001 - its owner sees the error
                pass
        with self._lock:
            self._closed = True
            self._comm.close()

    def abort(self) -> None:
        """Close at once, without the closing barrier (peers may be gone)."""
        self._stop_thread()
        with self._lock:
            self._closed = True
            self._comm.__exit__(RuntimeError, None, None)


def _no_value(results) -> list:
    return []


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


# ----------------------------------------------------------------------------- helpers

def _tensor_list(tensors, name: str) -> List[torch.Tensor]:
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"blsfab: {name} got no tensors")
    for t in tensors:
        _check_tensor(t, f"{name} tensor")
    return tensors


def _concat(tensors: List[torch.Tensor]) -> torch.Tensor:
    return _flat(tensors[0]) if len(tensors) == 1 else torch.cat([_flat(t) for t in tensors])


def _write_back(flat: torch.Tensor, tensors: List[torch.Tensor]) -> None:
    """Copy the 1-D ``flat`` into ``tensors``, in order."""
    off = 0
    for t in tensors:
        n = t.numel()
        sink = _Sink(t)
        sink.buf.copy_(flat if len(tensors) == 1 else flat[off:off + n])
        sink.flush()
        off += n


def _check_root(root: int, size: int, name: str) -> None:
    if not 0 <= root < size:
        raise ValueError(f"blsfab: {name} root {root} is not a rank of this {size}-rank group")


def _split_counts(what: str, t: torch.Tensor, splits, size: int) -> List[int]:
    """Elements to (input) or from (output) each rank; splits are in dim-0 rows."""
    if not splits and t.dim() == 1:
        n = t.numel()
        if n % size == 0:
            return [n // size] * size
    if t.dim() == 0:
        rows, row = 1, 1
    else:
        rows = t.shape[0]
        row = t.numel() // rows if rows else 0
    if not splits:
        if rows % size:
            raise ValueError(f"blsfab: all_to_all_single {what} has {rows} rows, not divisible "
                             f"by the group size {size}; pass split sizes")
        return [rows // size * row] * size
    if len(splits) != size:
        raise ValueError(f"blsfab: all_to_all_single {what}_split_sizes has {len(splits)} "
                         f"entries; the group has {size} ranks")
    splits = [int(s) for s in splits]
    if min(splits) < 0 or sum(splits) != rows:
        raise ValueError(f"blsfab: all_to_all_single {what}_split_sizes {splits} must be "
                         f"non-negative and sum to the {what}'s {rows} rows")
    return [s * row for s in splits] if row != 1 else splits


def _mismatch(name: str, got: Sequence[int], expect: Sequence[int], rank: int) -> str:
    return (f"blsfab: {name} on rank {rank} received {list(got)} elements from ranks "
            f"0..n-1 but the output expects {list(expect)}; the ranks' split sizes disagree")


# ----------------------------------------------------------------------------- registration

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


# ----------------------------------------------------------------------------- launching

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


__all__ = ["BACKEND_NAME", "Options", "ProcessGroupBlsfab", "Work", "init_process_group",
           "launcher_rank_size", "parse_bytes", "register"]
