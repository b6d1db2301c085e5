"""Nothing exposed, nothing overwritten, Ctrl-C clean: the study as a user runs it.

- a real local study's every TCP listener (Ray's, torch.distributed's, gloo's), seen while it trains, is on
  loopback (tests/test_local_ray.py shows which of Ray's also refuse a client without the token);
- `python -m zoo.world DIR` writes nothing into a non-empty DIR; a refused study command leaves nothing;
- SIGINT to the driver's process group (what Ctrl-C in a terminal sends) ends a study cleanly, and
  `--resume` finishes it.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from study import local_ray
from trainables import rendezvous
from test_resume import SPACE as SURVIVE, command, kill_session, run, trial_runs

REPO = Path(__file__).resolve().parents[1]
# Two workers per trial: a real process group of two ranks (rank 0 serving Ray Train's rendezvous, gloo's
# pair sockets between the ranks), over enough stage-2 steps to be seen training.
NET_SPACE = ("from study.space import choice\n"
             "NAME = 'net'\n"
             "FIXED = {'method': 'lora', 'model_size': '0.3m', 'num_workers': 2}\n"
             "SPACE = {'lora_rank': choice([4, 8])}\n"
             "SMOKE = {'stage1_steps': 2, 'stage2_steps': 20, 'batch_size': 4, 'eval_samples': 8}\n")


def train_workers(pids: set[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.name().startswith("ray::RayTrainWo"):  # Ray's process title, as `ss` shows it too
                found.append(p)
        except psutil.Error:
            pass
    return found


@pytest.mark.slow
def test_a_local_study_listens_only_on_loopback(tmp_path):
    """Every listener of the study's process tree, polled from Ray's start to the study's end, is on
    loopback. Before trainables.rendezvous, Ray Train's rank 0 served torch's TCPStore on MASTER_PORT on
    every interface (`*:PORT` in `ss`) for the whole trial."""
    space = tmp_path / "net.py"
    space.write_text(NET_SPACE)
    log = tmp_path / "study.log"
    with log.open("w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "study.run", str(space), "--smoke", "--num-samples", "1"],
                                  cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[tuple, local_ray.Listener] = {}
    training = {}
    try:
        deadline = time.monotonic() + 400
        while driver.poll() is None:
            pids = local_ray.descendants(driver.pid)
            for listener in local_ray.listeners(pids):
                seen.setdefault((listener.pid, listener.address, listener.port), listener)
            if not training and "] stage 2: " in log.read_text():
                workers = train_workers(pids)
                stores = list((tmp_path / "studies" / "train").glob("trial-*/.rendezvous"))
                training = {"gloo": sorted({w.environ().get("GLOO_SOCKET_IFNAME", "") for w in workers}),
                            "workers": len(workers), "stores": stores,
                            "files": [sorted(p.name for p in s.iterdir()) for s in stores],
                            "modes": [stat.S_IMODE(s.stat().st_mode) for s in stores]}
            assert time.monotonic() < deadline, "the study did not end in time"
            time.sleep(0.3)
        text = log.read_text()
        assert driver.returncode == 0, text[-3000:]
    finally:
        kill_session(driver.pid)

    print(f"\n{len(seen)} listeners of the study's processes:")
    for listener in sorted(seen.values(), key=lambda l: (l.process, l.port)):
        print(f"  {listener.process:28} {listener.address:18} {listener.port}")
    assert training, "no trial was seen training"
    ray_ports = {l.port for l in seen.values() if l.process.startswith(("gcs_server", "raylet"))}
    assert ray_ports, "Ray's own listeners were not seen: the poll is broken"
    exposed = sorted({f"{l.process} {l.address}:{l.port}" for l in seen.values() if not l.loopback})
    assert not exposed, f"listening beyond loopback: {exposed}"
    # gloo binds where the hostname resolves (127.0.0.1 on some machines, a LAN address on others): told `lo`
    assert training["workers"] == 2 and training["gloo"] == [rendezvous.loopback_interface()], training
    # the ranks met through a file in a directory only this user opens, one file per worker-group start
    assert len(training["stores"]) == 1 and len(training["files"][0]) == 1 and training["modes"] == [0o700], training
    assert not list((tmp_path / "studies" / "train").glob("trial-*/.rendezvous")), "the store outlived the trial"


# --- the user's files ---------------------------------------------------------------------------------------

def world(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zoo.world", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def error_lines(stderr: str) -> list[str]:
    # every line counts: runpy's RuntimeWarning ("'zoo.world' found in sys.modules") is gone since zoo/__init__
    # imports lazily, and must not come back
    return stderr.splitlines()


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))}


def test_the_world_refuses_a_directory_that_is_not_empty(tmp_path):
    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    (mine / "train.json").write_text('[{"id": "my own record"}]')
    (mine / "images" / "a.png").write_bytes(b"my image")
    before = snapshot(tmp_path)
    r = world(str(mine), cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert error_lines(r.stderr) == [f"error: {mine}: is not empty; the world is written only into a new or empty "
                                     "directory, so that it replaces nothing"], r.stderr
    assert snapshot(tmp_path) == before, "a refused write changed something"

    r = world(str(mine / "train.json"), cwd=tmp_path)
    assert r.returncode == 2 and error_lines(r.stderr) == [
        f"error: {mine / 'train.json'}: is a file; the world is written into a new or empty directory"], r.stderr
    r = world(cwd=tmp_path)
    assert r.returncode == 2 and error_lines(r.stderr)[0].startswith("error: usage: python -m zoo.world OUT_DIR")
    assert snapshot(tmp_path) == before

    # a new directory, and an empty one, are written; the world it wrote is not written over either
    for out in (tmp_path / "new" / "world", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        r = world(str(out), cwd=tmp_path)
        assert r.returncode == 0 and r.stdout.strip() == str(out), r.stderr
        assert {p.name for p in out.iterdir()} == {"train.json", "eval.json", "captions.json", "text.json",
                                                    "text_eval.json", "images"}
    written = snapshot(tmp_path / "empty")
    r = world(str(tmp_path / "empty"), cwd=tmp_path)
    assert r.returncode == 2 and "is not empty" in error_lines(r.stderr)[0]
    assert snapshot(tmp_path / "empty") == written
    assert not [p.name for p in tmp_path.rglob(".*partial-*")], "a temporary folder was left behind"


def test_a_refused_study_command_leaves_nothing_behind(tmp_path, monkeypatch, capsys, dataset_dir):
    """Real (not dry) commands, refused before Ray starts: no storage folder, no lock file, no store."""
    from study import run as cli
    from study import study as study_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(study_module, "run_study", lambda *a: pytest.fail("a refused command ran its study"))
    space = tmp_path / "survive.py"
    space.write_text(SURVIVE)
    storage = tmp_path / "studies"

    def refused(*flags: str) -> str:
        code = cli.main([str(space), "--smoke", *flags])
        _, err = capsys.readouterr()
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
        return err

    # nothing to resume: before, the lock file and its folders were made before the check refused
    assert "there is no study 'survive'" in refused("--resume")
    assert not storage.exists() and not (tmp_path / "mlflow.db").exists()

    # a study that exists (Ray Tune's state, made by hand): not started again, and no lock file appears
    (storage / "tune" / "survive").mkdir(parents=True)
    assert "already exists" in refused()
    assert sorted(p.name for p in (storage / "tune").iterdir()) == ["survive"]

    # refused after the lock was taken (the data check comes after it): the lock and its folders go too
    (dataset_dir / "images" / "r1.png").unlink()
    other = tmp_path / "fresh-storage"
    assert "record 't1'" in refused("--data", str(dataset_dir), "--storage", str(other))
    assert not (other / "tune").exists()
    assert not other.exists() or sorted(p.name for p in other.iterdir()) == ["shards"], list(other.iterdir())


# --- Ctrl-C ---------------------------------------------------------------------------------------------

@pytest.fixture
def another_ray(tmp_path):
    """A second local Ray on this machine while the test runs (another user's, or a second study): Ray's
    address auto-detection then finds two GCS processes."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; from study import local_ray; "
                              "local_ray.init(None, {}); print('READY', flush=True); sys.stdin.readline()"],
                             cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        assert child.stdout.readline().strip() == "READY", "the second Ray did not start"
        yield
    finally:
        child.stdin.close()
        try:
            child.wait(timeout=60)
        finally:
            kill_session(child.pid)


# Two trials, one at a time: lr 1e30 fails at its first step (FloatingPointError, as in tests/test_failures.py),
# lr 1e-3 trains. The seeded sampler (TPE, seed 0: random for its first trials) picks 1e30, then 1e-3.
DIVERGE = ("from study.space import choice\n"
           "NAME = 'interrupt'\n"
           "FIXED = {'method': 'full', 'model_size': '0.3m'}\n"
           "SPACE = {'lr': choice([1e-3, 1e30])}\n"
           "SMOKE = {'stage1_steps': 2, 'stage2_steps': 6, 'batch_size': 4, 'eval_samples': 8}\n")


@pytest.mark.slow
def test_ctrl_c_ends_the_study_cleanly_and_resume_finishes_it(tmp_path, another_ray):
    """SIGINT to the driver's process group while a trial trains (another trial has failed): exit 1 without a
    traceback, the training trial's run and the study's run KILLED with the reason; the same command with
    --resume keeps the failed trial as it was (not run again) and finishes the interrupted one in its run.

    Before: the resumed trial failed (Ray Train's record named checkpoints the trial had deleted when it
    finished after Tune stopped). With another Ray on the machine, before the study told its workers where
    their Ray is (RAY_ADDRESS), Ray Train's PlacementGroupCleaner printed a traceback ("Found multiple
    active Ray instances")."""
    from study.study import INTERRUPTED

    space = tmp_path / "interrupt.py"
    space.write_text(DIVERGE)
    db = tmp_path / "mlflow.db"
    log = tmp_path / "first.log"
    with log.open("w") as out:
        driver = subprocess.Popen(command(space, num_samples="2"), cwd=tmp_path, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (trial_runs(db, "FAILED") and trial_runs(db, "RUNNING", metric="train_loss")):
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no failed trial and training one were seen"
            time.sleep(0.3)
        (failed,) = trial_runs(db, "FAILED")
        (training,) = set(trial_runs(db, "RUNNING", metric="train_loss")) - {failed}
        os.killpg(driver.pid, signal.SIGINT)  # a terminal's Ctrl-C goes to the foreground process group
        code = driver.wait(timeout=180)
    finally:
        kill_session(driver.pid)
    text = log.read_text()
    assert code == 1, text[-3000:]
    # the failed trial's traceback is shown (Ray prints it; its run keeps it); nothing else is, before or after
    stop = text.index("Stop signal received (e.g. via SIGINT/Ctrl+C)")
    assert "Traceback" not in text[stop:] and "KeyboardInterrupt" not in text, text[stop:][-5000:]
    assert "Found multiple active Ray instances" not in text
    assert "Study interrupted with 1 of 2 trials done: the same command with --resume continues it" in text
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("interrupt").experiment_id
    (parent,) = [r for r in client.search_runs([exp]) if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "KILLED"
    stopped, failed_run = client.get_run(training), client.get_run(failed)
    assert stopped.info.status == "KILLED" and stopped.data.tags["killed_reason"] == INTERRUPTED
    assert failed_run.data.tags["failure_reason"].startswith("FloatingPointError")
    assert trial_runs(db, "RUNNING") == []

    r = run(command(space, "--resume", num_samples="2"), tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr, (r.stdout + r.stderr)[-5000:]
    assert "Study 'interrupt': 2 trials, 1 failed: FloatingPointError x1;" in r.stdout
    runs = client.search_runs([exp])
    (parent,) = [r_ for r_ in runs if "mlflow.parentRunId" not in r_.data.tags]
    trials = [r_ for r_ in runs if "mlflow.parentRunId" in r_.data.tags]
    assert parent.info.status == "FINISHED" and parent.data.tags["resumes"] == "1"
    assert sorted(t.info.status for t in trials) == ["FAILED", "FINISHED"]
    again = client.get_run(training)  # the stopped trial went on in its own run
    assert again.info.status == "FINISHED" and again.data.tags["restarts"] == "1"
    assert "killed_reason" not in again.data.tags and "score" in again.data.metrics
    kept = client.get_run(failed)  # the failed one was not run again
    assert kept.info.status == "FAILED" and kept.info.end_time == failed_run.info.end_time
    assert "restarts" not in kept.data.tags and kept.data.metrics == failed_run.data.metrics
    # its tags stay, but for `on_frontier`, which every trial's run gets again when a study (or resume) ends
    assert kept.data.tags.pop("on_frontier") == "false"
    assert kept.data.tags == {k: v for k, v in failed_run.data.tags.items() if k != "on_frontier"}


# --- a killed build blocks nothing ------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_study_runs_past_the_lock_a_killed_op_build_left(tmp_path):
    """What a study killed while DeepSpeed built or loaded its CPU op leaves behind: torch's `lock` file, which
    no process holds (tests/test_ds_ops.py kills a real loader to show it). Before trainables.ds_ops every
    later trial waited on it forever at stage 1, printing nothing (and test_ds_ops shows plain DeepSpeed
    still does). Here: one in this environment's extensions directory, one in the directory a plain
    TORCH_EXTENSIONS_DIR names; the next study says what it removed and runs to the end."""
    from trainables import ds_ops

    root, plain = tmp_path / "ds-ops", tmp_path / "torch-extensions"
    ours = ds_ops.extensions_dir(root) / ds_ops.SHM_OP / "lock"
    theirs = plain / ds_ops.SHM_OP / "lock"
    for lock in (ours, theirs):
        lock.parent.mkdir(parents=True)
        lock.touch()
    space = tmp_path / "survive.py"
    space.write_text(SURVIVE)
    env = {**os.environ, ds_ops.ROOT_ENV: str(root), "TORCH_EXTENSIONS_DIR": str(plain)}
    r = subprocess.run(command(space, num_samples="1"), cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=env, start_new_session=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"ds_ops: removed {ours}, a torch extension lock left by a process that died" in r.stdout
    assert not ours.exists() and theirs.exists()  # the plain directory is not used, so its lock does not matter
    assert "waiting for" not in r.stdout


CLEANUP = """
import sys, weakref
if sys.argv[1] == "quiet":
    from trainables.processes import quiet_exit_requests
    quiet_exit_requests()
class Thing: pass
def cleanup(ref):
    raise {"exit": SystemExit(1), "bug": ValueError("a real bug")}[sys.argv[2]]
thing = Thing(); ref = weakref.ref(thing, cleanup); del thing
print("alive")
"""


@pytest.mark.parametrize("mode, kind, printed", [("default", "exit", True), ("quiet", "exit", False),
                                                 ("quiet", "bug", True)])
def test_an_exit_request_during_cleanup_prints_no_traceback_and_a_real_error_still_does(tmp_path, mode, kind,
                                                                                        printed):
    """Ray's SIGTERM handler raises SystemExit; landing in a weakref callback as a finished trial's actor was
    torn down, it printed 'Exception ignored in ... Traceback ... SystemExit: 1' after a resumed study (CI)."""
    script = tmp_path / "cleanup.py"
    script.write_text(CLEANUP)
    r = subprocess.run([sys.executable, str(script), mode, kind], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).parent.parent)
    assert r.stdout == "alive\n"
    assert ("Exception ignored in" in r.stderr and "Traceback" in r.stderr) == printed, r.stderr
