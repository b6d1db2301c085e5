"""Studies that survive: the driver SIGKILLed in the middle of a study, then the same command with --resume.

The kill takes the driver's whole process group (the local Ray it started goes with it);
whatever of that Ray outlives it is found by its session and killed, never by name.
"""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

SPACE = ("from study.space import choice\n"
         "NAME = 'survive'\n"
         "FIXED = {'method': 'lora', 'model_size': '0.3m'}\n"
         "SPACE = {'lora_rank': choice([4, 8])}\n"
         "SMOKE = {'stage1_steps': 2, 'stage2_steps': 4, 'batch_size': 4, 'eval_samples': 8}\n")


def command(space: Path, *flags: str, num_samples: str = "3") -> list[str]:
    return [sys.executable, "-m", "study.run", str(space), "--smoke", "--num-samples", num_samples,
            "--max-concurrent", "1", *flags]


def run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, start_new_session=True)


def kill_session(sid: int) -> None:
    """SIGKILL what is left of a session (Ray's workers put themselves in process groups of their own)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6 of /proc/PID/stat: the session id
            try:
                os.kill(int(stat.parent.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def trial_runs(db: Path, status: str, metric: str | None = None) -> list[str]:
    """Read-only peek at the store while the driver writes to it (an MlflowClient could migrate it):
    the trial runs in `status`, only those that have logged `metric` if one is named."""
    if not db.exists():
        return []
    query = ("SELECT DISTINCT runs.run_uuid FROM runs JOIN tags ON tags.run_uuid = runs.run_uuid "
             "AND tags.key = 'mlflow.parentRunId' "
             + ("JOIN metrics ON metrics.run_uuid = runs.run_uuid AND metrics.key = ? " if metric else "")
             + "WHERE runs.status = ?")
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return [r[0] for r in con.execute(query, (metric, status) if metric else (status,))]
    except sqlite3.OperationalError:  # tables not created yet, or locked for a moment
        return []


def kill_when(cwd: Path, space: Path, ready, num_samples: str = "3") -> None:
    """Start the study, wait until `ready()` holds, then SIGKILL the driver's process group."""
    log = (cwd / "first.log").open("w")
    driver = subprocess.Popen(command(space, num_samples=num_samples), cwd=cwd, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not ready():
            assert driver.poll() is None, (cwd / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the study did not get there in time"
            time.sleep(0.3)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        kill_session(driver.pid)


def study_runs(cwd: Path):
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("survive").experiment_id])
    return client, [r for r in runs if "mlflow.parentRunId" not in r.data.tags], \
        [r for r in runs if "mlflow.parentRunId" in r.data.tags]


@pytest.mark.slow
def test_a_sigkilled_study_resumes_where_it_stopped(tmp_path, monkeypatch):
    """Killed as soon as the first trial's run is FINISHED and the second one's has started, before Tune saved
    either: on --resume Tune continues the first, whose recorded result is reported again, not retrained;
    the second, which Tune never saved, has its run closed KILLED and the search runs another in its place.

    Tune saves its state at its first step (the first trial in it, unfinished) and then every
    TUNE_GLOBAL_CHECKPOINT_S seconds (default: every ~10 s): an hour makes "before Tune saved it" certain."""
    from study.study import ORPHANED

    space = tmp_path / "survive.py"
    space.write_text(SPACE)
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "3600")
    kill_when(tmp_path, space, lambda: trial_runs(db, "FINISHED") and trial_runs(db, "RUNNING"))
    monkeypatch.delenv("TUNE_GLOBAL_CHECKPOINT_S")
    (orphan_id,) = trial_runs(db, "RUNNING")
    (first_id,) = trial_runs(db, "FINISHED")
    client, (parent,), trials = study_runs(tmp_path)
    first = client.get_run(first_id)
    assert parent.info.status == "RUNNING"  # nobody closed it: the driver died at once

    # the same command again is refused before Ray starts; so is --resume with another space file
    r = run(command(space), tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: study 'survive' in ") and "already exists" in r.stderr
    assert "pass --resume" in r.stderr and "--experiment or --storage" in r.stderr
    other = tmp_path / "other.py"
    other.write_text(SPACE)
    r = run(command(other, "--resume"), tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"space_file={space}" in r.stderr and f"space_file={other}" in r.stderr

    r = run(command(space, "--resume"), tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resuming study 'survive' (resume 1) in its MLflow run {parent.info.run_id}" in r.stdout
    client, parents, trials = study_runs(tmp_path)
    assert [p.info.run_id for p in parents] == [parent.info.run_id]
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["resumes"] == "1"
    ids = [t.data.tags["mmscale.trial_id"] for t in trials]
    assert len(ids) == len(set(ids)), "a trial has two runs"
    assert sorted(t.info.status for t in trials if t.info.status != "KILLED") == ["FINISHED"] * 3
    assert all(t.data.tags["mlflow.parentRunId"] == parent.info.run_id for t in trials)
    again = client.get_run(first_id)
    assert again.info.status == "FINISHED" and again.data.metrics == first.data.metrics
    assert again.info.end_time == first.info.end_time and "restarts" not in again.data.tags
    # the path ran (study.study.study_trial): Tune had the trial unfinished, and its recorded result went back
    first_trial = first.data.tags["mmscale.trial_id"]
    assert f"[{first_trial}] ended before the study was interrupted (FINISHED); not run again" in r.stdout, \
        r.stdout[-3000:]
    (orphan,) = [t for t in trials if t.info.status == "KILLED"]  # the trial Tune never saved
    assert orphan.info.run_id == orphan_id and orphan.data.tags["killed_reason"] == ORPHANED



@pytest.mark.slow
def test_an_interrupted_trial_starts_again_in_its_own_run(tmp_path):
    """Killed while a trial runs (its worker has logged its losses; Tune has not seen it end):
    on --resume Tune runs that trial again under its id, and it goes on in the same run."""
    space = tmp_path / "survive.py"
    space.write_text(SPACE)
    db = tmp_path / "mlflow.db"
    kill_when(tmp_path, space, lambda: trial_runs(db, "RUNNING", metric="train_loss"), num_samples="2")
    (killed_id,) = trial_runs(db, "RUNNING", metric="train_loss")

    r = run(command(space, "--resume", num_samples="2"), tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    client, (parent,), trials = study_runs(tmp_path)
    assert parent.info.status == "FINISHED" and parent.data.tags["resumes"] == "1"
    assert sorted(t.info.status for t in trials) == ["FINISHED", "FINISHED"]
    killed = client.get_run(killed_id)
    assert killed.info.status == "FINISHED" and killed.data.tags["restarts"] == "1"
    assert {"score", "gpu_hours", "trainable_params", "artifact_mb"} <= set(killed.data.metrics), \
        "the restarted trial did not report its results into its run"
    assert len({t.data.tags["mmscale.trial_id"] for t in trials}) == 2


# --- what --resume refuses, before Ray starts (no study is run: the store and Tune's directory are made by hand) ---

def stored_study(cwd: Path, space: Path, *flags: str) -> str:
    """The study's MLflow run as `study.run` starts it, for the command `space --smoke *flags`."""
    from study import mlflow_runs
    from study import run as cli
    from study import space as spaces
    from study.plan import make_plan
    from tracking import store

    # planned against an empty storage (this one already holds Tune's state), then logged as of this one
    args = cli.parse_args([str(space), "--smoke", "--storage", str(cwd / "planned"), "--dry-run", *flags])
    loaded = spaces.load(space)
    plan, _ = make_plan(args, loaded)
    uri = store.resolve_uri(f"sqlite:///{cwd / 'mlflow.db'}")
    client = MlflowClient(uri)
    exp = store.ensure_experiment(client, plan.study, uri)
    settings = {**plan.settings(loaded), "storage": str((cwd / "studies").resolve())}
    return mlflow_runs.start_study_run(client, exp, plan.study, settings)


def dry(capsys, space: Path, *flags: str, smoke: bool = True) -> tuple[int, str, str]:
    """`python -m study.run SPACE [--smoke] --dry-run FLAGS` in this process (the cwd is the test's)."""
    from study import run as cli

    code = cli.main([str(space), *(["--smoke"] if smoke else []), "--dry-run", *flags])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(result: tuple[int, str, str]) -> str:
    code, _, err = result
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def test_resume_refuses_what_it_cannot_continue(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    space, other = tmp_path / "survive.py", tmp_path / "other.py"
    space.write_text(SPACE)
    other.write_text(SPACE.replace("[4, 8]", "[4, 16]"))
    storage = tmp_path / "studies"

    assert one_error_line(dry(capsys, space, "--resume")) == (
        f"error: --resume: there is no study 'survive' in {storage} to resume "
        f"(MLflow sqlite:///{tmp_path / 'mlflow.db'})")
    assert not (tmp_path / "mlflow.db").exists(), "looking for a study must not create a store"

    (storage / "tune" / "survive").mkdir(parents=True)  # Tune's state, but no MLflow run (another store)
    assert "already exists (Ray Tune state " in one_error_line(dry(capsys, space))
    assert "has no MLflow run of it (was it started with another --tracking-uri?)" in \
        one_error_line(dry(capsys, space, "--resume"))

    parent = stored_study(tmp_path, space, "--num-samples", "3")
    capsys.readouterr()  # MLflow's notes on creating the store
    line = one_error_line(dry(capsys, other, "--resume", "--num-samples", "3"))
    assert f"space_file={space}, this command gives space_file={other}" in line
    line = one_error_line(dry(capsys, space, "--resume", "--num-samples", "5"))
    assert "was started with num_samples=3, this command gives num_samples=5" in line
    assert "smoke=True, this command gives smoke=False" in \
        one_error_line(dry(capsys, space, "--resume", "--num-samples", "3", smoke=False))
    space.write_text(SPACE.replace("[4, 8]", "[4, 8, 16]"))  # the same file, edited since
    assert "space.lora_rank=Choice(values=(4, 8)), this command gives" in \
        one_error_line(dry(capsys, space, "--resume", "--num-samples", "3"))
    space.write_text(SPACE)

    code, out, err = dry(capsys, space, "--resume", "--num-samples", "3")
    assert code == 0, err
    assert f"resumes the study's MLflow run {parent} (RUNNING)" in out

    # a second driver on a study that is running (another process holds its lock) is turned away
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               f"lock = FileLock({str(storage / 'tune' / '.survive.lock')!r}); lock.acquire(); "
                               "print('held', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert one_error_line(dry(capsys, space, "--resume", "--num-samples", "3")) == (
            f"error: study 'survive' in {storage} is running in another process; wait for it, "
            "or stop it and pass --resume")
    finally:
        holder.kill()
        holder.wait()
    assert dry(capsys, space, "--resume", "--num-samples", "3")[0] == 0, "the lock dies with its holder"

    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").set_terminated(parent, "FINISHED")
    assert "has finished" in one_error_line(dry(capsys, space, "--resume", "--num-samples", "3"))
