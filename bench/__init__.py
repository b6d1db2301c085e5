"""Benchmarks (BENCHMARKS.md).

A measurement runs in a child process of its own (peak memory and import costs are per process) and hands
its result back on stdout as one line, `RESULT <json>`: `result_line` writes it, `result_of` and
`run_child` read it.
"""

from __future__ import annotations

import json
import subprocess

PREFIX = "RESULT "


class ChildFailed(RuntimeError):
    """A child measurement exited non-zero or printed no result; the message holds its command and output."""

    def __init__(self, cmd: list[str], stdout: str, stderr: str):
        super().__init__(f"{' '.join(cmd)} failed:\n{stdout[-2000:]}\n{stderr[-3000:]}")
        self.stdout, self.stderr = stdout, stderr


def result_line(result: dict) -> str:
    return PREFIX + json.dumps(result)


def result_of(cmd: list[str], returncode: int, stdout: str, stderr: str) -> dict:
    """The child's last result line, parsed; ChildFailed when it failed or printed none."""
    lines = [line for line in stdout.splitlines() if line.startswith(PREFIX)]
    if returncode or not lines:
        raise ChildFailed(cmd, stdout, stderr)
    return json.loads(lines[-1][len(PREFIX):])


def run_child(cmd: list[str], **kwargs) -> dict:
    """Run `cmd` (subprocess.run's `kwargs`: cwd, timeout, ...) and return its result (ChildFailed if none)."""
    r = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    return result_of(cmd, r.returncode, r.stdout, r.stderr)
