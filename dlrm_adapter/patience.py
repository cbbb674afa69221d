"""The latency policy: a soft bound on how far a rank runs ahead (``--patience-ms``).

The hard bound k lets a fast rank start up to k steps before the slowest rank has
posted its part of the oldest one.  In a closed loop nothing pulls the fast rank back,
so ranks drift to the full lead and every prediction waits about k steps for its
exchange.  The soft bound keeps ranks together while they are healthy and lets them
apart only when a peer is really late:

- before a rank starts its next step, it waits for every exchange it started to
  complete, finishing each FIFO head as it completes, for at most its *patience* in
  all (one budget per step);
- a FIFO still not empty after that means a peer is late beyond the normal jitter of
  a step: the rank runs ahead, within the hard bound.

A rank that has drifted ahead is pulled back, step by step, while its peers are
healthy; with more ranks than cores its waits even give them the cores they need.
A wait costs at most one patience per step, and a delay longer than the patience is
masked by the bound as before.  Waits test the head and sleep in between (see
``Backend.wait_until``): a rank that yields instead may lose its core for a whole
time slice of the rank it yielded to, and overshoot a short patience by as much.

``auto`` (the default) measures the patience: ``AUTO_STEPS`` times the mean of this
rank's last ``AUTO_WINDOW`` steps of work (pooling, posting, both MLPs; waits and
injected delays excluded).  A healthy peer posts its part within about a step of
work of this rank's post (it does the same work, on the same cores), and a rank
that sleeps past its deadline overshoots by a fraction of a step.  One and a half
steps kept the ranks together where nothing delayed them and gave back little of
the bound's masking where something did; half a step let them drift apart
(docs/dlrm.md has the figures).  ``0`` turns the policy off (eager completion
alone, as before); a number of milliseconds fixes the patience.
"""
from __future__ import annotations

from collections import deque
from typing import Deque, Optional

PATIENCE_AUTO = "auto"
AUTO_STEPS = 1.5   # auto patience, in mean steps of work
AUTO_WINDOW = 16   # steps of work the mean looks back on


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
    """How long, per step, a rank waits for its FIFO to empty before it runs ahead.

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
        # the mean, not the median: a step that finishes several batches (catching
        # up) and a step that finishes none (running ahead) must average out
        return AUTO_STEPS * sum(self._work) / len(self._work)
