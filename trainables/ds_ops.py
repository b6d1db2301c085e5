"""DeepSpeed's JIT-built CPU op, prepared once per machine and never waited on forever.

Why (DeepSpeed 0.19.8, CPU accelerator, gloo): the first `deepspeed.initialize` in a
process creates DeepSpeed's comm backend (`deepspeed.comm.init_distributed` ->
`TorchBackend.__init__` -> `build_shm_op()`), which JIT-builds and loads the
`deepspeed_shm_comm` op with `torch.utils.cpp_extension.load` (ninja + g++, ~28-35 s
fresh on 2 cores, ~10 ms when already built; torch's lock is held all that time). That op serves only
`deepspeed.comm.inference_all_reduce` (tensor-parallel inference, AutoTP); ZeRO-2/3
training on gloo never calls it, and without it that call falls back to
`torch.distributed.all_reduce`. DeepSpeed has no switch (env var, config key or
accelerator setting) to leave it out (installing DeepSpeed with DS_BUILD_SHM_COMM=1
prebuilds it instead); `build_shm_op` only checks `deepspeed.ops.__compatible_ops__`, a
per-process dict that deepspeed/ops/__init__.py keeps "so edits to it persist" (an
internal, not a documented API: tests/test_ds_ops.py fails if it stops working).

While loading, torch holds a plain `lock` file (`FileBaton`: created with O_EXCL, no
owner, removed when done) in `$TORCH_EXTENSIONS_DIR/<op>/`, and any other loader spins
on it forever. A loader killed in that window (SIGKILL, OOM, a stopped trial) leaves
the file behind and every later trial hangs silently; two environments sharing the
default cache rebuild the op in turn. This module:

- keeps one extensions directory per environment (`extensions_dir`: keyed by the
  Python prefix, torch and deepspeed versions) and sets TORCH_EXTENSIONS_DIR to it;
- by default (mode "skip") tells DeepSpeed in this process that the op is unavailable,
  so nothing is built, loaded, locked or put in /dev/shm; mode "build" builds/loads it
  once, under a lock of ours;
- guards every load with an fcntl lock of ours (`<extensions dir>/<op>.ds_ops.lock`),
  which the OS releases when its holder dies, so a live builder is never mistaken for
  a dead one; a torch `lock` found while holding ours is stale unless some live
  process still has it open or runs in the op's build directory (an orphaned ninja or
  g++ of a killed builder keeps building there: it is waited for, not raced);
- bounds every wait (`timeout_s`, seconds): a waiter prints once
  "waiting for <what> (<path>) held by another process" and raises `OpLockTimeout`
  naming the path, the holders and what to do.

Call `prepare()` in the study driver before any trial starts, pass the dict it returns
to Ray's runtime_env env_vars, and call `prepare()` again in each trial worker before
its first `deepspeed.initialize` (cheap, idempotent). Linux only (fcntl, /proc).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

SHM_OP = "deepspeed_shm_comm"  # ShareMemCommBuilder.NAME
ROOT_ENV = "MMSCALE_DS_OPS_ROOT"  # parent of the per-environment extension directories
MODE_ENV = "MMSCALE_DS_SHM"  # "skip" (default) or "build"
TIMEOUT_ENV = "MMSCALE_DS_OPS_TIMEOUT"  # seconds, overrides the default bound
MODES = ("skip", "build")
DEFAULT_TIMEOUT_S = 600.0  # a fresh build takes ~30-60 s; ten times that is surely stuck
STALE_GRACE_S = 0.2  # an unheld torch lock must stay unheld this long before it is removed

_load_lock = threading.Lock()  # one in-process load at a time (the FileBaton swap is process-wide)


class OpLockTimeout(TimeoutError):
    """A bounded wait for a lock held by another live process ran out.

    Attributes: `path` (the lock file), `what` (what was waited for), `pids` (its
    live holders when we gave up, empty if unknown), `waited_s` (seconds).
    """

    def __init__(self, what: str, path: Path, pids: list[int], waited_s: float, advice: str):
        self.what, self.path, self.pids, self.waited_s = what, path, pids, waited_s
        held = f" held by pid {', '.join(map(str, pids))}" if pids else ""
        super().__init__(f"gave up after {waited_s:.1f} s waiting for {what} ({path}){held}. {advice}")


class StaleOpBuild(RuntimeError):
    """A process outside ds_ops died while building the op under our feet; its lock was removed, rerun."""


def default_root() -> Path:
    """Parent of the per-environment directories: $MMSCALE_DS_OPS_ROOT, else
    $MMSCALE_CACHE/torch_extensions, else ~/.cache/mmscale/torch_extensions."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV])
    cache = os.environ.get("MMSCALE_CACHE") or Path.home() / ".cache" / "mmscale"
    return Path(cache) / "torch_extensions"


def env_key() -> str:
    """This environment's directory name: Python ABI, torch and deepspeed versions, and a
    hash of the real sys.prefix (two venvs never share, so never rebuild each other's op)."""
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "none"

    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    prefix = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:12]
    key = f"{py}-torch{version('torch')}-ds{version('deepspeed')}-{prefix}"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in key)


def extensions_dir(root: str | os.PathLike | None = None) -> Path:
    """`<root>/<env_key()>`, the TORCH_EXTENSIONS_DIR of this environment (not created)."""
    return Path(root if root is not None else default_root()).expanduser().resolve() / env_key()


def prepare(root: str | os.PathLike | None = None, *, shm: str | None = None, timeout_s: float | None = None,
            say: Callable[[str], None] | None = None) -> dict[str, str]:
    """Make DeepSpeed's CPU op safe for this process; returns the env vars for Ray workers.

    root: parent of the per-environment extension directories (default `default_root()`).
    shm: "skip" (default, or $MMSCALE_DS_SHM): DeepSpeed's comm backend is told the shm op is
        unavailable in this process, so `deepspeed.initialize` builds and loads nothing (the op
        only serves inference_all_reduce; training is unchanged). "build": the op is built (first
        time, ~30-60 s) and loaded here, under our lock, so a later `deepspeed.initialize` in this
        process reuses it without touching torch's lock.
    timeout_s: bound in seconds on all waits of this call together (default 600, or
        $MMSCALE_DS_OPS_TIMEOUT); building ourselves is work, not a wait, and is not bounded.
    say: where the one-line waiting/cleanup messages go (default print to stdout).

    Sets TORCH_EXTENSIONS_DIR (and the two variables below) in os.environ. Removes torch `lock`
    files left in that directory by dead loaders. Returns {"TORCH_EXTENSIONS_DIR",
    "MMSCALE_DS_OPS_ROOT", "MMSCALE_DS_SHM"}: pass it to Ray's runtime_env env_vars so workers
    use the same directory and mode. Raises OpLockTimeout when a live process holds a lock past
    the bound, ValueError for an unknown mode, StaleOpBuild (rare, see the class).
    """
    mode = shm or os.environ.get(MODE_ENV) or "skip"
    if mode not in MODES:
        raise ValueError(f"shm must be one of {MODES}, got {mode!r}")
    if timeout_s is None:
        timeout_s = float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)
    say = say or (lambda msg: print(msg, flush=True))
    import deepspeed.ops  # noqa: F401  (~2 s the first time: before the clock starts, it is not a wait)

    deadline = time.monotonic() + timeout_s
    ext = extensions_dir(root)
    ext.mkdir(parents=True, exist_ok=True)
    env = {"TORCH_EXTENSIONS_DIR": str(ext), ROOT_ENV: str(ext.parent), MODE_ENV: mode}
    os.environ.update(env)

    sweep(ext, say)
    if mode == "skip":
        _skip_shm()
    else:
        load_shm(ext, deadline, say)
    return env


def _skip_shm() -> None:
    """Mark the shm op unavailable for DeepSpeed's comm backend in this process.

    `TorchBackend.__init__` calls `build_shm_op()`, which returns None (no build, no load, no
    torch lock) when `deepspeed.ops.__compatible_ops__[SHM_OP]` is false. The dict is built on
    first access (~0.05 s) and kept in the module, so the edit holds for the process. Too late
    if DeepSpeed's backend already exists; then it stays as it is.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_OP] = False


def shm_loaded() -> bool:
    """Whether this process's DeepSpeed comm backend holds the shm op (False before initialize)."""
    import deepspeed.comm.comm as comm

    return getattr(comm.cdb, "shm_comm_op", None) is not None


def load_shm(ext: Path, deadline: float, say: Callable[[str], None]):
    """Build (if needed) and load the shm op into DeepSpeed's op cache; None where incompatible.

    Under our lock, a stale torch lock is removed first, so torch takes its own lock and
    builds; torch's unbounded wait is swapped for a bounded one while it loads.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return None
    ok = deepspeed.ops.__compatible_ops__[builder.NAME] = bool(builder.is_compatible(False))  # undoes a skip
    if not ok:
        return None
    with op_lock(ext, builder.NAME, deadline, say), _load_lock:
        clear_stale(ext / builder.NAME / "lock", deadline, say)
        with _bounded_baton(deadline, say):
            return builder.load(verbose=False)


def sweep(ext: Path, say: Callable[[str], None]) -> list[Path]:
    """Remove the torch `lock` files in `ext` (any op) that dead loaders left; returns them.

    Never waits: an op whose ds_ops lock is held, or whose torch lock a live process holds, is
    left alone (it is not needed here; `load_shm` waits, bounded, for the one it loads).
    """
    removed = []
    for baton in sorted(ext.glob("*/lock")):
        with op_lock(ext, baton.parent.name, None, say) as held:
            if held and clear_stale(baton, time.monotonic(), say, wait=False):
                removed.append(baton)
    return removed


@contextlib.contextmanager
def op_lock(ext: Path, op: str, deadline: float | None, say: Callable[[str], None]) -> Iterator[bool]:
    """Hold `<ext>/<op>.ds_ops.lock` (fcntl, released by the OS when we die); yields True when held.

    Waits until `deadline` (time.monotonic() seconds), polling every 0.1 s: prints once while
    another process holds it and raises OpLockTimeout past the deadline. With deadline None it
    tries once and yields False if the lock is busy. The file keeps the last holder's pid, for
    the messages; it is never removed (that would let two builders lock two different files).
    """
    path = ext / f"{op}.ds_ops.lock"
    ext.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    start, said = time.monotonic(), False
    try:
        while not _try_flock(fd):
            if deadline is None:
                break
            holder = _pid_in(path)
            what = f"DeepSpeed op {op} to be built or loaded"
            if not said:
                say(f"ds_ops: waiting for {what} ({path}) held by another process"
                    f"{f' (pid {holder})' if holder else ''}; giving up in {deadline - start:.0f} s")
                said = True
            if time.monotonic() >= deadline:
                raise OpLockTimeout(
                    what, path, [holder] if holder else [], time.monotonic() - start,
                    "The holder is alive (the OS drops this lock when it dies): let it finish, stop it "
                    f"if it is stuck, or allow more time (timeout_s / ${TIMEOUT_ENV}). Do not delete the file.")
            time.sleep(0.1)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield True
            return
        yield False
    finally:
        os.close(fd)  # also releases the flock


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def holders(lock: Path) -> list[int]:
    """Live pids that have `lock` open or run inside its directory (torch's ninja and g++ run
    with cwd = the build directory, and outlive a killed loader). Scans /proc; processes we
    may not inspect (other users') or in another pid namespace are not seen."""
    lock_s, dir_s = os.path.realpath(lock), os.path.realpath(lock.parent)
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        base = f"/proc/{entry.name}"
        try:
            cwd = os.readlink(f"{base}/cwd")
            if cwd == dir_s or cwd.startswith(dir_s + os.sep):
                found.append(int(entry.name))
                continue
            fds = os.listdir(f"{base}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{base}/fd/{fd}") == lock_s:
                    found.append(int(entry.name))
                    break
            except OSError:
                pass
    return found


def clear_stale(baton: Path, deadline: float, say: Callable[[str], None], remove: bool = True,
                wait: bool = True) -> bool:
    """Wait (bounded) until torch's `baton` lock is gone; True if it was stale and we removed it.

    Call with `op_lock` held, so no ds_ops loader is in its window. The file is stale when no
    live process holds it (`holders`) twice, STALE_GRACE_S apart, with the same inode (torch
    closes the file just before removing it; a new holder can only create a new inode after
    the old one is gone). Live holders are waited for until `deadline` (time.monotonic()
    seconds): one message, then OpLockTimeout; with wait=False they are left alone (False).
    With remove=False a stale lock raises StaleOpBuild instead of being removed.
    """
    start, said = time.monotonic(), False
    while True:
        try:
            first = os.stat(baton)
        except FileNotFoundError:
            return False
        pids = holders(baton)
        if pids and not wait:
            return False
        if not pids:
            time.sleep(STALE_GRACE_S)
            try:
                again = os.stat(baton)
            except FileNotFoundError:
                return False
            if (again.st_ino, again.st_ctime_ns) == (first.st_ino, first.st_ctime_ns) and not holders(baton):
                if not remove:
                    raise StaleOpBuild(f"a process building {baton.parent.name} outside ds_ops died; its lock "
                                       f"{baton} is stale and the build may be incomplete: rerun")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(baton)
                say(f"ds_ops: removed {baton}, a torch extension lock left by a process that died while "
                    f"building or loading {baton.parent.name}")
                return True
            continue
        what = f"torch extension build of {baton.parent.name}"
        if not said:
            say(f"ds_ops: waiting for {what} ({baton}) held by another process (pid "
                f"{', '.join(map(str, pids))}); giving up in {max(0.0, deadline - start):.0f} s")
            said = True
        if time.monotonic() >= deadline:
            raise OpLockTimeout(what, baton, pids, time.monotonic() - start,
                                "Those processes are alive: let them finish or stop them; once none is left, "
                                "the lock is removed on the next run (or delete it yourself).")
        time.sleep(0.1)


@contextlib.contextmanager
def _bounded_baton(deadline: float, say: Callable[[str], None]) -> Iterator[None]:
    """While torch loads in this thread, its FileBaton.wait (an endless 0.1 s spin) is bounded.

    Only reached if a process outside ds_ops took torch's lock between our check and torch's;
    a dead one raises StaleOpBuild (torch would otherwise import what it left half-built).
    Other threads keep torch's own wait.
    """
    import torch.utils.cpp_extension as cpp

    original = getattr(cpp, "FileBaton", None)
    if original is None:  # a torch without it: nothing to bound
        yield
        return
    me = threading.get_ident()

    class Bounded(original):
        def wait(self):
            if threading.get_ident() != me:
                return super().wait()
            clear_stale(Path(self.lock_file_path), deadline, say, remove=False)

    cpp.FileBaton = Bounded
    try:
        yield
    finally:
        cpp.FileBaton = original
