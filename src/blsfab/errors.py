"""Typed exceptions. Every error names the bad value and, where there is one, the fix."""

import builtins


class BlsError(Exception):
    """Base class of every error blsfab raises on purpose."""


class FabricError(BlsError, RuntimeError):
    """A libfabric call returned an error, or an operation completed in error.

    ``provider`` is the provider in use, ``errno`` the positive libfabric error
    number and ``strerror`` its ``fi_strerror`` text.
    """

    def __init__(self, message, provider="", errno=0, strerror=""):
        super().__init__(message)
        self.provider = provider
        self.errno = errno
        self.strerror = strerror


class TimeoutError(BlsError, builtins.TimeoutError):
    """A wait ran past its timeout. ``iteration`` is what it waited for and
    ``ranks`` the ranks it had not yet heard from."""

    def __init__(self, message, iteration=-1, ranks=()):
        super().__init__(message)
        self.iteration = iteration
        self.ranks = list(ranks)


class ClosedError(BlsError, RuntimeError):
    """The communicator (or the request's communicator) has been closed."""


class BrokenError(FabricError):
    """An earlier failure left the communicator in an undefined protocol state
    (some writes of an iteration went out, or a peer broke the protocol).

    Every call after it raises BrokenError until ``close()``, which still frees
    everything. ``cause`` is the original error and ``iteration`` the iteration
    it hit (-1 if none).
    """

    def __init__(self, message, cause=None, iteration=-1, provider=""):
        super().__init__(message, provider=provider,
                         errno=getattr(cause, "errno", 0) or 0,
                         strerror=getattr(cause, "strerror", "") or "")
        self.cause = cause
        self.iteration = iteration
