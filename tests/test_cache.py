"""Shared caches under real concurrency and real kills: one builder per key, never a half-written entry."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zoo import cache

REPO = Path(__file__).parent.parent
STEPS = 400  # a stage 1 of ~10 s: time to kill it mid-training
# A stage-1 computation in its own process (its own one-rank gloo group), as a trial's rank 0 runs it.
STAGE1 = """
import os, socket, sys, torch, torch.distributed as dist
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo", rank=0, world_size=1)
torch.set_num_threads(1)
import zoo
from trainables import worker
from trainables.config import TrialConfig
from trainables.prepare import prepare
cfg = TrialConfig(model_size="0.3m", stage1_steps=int(sys.argv[2]), batch_size=8)
_, data = prepare(zoo.world_dir(), [cfg], sys.argv[1], progress=False)
target, meta = worker.stage1(worker.setup(cfg, 0, 1, torch.device("cpu"), data, sys.argv[1]))
print("RESULT", target, meta["trainable_params"], flush=True)
"""


def stage1_process(storage: Path, steps: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", STAGE1, str(storage), str(steps)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_concurrent_trials_with_the_same_stage1_key_compute_it_once(zoo_ready, tmp_path):
    procs = [stage1_process(tmp_path, 20) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = {line for out in outs for line in out.splitlines() if line.startswith("RESULT")}
    assert len(results) == 1, results  # the same checkpoint, the same metadata
    computed = sum("aligning the projector" in out for out in outs)
    assert computed == 1, outs
    entries = [p for p in (tmp_path / "stage1").iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / "stage1.json").exists()


def test_a_killed_builder_leaves_nothing_that_loads_and_the_next_one_rebuilds(zoo_ready, tmp_path):
    proc = stage1_process(tmp_path, STEPS)  # long enough to be killed mid-training
    deadline = time.monotonic() + 120
    while not list((tmp_path / "stage1").glob("*.tmp-*")):
        assert proc.poll() is None and time.monotonic() < deadline, "the builder never started"
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = list((tmp_path / "stage1").glob("*.tmp-*"))
    assert leftovers and not [p for p in (tmp_path / "stage1").iterdir() if p.is_dir() and ".tmp-" not in p.name]

    # The same key again (a short recipe would be another key, so write the same one): it must rebuild.
    target = leftovers[0].name.split(".tmp-")[0]
    with cache.locked(tmp_path / "stage1" / target):  # the dead builder's lock is free
        assert cache.stale(tmp_path / "stage1" / target) == leftovers
    again = stage1_process(tmp_path, STEPS)
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0 and "aligning the projector" in out, out[-2000:]
    assert not leftovers[0].exists() and not cache.stale(tmp_path / "stage1" / target)
    assert (tmp_path / "stage1" / target / "stage1.json").exists()


def test_building_renames_only_complete_entries(tmp_path):
    target = tmp_path / "entry"
    with pytest.raises(RuntimeError):
        with cache.locked(target), cache.building(target) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("the build failed")
    assert not target.exists() and not cache.stale(target)
    with cache.locked(target), cache.building(target) as tmp:
        (tmp / "whole").write_text("x")
    assert (target / "whole").exists() and not cache.stale(target)
