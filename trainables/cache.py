"""Cache entries shared by concurrent trials and workers: one builder per key, whole entries only.

Used by the stage-1 cache and the preprocessed shards. A builder holds the key's file
lock (released by the OS if the process dies, so a killed builder never blocks the
next one), builds into a temporary sibling directory and renames it into place, so an
entry at the key's path is always complete. A temporary directory left by a killed
builder is removed by the next lock holder, which then builds the entry again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout


@contextlib.contextmanager
def locked(target: Path, waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold `target`'s lock; `waiting()` is called once if another process holds it first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(blocking=False)
    except Timeout:
        if waiting:
            waiting()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def stale(target: Path) -> list[Path]:
    """Temporary directories of `target` left by builders that died (call with the lock held)."""
    return sorted(target.parent.glob(target.name + ".tmp-*"))


@contextlib.contextmanager
def building(target: Path) -> Iterator[Path]:
    """A fresh temporary directory that becomes `target` when the block succeeds (call with the lock held)."""
    for leftover in stale(target):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, target)
