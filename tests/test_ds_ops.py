"""trainables.ds_ops: DeepSpeed's JIT-built shm op never leaves a lock that hangs the next trial.

The real op is built once per session into a temporary extensions root (`built`, ~30-60 s);
processes that hold, lose or wait for torch's `lock` are real subprocesses, killed with
SIGKILL where a scheduler or the OOM killer would kill them. A subprocess that hangs fails
its test through a timeout instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trainables import ds_ops

REPO = Path(__file__).resolve().parents[1]
PRELUDE = "import os, sys, time\nfrom pathlib import Path\nfrom trainables import ds_ops\n"
# Holds torch's lock inside a real load: torch calls this (with its lock taken) to run ninja.
HOLD = """
import torch.utils.cpp_extension as cpp
_build = cpp._write_ninja_file_and_build_library
def _held(*a, **k):
    Path(os.environ["MARK"]).write_text(str(os.getpid()))
    while not Path(os.environ["GO"]).exists():
        time.sleep(0.05)
    return _build(*a, **k)
cpp._write_ninja_file_and_build_library = _held
"""
LOAD = """
ds_ops.prepare(os.environ["ROOT"], shm="build")
import deepspeed.ops
from deepspeed.ops.op_builder.builder import OpBuilder
print("LOADED", hasattr(OpBuilder._loaded_ops.get(ds_ops.SHM_OP), "initialize"), flush=True)
"""


@pytest.fixture
def procs():
    """Start subprocesses (own session each); every one left, with its children, is killed at the end."""
    started = []

    def spawn(code: str, **env) -> subprocess.Popen:
        full = {k: v for k, v in os.environ.items() if not k.startswith(("TORCH_EXTENSIONS", "MMSCALE_DS"))}
        full.update(PYTHONPATH=str(REPO), **{k: str(v) for k, v in env.items()})
        p = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], env=full, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        started.append(p)
        return p

    yield spawn
    for p in started:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def finish(p: subprocess.Popen, timeout: float) -> str:
    """The output of `p` once it exits 0 within `timeout` seconds (a hang or a failure fails the test)."""
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"process {p.pid} did not finish within {timeout} s")
    assert p.returncode == 0, out
    return out


def wait_for(path: Path, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


def has_open(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    """An extensions root where the shm op is built (once per session), as after a driver's prepare."""
    root = tmp_path_factory.mktemp("ds_ops_built")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCH_EXTENSIONS", "MMSCALE_DS"))}
    env.update(PYTHONPATH=str(REPO), ROOT=str(root))
    out = subprocess.run([sys.executable, "-c", PRELUDE + LOAD], env=env, text=True, capture_output=True,
                         timeout=600)
    assert out.returncode == 0 and "LOADED True" in out.stdout, out.stdout + out.stderr
    return root


@pytest.fixture
def quiet_env(monkeypatch):
    """prepare() in this process: its env vars are restored and DeepSpeed's op table is left as it is."""
    for name in ("TORCH_EXTENSIONS_DIR", ds_ops.ROOT_ENV, ds_ops.MODE_ENV):
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    monkeypatch.setattr(ds_ops, "_skip_shm", lambda: None)


def test_one_directory_per_environment(tmp_path, monkeypatch, quiet_env):
    here = ds_ops.extensions_dir(tmp_path)
    assert here.parent == tmp_path.resolve() and here == ds_ops.extensions_dir(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(sys, "prefix", str(tmp_path / "another-venv"))
        assert ds_ops.extensions_dir(tmp_path) != here  # another venv: its own op build, no rebuilds in turn
    quiet = []
    env = ds_ops.prepare(tmp_path, say=quiet.append)
    assert env == {"TORCH_EXTENSIONS_DIR": str(here), "MMSCALE_DS_OPS_ROOT": str(tmp_path.resolve()),
                   "MMSCALE_DS_SHM": "skip"}
    assert all(os.environ[k] == v for k, v in env.items()) and here.is_dir() and not quiet
    with pytest.raises(ValueError, match="shm must be one of"):
        ds_ops.prepare(tmp_path, shm="sometimes")


def test_stale_lock_no_longer_hangs(tmp_path, procs, quiet_env):
    """(a) A `lock` as a killed builder leaves it: torch's own loader waits forever; prepare() does not."""
    lock = ds_ops.extensions_dir(tmp_path) / ds_ops.SHM_OP / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    raw = procs("""
        from deepspeed.accelerator import get_accelerator
        get_accelerator().create_op_builder("ShareMemCommBuilder").load()
        print("LOADED", flush=True)
    """, TORCH_EXTENSIONS_DIR=lock.parent.parent)
    with pytest.raises(subprocess.TimeoutExpired):  # DeepSpeed -> torch FileBaton.wait(): no bound
        raw.wait(timeout=8)
    assert lock.exists()

    said = []
    t0 = time.monotonic()
    ds_ops.prepare(tmp_path, timeout_s=30, say=said.append)
    assert time.monotonic() - t0 < 10
    assert not lock.exists()
    assert len(said) == 1 and "removed" in said[0] and str(lock) in said[0]


def test_stale_lock_on_a_built_op_is_loaded_past(built, procs):
    """(a) The same in build mode: the next process loads the (already built) op instead of waiting."""
    lock = ds_ops.extensions_dir(built) / ds_ops.SHM_OP / "lock"
    lock.touch()
    t0 = time.monotonic()
    out = finish(procs(LOAD, ROOT=built), timeout=60)
    assert "LOADED True" in out and f"removed {lock}" in out, out
    assert not lock.exists() and time.monotonic() - t0 < 60


def test_killed_while_holding_the_lock_next_one_runs(built, procs, tmp_path):
    """(b) SIGKILL a loader while it holds torch's lock (inside the real load); the next one completes."""
    lock = ds_ops.extensions_dir(built) / ds_ops.SHM_OP / "lock"
    mark = tmp_path / "holding"
    victim = procs(HOLD + LOAD, ROOT=built, MARK=mark, GO=tmp_path / "never")
    wait_for(mark, 60)
    assert lock.exists() and victim.pid in ds_ops.holders(lock)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=10)
    assert lock.exists()  # what the killed loader left behind

    t0 = time.monotonic()
    out = finish(procs(LOAD, ROOT=built), timeout=60)
    assert "LOADED True" in out and f"removed {lock}" in out, out
    assert "waiting for" not in out  # a dead holder is not waited for
    assert not lock.exists() and time.monotonic() - t0 < 60


@pytest.mark.slow
def test_killed_during_a_fresh_build_next_one_builds(tmp_path, procs):
    """(b) SIGKILL a fresh build mid-compile (its ninja/g++ live on, still building in the directory):
    the next process waits for them (bounded, said), removes the lock, builds and loads (~1-2 min)."""
    lock = ds_ops.extensions_dir(tmp_path) / ds_ops.SHM_OP / "lock"
    victim = procs(LOAD, ROOT=tmp_path)
    end = time.monotonic() + 120
    while not (lock.exists() and set(ds_ops.holders(lock)) - {victim.pid}):  # ninja has started
        assert time.monotonic() < end and victim.poll() is None, "the build never started"
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=10)
    assert lock.exists()

    out = finish(procs(LOAD, ROOT=tmp_path), timeout=400)
    assert "LOADED True" in out and f"removed {lock}" in out, out
    assert not lock.exists()


def test_live_holder_is_waited_for_and_the_wait_is_bounded(built, procs, tmp_path, quiet_env):
    """(c) A live loader is waited for with one message, never has its lock removed; a short bound
    raises a clear error; once the holder finishes, the waiter completes."""
    lock = ds_ops.extensions_dir(built) / ds_ops.SHM_OP / "lock"
    ours = ds_ops.extensions_dir(built) / f"{ds_ops.SHM_OP}.ds_ops.lock"
    mark, go = tmp_path / "holding", tmp_path / "go"
    holder = procs(HOLD + LOAD, ROOT=built, MARK=mark, GO=go)
    wait_for(mark, 60)

    said = []
    t0 = time.monotonic()
    with pytest.raises(ds_ops.OpLockTimeout) as err:
        ds_ops.prepare(built, shm="build", timeout_s=1.5, say=said.append)
    waited = time.monotonic() - t0
    assert 1.5 <= waited < 10
    assert err.value.path == ours and err.value.pids == [holder.pid]
    assert str(ours) in str(err.value) and "gave up after" in str(err.value) and "stop it" in str(err.value)
    assert said == [said[0]] and f"waiting for DeepSpeed op {ds_ops.SHM_OP}" in said[0]
    assert f"({ours}) held by another process (pid {holder.pid})" in said[0]
    assert holder.poll() is None and lock.exists()  # the live holder and its lock are untouched
    ds_ops.prepare(built, shm="skip", timeout_s=30, say=said.append)  # skip mode does not wait for it
    assert lock.exists() and len(said) == 1

    waiter = procs(LOAD, ROOT=built)
    end = time.monotonic() + 60
    while not has_open(waiter.pid, ours):  # it is in op_lock's wait
        assert time.monotonic() < end and waiter.poll() is None, "the waiter never waited"
        time.sleep(0.05)
    time.sleep(1)
    assert waiter.poll() is None
    go.touch()
    assert "LOADED True" in finish(holder, timeout=60)
    out = finish(waiter, timeout=60)
    assert "LOADED True" in out and out.count("waiting for") == 1 and "removed" not in out, out


def test_foreign_holder_of_torch_lock_is_not_removed(built, procs, tmp_path, quiet_env):
    """(c) A process outside ds_ops holding torch's lock open (a plain DeepSpeed loader) is alive:
    waited for, bounded, and its lock is left in place."""
    lock = ds_ops.extensions_dir(built) / ds_ops.SHM_OP / "lock"
    mark = tmp_path / "holding"
    foreign = procs(f"""
        fd = os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL)  # what torch's FileBaton.try_acquire does
        Path(os.environ["MARK"]).touch()
        time.sleep(120)
    """, MARK=mark)
    wait_for(mark, 30)
    said = []
    with pytest.raises(ds_ops.OpLockTimeout) as err:
        ds_ops.prepare(built, shm="build", timeout_s=1, say=said.append)
    assert err.value.path == lock and err.value.pids == [foreign.pid] and str(lock) in str(err.value)
    assert len(said) == 1 and f"({lock}) held by another process (pid {foreign.pid})" in said[0]
    assert lock.exists() and foreign.poll() is None
    os.kill(foreign.pid, signal.SIGKILL)
    foreign.wait(timeout=10)
    assert ds_ops.sweep(ds_ops.extensions_dir(built), said.append) == [lock]  # dead now: stale, removed
    assert not lock.exists()


TRAIN = """
import socket
import torch, torch.distributed as dist
import torch.utils.cpp_extension as cpp
loads, _load = [], cpp.load
cpp.load = lambda *a, **k: loads.append(k.get("name")) or _load(*a, **k)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo", rank=0, world_size=1)
if os.environ["PREPARE"] == "1":
    ds_ops.prepare()  # as a worker: root and mode from the env vars the driver passed
import deepspeed
seconds = []
for stage in (2, 3):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    cfg = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": stage, "overlap_comm": False, "contiguous_gradients": True},
           "bf16": {"enabled": False}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    t = time.perf_counter()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg,
                                      dist_init_required=False)
    seconds.append(time.perf_counter() - t)
    loss = engine(torch.randn(2, 8)).pow(2).mean()
    engine.backward(loss)
    engine.step()
print("RESULT", json.dumps(dict(loads=loads, shm=ds_ops.shm_loaded(), seconds=seconds, loss=loss.item())))
"""


@pytest.mark.parametrize("prepared", [True, False])
def test_initialize_after_prepare_loads_nothing(built, procs, prepared):
    """In a one-rank gloo group, ZeRO-2 then ZeRO-3 train a step; after prepare() (skip) DeepSpeed
    loads no op, without it DeepSpeed's comm backend loads the shm op (from the built directory)."""
    env = dict(ROOT=built, PREPARE=int(prepared), MMSCALE_DS_OPS_ROOT=built, MMSCALE_DS_SHM="skip")
    if not prepared:
        env["TORCH_EXTENSIONS_DIR"] = ds_ops.extensions_dir(built)
    out = finish(procs("import json\n" + TRAIN, **env), timeout=120)
    result = json.loads(out.split("RESULT ", 1)[1])
    assert result["loss"] == result["loss"]  # trained: a finite loss, not nan
    if prepared:
        assert result["loads"] == [] and result["shm"] is False
    else:
        assert result["loads"] == [ds_ops.SHM_OP] and result["shm"] is True


def test_torch_wait_is_bounded_while_we_load(tmp_path, procs):
    """A plain loader that takes torch's lock between our check and torch's own: while ds_ops loads,
    torch's endless FileBaton.wait is bounded (live holder) and refuses a dead holder's half build."""
    import torch.utils.cpp_extension as cpp

    lock = tmp_path / "op" / "lock"
    lock.parent.mkdir()
    mark = tmp_path / "holding"
    foreign = procs(f"""
        fd = os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL)
        Path(os.environ["MARK"]).touch()
        time.sleep(120)
    """, MARK=mark)
    wait_for(mark, 30)
    original, said = cpp.FileBaton, []
    with ds_ops._bounded_baton(time.monotonic() + 1, said.append):
        baton = cpp.FileBaton(str(lock))  # what torch's _jit_compile makes
        assert not baton.try_acquire()
        t0 = time.monotonic()
        with pytest.raises(ds_ops.OpLockTimeout, match="gave up after"):
            baton.wait()
        assert time.monotonic() - t0 < 5 and len(said) == 1 and str(lock) in said[0]
        os.kill(foreign.pid, signal.SIGKILL)
        foreign.wait(timeout=10)
        with pytest.raises(ds_ops.StaleOpBuild, match="rerun"):
            baton.wait()
    assert cpp.FileBaton is original and lock.exists()
