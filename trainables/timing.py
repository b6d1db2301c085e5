"""Where a trial's wall time goes: its phases on rank 0, logged to its run as `time_<phase>_s`.

A trial pays for more than its training (Ray starting its workers, imports, loading, DeepSpeed's
setup, evaluation, saving and logging), and a study pays that once per trial. The phases are
exclusive: a phase entered inside another pauses it, so they add up to at most the worker's wall time
(a few collectives between phases are in none: bench.overhead shows them as "unaccounted"), and
`bench.overhead` sets them beside the run's own start and end (MLflow) to show the whole trial.
Written by hand: Ray Train reports no per-phase times, and torch's profiler times operators, not phases.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

from tracking.metrics import PHASES, WORK, phase_metric as metric


class Phases:
    """Exclusive wall-clock seconds per phase (`with phases("ds_init"): ...`); unknown names raise KeyError."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._stack: list[str] = []
        self._since = time.perf_counter()

    def _charge(self, now: float) -> None:
        if self._stack:
            top = self._stack[-1]
            self.seconds[top] = self.seconds.get(top, 0.0) + now - self._since
        self._since = now

    @staticmethod
    def _known(phase: str) -> None:
        if phase not in PHASES:
            raise KeyError(f"unknown phase {phase!r}; known: {', '.join(PHASES)}")

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self._known(phase)
        self._charge(time.perf_counter())
        self._stack.append(phase)
        try:
            yield
        finally:
            self._charge(time.perf_counter())
            self._stack.pop()

    def add(self, phase: str, seconds: float) -> None:
        """Seconds measured elsewhere (the trial's startup, from its run's start time)."""
        self._known(phase)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def metrics(self) -> dict[str, float]:
        """`time_<phase>_s` for every phase that ran, and `time_overhead_s`: all but WORK."""
        out = {metric(k): v for k, v in self.seconds.items()}
        out["time_overhead_s"] = sum(v for k, v in self.seconds.items() if k not in WORK)
        return out
