"""The search tells Optuna the truth and spends within a budget; the forecast counts FLOPs as the papers do."""

import json
import math
import pickle
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from ray.tune.search import Searcher

from study import space as spaces
from study.forecast import DataShape, Shapes, flops_per_sample
from study.search import StudySearch
from trainables.methods import METHODS, STAGE1

REPO = Path(__file__).parent.parent


def space(trial):
    trial.suggest_categorical("lora_rank", [4, 8, 16, 32])
    trial.suggest_float("lr", 1e-4, 1e-2, log=True)


def one_hour(config) -> float:
    return 1.0


def searcher(budget=None, forecast=one_hour, objectives=("score", "gpu_hours"), seeds=1):
    several = len(objectives) > 1
    modes = {"score": "max", "gpu_hours": "min"}
    return StudySearch(space=space, sampler=optuna.samplers.RandomSampler(seed=0),
                       metric=list(objectives) if several else objectives[0],
                       mode=[modes[o] for o in objectives] if several else modes[objectives[0]],
                       budget_gpu_hours=budget, forecast=forecast, seeds=seeds)


def final(score, hours):
    return {"score": score, "gpu_hours": hours, "stage2_step": 10, "interim_score": score}


def interim(score, hours, step):
    return {"interim_score": score, "gpu_hours": hours, "stage2_step": step}


BARE_DONE = {"done": True, "trial_id": "x", "hostname": "h"}  # what Tune hands on when a function trainable returns


def states(s):
    return [t.state for t in s._ot_study.trials]


def test_a_finished_trial_is_complete_with_every_objective_even_after_tunes_bare_done_result():
    s = searcher()
    s.suggest("a")
    s.on_trial_result("a", interim(20.0, 0.5, 5))
    s.on_trial_result("a", final(40.0, 1.0))
    s.on_trial_complete("a", BARE_DONE)
    (trial,) = s._ot_study.trials
    assert trial.state == TrialState.COMPLETE and trial.values == [40.0, 1.0]


def test_a_trial_stopped_early_is_pruned_and_keeps_its_cost_and_an_errored_one_fails():
    s = searcher()
    s.suggest("stopped")
    s.on_trial_result("stopped", interim(10.0, 0.3, 5))
    s.on_trial_complete("stopped", interim(12.0, 0.4, 10))  # ASHA stopped it on this result: no final one
    s.suggest("broken")
    s.on_trial_result("broken", interim(30.0, 0.2, 5))
    s.on_trial_complete("broken", None, error=True)
    assert states(s) == [TrialState.PRUNED, TrialState.FAIL]
    assert s.spent == pytest.approx(0.4 + 0.2), "a stopped or failed trial's cost still counts"


def test_each_configuration_runs_at_every_seed_and_optuna_hears_the_mean_once():
    s = searcher(seeds=3)
    configs = [s.suggest(t) for t in ("a", "b", "c", "d")]
    assert [c.get("seed", 0) for c in configs[:3]] == [0, 1, 2]
    strip = [{k: v for k, v in c.items() if k != "seed"} for c in configs]
    assert strip[0] == strip[1] == strip[2] != strip[3], "three seeds of one configuration, then a new one"
    assert configs[3].get("seed", 0) == 0
    for trial, score in (("a", 40.0), ("b", 46.0)):
        s.on_trial_complete(trial, final(score, 1.0))
    assert states(s) == [TrialState.RUNNING, TrialState.RUNNING], "told once, when the last seed ends"
    s.on_trial_complete("c", final(52.0, 2.5))
    assert s._ot_study.trials[0].state == TrialState.COMPLETE
    assert s._ot_study.trials[0].values == [pytest.approx(46.0), pytest.approx(1.5)]
    assert s.spent == pytest.approx(4.5), "each seed's cost is spent"


def test_a_configuration_with_a_seed_stopped_early_is_pruned_and_with_every_seed_failed_fails():
    s = searcher(seeds=2)
    for t in "abcd":
        s.suggest(t)
    s.on_trial_complete("a", final(40.0, 1.0))
    s.on_trial_complete("b", interim(12.0, 0.4, 10))  # stopped early
    s.on_trial_complete("c", None, error=True)
    s.on_trial_complete("d", None, error=True)
    assert states(s) == [TrialState.PRUNED, TrialState.FAIL]
    assert s.pruned() == 1, "Tune trials stopped early, seed by seed"


def test_seed_groups_survive_the_searchers_save_and_restore(tmp_path):
    s = searcher(seeds=2)
    first = s.suggest("a")
    s.save(str(tmp_path / "searcher.pkl"))
    restored = searcher(seeds=2)
    restored.restore(str(tmp_path / "searcher.pkl"))
    second = restored.suggest("b")
    assert second == {**first, "seed": 1}
    restored.on_trial_complete("a", final(30.0, 1.0))
    restored.on_trial_complete("b", final(50.0, 1.0))
    assert restored._ot_study.trials[0].values == [pytest.approx(40.0), pytest.approx(1.0)]


@pytest.mark.parametrize("outcome", ["finished", "failed"])
def test_the_last_point_of_a_grid_ends_cleanly(outcome):
    """Optuna's GridSampler stops its study when the last point ends (study.stop(), which raises outside
    study.optimize): the trial is still told, and nothing reaches Tune (which crashed the study before)."""
    s = StudySearch(space={"lr": optuna.distributions.CategoricalDistribution([1e-3])},
                    sampler=optuna.samplers.GridSampler({"lr": [1e-3]}), metric="score", mode="max")
    assert s.suggest("only") == {"lr": 1e-3}
    s.on_trial_complete("only", final(40.0, 1.0) if outcome == "finished" else None, error=outcome == "failed")
    assert states(s) == [TrialState.COMPLETE if outcome == "finished" else TrialState.FAIL]


def test_a_single_objective_study_is_told_its_metric():
    s = searcher(objectives=("score",))
    s.suggest("a")
    s.on_trial_complete("a", final(33.0, 1.0))
    assert s._ot_study.trials[0].value == 33.0


def test_the_budget_stops_launching_and_is_exceeded_by_at_most_one_trials_cost():
    s = searcher(budget=2.5)
    assert s.suggest("a") and s.suggest("b")  # committed: 2 forecasts = 2.0 < 2.5
    assert s.suggest("c") is not None, "2.0 < 2.5: one more may start"
    assert s.suggest("d") is None, "3.0 committed: wait for a running trial"
    s.on_trial_complete("a", final(30.0, 0.2))  # cheaper than forecast: room again
    assert s.committed() == pytest.approx(2.2) and s.suggest("d") is not None
    for t, cost in (("b", 0.9), ("c", 0.9), ("d", 0.9)):
        s.on_trial_complete(t, final(30.0, cost))
    assert s.suggest("e") is Searcher.FINISHED and s.budget_exhausted
    assert s.spent == pytest.approx(2.9) and s.spent <= 2.5 + 1.0


def test_a_repeat_answered_from_an_earlier_trial_costs_nothing():
    s = searcher(budget=10.0)
    s.suggest("a")
    s.on_trial_complete("a", final(30.0, 1.0))
    s.suggest("b")
    s.on_trial_result("b", {**final(30.0, 1.0), "repeat_of": "run-a"})
    s.on_trial_complete("b", BARE_DONE)
    assert s.spent == pytest.approx(1.0) and states(s) == [TrialState.COMPLETE, TrialState.COMPLETE]


def test_what_was_spent_survives_the_searchers_save_and_restore(tmp_path):
    s = searcher(budget=5.0)
    s.suggest("a")
    s.on_trial_complete("a", final(30.0, 1.5))
    s.suggest("b")
    s.save(str(tmp_path / "searcher.pkl"))
    again = searcher(budget=5.0)
    again.restore(str(tmp_path / "searcher.pkl"))
    assert again.spent == pytest.approx(1.5) and set(again.running) == {"b"} and len(again._ot_study.trials) == 2
    assert pickle.loads(pickle.dumps(again)).spent == pytest.approx(1.5)


SHAPES = Shapes(llm=6_476_005_376, llm_layers=32, llm_width=4096, vision=303_000_000, vision_layers=24,
                vision_width=1024, patches=577, projector=1024 * 4096 + 4096 * 4096, image_tokens=576)


def test_an_identical_earlier_trial_is_found_finished_or_stopped_and_a_running_one_waited_for(tmp_path):
    import threading
    import time

    from mlflow.tracking import MlflowClient

    from study.study import identical_trial
    from trainables.config import TrialConfig

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("twins")
    parent = client.create_run(exp).info.run_id

    def trial(cfg, status=None, **tags):
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent, **tags})
        for k, v in cfg.logged_params().items():
            client.log_param(run.info.run_id, k, v)
        if status:
            client.set_terminated(run.info.run_id, status)
        time.sleep(0.01)
        return client.get_run(run.info.run_id)

    a, b = TrialConfig(lr=1e-3), TrialConfig(lr=2e-3)
    done = trial(a, "FINISHED")
    trial(b, "FAILED")  # a failed twin is not an answer
    stopped = trial(b, "KILLED", stopped_early="8")
    me = trial(a)
    assert identical_trial(client, exp, me, a).info.run_id == done.info.run_id
    assert identical_trial(client, exp, trial(b), b).info.run_id == stopped.info.run_id
    c = TrialConfig(lr=3e-3)
    assert identical_trial(client, exp, trial(c), c) is None
    full8, full64 = TrialConfig(method="full", lora_rank=8), TrialConfig(method="full", lora_rank=64)
    first = trial(full8, "FINISHED")
    assert identical_trial(client, exp, trial(full64), full64).info.run_id == first.info.run_id, \
        "a rank full fine-tuning does not use makes no new configuration"
    lora64 = TrialConfig(lora_rank=64)
    assert identical_trial(client, exp, trial(lora64), lora64) is None, "LoRA's rank does"
    running = trial(TrialConfig(lr=4e-3))
    later = trial(TrialConfig(lr=4e-3))
    threading.Timer(0.5, lambda: client.set_terminated(running.info.run_id, "FINISHED")).start()
    started = time.monotonic()
    assert identical_trial(client, exp, later, TrialConfig(lr=4e-3), poll_s=0.1).info.run_id == running.info.run_id
    assert time.monotonic() - started >= 0.4, "the twin was still running: waited for"
    # a RUNNING twin from before this session (the driver was killed) is no one's to wait for
    stale = trial(TrialConfig(lr=5e-3))
    session = int(time.time() * 1000) + 1
    time.sleep(0.01)
    mine = trial(TrialConfig(lr=5e-3))
    found = []
    look = threading.Thread(target=lambda: found.append(identical_trial(
        client, exp, mine, TrialConfig(lr=5e-3), poll_s=0.1, live_since_ms=session)), daemon=True)
    look.start()
    look.join(10)
    assert found == [None], "waited for a stale RUNNING twin"
    assert client.get_run(stale.info.run_id).info.status == "RUNNING"


def test_flops_follow_the_stage_table():
    """6 N T for full fine-tuning, 4 N T for LoRA and for stage 1 (backward through the frozen LLM to reach the
    projector), the tower forward only; with one text token per sample and no image, exactly those."""
    text = DataShape(tokens=1, image_share=0.0)
    n = SHAPES.llm
    attention = 4 * SHAPES.llm_layers * 1 * SHAPES.llm_width
    assert flops_per_sample(SHAPES, text, METHODS["full"].stage2, 2048) == pytest.approx(3 * (2 * n + attention))
    assert flops_per_sample(SHAPES, text, METHODS["lora"].stage2, 2048) == pytest.approx(2 * (2 * n + attention))
    assert flops_per_sample(SHAPES, text, STAGE1, 2048) == pytest.approx(2 * (2 * n + attention))
    image = DataShape(tokens=101, image_share=1.0)  # 100 text tokens and the <image> token -> 576 features
    lora = flops_per_sample(SHAPES, image, METHODS["lora"].stage2, 2048)
    tower = 2 * SHAPES.vision * 577 + 4 * 24 * 577 ** 2 * 1024
    tokens = 100 + 576
    llm = 2 * n * tokens + 4 * 32 * tokens ** 2 * 4096
    projector = 2 * SHAPES.projector * 576
    assert lora == pytest.approx(tower + 2 * llm + 3 * projector)  # the tower frozen and first: forward only


def test_the_cost_study_file_and_its_refusals(tmp_path):
    space = spaces.load(REPO / "search_spaces" / "cost.py")
    assert space.goals() == {"score": "max", "gpu_hours": "min"} and space.scheduler.grace_steps == 100
    assert space.seed_params() == [{"model_size": "1m", "lora_rank": 16, "alpha_per_rank": 2.0, "lr": 3e-3}]
    head = "from study.space import alpha_per_rank, asha, choice, loguniform\n"
    bad = {
        "OBJECTIVES = {'scroe': 'max'}": "OBJECTIVES['scroe']: not a metric a trial reports",
        "OBJECTIVES = {'gpu_hours': 'max'}": "lower gpu_hours is better",
        "SCHEDULER = asha(grace_steps=5)": "SCHEDULER needs interim evaluations",
        "SCHEDULER = asha(grace_steps=500)\nFIXED = {'interim_every': 10}": "grace_steps=500 should be fewer",
        "SCHEDULER = 'asha'\nFIXED = {'interim_every': 10}": "should be asha",
        "BUDGET_DOLLARS = -3": "BUDGET_DOLLARS=-3 should be a positive number",
        "DEVICE = 'TPU9'\nMFU = 0.4": "DEVICE='TPU9' is not in the table",
        "DEVICE = 'A100'": "DEVICE and MFU go together",
        "DEVICE = 'A100'\nMFU = 35": "MFU=35 should be a share",
        "SEED_POINTS = [{'lora_rank': 16}]": "SEED_POINTS[0]",
        "SEED_POINTS = [{'lora_rank': 12, 'lora_alpha': 24, 'lr': 1e-3}]": "is not one of the choice",
        "SEED_POINTS = [{'lora_rank': 16, 'lora_alpha': 32, 'lr': 1.0}]": "is outside",
        "SEED_POINTS = [{'lora_rank': 16, 'lora_alpha': 24, 'lr': 1e-3}]":
            "['lora_alpha']=24 (alpha_per_rank 1.5 = 24 / lora_rank 16",
        "SAMPLER = 'nsga2'": "SAMPLER='nsga2' is for several OBJECTIVES",
    }
    for body, culprit in bad.items():
        f = tmp_path / "bad.py"
        f.write_text(head + "SPACE = {'lora_rank': choice([8, 16]), 'lora_alpha': alpha_per_rank([2]), "
                            "'lr': loguniform(1e-4, 1e-2)}\n" + body + "\n")
        with pytest.raises(spaces.SpaceError, match=culprit.replace("[", r"\[").replace("(", r"\(")):
            spaces.load(f)


SEARCH = """
from study.space import asha, choice
NAME = "mo"
NUM_SAMPLES = 6
MAX_CONCURRENT = 1   # one at a time: the scheduler sees the trials in the seed points' order
OBJECTIVES = {"score": "max", "gpu_hours": "min"}
SCHEDULER = asha(grace_steps=8, reduction_factor=2)
FIXED = {"method": "lora", "model_size": "0.3m", "stage1_steps": 2, "stage2_steps": 16, "batch_size": 8,
         "eval_samples": 32, "interim_every": 8, "interim_samples": 32, "checkpoint_every": 0, "lora_rank": 8,
         "lora_alpha": 16}
SPACE = {"lr": choice([3e-3, 1e-2, 1e-3, 3e-4]), "max_new_tokens": choice([8, 1])}
# The same training twice; the second answers in one token, so it misses every two-word answer ("top left"):
# behind the first at step 8 whatever the scores, so ASHA (reduction factor 2) stops it there.
SEED_POINTS = [{"lr": 3e-3, "max_new_tokens": 8}, {"lr": 3e-3, "max_new_tokens": 1}]
"""


@pytest.mark.slow
def test_a_multi_objective_study_with_asha(tmp_path):
    """Pruned trials reach Optuna as PRUNED, their runs end KILLED / stopped_early with the cost they spent and stay
    off the frontier; a configuration suggested again is answered from its earlier trial, not trained again."""
    import glob
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    space = tmp_path / "mo.py"
    space.write_text(SEARCH)
    r = subprocess.run([sys.executable, "-m", "study.run", str(space)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mo").experiment_id])
    trials = sorted((run for run in runs if "mlflow.parentRunId" in run.data.tags), key=lambda t: t.info.start_time)
    stopped = [t for t in trials if "stopped_early" in t.data.tags]
    repeats = [t for t in trials if "repeat_of" in t.data.tags]
    trained = [t for t in trials if t not in repeats]
    assert len(trials) == 6
    assert [(t.data.params["lr"], t.data.params["max_new_tokens"]) for t in stopped if t not in repeats][:1] == \
        [("0.003", "1")], "the one-token trial stops at step 8"
    for t in stopped:
        assert t.info.status == "KILLED" and t.data.tags["stopped_early"] == "8" and t.data.tags["on_frontier"] == \
            "false"
    assert all(t.data.metrics["gpu_hours"] > 0 for t in stopped if t not in repeats), "a stopped trial keeps its cost"
    assert all(8 in {m.step for m in client.get_metric_history(t.info.run_id, "interim_score")} for t in stopped
               if t not in repeats), "the interim score it was stopped on is in its run"
    assert all("gpu_hours" not in t.data.metrics for t in repeats), "a repeat trains nothing and costs nothing"
    configs = [(t.data.params["lr"], t.data.params["max_new_tokens"]) for t in trained]
    assert len(set(configs)) == len(configs), "no configuration trained twice"
    assert all(client.get_run(t.data.tags["repeat_of"]).data.params == t.data.params for t in repeats)
    assert not any("failure_reason" in t.data.tags for t in trials), "a stopped or finished trial did not fail"
    assert all("forecast_gpu_hours" in t.data.metrics for t in trained)

    # Optuna was told the truth: a PRUNED trial for each stop, COMPLETE for the rest (the searcher's saved state)
    state = pickle.loads(open(sorted(glob.glob(str(tmp_path / "studies" / "tune" / "mo" / "searcher-state-*.pkl")))[-1],
                              "rb").read())
    told = [t.state for t in state["_ot_study"].trials]
    assert told.count(TrialState.PRUNED) == len(stopped) and told.count(TrialState.COMPLETE) == len(trials) - \
        len(stopped)
    assert state["spent"] == pytest.approx(sum(t.data.metrics["gpu_hours"] for t in trained))


@pytest.mark.slow
def test_a_budget_stops_launching_trials_and_the_study_says_what_it_spent(tmp_path):
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    budget = 1e-6  # less than any trial: the first one is launched (nothing is spent yet), then no other
    r = subprocess.run([sys.executable, "-m", "study.run", str(REPO / "search_spaces" / "cost.py"), "--smoke",
                        "--num-samples", "3", "--budget-gpu-hours", str(budget)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cost").experiment_id])
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    (trial,) = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    spent = trial.data.metrics["gpu_hours"]
    assert parent.info.status == "FINISHED", "a study that spent its budget is complete, not interrupted"
    assert budget < spent <= budget + spent
    assert f"Budget: spent {spent:.4g} of {budget:.4g} GPU-hours per node" in r.stdout
    assert parent.data.params["budget_gpu_hours"] == str(budget)


@pytest.mark.slow
def test_the_calibration_measures_a_diverging_first_configuration(tmp_path, monkeypatch):
    """The rate does not depend on the learning rate: a study whose first configuration diverges (lr 1e30, as in
    tests/test_failures.py) still gets its forecast (it failed with 'loss is nan at step 1' on a machine whose
    calibration cache was empty)."""
    from study import forecast
    from trainables.config import TrialConfig

    monkeypatch.setattr(forecast, "calibration_cache", lambda cfg, data, threads: tmp_path / "rate.json")
    cfg = TrialConfig(method="full", model_size="0.3m", lr=1e30, projector_lr=1e30, batch_size=4)
    rate = forecast.calibrate(cfg, DataShape(tokens=40.0, image_share=0.5), say=lambda line: None)
    found = json.loads((tmp_path / "rate.json").read_text())
    assert rate == found["flops_per_s"] and found["seconds_per_step"] > 0 and math.isfinite(rate)


SEEDED = """
from study.space import choice
NAME = "seeded"
SAMPLER = "grid"
SEEDS = 2
MAX_CONCURRENT = 1
FIXED = {"method": "lora", "model_size": "0.3m", "stage1_steps": 2, "stage2_steps": 6, "batch_size": 8,
         "eval_samples": 24, "checkpoint_every": 0, "lora_rank": 8, "lora_alpha": 16}
SPACE = {"lr": choice([3e-3, 1e-3])}
"""


@pytest.mark.slow
def test_seeds_run_every_configuration_at_each_seed_and_every_score_carries_its_interval(tmp_path):
    import glob
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from tracking.intervals import wilson

    space = tmp_path / "seeded.py"
    space.write_text(SEEDED)
    r = subprocess.run([sys.executable, "-m", "study.run", str(space)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "4 trials (2 configurations x 2 seeds)" in r.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("seeded").experiment_id])
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    trials = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert parent.data.params["seeds"] == "2"
    assert sorted((t.data.params["lr"], t.data.params["seed"]) for t in trials) == \
        [("0.001", "0"), ("0.001", "1"), ("0.003", "0"), ("0.003", "1")]
    for t in trials:
        m = t.data.metrics
        assert m["score_n"] == 24, "the score counts its questions"
        expected = wilson(round(m["score"] * 24 / 100), 24)
        assert (m["score_ci_low"], m["score_ci_high"]) == (pytest.approx(expected.low), pytest.approx(expected.high))
        assert m["score_ci_low"] < m["score_ci_high"]
    # the frontier is drawn over configurations (the mean of their seeds): every seed's run carries its tag
    tags = {lr: {t.data.tags["on_frontier"] for t in trials if t.data.params["lr"] == lr} for lr in ("0.001", "0.003")}
    assert all(len(v) == 1 for v in tags.values()) and {"true"} in tags.values(), tags
    # Optuna heard each configuration once, with the mean over its seeds
    state = pickle.loads(open(sorted(glob.glob(str(tmp_path / "studies" / "tune" / "seeded" /
                                                   "searcher-state-*.pkl")))[-1], "rb").read())
    told = state["_ot_study"].trials
    assert [t.state for t in told] == [TrialState.COMPLETE] * 2
    for t in told:
        lr = str(t.params["lr"])
        scores = [run.data.metrics["score"] for run in trials if float(run.data.params["lr"]) == float(lr)]
        assert t.value == pytest.approx(sum(scores) / 2)


def test_trial_actors_are_reused_only_without_a_scheduler(tmp_path):
    from study.space import load
    from study.study import reuse_actors

    plain = tmp_path / "plain.py"
    plain.write_text("from study.space import choice\nSPACE = {'lr': choice([1e-3, 2e-3])}\n")
    asha = tmp_path / "asha.py"
    asha.write_text("from study.space import asha, choice\nSPACE = {'lr': choice([1e-3, 2e-3])}\n"
                    "FIXED = {'interim_every': 10, 'stage2_steps': 50}\nSCHEDULER = asha(grace_steps=10)\n")
    assert reuse_actors(load(plain)) and not reuse_actors(load(asha))
