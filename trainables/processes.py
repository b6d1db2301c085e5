"""Process hygiene for the Ray actors a trial runs in (the Tune trial and its Ray Train workers)."""

from __future__ import annotations

import sys


def quiet_exit_requests() -> None:
    """Ray ends an actor's process with SIGTERM, which Ray's handler turns into SystemExit. When the signal
    lands while Python runs a weakref callback or a finalizer (garbage collection as a finished trial's actor
    is torn down), Python cannot raise it there: it prints "Exception ignored in: ... Traceback ...
    SystemExit: 1" into the study's output though nothing failed (seen after a resumed study had finished).
    This unraisable hook drops exactly those, an exit request that arrived during cleanup, and hands every
    other unraisable exception to Python's default hook. Idempotent."""
    if getattr(sys.unraisablehook, "quiet_exit_requests", False):
        return
    default = sys.unraisablehook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, SystemExit):
            return
        default(unraisable)

    hook.quiet_exit_requests = True
    sys.unraisablehook = hook
