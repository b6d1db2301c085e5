"""Bad flags and bad space files: exit 2, one `error:` line naming the culprit, before Ray starts."""

import subprocess
import sys
from pathlib import Path

import pytest

LORA = str(Path(__file__).parent.parent / "search_spaces" / "lora.py")


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
