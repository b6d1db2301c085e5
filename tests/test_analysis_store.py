"""A hand-made MLflow store shaped like a study's (the other analysis tests build theirs with
`make_store`), and the checks that `load_trials` reads it back as the contract says."""
# Runs are named, tagged and logged as a study does (study.mlflow_runs): trial names by what varies, a
# trial an early-stopping scheduler stopped (KILLED, tag stopped_early), the cost forecast beside the cost.

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from study.mlflow_runs import start_study_run, trial_name
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
# Stopped by a scheduler at stage-2 step STOPPED_STEP, cheaper and better than both 0.3m trials: left out of the
# frontier by default; when stopped trials are included, it replaces them there.
STOPPED = ("0.3m", 16, 5e-3, 48.0, 1.5e-4, "KILLED")
STOPPED_STEP = 6
FRONTIER_WITH_STOPPED = {("0.3m", 16), ("1m", 16), ("3.6m", 16)}
OTHER_TRIAL = ("3.6m", 8, 1e-3, 70.0, 5e-3, "FINISHED")
HIDDEN = {"0.3m": 64, "1m": 128, "3.6m": 256}
SEARCHED = ["model_size", "lora_rank", "lora_alpha", "lr"]


def forecast_ratio(index: int) -> float:
    """Measured / forecast cost of the trial logged `index`-th (1.0, 1.25, 1.5, ...)."""
    return 1 + 0.25 * (index % 3)


def trial_config(**changes) -> dict:
    """A full trial config as the study logs it (TrialConfig's defaults; no validation needed here)."""
    values = {f.name: f.default for f in dataclasses.fields(TrialConfig)}
    return {**values, **changes}


def log_trial(client: MlflowClient, exp_id: str, parent: str, study: str, index: int, spec: tuple,
              stopped_at: int | None = None) -> str:
    size, rank, lr, score, hours, status = spec
    cfg = trial_config(method="lora", model_size=size, lora_rank=rank, lora_alpha=2.0 * rank, lr=lr)
    tags = {PARENT_TAG: parent, STUDY_TAG: study, TRIAL_TAG: f"t{index:05d}"}
    if stopped_at is not None:
        tags["stopped_early"] = str(stopped_at)
    run = client.create_run(exp_id, run_name=trial_name(cfg, SEARCHED), tags=tags)
    run_id = run.info.run_id
    # LoRA on 7 linear layers of 4 blocks, plus the projector: grows with the width and the rank.
    params = 4 * 7 * rank * 2 * HIDDEN[size] + 2 * HIDDEN[size] ** 2
    loss = [3.0 * 0.8 ** step + 0.5 for step in range(10)]
    metrics = {"gpu_hours": hours, "dollars": hours * 13.63, "stage1_gpu_hours": hours * 0.3,
               "stage2_gpu_hours": hours * 0.7, "trainable_params": params, "peak_mem_gb": 0.2 + HIDDEN[size] / 500,
               "samples_per_s": 0.02 / hours}
    if score is not None:
        metrics.update(score=score, text_score=90.0 - index)
    if status == "FINISHED":
        metrics.update(forecast_gpu_hours=hours / forecast_ratio(index),
                       forecast_dollars=hours * 13.63 / forecast_ratio(index))
    now = 1_700_000_000_000
    history = [Metric("train_loss", v, now + step, step) for step, v in enumerate(loss)]
    finals = [Metric(k, float(v), now + 100, 0) for k, v in metrics.items()]
    client.log_batch(run_id, metrics=history + finals, params=[Param(k, str(v)) for k, v in cfg.items()])
    client.set_terminated(run_id, status=status)
    return run_id


def make_store(root: Path, with_frontier: bool = True) -> SimpleNamespace:
    """A sqlite store with experiment `demo`: the study's parent run, its 7 trials and one stopped early,
    plus a second study (parent) in the same experiment whose one trial tops the experiment's frontier
    (it scores best) but must not appear in the first study's own frontier."""
    from analysis.frontier import log_study_frontier

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = ensure_experiment(client, STUDY, uri)
    parent = start_study_run(client, exp_id, STUDY, {"space_file": "search_spaces/demo.py"})
    run_ids = [log_trial(client, exp_id, parent, STUDY, i, spec) for i, spec in enumerate(TRIALS)]
    stopped = log_trial(client, exp_id, parent, STUDY, len(TRIALS), STOPPED, stopped_at=STOPPED_STEP)
    client.set_terminated(parent, "FINISHED")
    other = start_study_run(client, exp_id, STUDY, {"space_file": "search_spaces/other.py"})
    other_run = log_trial(client, exp_id, other, STUDY, 99, OTHER_TRIAL)
    client.set_terminated(other, "FINISHED")
    if with_frontier:
        log_study_frontier(uri, STUDY, parent, root / "frontier")
    return SimpleNamespace(uri=uri, root=root, experiment=STUDY, parent=parent, run_ids=run_ids, stopped=stopped,
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
    assert len(df) == len(TRIALS) + 2  # both studies' trials (the stopped one too), none of the parent runs
    assert set(df["parent_run_id"]) == {store.parent, store.other_parent}
    assert (df["study"] == STUDY).all() and (df["experiment"] == STUDY).all()
    assert df["lora_rank"].dtype.kind == "i" and df["lr"].dtype.kind == "f"
    assert df["model_size"].map(type).eq(str).all() and df["use_gpu"].map(type).eq(bool).all()
    assert df["train_loss"].round(6).eq(round(3.0 * 0.8 ** 9 + 0.5, 6)).all()  # the last step's value
    failed = df[df["status"] == "FAILED"]
    assert len(failed) == 1 and failed["score"].isna().all()
    # the trial's name, as the study named it, and the step a stopped trial reached (NaN for the others)
    names = dict(zip(df["run_id"], df["run_name"]))
    assert names[store.run_ids[0]] == "0.3m r8 a16 lr3e-3" and names[store.run_ids[2]] == "1m r16 a32 lr2e-3"
    stopped = df.set_index("run_id")["stopped_early"]
    assert stopped[store.stopped] == STOPPED_STEP and stopped.drop(store.stopped).isna().all()


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
    import time

    started = time.monotonic()  # a dead server is named at once, not after MLflow's minutes of retries
    with pytest.raises(AnalysisError, match=r"no tracking server answers at 127.0.0.1:1 "):
        load_trials("http://127.0.0.1:1", STUDY)
    assert time.monotonic() - started < 30


def test_what_is_not_an_mlflow_store_is_named_and_left_as_it_was(tmp_path):
    import http.server
    import threading

    from analysis.runs import AnalysisError, load_trials

    empty, text, folder = tmp_path / "empty.db", tmp_path / "notes.db", tmp_path / "folder.db"
    empty.touch()
    text.write_text("not a database")
    folder.mkdir()
    for path, said in ((empty, "empty"), (text, "another kind of file"), (folder, "is not a file")):
        with pytest.raises(AnalysisError, match=said):
            load_trials(f"sqlite:///{path}", STUDY)
    assert empty.stat().st_size == 0 and text.read_text() == "not a database", "reading wrote nothing"
    import sqlite3

    other = tmp_path / "app.db"  # another program's SQLite database: MLflow wrote its 200 tables into it
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    before = other.read_bytes()
    with pytest.raises(AnalysisError, match="without MLflow's tables"):
        load_trials(f"sqlite:///{other}", STUDY)
    assert other.read_bytes() == before
    # a bare path is the SQLite file it names (the default, ./mlflow.db, is written as one); a folder is refused
    with pytest.raises(AnalysisError, match="without MLflow's tables"):
        load_trials(str(other), STUDY)
    with pytest.raises(AnalysisError, match=r"is a folder \(MLflow's file store\), which this MLflow does not read"):
        load_trials(str(tmp_path), STUDY)
    assert other.read_bytes() == before and not (tmp_path / "mlruns").exists()
    # a web server that is not MLflow's answers 404 on MLflow's REST API
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(AnalysisError, match="does not answer as an MLflow tracking store"):
            load_trials(f"http://127.0.0.1:{server.server_address[1]}", STUDY)
    finally:
        server.shutdown()


# --- how the study's runs read (study.mlflow_runs): names, the study's run, the frontier's tags ---

def test_trial_names_say_what_varies_and_stay_unique():
    from trainables.config import TrialConfig

    lora = TrialConfig(model_size="1m", lora_rank=8, lora_alpha=32.0, lr=0.0035356).logged_params()
    assert trial_name(lora, SEARCHED) == "1m r8 a32 lr3.5e-3"
    # a near twin takes more digits; the same configuration again takes a number
    assert trial_name(lora, SEARCHED, {"1m r8 a32 lr3.5e-3"}) == "1m r8 a32 lr3.54e-3"
    taken = {"1m r8 a32 lr3.5e-3", "1m r8 a32 lr3.54e-3", "1m r8 a32 lr3.536e-3", "1m r8 a32 lr3.5356e-3"}
    assert trial_name(lora, SEARCHED, taken) == "1m r8 a32 lr3.5e-3 #2"
    # a method without LoRA has no rank to show; the resolution and mixing axes read as such
    full = TrialConfig(method="full", lr=1e-3).logged_params()
    assert trial_name(full, ["method", "lora_rank", "lr"]) == "full lr1e-3"
    mixed = TrialConfig(model_size="3.6m", image_size=48, mix_ratio=0.2).logged_params()
    assert trial_name(mixed, ["model_size", "image_size", "mix_ratio"]) == "3.6m 48px mix0.2"
    assert trial_name(lora, []) == "lora 1m"  # nothing searched: the method and the size


def test_the_study_run_tells_the_story_and_its_frontier_is_retagged(tmp_path):
    from analysis.frontier import log_study_frontier
    from analysis.pareto import frontier
    from analysis.runs import load_trials
    from study.mlflow_runs import finish_study_run

    store = make_store(tmp_path, with_frontier=False)
    client = MlflowClient(store.uri)
    exp_id = client.get_experiment_by_name(STUDY).experiment_id
    front = log_study_frontier(store.uri, STUDY, store.parent, tmp_path / "frontier")
    view = finish_study_run(client, exp_id, store.parent, STUDY, front)
    parent = client.get_run(store.parent)
    finished = [t for t in TRIALS if t[-1] == "FINISHED"]
    assert parent.data.metrics == pytest.approx({
        "best_score": max(t[3] for t in finished), "frontier_size": len(FRONTIER),
        "trials_finished": len(finished), "trials_failed": 1, "trials_pruned": 1,
        "total_gpu_hours": sum(t[4] for t in TRIALS + [STOPPED]),
        "total_dollars": sum(t[4] * 13.63 for t in TRIALS + [STOPPED])})
    note = parent.data.tags["mlflow.note.content"]
    names = {r.info.run_id: r.info.run_name for r in (client.get_run(i) for i in store.run_ids + [store.stopped])}
    on = {i for i, spec in zip(store.run_ids, TRIALS) if spec[:2] in FRONTIER}
    for run_id, name in names.items():
        assert client.get_run(run_id).data.tags["on_frontier"] == ("true" if run_id in on else "false")
        assert (f"[{name}](#/experiments/{exp_id}/runs/{run_id}" in note) == (run_id in on), name
    assert note.index("0.3m r8 a16 lr3e-3") < note.index("3.6m r16 a32 lr2e-3")  # cheapest first
    assert "1 failed, 1 stopped early" in note and "frontier/frontier.png" in note
    experiment = client.get_experiment(exp_id)
    assert view == f"mmscale-{store.parent}" and f"mlflow.sharedViewState.{view}" in experiment.tags

    # a resumed study ends again with another frontier (here: the stopped trial let in): tags follow it
    trials = load_trials(store.uri, STUDY, parent_run_id=store.parent)
    finish_study_run(client, exp_id, store.parent, STUDY, frontier(trials, include_stopped=True))
    tagged = {r.info.run_id for r in client.search_runs([exp_id], "tags.on_frontier = 'true'")}
    assert tagged == {store.stopped} | {i for i, spec in zip(store.run_ids, TRIALS) if spec[:2] in FRONTIER_WITH_STOPPED}
    assert client.get_run(store.parent).data.metrics["frontier_size"] == len(FRONTIER_WITH_STOPPED)


def test_finish_without_a_frontier_says_so_and_tags_nothing(tmp_path):
    from study.mlflow_runs import finish_study_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = ensure_experiment(client, "failed", uri)
    parent = start_study_run(client, exp_id, "failed", {"space.lr": "Float(low=0.0001, high=0.01, log=True)"})
    run = log_trial(client, exp_id, parent, "failed", 0, TRIALS[-1])
    finish_study_run(client, exp_id, parent, "failed", None)
    assert "No frontier" in client.get_run(parent).data.tags["mlflow.note.content"]
    assert "on_frontier" not in client.get_run(run).data.tags
    assert client.get_run(parent).data.metrics == {"trials_finished": 0, "trials_failed": 1, "trials_pruned": 0,
                                                   "total_gpu_hours": 1e-4, "total_dollars": 1e-4 * 13.63}
    described = client.get_experiment(exp_id).tags["mlflow.note.content"]
    assert "`lr`: log-uniform in [0.0001, 0.01]" in described


def test_a_long_frontier_fits_mlflows_description_limit():
    import pandas as pd

    from study.mlflow_runs import MAX_NOTE_CHARS, study_note

    n = 400
    table = pd.DataFrame({"run_name": [f"3.6m r{i} a{2 * i} lr1e-3" for i in range(n)], "score": 50.0,
                          "gpu_hours": 1e-3, "dollars": 0.01, "trainable_params": 1e6,
                          "run_id": [f"{i:032x}" for i in range(n)]})
    summary = {"trials_finished": n, "trials_failed": 0, "trials_pruned": 0, "best_score": 50.0,
               "total_gpu_hours": 0.4, "total_dollars": 5.0}
    note = study_note("big", "7", summary, table, n)
    shown = note.count("](#/experiments/7/runs/")
    assert len(note) <= MAX_NOTE_CHARS and 0 < shown < n
    assert f"({n - shown} more rows in `frontier/table.md`)" in note and note.endswith("`frontier/table.md`.")
