"""Tables, plots, the frontier CLI and log_study_frontier, on a hand-made store and hand-made frames."""

from __future__ import annotations

import io
import itertools
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from analysis import plots, tables
from analysis.frontier import log_study_frontier, main
from analysis.pareto import frontier
from analysis.runs import load_trials
from test_analysis_store import FRONTIER, OTHER_TRIAL, STUDY, TRIALS, log_trial, shared_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return shared_store(tmp_path_factory)


def synthetic(n_per_cell: int = 1, seed: int = 0) -> pd.DataFrame:
    """A 36-trial LoRA study: 3 sizes x 4 ranks x 3 learning rates, cost growing with size and rank."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, (size, rank, lr) in enumerate(itertools.product(["0.3m", "1m", "3.6m"], [8, 16, 32, 64],
                                                            [3e-4, 1e-3, 3e-3])):
        scale = {"0.3m": 1, "1m": 4, "3.6m": 15}[size]
        hours = 1e-4 * scale * (1 + rank / 16) * rng.uniform(0.9, 1.1)
        score = 30 + 12 * np.log10(scale) + 4 * np.log10(lr / 3e-4) + rng.normal(0, 2)
        rows.append({"run_id": f"r{i}", "status": "FINISHED", "method": "lora", "model_size": size,
                     "lora_rank": rank, "lora_alpha": 2.0 * rank, "lr": lr, "score": score, "gpu_hours": hours,
                     "dollars": hours * 13.63, "trainable_params": 1000 * rank * scale, "image_size": 32,
                     "stage1_gpu_hours": hours * 0.3, "stage2_gpu_hours": hours * 0.7})
    return pd.DataFrame(rows)


def test_by_size_method_like_table_4(store):
    df = load_trials(store.uri, STUDY, parent_run_id=store.parent)
    table = tables.by_size_method(df)
    finished = [t for t in TRIALS if t[-1] == "FINISHED"]
    assert list(zip(table["model_size"], table["lora_rank"])) == sorted(
        {(t[0], t[1]) for t in finished}, key=lambda k: (tables.size_key(k[0]), k[1]))
    assert table["trials"].sum() == len(finished)  # the failed trial does not count
    row = table[(table["model_size"] == "3.6m") & (table["lora_rank"] == 16)].iloc[0]
    assert row["score_best"] == 63.0 and row["gpu_hours"] == pytest.approx(2.1e-3)
    assert {"dollars", "trainable_params", "peak_mem_gb"} <= set(table.columns)


def test_rank_is_blank_for_methods_without_one():
    df = pd.DataFrame([
        {"status": "FINISHED", "method": "full", "model_size": "1m", "lora_rank": 16, "score": 60.0, "gpu_hours": 2.0},
        {"status": "FINISHED", "method": "full", "model_size": "1m", "lora_rank": 64, "score": 58.0, "gpu_hours": 2.2},
        {"status": "FINISHED", "method": "lora", "model_size": "1m", "lora_rank": 64, "score": 57.0, "gpu_hours": 1.0},
    ])
    table = tables.by_size_method(df)
    full = table[table["method"] == "full"]
    assert len(full) == 1 and full["trials"].item() == 2 and pd.isna(full["lora_rank"].item())
    md = tables.to_markdown(table)
    assert md.splitlines()[1].startswith("|---") and "| 1m | full | - | 2 |" in md


def test_factor_effects_like_table_3():
    effects = tables.factor_effects(synthetic())
    # image_size never varied, and every trial has alpha = 2 x rank: neither has an effect to show
    assert set(effects["factor"]) == {"model_size", "lora_rank", "lora_alpha"}
    assert list(effects.loc[effects["factor"] == "lora_alpha", "level"]) == ["16", "32", "64", "128"]
    sizes = effects[effects["factor"] == "model_size"]
    assert list(sizes["level"]) == ["0.3m", "1m", "3.6m"] and (sizes["trials"] == 12).all()
    assert sizes["score_mean"].is_monotonic_increasing  # the synthetic study's larger models score higher
    text = tables.to_text(effects)
    assert "score_mean" in text and "3.6m" in text and "nan" not in text


def test_frontier_plot_labels_do_not_overlap_and_cost_axis_goes_log():
    df = synthetic()
    front = frontier(df)
    fig = plots.frontier_plot(front)
    fig.savefig(io.BytesIO(), format="png")
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) == int(front.trials["on_frontier"].sum()) >= 3  # only frontier points are labelled
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    inside = ax.get_window_extent(renderer)
    assert all(inside.x0 <= b.x0 and b.x1 <= inside.x1 for b in boxes)
    assert ax.get_xscale() == "log"  # 1.4e-4 .. 8e-3 spans more than 1.5 decades
    assert "GPU-hours" in ax.get_xlabel() and "score" in ax.get_ylabel()
    assert any(t.get_text().startswith("lora ") and " r" in t.get_text() for t in ax.texts)
    assert ax.get_legend() is not None
    narrow = df[df["model_size"] == "1m"]
    assert plots.frontier_plot(frontier(narrow)).axes[0].get_xscale() == "linear"


def test_the_other_plots_draw():
    df = synthetic()
    for fig, xlabel in [(plots.rank_plot(df), "LoRA rank"), (plots.lr_plot(df), "learning rate"),
                        (plots.stage_cost_plot(df), "model_size")]:
        fig.savefig(io.BytesIO(), format="png")
        assert xlabel in fig.axes[0].get_xlabel() and fig.axes[0].get_legend() is not None
    assert plots.lr_plot(df).axes[0].get_xscale() == "log"
    bars = plots.stage_cost_plot(df).axes[0].patches
    assert len(bars) == 2 * 3  # stage 1 and stage 2 for each model size (one method)


def test_log_study_frontier_logs_the_parents_artifacts(store):
    client = MlflowClient(store.uri)
    listed = {a.path for a in client.list_artifacts(store.parent, "frontier")}
    assert listed == {"frontier/frontier.png", "frontier/frontier.csv", "frontier/table.md"}
    csv = pd.read_csv(store.root / "frontier" / "frontier.csv")
    assert set(csv["run_id"]) == set(store.run_ids)  # this study's trials only, not the other study's
    on = {(r.model_size, r.lora_rank) for r in csv[csv["on_frontier"]].itertuples()}
    assert on == FRONTIER
    assert (csv["excluded"].fillna("") != "").sum() == 1 and "failed" in set(csv["excluded"])
    assert "| model_size |" in (store.root / "frontier" / "table.md").read_text()


def test_cli_writes_the_table_csv_and_png(store, tmp_path, capsys):
    assert main(["--experiment", STUDY, "--tracking-uri", store.uri, "--out", str(tmp_path), "--price", "2"]) == 0
    printed = capsys.readouterr().out
    assert "on the frontier" in printed and "1 failed" in printed
    csv = pd.read_csv(tmp_path / "frontier.csv")
    assert len(csv) == len(TRIALS) + 1 and list(csv.columns[:3]) == ["run_id", "status", "parent_run_id"]
    assert {"on_frontier", "lr", "lora_rank", "score", "gpu_hours", "train_loss"} <= set(csv.columns)
    on = {(r.model_size, r.lora_rank) for r in csv[csv["on_frontier"]].itertuples()}
    assert on == FRONTIER | {OTHER_TRIAL[:2]}  # the whole experiment: both studies
    assert np.allclose(csv["dollars"], csv["gpu_hours"] * 2) and (csv["price_per_node_hour"] == 2).all()
    assert (tmp_path / "frontier.png").stat().st_size > 10_000


def test_cli_other_cost_axis(store, tmp_path):
    assert main(["--experiment", STUDY, "--tracking-uri", store.uri, "--out", str(tmp_path),
                 "--x", "trainable_params"]) == 0
    assert pd.read_csv(tmp_path / "frontier.csv")["on_frontier"].any()


@pytest.mark.parametrize("argv, culprit", [
    (["--experiment", "nope"], "'nope'"),
    (["--experiment", STUDY, "--x", "walltime"], "'walltime'"),
    (["--experiment", STUDY, "--price", "-1"], "--price"),
    (["--experiment", STUDY, "--bogus"], "--bogus"),
    (["--experiment", "all_failed"], "no finished trials"),
])
def test_cli_bad_input_is_one_error_line(store, tmp_path, capsys, argv, culprit):
    if argv[1] == "all_failed":
        client = MlflowClient(store.uri)
        exp = client.get_experiment_by_name("all_failed")
        exp_id = exp.experiment_id if exp else client.create_experiment("all_failed")
        parent = client.create_run(exp_id).info.run_id
        log_trial(client, exp_id, parent, "all_failed", 0, TRIALS[-1])
    rc = main(argv + ["--tracking-uri", store.uri, "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and culprit in err[0]
    assert not (tmp_path / "frontier.csv").exists()


def test_cli_as_a_process(store, tmp_path):
    done = subprocess.run([sys.executable, "-m", "analysis.frontier", "--experiment", "nope",
                           "--tracking-uri", store.uri, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: no MLflow experiment named 'nope'")
