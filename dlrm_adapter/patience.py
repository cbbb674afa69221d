"""The latency policy: a soft bound on how far a rank runs ahead (``--patience-ms``).

The hard bound k lets a fast rank start up to k steps before the slowest rank has
posted its part of the oldest one.  In a closed loop nothing pulls the fast rank back,
so ranks drift to the full lead and every prediction waits about k steps for its
exchange.  The soft bound keeps ranks together while they are healthy and lets them
apart only when a peer is really late:

- before a rank starts its next step, it waits on the head of its FIFO, then on the
  next head, until every exchange it started has completed, finishing each head as it
  completes; but it waits on any one head for at most its *patience*;
- a head that has been waited on for a whole patience means a peer is late beyond the
  normal jitter of a step: the rank runs ahead, within the hard bound, and does not
  wait on that head again (the next head gets a patience of its own).

A rank that has drifted ahead is thus pulled back within a step or two, since each
head it waits for arrives within the patience while peers are healthy.  A wait costs
at most one patience per late head, and a delay longer than the patience is masked
by the bound as before.

``auto`` (the default) measures the patience: ``AUTO_STEPS`` times the median of this
rank's recent step work (the step's wall time outside waits and injected delays).  In
a healthy step, a peer posts its part within about one step of work of this rank's post
(it does the same work, on the same cores); a peer later than that is late for a reason
of its own.  ``0`` turns the policy off (the runner's eager
completion alone, as before); a number of milliseconds fixes the patience.
"""
from __future__ import annotations

from collections import deque
from typing import Deque, Optional

PATIENCE_AUTO = "auto"
AUTO_STEPS = 1.0   # auto patience, in median steps of work
AUTO_WINDOW = 16   # steps of work the median looks back on


def parse_patience(text: object) -> Optional[float]:
    """``--patience-ms``: ``"auto"`` -> None (measured), else a number of milliseconds
    >= 0 -> seconds; anything else raises ValueError naming the value and the fix."""
    if isinstance(text, str) and text.strip().lower() == PATIENCE_AUTO:
        return None
    try:
        ms = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        ms = float("nan")
    if not ms >= 0 or ms == float("inf"):
        raise ValueError(f"--patience-ms must be auto, 0 (off) or a number of milliseconds "
                         f">= 0; got {text!r}")
    return ms / 1000.0


class Patience:
    """How long a rank waits on its FIFO head before it runs ahead.

    ``setting``: None measures it (auto), 0 turns the policy off, > 0 fixes it (seconds).
    """

    def __init__(self, setting: Optional[float]) -> None:
        self.setting = setting
        self._work: Deque[float] = deque(maxlen=AUTO_WINDOW)

    @property
    def enabled(self) -> bool:
        return self.setting is None or self.setting > 0

    def note_work(self, seconds: float) -> None:
        """One step's work (outside waits and injected delays), for the auto patience."""
        self._work.append(seconds)

    def seconds(self) -> float:
        """The current patience (auto: 0 until one step's work was measured)."""
        if self.setting is not None:
            return self.setting
        if not self._work:
            return 0.0
        ordered = sorted(self._work)
        return AUTO_STEPS * ordered[len(ordered) // 2]
