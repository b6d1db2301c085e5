"""Failure isolation: a trial that fails does not stop the study, and its MLflow run says why."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

# lr 1e30 throws the weights past float32 after one step: the loss turns NaN and the worker raises
# FloatingPointError naming the step (lr 1e4 is not enough: clipping and AdamW keep the loss finite).
def space_file(tmp_path: Path, lrs: list[float]) -> Path:
    space = tmp_path / "diverge.py"
    space.write_text("from study.space import choice\n"
                     "NAME = 'diverge'\n"
                     "SAMPLER = 'grid'\n"
                     "FIXED = {'method': 'full', 'model_size': '0.3m'}\n"
                     f"SPACE = {{'lr': choice({lrs})}}\n"
                     "SMOKE = {'stage1_steps': 2, 'stage2_steps': 4, 'batch_size': 4, 'eval_samples': 8}\n")
    return space


def study(cwd: Path, space: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "study.run", str(space), "--smoke", "--max-concurrent", "1", *flags],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_diverging_trial_fails_alone_and_its_run_says_why(tmp_path):
    space = space_file(tmp_path, [1e-3, 1e30])
    r = study(tmp_path, space, "--num-samples", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Study 'diverge': 2 trials, 1 failed: FloatingPointError x1;" in r.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("diverge").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    by_status = {r.info.status: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert parent.info.status == "FINISHED" and sorted(by_status) == ["FAILED", "FINISHED"]
    failed = by_status["FAILED"]
    assert float(failed.data.params["lr"]) == 1e30
    assert failed.data.tags["failure_reason"].startswith("FloatingPointError: stage2: loss is nan at step ")
    text = Path(client.download_artifacts(failed.info.run_id, "error/traceback.txt", str(tmp_path / "dl")))
    text = text.read_text()
    assert text.startswith(failed.data.tags["failure_reason"] + "\n") and "\x1b[" not in text
    assert 'worker.py", line' in text and "raise FloatingPointError" in text
    assert f"failed: trial {failed.data.tags['mmscale.trial_id']} (run {failed.info.run_id}): FloatingPointError" \
        in r.stdout
    done = by_status["FINISHED"].data.metrics  # the sound trial is scored as usual: over its 8 smoke questions
    assert done["score_n"] == 8 and done["score_ci_low"] <= done["score"] <= done["score_ci_high"]
    assert done["score"] * 8 / 100 == pytest.approx(round(done["score"] * 8 / 100))  # a whole number right

    # the study is done: the same command again, and --resume, are refused with one line each
    again = study(tmp_path, space, "--num-samples", "2")
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert again.stderr.startswith(f"error: study 'diverge' in {tmp_path / 'studies'} already exists (MLflow run "
                                   f"{parent.info.run_id}, FINISHED): pass --resume to continue it")
    again = study(tmp_path, space, "--num-samples", "2", "--resume")
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert "has finished" in again.stderr and "nothing to resume" in again.stderr


@pytest.mark.slow
def test_a_study_whose_every_trial_fails_exits_1(tmp_path):
    space = space_file(tmp_path, [1e30])
    r = study(tmp_path, space, "--num-samples", "1")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Study 'diverge': 1 trial, 1 failed: FloatingPointError x1;" in r.stdout


def test_the_reason_names_the_root_cause_under_rays_wrappers(tmp_path):
    """A failed trial's exception as Ray hands it over -> run tag and artifact text; Tune's text file
    is the fallback (a trial that died before it could say why), read as text, never unpickled."""
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from study.mlflow_runs import failure_counts
    from tracking.trial_log import describe, failure_from_text

    def raised(error):
        try:
            raise error
        except Exception as e:  # noqa: BLE001 - a raised exception carries its traceback
            return e

    nan = raised(FloatingPointError("stage2: loss is nan at step 1\nmore"))
    group = WorkerGroupError("Training failed due to worker errors:", {1: ValueError("later"), 0: nan})
    error = raised(RayTaskError("train", "Traceback ...", group).as_instanceof_cause())
    reason, text = describe(error)
    assert reason == "FloatingPointError: stage2: loss is nan at step 1"
    assert "Traceback" in text and "\x1b[" not in text

    (tmp_path / "error.txt").write_text("Failure # 1\n\x1b[36mray::ImplicitFunc.train()\x1b[39m\n"
                                        "FloatingPointError: stage2: loss is nan at step 1\n")
    reason, text = failure_from_text(str(tmp_path / "error.txt"))
    assert reason == "FloatingPointError: stage2: loss is nan at step 1"
    assert text.startswith("Failure # 1\nray::ImplicitFunc.train()\n")
    assert failure_from_text(None)[0].startswith("unknown")
    assert failure_from_text(str(tmp_path / "gone.txt"))[0].startswith("unknown")

    runs = [SimpleNamespace(data=SimpleNamespace(tags={"failure_reason": r})) for r in
            ("FloatingPointError: a", "MemoryError", "FloatingPointError: b")]
    assert failure_counts(runs) == "FloatingPointError x2, MemoryError x1"
