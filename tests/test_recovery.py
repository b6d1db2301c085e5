"""Stage-2 checkpoints and recovery.

In process, on a real one-rank gloo group with real DeepSpeed: a stage 2 that stops
after its checkpoint and resumes in a fresh model and engine must end where an
uninterrupted one ends. End to end: a study whose Ray Train worker is SIGKILLed in
stage 2 must restart it, resume from the checkpoint and finish the trial.
"""

import contextlib
import json
import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from trainables import checkpoint, worker
from trainables.checkpoint import CheckpointMismatch, Progress, Saver
from trainables.config import ConfigError, TrialConfig

# fp32 on CPU in one process: the same batches, dropout masks, optimizer state and summation
# order, so a resumed run matches an uninterrupted one bit for bit (measured: a difference of
# exactly 0 in every loss and weight, for every case below). The tolerance is therefore 0.


class Crash(Exception):
    """Stands in for a worker dying right after its checkpoint was reported."""


class Recorder:
    """Rank 0's TrialLog, in memory: the per-step losses a run logs."""

    def __init__(self):
        self.losses: dict[int, float] = {}
        self.flushes = 0

    def metric(self, key, value, step):
        if key == "train_loss":
            self.losses[step] = value

    def flush(self):
        self.flushes += 1


def trained(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """The trainable weights, whole (gathered under ZeRO-3)."""
    import deepspeed

    params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    gather = deepspeed.zero.GatheredParameters([p for _, p in params]) if zero_stage == 3 else contextlib.nullcontext()
    with gather:
        return {n: p.detach().clone() for n, p in params}


def resumed_and_uninterrupted(method: str, zero_stage: int, world_data, tmp_path, tmp_path_factory, n: int = 6):
    """Stage 2 for 2n steps straight, and for n steps + checkpoint + crash + resume in a fresh engine."""
    lr = {"full": 1e-3, "lora": 1e-2, "qlora": 1e-2, "mma": 1e-2}[method]
    cfg = TrialConfig(method=method, model_size="0.3m", stage1_steps=4, stage2_steps=2 * n, batch_size=8, lr=lr,
                      zero_stage=zero_stage, checkpoint_every=n)
    ctx = worker.setup(cfg, 0, 1, torch.device("cpu"), world_data, tmp_path_factory.getbasetemp() / "storage",
                       Recorder())  # stage 1 shared with test_methods
    base, _ = worker.stage1(ctx)

    torch.manual_seed(cfg.seed)
    straight, counts, _, straight_loss, _ = worker.stage2(ctx, base)
    out = {"counts": counts, "straight_loss": straight_loss, "straight_losses": ctx.log.losses,
           "straight": trained(straight, zero_stage)}
    del straight

    saved = tmp_path / "checkpoint"

    def report_then_die(metrics, directory):
        shutil.copytree(directory, saved)  # what Ray Train's storage would hold
        out["reported"] = metrics
        raise Crash

    ctx.log = Recorder()
    torch.manual_seed(cfg.seed)
    with pytest.raises(Crash):
        worker.stage2(ctx, base, saver=Saver(cfg.checkpoint_every, cfg, 0, 1, report_then_die))
    out["flushed_before_report"] = ctx.log.flushes

    ctx.log = Recorder()
    torch.manual_seed(cfg.seed + 1)  # another RNG state: the checkpoint must bring its own back
    resumed, _, seconds, resumed_loss, _ = worker.stage2(ctx, base, resume=saved)
    out.update(cfg=cfg, saved=saved, resumed_loss=resumed_loss, resumed_losses=ctx.log.losses,
               resumed=trained(resumed, zero_stage), seconds=seconds)
    return out


CASES = [("lora", 2), ("full", 3), ("qlora", 2), ("qlora", 3), ("lora", 3), ("full", 2), ("mma", 2)]


@pytest.mark.parametrize("method, zero_stage", CASES, ids=[f"{m}-zero{z}" for m, z in CASES])
def test_resumed_stage2_ends_where_an_uninterrupted_one_does(world_data, process_group, tmp_path, tmp_path_factory,
                                                             monkeypatch, method, zero_stage):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(torch, "load", no_unpickling)
    r = resumed_and_uninterrupted(method, zero_stage, world_data, tmp_path, tmp_path_factory)
    n = r["cfg"].checkpoint_every
    assert r["reported"] == {"stage2_step": n, "train_loss": r["straight_losses"][n - 1]}
    assert r["flushed_before_report"] == 1, "steps up to a checkpoint must reach MLflow before it is reported"
    assert sorted(r["resumed_losses"]) == list(range(n, 2 * n)), "the resumed run starts after the checkpoint"
    for step, loss in r["resumed_losses"].items():
        assert loss == r["straight_losses"][step], (step, loss, r["straight_losses"][step])
    assert r["resumed_loss"] == r["straight_loss"]
    assert r["resumed"].keys() == r["straight"].keys()
    worst = max((r["resumed"][k] - r["straight"][k]).abs().max().item() for k in r["straight"])
    assert worst == 0, f"trained weights differ by up to {worst:.2e}"
    assert r["seconds"] > 0

    # What was saved: safetensors + JSON only, and of the weights only the trained ones.
    files = sorted(p.name for p in r["saved"].iterdir())
    assert files == ["rank-0.json", "rank-0.safetensors", "trial.json"], files
    shard = checkpoint.load_tree(r["saved"], "rank-0")
    fp32 = shard["optimizer"]["fp32_flat_groups" if zero_stage == 3 else "single_partition_of_fp32_groups"]
    assert sum(t.numel() for t in fp32) == sum(r["counts"].values()), "the checkpoint holds more than the trained weights"
    assert shard["progress"]["step"] == n and len(shard["progress"]["losses"]) == max(1, 2 * n // 10)
    assert json.loads((r["saved"] / "trial.json").read_text())["step"] == n
    # About three times the trained weights (fp32 weights + AdamW's two moments), as BENCHMARKS.md says;
    # the JSON (RNG states, progress) and the safetensors header are the rest.
    trained_bytes = 4 * sum(r["counts"].values())
    size = sum(f.stat().st_size for f in r["saved"].iterdir())
    assert 3 * trained_bytes <= size <= 3 * trained_bytes + 64 * 1024, (size, trained_bytes)
    print(f"\n{method} zero{zero_stage}: checkpoint {size / 2**20:.2f} MB for {trained_bytes / 2**20:.2f} MB trained")


def test_a_checkpoint_after_the_last_step_resumes_straight_to_evaluation(world_data, process_group, tmp_path,
                                                                          tmp_path_factory):
    cfg = TrialConfig(model_size="0.3m", stage1_steps=4, stage2_steps=4, batch_size=8, checkpoint_every=10,
                      eval_samples=16)
    ctx = worker.setup(cfg, 0, 1, torch.device("cpu"), world_data, tmp_path_factory.getbasetemp() / "storage",
                       Recorder())
    base, _ = worker.stage1(ctx)
    saved = tmp_path / "checkpoint"
    saver = Saver(cfg.checkpoint_every, cfg, 0, 1, lambda metrics, directory: shutil.copytree(directory, saved))
    engine, _, _, loss, _ = worker.stage2(ctx, base, saver=saver)
    weights = trained(engine, 2)
    ctx.log = Recorder()
    again, _, _, loss_again, _ = worker.stage2(ctx, base, resume=saved)
    assert ctx.log.losses == {} and loss_again == loss
    assert all(torch.equal(p, weights[n]) for n, p in trained(again, 2).items())
    assert worker.evaluate(ctx, again) == worker.evaluate(ctx, engine)


def test_a_checkpoint_of_another_trial_is_refused_by_name(world_data, process_group, tmp_path, tmp_path_factory):
    r = resumed_and_uninterrupted("lora", 2, world_data, tmp_path, tmp_path_factory, n=2)
    cfg = r["cfg"]
    assert checkpoint.check(r["saved"], cfg.replace(checkpoint_every=7, loader_workers=0), 1)["step"] == 2
    with pytest.raises(CheckpointMismatch, match="lr=0.01"):
        checkpoint.check(r["saved"], cfg.replace(lr=0.02), 1)
    with pytest.raises(CheckpointMismatch, match="saved by 1 workers, resumed by 2"):
        checkpoint.check(r["saved"], cfg, 2)


def test_nested_state_round_trips_through_safetensors_and_json(tmp_path):
    tree = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.arange(4.0)}, 1: {}},
            "groups": [{"betas": (0.9, 0.999), "params": [0], "foreach": None, "fused": False}],
            "rng": torch.get_rng_state(), "half": torch.ones(2, 3, dtype=torch.bfloat16),
            "python": (3, tuple(range(5)), None), "nan": float("nan"), "name": "x", "__tensor__": 1}
    checkpoint.save_tree(tree, tmp_path, "t")
    back = checkpoint.load_tree(tmp_path, "t")
    assert back["state"][0]["step"].item() == 3.0 and torch.equal(back["state"][0]["exp_avg"], torch.arange(4.0))
    assert back["state"][1] == {} and back["groups"][0]["betas"] == (0.9, 0.999)
    assert back["groups"][0]["params"] == [0] and back["groups"][0]["foreach"] is None
    assert torch.equal(back["rng"], tree["rng"]) and back["half"].dtype == torch.bfloat16
    assert back["python"] == tree["python"] and math.isnan(back["nan"]) and back["__tensor__"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json", "t.safetensors"]
    with pytest.raises(TypeError, match=r"t/opt/scaler: a object is neither"):
        checkpoint.save_tree({"opt": {"scaler": object()}}, tmp_path, "t")


def test_an_error_of_the_trial_is_raised_again_instead_of_retried(tmp_path):
    with pytest.raises(FloatingPointError):
        with checkpoint.no_repeats(tmp_path):
            raise FloatingPointError("stage2: loss is nan at step 3")
    # A restarted worker raises it at once: same type and first line, the first traceback attached, no cause.
    with pytest.raises(FloatingPointError, match=r"^stage2: loss is nan at step 3\n\(not retried") as again:
        with checkpoint.no_repeats(tmp_path):
            pytest.fail("a restarted worker trained again")
    assert again.value.__cause__ is None and "Traceback" in str(again.value)
    with pytest.raises(CheckpointMismatch):
        with checkpoint.no_repeats(tmp_path / "mismatch"):
            raise CheckpointMismatch("saved with lr=0.01")
    with pytest.raises(CheckpointMismatch, match="^saved with lr=0.01"):
        with checkpoint.no_repeats(tmp_path / "mismatch"):
            pass
    # What the machine may cause (a collective broken by a dead peer) is left to Ray Train's retries.
    with pytest.raises(RuntimeError):
        with checkpoint.no_repeats(tmp_path / "machine"):
            raise RuntimeError("Connection reset by peer")
    with checkpoint.no_repeats(tmp_path / "machine"):
        pass


def test_checkpoint_settings_are_range_checked():
    assert TrialConfig().checkpoint_every > 0 and TrialConfig().max_worker_failures > 0
    for key in ("checkpoint_every", "max_worker_failures"):
        with pytest.raises(ConfigError, match=key):
            TrialConfig.from_dict({key: -1})
    saver = Saver(5, TrialConfig(), 0, 1)
    assert [s for s in range(1, 13) if saver.due(s, 12)] == [5, 10, 12]
    assert not any(Saver(0, TrialConfig(), 0, 1).due(s, 12) for s in range(1, 13))


# --- a real worker killed in the middle of a study ---

STEPS, EVERY = 120, 20


def session_processes(sid: int) -> dict[int, str]:
    """pid -> command line of every live process in session `sid` (this test's study and its Ray)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True).stdout
    found = {}
    for line in out.splitlines():
        pid, session, stat, args = (line.split(None, 3) + [""])[:4]
        if int(session) == sid and not stat.startswith("Z"):
            found[int(pid)] = args
    return found


def train_loss_steps(db: Path) -> list[int]:
    """The train_loss steps the store holds, read-only: an MlflowClient would create or migrate the store while
    the study does (two migrations of one SQLite file race and fail)."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return sorted(r[0] for r in con.execute("SELECT step FROM metrics WHERE key = 'train_loss'"))
    except sqlite3.OperationalError:  # tables not created yet, or locked for a moment
        return []


@pytest.mark.slow
def test_a_killed_worker_resumes_from_its_checkpoint(tmp_path):
    space = tmp_path / "recover.py"
    space.write_text(
        "from study.space import choice\n"
        "NAME = 'recover'\n"
        "FIXED = {'method': 'lora', 'model_size': '0.3m', 'num_workers': 2}\n"
        "SPACE = {'lora_rank': choice([8])}\n"
        f"SMOKE = {{'stage1_steps': 4, 'stage2_steps': {STEPS}, 'checkpoint_every': {EVERY}, 'batch_size': 8, "
        "'eval_samples': 16}\n")
    log = tmp_path / "study.log"
    with open(log, "w") as out:
        study = subprocess.Popen([sys.executable, "-m", "study.run", str(space), "--smoke", "--num-samples", "1"],
                                 cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        victim, at = None, []
        while victim is None:
            assert study.poll() is None, f"the study ended before a worker was killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no stage-2 checkpoint in time:\n{log.read_text()[-3000:]}"
            # Ray Train has registered a checkpoint (its snapshot exists) and MLflow has the steps up to it.
            registered = list((tmp_path / "studies" / "train").glob("trial-*/checkpoint_manager_snapshot.json"))
            at = train_loss_steps(tmp_path / "mlflow.db")
            workers = [pid for pid, args in session_processes(study.pid).items() if "RayTrainWorker" in args]
            if registered and at and max(at) >= EVERY and workers:
                victim = workers[0]
            else:
                time.sleep(0.2)
        os.kill(victim, signal.SIGKILL)
        assert max(at) < STEPS - 1, "stage 2 ended before the kill: make STEPS larger"
        rc = study.wait(timeout=240)
        output = log.read_text()
        assert rc == 0, output[-4000:]
    finally:
        if study.poll() is None:
            os.killpg(study.pid, signal.SIGKILL)
            study.wait()
        # The study's session holds its local Ray (GCS, raylet, workers): all of it must be gone.
        deadline = time.monotonic() + 20
        while (left := session_processes(study.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not left, f"stray processes after the study: {left}"

    resumed = [int(k) for k in re.findall(rf"stage2: resumed from the checkpoint at step (\d+)/{STEPS}", output)]
    assert resumed and all(k >= EVERY and k % EVERY == 0 for k in resumed), output[-4000:]
    # Steps trained both before the kill and after the resume print the same loss (the resume is exact).
    printed: dict[int, set[str]] = {}
    for step, loss in re.findall(rf"stage2 step (\d+)/{STEPS} loss ([\d.]+)", output):
        printed.setdefault(int(step), set()).add(loss)
    assert all(len(v) == 1 for v in printed.values()), {k: v for k, v in printed.items() if len(v) > 1}

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("recover").experiment_id])
              if "mlflow.parentRunId" in r.data.tags]
    assert run.info.status == "FINISHED"
    # the score MLflow holds is the one the resumed worker printed, and the resumed training went on learning
    (printed_score,) = re.findall(r"\] score ([\d.]+), ", output)
    assert f"{run.data.metrics['score']:.1f}" == printed_score
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert {m.step for m in history} == set(range(STEPS)), "a step is missing from train_loss"
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert sum(losses[-EVERY:]) < sum(losses[:EVERY]), "the loss did not fall across the kill"

    # Ray Train's latest checkpoint was after the last step, with every rank's shard in it (the driver's
    # log says so); the trial finished, so its checkpoints are gone from storage (driver.run_trial).
    (snapshot,) = (tmp_path / "studies" / "train").glob("trial-*/checkpoint_manager_snapshot.json")
    latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
    assert latest["metrics"]["stage2_step"] == STEPS, latest
    assert not [d for d in snapshot.parent.glob("checkpoint_*") if d.is_dir()], "a finished trial kept its checkpoints"
