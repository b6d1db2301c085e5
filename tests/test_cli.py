"""Bad flags, space files and data: exit 2, one `error:` line naming the culprit, before Ray starts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
LORA = str(REPO / "search_spaces" / "lora.py")


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "study.run", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


@pytest.mark.parametrize("args, culprit", [
    ([LORA, "--num-samples", "0"], "--num-samples"),
    ([LORA, "--num-samples", "three"], "--num-samples"),
    ([LORA, "--bogus"], "--bogus"),
    (["missing_space.py"], "missing_space.py"),
])
def test_bad_flags_exit_2_with_one_error_line(args, culprit, tmp_path):
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], r.stderr


def test_bad_space_file_exits_2_and_touches_nothing(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from study.space import choice\nSPACE = {'lora_rank': choice([8, -1])}\n")
    r = run(str(bad), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "lora_rank" in r.stderr and "bad.py" in r.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "studies").exists()


def test_dry_run_prints_the_plan(tmp_path):
    r = run(LORA, "--dry-run", "--num-samples", "5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "5 trials" in r.stdout and "lora_rank" in r.stdout
    assert not (tmp_path / "mlflow.db").exists()


def test_a_smoke_check_of_a_seeded_study_runs_two_seeds_of_three_configurations(tmp_path):
    r = run(str(REPO / "search_spaces" / "paper_table3.py"), "--smoke", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "6 trials (3 configurations x 2 seeds)" in r.stdout, r.stdout


def test_bad_data_exits_2_naming_file_and_record_before_ray(dataset_dir, tmp_path):
    # a missing image and a corrupt one (garbage bytes under a .png name)
    # (train.json's records t1 and t2 use them; eval and captions are moved to r0 and r3 so only those two are bad)
    (dataset_dir / "images" / "r1.png").unlink()
    (dataset_dir / "images" / "r2.png").write_bytes(b"garbage, not a PNG")
    for name in ("eval.json", "captions.json"):
        recs = json.loads((dataset_dir / name).read_text())
        recs[1]["image"] = "r3.png"
        (dataset_dir / name).write_text(json.dumps(recs))
    r = run(LORA, "--data", str(dataset_dir), "--dry-run", cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0] == (f"error: {dataset_dir / 'train.json'} record 't1': image 'r1.png' does not exist "
                        "(and 1 more problem; --skip-invalid drops the 2 bad records)")
    assert r.stdout == "" and not (tmp_path / "studies").exists() and not (tmp_path / "mlflow.db").exists()

    r = run(LORA, "--data", str(dataset_dir), "--skip-invalid", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "--skip-invalid drops 2 of 12 records:" in r.stdout
    assert "train.json record 't1': image 'r1.png' does not exist\n" in r.stdout
    assert "train.json record 't2': image 'r2.png' is not an image in a supported format" in r.stdout
    assert not (tmp_path / "studies").exists()  # a dry run writes no shard


def test_a_clean_dataset_is_reported_in_the_plan(dataset_dir, tmp_path):
    r = run(LORA, "--data", str(dataset_dir), "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"data: {dataset_dir} (train.json 5, eval.json 2" in r.stdout and "every record is valid" in r.stdout


@pytest.mark.parametrize("flags, culprit", [
    (["--data", "no_such_dir"], "--data no_such_dir: no such directory"),
    (["--skip-invalid"], "--skip-invalid applies to a --data DIR dataset"),
])
def test_bad_data_flags(flags, culprit, tmp_path):
    r = run(LORA, *flags, "--dry-run", cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], r.stderr


def test_a_file_that_does_not_parse_stops_even_with_skip_invalid(dataset_dir, tmp_path):
    (dataset_dir / "train.json").write_text('[{"id": "a",}]')
    r = run(LORA, "--data", str(dataset_dir), "--skip-invalid", "--dry-run", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {dataset_dir / 'train.json'}: line 1 column 13: not valid JSON: " \
                               "Expecting property name enclosed in double quotes"


def test_skip_invalid_with_nothing_left_to_train_on(dataset_dir, tmp_path):
    for png in (dataset_dir / "images").iterdir():
        png.unlink()
    records = json.loads((dataset_dir / "train.json").read_text())
    (dataset_dir / "train.json").write_text(json.dumps([r for r in records if "image" in r]))
    r = run(LORA, "--data", str(dataset_dir), "--skip-invalid", "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and "none of its 4 records is usable" in r.stderr, r.stderr


def test_skip_invalid_logs_what_it_dropped_on_the_study_run(dataset_dir, tmp_path):
    """The part of run_study before Ray starts: the study's run records what --skip-invalid dropped."""
    from mlflow.tracking import MlflowClient

    from study import mlflow_runs
    from study.study import log_skipped
    from tracking import store
    from trainables.config import TrialConfig
    from trainables.prepare import prepare

    (dataset_dir / "images" / "r3.png").unlink()
    report, plan = prepare(dataset_dir, [TrialConfig(model_size="0.3m")], tmp_path / "studies", skip_invalid=True,
                           progress=False)
    (train,) = [s["train"] for s in plan.splits.values()]
    assert train.dropped == (3,) and train.used == 4, "trials skip t3, and only t3"

    uri = store.resolve_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient(uri)
    exp = store.ensure_experiment(client, "skip", uri)
    parent = mlflow_runs.start_study_run(client, exp, "skip", {"space_file": "lora.py"})
    log_skipped(client, parent, report)
    run_ = client.get_run(parent)
    assert run_.data.metrics["skipped_records"] == 1 and run_.data.params["space_file"] == "lora.py"
    local = Path(client.download_artifacts(parent, "data/skipped.json", str(tmp_path / "dl")))
    assert json.loads(local.read_text()) == [{"file": "train.json", "id": "t3", "index": 3,
                                              "reasons": ["image 'r3.png' does not exist"]}]


# --- refusals of the study's settings, from the command line (the checks: study/plan.py make_plan) ---------

SMALL = ("from study.space import choice\n"
         "NAME = 'small'\n"
         "FIXED = {'method': 'lora', 'model_size': '0.3m'%s}\n"
         "SPACE = {'lora_rank': choice([4, 8])}\n"
         "SMOKE = {'stage1_steps': 2, 'stage2_steps': 4, 'batch_size': 4, 'eval_samples': 8}\n")


def one_error(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stdout[-2000:] + r.stderr
    return lines[0]


def space_file(tmp_path: Path, fixed: str = "") -> Path:
    path = tmp_path / "small.py"
    path.write_text(SMALL % fixed)
    return path


def test_use_gpu_without_a_gpu_is_refused(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    space = space_file(tmp_path, ", 'use_gpu': True")
    line = one_error(run(str(space), "--smoke", cwd=tmp_path))
    assert line == (f"error: {space}: use_gpu is True, but this machine has no GPU (torch sees none); set use_gpu "
                    "False to train on the CPU")
    assert not (tmp_path / "studies").exists() and not (tmp_path / "mlflow.db").exists()


def test_more_workers_per_trial_than_cpus_is_refused(tmp_path):
    import os

    n = (os.cpu_count() or 1) + 1
    space = tmp_path / "wide.py"
    text = SMALL % f", 'num_workers': {n}, 'batch_size': 4"
    space.write_text(text.replace("'batch_size': 4", f"'batch_size': {4 * n}"))  # divisible by the workers
    line = one_error(run(str(space), "--smoke", "--dry-run", cwd=tmp_path))
    assert line == (f"error: {space}: num_workers={n} workers per trial, but this machine has {n - 1} CPUs: "
                    "no trial could ever start")


@pytest.mark.parametrize("flags, message", [
    (["--storage", "afile"],
     "error: --storage afile: is a file; the study needs a directory (it creates it if absent)"),
    (["--tracking-uri", "ftp://host/runs"], "error: --tracking-uri ftp://host/runs: not a tracking URI MLflow serves"),
    (["--tracking-uri", "gopher://alice:s3cret@host/x"],
     "error: --tracking-uri gopher://alice:***@host/x: not a tracking URI MLflow serves"),
    (["--address", "127.0.0.1:1"], "error: --address 127.0.0.1:1: no Ray cluster answers there"),
    (["--tracking-uri", "http://alice:s3cret@127.0.0.1:1"],
     "error: --tracking-uri http://alice:***@127.0.0.1:1: no tracking server answers at 127.0.0.1:1"),
])
def test_bad_storage_tracking_uri_and_address_are_refused_before_ray(flags, message, tmp_path):
    import time

    (tmp_path / "afile").write_text("the user's")
    space = space_file(tmp_path)
    t0 = time.monotonic()
    line = one_error(run(str(space), "--smoke", *flags, cwd=tmp_path))
    assert line.startswith(message), line
    assert "s3cret" not in line
    assert (tmp_path / "afile").read_text() == "the user's" and not (tmp_path / "studies").exists()
    assert time.monotonic() - t0 < 60  # Ray's own connect would retry for minutes


def test_apostrophes_in_the_study_name_and_the_storage_path(tmp_path):
    """`bob's study` in `/…/o'brien/studies`: planned, refused as existing, resumable (MLflow filters quoted)."""
    from mlflow.tracking import MlflowClient

    from study import mlflow_runs
    from study import run as cli
    from study import space as spaces
    from study.plan import make_plan
    from tracking import store

    home = tmp_path / "o'brien"
    home.mkdir()
    space = space_file(home)
    flags = ["--smoke", "--experiment", "bob's study", "--storage", str(home / "studies"),
             "--tracking-uri", f"sqlite:///{home / 'mlflow.db'}"]
    r = run(str(space), *flags, "--dry-run", cwd=home)
    assert r.returncode == 0, r.stderr
    assert f"""study "bob's study" from {space}""" in r.stdout

    # the study as `study.run` starts it: its MLflow run, with its settings
    plan, _ = make_plan(cli.parse_args([str(space), *flags, "--dry-run"]), spaces.load(space))
    client = MlflowClient(plan.tracking_uri)
    experiment = store.ensure_experiment(client, plan.study, plan.tracking_uri)
    parent = mlflow_runs.start_study_run(client, experiment, plan.study, plan.settings(spaces.load(space)))

    line = one_error(run(str(space), *flags, cwd=home))
    assert line == (f"""error: study "bob's study" in {home / 'studies'} already exists (MLflow run {parent}, """
                    "RUNNING): pass --resume to continue it, or choose another --experiment or --storage for a new "
                    "study")
    assert not (home / "studies").exists(), "the refused command left a folder"
    r = run(str(space), *flags, "--resume", "--dry-run", cwd=home)
    assert r.returncode == 0, r.stderr
    assert f"resumes the study's MLflow run {parent} (RUNNING)" in r.stdout
