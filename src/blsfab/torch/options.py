"""Backend options: ``pg_options`` over ``BLSFAB_*`` variables over defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any, Callable, Dict, Optional

BACKEND_NAME = "blsfab"
ENV_PREFIX = "BLSFAB_"


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
        for name, parse in _PARSERS.items():
            if getattr(out, name) is None:
                var = ENV_PREFIX + name.upper()
                text = env.get(var)
                if text not in (None, ""):
                    try:
                        setattr(out, name, parse(text))
                    except ValueError:
                        raise ValueError(f"{var}={text!r} is not a valid {name}") from None
        for name, value in _DEFAULTS.items():
            if getattr(out, name) is None:
                setattr(out, name, value)
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


_PARSERS: Dict[str, Callable[[str], Any]] = {
    "bound": int, "slot_bytes": parse_bytes, "provider": str, "timeout": float,
    "progress_thread": _parse_bool}
# provider and timeout have no default here: the library picks the provider,
# the process group falls back to torch's timeout.
_DEFAULTS: Dict[str, Any] = {"bound": 4, "slot_bytes": 1 << 20, "progress_thread": True}


def seconds(timeout) -> Optional[float]:
    """A torch timeout (timedelta, seconds or None) in seconds; 0 or None means none given."""
    if timeout is None:
        return None
    if isinstance(timeout, timedelta):
        timeout = timeout.total_seconds()
    timeout = float(timeout)
    return timeout if timeout > 0 else None
