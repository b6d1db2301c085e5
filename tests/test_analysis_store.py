"""A hand-made MLflow store shaped like a study's (the other analysis tests build theirs with
`make_store`), and the checks that `load_trials` reads it back as the contract says."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from study.mlflow_runs import start_study_run
from tracking.store import PARENT_TAG, STUDY_TAG, TRIAL_TAG, ensure_experiment
from trainables.config import TrialConfig

STUDY = "demo"
# (model_size, lora_rank, lr, score, gpu_hours, status). The known answer for score vs gpu_hours:
# 0.3m r8, 0.3m r64, 1m r16 and 3.6m r16 are the frontier; 1m r64 and 3.6m r32 are beaten;
# the failed trial would be the cheapest but has no score and must be left out and counted.
TRIALS = [
    ("0.3m", 8, 3e-3, 41.0, 2.0e-4, "FINISHED"),
    ("0.3m", 64, 1e-3, 43.5, 2.6e-4, "FINISHED"),
    ("1m", 16, 2e-3, 55.0, 6.0e-4, "FINISHED"),
    ("1m", 64, 5e-4, 52.0, 7.5e-4, "FINISHED"),
    ("3.6m", 16, 2e-3, 63.0, 2.1e-3, "FINISHED"),
    ("3.6m", 32, 8e-3, 61.0, 2.3e-3, "FINISHED"),
    ("1m", 32, 1e-2, None, 1.0e-4, "FAILED"),
]
FRONTIER = {("0.3m", 8), ("0.3m", 64), ("1m", 16), ("3.6m", 16)}
OTHER_TRIAL = ("3.6m", 8, 1e-3, 70.0, 5e-3, "FINISHED")
HIDDEN = {"0.3m": 64, "1m": 128, "3.6m": 256}


def trial_config(**changes) -> dict:
    """A full trial config as the study logs it (TrialConfig's defaults; no validation needed here)."""
    values = {f.name: f.default for f in dataclasses.fields(TrialConfig)}
    return {**values, **changes}


def log_trial(client: MlflowClient, exp_id: str, parent: str, study: str, index: int, spec: tuple) -> str:
    size, rank, lr, score, hours, status = spec
    run = client.create_run(exp_id, run_name=f"{study}-{index:05d}",
                            tags={PARENT_TAG: parent, STUDY_TAG: study, TRIAL_TAG: f"t{index:05d}"})
    run_id = run.info.run_id
    cfg = trial_config(method="lora", model_size=size, lora_rank=rank, lora_alpha=2.0 * rank, lr=lr)
    # LoRA on 7 linear layers of 4 blocks, plus the projector: grows with the width and the rank.
    params = 4 * 7 * rank * 2 * HIDDEN[size] + 2 * HIDDEN[size] ** 2
    loss = [3.0 * 0.8 ** step + 0.5 for step in range(10)]
    metrics = {"gpu_hours": hours, "dollars": hours * 13.63, "stage1_gpu_hours": hours * 0.3,
               "stage2_gpu_hours": hours * 0.7, "trainable_params": params, "peak_mem_gb": 0.2 + HIDDEN[size] / 500,
               "samples_per_s": 0.02 / hours}
    if score is not None:
        metrics["score"] = score
    now = 1_700_000_000_000
    history = [Metric("train_loss", v, now + step, step) for step, v in enumerate(loss)]
    finals = [Metric(k, float(v), now + 100, 0) for k, v in metrics.items()]
    client.log_batch(run_id, metrics=history + finals, params=[Param(k, str(v)) for k, v in cfg.items()])
    client.set_terminated(run_id, status=status)
    return run_id


def make_store(root: Path, with_frontier: bool = True) -> SimpleNamespace:
    """A sqlite store with experiment `demo`: the study's parent run and its 7 trials, plus a second
    study (parent) in the same experiment whose one trial tops the experiment's frontier (it
    scores best) but must not appear in the first study's own frontier."""
    from analysis.frontier import log_study_frontier

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = ensure_experiment(client, STUDY, uri)
    parent = start_study_run(client, exp_id, STUDY, {"space_file": "search_spaces/demo.py"})
    run_ids = [log_trial(client, exp_id, parent, STUDY, i, spec) for i, spec in enumerate(TRIALS)]
    client.set_terminated(parent, "FINISHED")
    other = start_study_run(client, exp_id, STUDY, {"space_file": "search_spaces/other.py"})
    other_run = log_trial(client, exp_id, other, STUDY, 99, OTHER_TRIAL)
    client.set_terminated(other, "FINISHED")
    if with_frontier:
        log_study_frontier(uri, STUDY, parent, root / "frontier")
    return SimpleNamespace(uri=uri, root=root, experiment=STUDY, parent=parent, run_ids=run_ids,
                           other_parent=other, other_run=other_run)


_SHARED: dict[str, SimpleNamespace] = {}


def shared_store(tmp_path_factory) -> SimpleNamespace:
    """One store for the whole test session: each costs seconds (MLflow migrates a new database).
    Tests only add to it (new experiments), so they can share it."""
    if "store" not in _SHARED:
        _SHARED["store"] = make_store(tmp_path_factory.mktemp("store"))
    return _SHARED["store"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return shared_store(tmp_path_factory)


def test_load_trials_restores_types_and_leaves_out_the_parents(store):
    from analysis.runs import load_trials

    df = load_trials(store.uri, STUDY)
    assert len(df) == len(TRIALS) + 1  # both studies' trials, none of the parent runs
    assert set(df["parent_run_id"]) == {store.parent, store.other_parent}
    assert (df["study"] == STUDY).all() and (df["experiment"] == STUDY).all()
    assert df["lora_rank"].dtype.kind == "i" and df["lr"].dtype.kind == "f"
    assert df["model_size"].map(type).eq(str).all() and df["use_gpu"].map(type).eq(bool).all()
    assert df["train_loss"].round(6).eq(round(3.0 * 0.8 ** 9 + 0.5, 6)).all()  # the last step's value
    failed = df[df["status"] == "FAILED"]
    assert len(failed) == 1 and failed["score"].isna().all()


def test_load_trials_of_one_parent(store):
    from analysis.runs import load_trials

    df = load_trials(store.uri, STUDY, parent_run_id=store.other_parent)
    assert list(df["run_id"]) == [store.other_run]


def test_unknown_experiment_and_missing_store_are_named(store, tmp_path):
    from analysis.runs import AnalysisError, load_trials

    with pytest.raises(AnalysisError, match="'nope'"):
        load_trials(store.uri, "nope")
    missing = tmp_path / "absent.db"
    with pytest.raises(AnalysisError, match="absent.db"):
        load_trials(f"sqlite:///{missing}", STUDY)
    assert not missing.exists()  # reading never creates a store
