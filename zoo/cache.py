"""Build once, then rename: the one discipline of every cache (zoo, world, stage 1, shards).

A builder holds the key's file lock (an OS lock: released when the process dies, even
by SIGKILL, so a killed builder never blocks the next one), builds into a temporary
sibling directory and renames it into place, so an entry at the key's path is always
complete. A temporary directory left by a killed builder is removed by the next lock
holder, which then builds the entry again. A process that finds the lock held says
what it waits for, once, and gives up with `CacheWaitTimeout` past a bound.

    path = ensure(target, make)        # make(tmp_dir) fills a fresh directory; returns target
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout

# How long a process waits for another one to finish building an entry (seconds). Building
# the largest entries (a stage 1 of a 7B model on a cluster) takes hours; a wait past this
# bound is a hang, not a build. MMSCALE_CACHE_WAIT_S overrides it.
DEFAULT_WAIT_S = 6 * 3600.0


class CacheWaitTimeout(TimeoutError):
    """Another process held a cache entry's lock for longer than the bound; the message names the entry."""


def cache_dir() -> Path:
    """Where built things live (the zoo, the world, dataset verdicts): $MMSCALE_CACHE or ~/.cache/mmscale."""
    return Path(os.environ.get("MMSCALE_CACHE") or Path.home() / ".cache" / "mmscale")


def wait_bound() -> float:
    return float(os.environ.get("MMSCALE_CACHE_WAIT_S") or DEFAULT_WAIT_S)


@contextlib.contextmanager
def locked(target: Path, waiting: Callable[[], None] | None = None, timeout_s: float | None = None) -> Iterator[None]:
    """Hold `target`'s lock. If another process holds it first, `waiting()` is called once (default: a line
    on stdout naming the entry) and the wait is bounded by `timeout_s` (default `wait_bound()`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(blocking=False)
    except Timeout:
        bound = wait_bound() if timeout_s is None else timeout_s
        (waiting or (lambda: print(f"waiting for another process to finish building {target} "
                                    f"(at most {bound:.0f} s)", flush=True)))()
        try:
            lock.acquire(timeout=bound)
        except Timeout:
            raise CacheWaitTimeout(f"{target}: another process has been building it for more than {bound:.0f} s; "
                                   f"if none is running, delete {target}.lock's holder or raise "
                                   "MMSCALE_CACHE_WAIT_S") from None
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


def ensure(target: Path, make: Callable[[Path], object], waiting: Callable[[], None] | None = None) -> Path:
    """`target`, built by `make(tmp)` into a fresh directory the first time (once, whoever asks first)."""
    target = Path(target)
    if target.exists():
        return target
    with locked(target, waiting):
        if not target.exists():
            with building(target) as tmp:
                make(tmp)
    return target
