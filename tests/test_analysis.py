"""Tables, plots, the frontier CLI and log_study_frontier, on a hand-made store and hand-made frames."""

from __future__ import annotations

import io
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from analysis import plots, tables
from analysis.frontier import log_study_frontier, main
from analysis.pareto import frontier
from analysis.runs import load_trials
from test_analysis_store import (FRONTIER, FRONTIER_WITH_STOPPED, OTHER_TRIAL, STOPPED_STEP, STUDY, TRIALS,
                                 forecast_ratio, log_trial, shared_store)


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
    assert set(csv["run_id"]) == set(store.run_ids) | {store.stopped}  # this study's trials, not the other's
    on = {(r.model_size, r.lora_rank) for r in csv[csv["on_frontier"]].itertuples()}
    assert on == FRONTIER
    excluded = dict(zip(csv["run_id"], csv["excluded"].fillna("")))
    assert excluded[store.stopped] == "stopped early" and sorted(e for e in excluded.values() if e) == [
        "failed", "stopped early"]
    assert "| model_size |" in (store.root / "frontier" / "table.md").read_text()


def test_cli_writes_the_table_csv_and_png(store, tmp_path, capsys):
    assert main(["--experiment", STUDY, "--tracking-uri", store.uri, "--out", str(tmp_path), "--price", "2"]) == 0
    printed = capsys.readouterr().out
    assert "on the frontier" in printed and "1 failed" in printed
    csv = pd.read_csv(tmp_path / "frontier.csv")
    assert len(csv) == len(TRIALS) + 2 and list(csv.columns[:3]) == ["run_id", "status", "parent_run_id"]
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


# --- what a study's report shows: text_score and intervals where logged, forecast vs measured cost ---

def test_frontier_table_shows_text_score_and_a_scores_interval_only_where_logged():
    from analysis.frontier import frontier_table
    from analysis.runs import formatted

    df = synthetic().assign(text_score=70.0)
    plain = frontier_table(frontier(df))
    assert "text_score" in plain and not any(c.endswith(("_ci_low", "_ci_high")) for c in plain)
    cols = list(frontier_table(frontier(df.assign(score_ci_low=df["score"] - 4.04, score_ci_high=df["score"] + 3.96)))
                .columns)
    assert cols[cols.index("score"):cols.index("score") + 4] == ["score", "score_ci_low", "score_ci_high", "text_score"]
    shown = formatted(pd.DataFrame({"score": [41.25], "score_ci_low": [37.21], "score_ci_high": [45.33]}))
    assert shown.iloc[0].tolist() == ["41.2", "37.2", "45.3"]  # an interval reads like the score it bounds


def test_forecast_vs_measured_per_trial(store):
    trials = load_trials(store.uri, STUDY, parent_run_id=store.parent)
    table = tables.forecast_vs_measured(trials)
    finished = {rid: i for i, (rid, spec) in enumerate(zip(store.run_ids, TRIALS)) if spec[-1] == "FINISHED"}
    assert len(table) == len(finished)  # the failed and the stopped trial have no measured cost to compare
    names = load_trials(store.uri, STUDY).set_index("run_name")["run_id"]
    for row in table.itertuples():
        ratio = forecast_ratio(finished[names[row.run_name]])
        assert row.gpu_hours_ratio == pytest.approx(ratio) and row.dollars_ratio == pytest.approx(ratio)
        assert row.gpu_hours == pytest.approx(row.forecast_gpu_hours * ratio)
    report = (store.root / "frontier" / "table.md").read_text()
    assert "## Forecast vs measured cost per trial" in report and "| 1.25 |" in report
    # no forecast logged: no table, and no section in the report
    assert tables.forecast_vs_measured(synthetic()).empty
    from analysis.frontier import report_markdown
    assert "Forecast" not in report_markdown(frontier(synthetic()), "t")
    # a study that varied no factor of the table (only lr) says so, not that nothing finished
    only_lr = synthetic()
    for factor in ("model_size", "method", "image_size", "mix_ratio", "lora_rank", "lora_alpha", "alpha_per_rank"):
        if factor in only_lr:
            only_lr[factor] = only_lr[factor].iloc[0]
    text = report_markdown(frontier(only_lr), "t")
    assert "no factor of the table (model_size" in text and "no finished trials" not in text


# --- plots readable at any scale ---

def tick_values(axis) -> tuple[list[float], list[float]]:
    """(tick positions in view, what their labels say) after a draw: SI suffixes and separators undone."""
    lo, hi = sorted(axis.get_view_interval())
    scale = {"k": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
    shown, said = [], []
    for tick in axis.get_major_ticks():
        text = tick.label1.get_text() or tick.label2.get_text()
        if text and lo <= tick.get_loc() <= hi:
            shown.append(tick.get_loc())
            said.append(float(text.rstrip("kMBT").replace(",", "")) * scale.get(text[-1], 1))
    return shown, said


SMOKE_HOURS = [5.12e-5, 5.32e-5, 6.92e-5]  # a smoke study's three trials (their labels ran into each other)


@pytest.mark.parametrize("scale", ["smoke", 1.0, 1e6])  # laptop (5e-5 .. 2e-3 GPU-hours) and cluster (600+)
def test_linear_axes_say_their_values_without_a_corner_multiplier(scale):
    df = synthetic()
    narrow = df[df["model_size"] == "1m"]
    if scale == "smoke":
        narrow = narrow.iloc[:3].assign(gpu_hours=SMOKE_HOURS)
    else:
        narrow = narrow.assign(gpu_hours=narrow["gpu_hours"] * scale)
    fig = plots.frontier_plot(frontier(narrow), price=13.63)
    fig.savefig(io.BytesIO(), format="png")
    ax = fig.axes[0]
    assert ax.get_xscale() == "linear"
    renderer = fig.canvas.get_renderer()
    for axis in (ax.xaxis, ax.yaxis, ax.child_axes[0].xaxis):
        shown, said = tick_values(axis)
        assert len(shown) >= 3 and axis.get_offset_text().get_text() == ""  # matplotlib's would read "1e-3"
        assert np.allclose(said, shown, rtol=1e-9, atol=0)
        labels = [t.label1 if t.label1.get_text() else t.label2 for t in axis.get_major_ticks()]
        boxes = [lb.get_window_extent(renderer) for lb in labels if lb.get_text() and lb.get_visible()]
        assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))  # wide labels, fewer ticks


def test_trainable_params_go_log_with_readable_labels_and_a_dollars_axis_is_optional():
    df = synthetic()
    fig = plots.frontier_plot(frontier(df, x="trainable_params"))
    fig.savefig(io.BytesIO(), format="png")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.child_axes == []  # 8k to 1.5M parameters; dollars only when asked
    shown, said = tick_values(ax.xaxis)
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert any(label.endswith("k") for label in labels) and np.allclose(said, shown, rtol=1e-9)
    fig = plots.frontier_plot(frontier(df), price=13.63)
    fig.savefig(io.BytesIO(), format="png")
    ax = fig.axes[0]
    (top,) = ax.child_axes
    assert np.allclose(top.get_xlim(), np.array(ax.get_xlim()) * 13.63) and "$" in top.get_xlabel()
    assert plots.price_of(df) == pytest.approx(13.63) and plots.price_of(df.assign(dollars=df["gpu_hours"])) == 1.0
    mixed = pd.concat([df, df.assign(dollars=df["gpu_hours"] * 2)])
    assert plots.price_of(mixed) is None


def test_crowded_frontier_labels_never_overlap_and_the_left_out_are_counted():
    n = 150  # every trial on the frontier: more labels than the plot has room for
    df = pd.DataFrame({"run_id": [f"r{i}" for i in range(n)], "status": "FINISHED", "method": "lora",
                       "model_size": "1m", "lora_rank": 8, "score": 40 + np.arange(n) * 0.05,
                       "gpu_hours": 1e-3 + np.arange(n) * 1e-6})
    front = frontier(df)
    assert front.trials["on_frontier"].all()
    fig = plots.frontier_plot(front)
    fig.savefig(io.BytesIO(), format="png")
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert 0 < len(boxes) < n and not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    assert f"{n - len(boxes)} frontier labels left out" in ax.get_title()


# --- the CLI never replaces what it did not write; stopped trials on request ---

def test_cli_refuses_to_replace_files_it_did_not_write(store, tmp_path, capsys):
    argv = ["--experiment", STUDY, "--tracking-uri", store.uri, "--out", str(tmp_path)]
    (tmp_path / "table.md").write_text("my notes")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out") and "table.md" in err[0] and "--force" in err[0]
    assert (tmp_path / "table.md").read_text() == "my notes" and not (tmp_path / "frontier.csv").exists()
    assert main(argv + ["--force"]) == 0 and (tmp_path / "table.md").read_text() != "my notes"
    assert main(argv) == 0  # what it wrote itself it replaces
    (tmp_path / "frontier.csv").write_text("edited by hand")
    assert main(argv) == 2 and "frontier.csv" in capsys.readouterr().err
    assert (tmp_path / "frontier.csv").read_text() == "edited by hand"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(argv[:-1] + [str(a_file)]) == 2 and "is a file" in capsys.readouterr().err


def test_cli_default_out_is_a_folder_per_experiment(store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--experiment", STUDY, "--tracking-uri", store.uri]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frontier"]  # nothing in the working directory itself
    assert {p.name for p in (tmp_path / "frontier" / STUDY).iterdir()} >= {"frontier.csv", "frontier.png", "table.md"}
    assert f"wrote {Path('frontier') / STUDY / 'frontier.csv'}" in capsys.readouterr().out


def test_cli_includes_stopped_trials_on_request(store, tmp_path, capsys):
    argv = ["--experiment", STUDY, "--tracking-uri", store.uri, "--out", str(tmp_path)]
    assert main(argv) == 0 and "1 stopped early" in capsys.readouterr().out
    assert main(argv + ["--include-stopped", "--dollars-axis"]) == 0
    printed = capsys.readouterr().out
    csv = pd.read_csv(tmp_path / "frontier.csv")
    on = {(r.model_size, r.lora_rank) for r in csv[csv["on_frontier"]].itertuples()}
    assert on == FRONTIER_WITH_STOPPED | {OTHER_TRIAL[:2]}  # the stopped trial beats both 0.3m trials
    assert "stopped early" not in printed.splitlines()[0] and "stopped_early" in printed
    assert csv.loc[csv["stopped_early"].notna(), "stopped_early"].tolist() == [STOPPED_STEP]


# --- several seeds per configuration: means with their t interval; intervals on the frontier ---

def seeds_study() -> pd.DataFrame:
    """Two LoRA configurations at 1m (r8 at three seeds, r16 at two), one at 0.3m with one seed, a failed trial."""
    rows = []
    for size, rank, scores, texts, hours in [("1m", 8, [50.0, 52.0, 57.0], [70.0, 72.0, np.nan], [1.0, 1.2, 1.1]),
                                             ("1m", 16, [60.0, 64.0], [75.0, 77.0], [2.0, 2.2]),
                                             ("0.3m", 8, [40.0], [60.0], [0.5])]:
        for seed, (score, text, h) in enumerate(zip(scores, texts, hours)):
            rows.append({"run_id": f"{size}-{rank}-{seed}", "run_name": f"{size} r{rank} seed={seed}",
                         "status": "FINISHED", "experiment": "e", "method": "lora", "model_size": size,
                         "lora_rank": rank, "lora_alpha": 2.0 * rank, "lr": 1e-3, "seed": seed, "score": score,
                         "score_n": 300.0, "score_ci_low": score - 5.5, "score_ci_high": score + 5.4,
                         "text_score": text, "gpu_hours": h, "dollars": h * 13.63})
    rows.append({**rows[0], "run_id": "failed", "status": "FAILED", "lr": 5e-3, "score": np.nan})  # its own config
    return pd.DataFrame(rows)


def test_over_seeds_gives_each_configuration_its_mean_and_t_interval():
    from tracking.intervals import mean_interval

    configs = tables.over_seeds(seeds_study()).set_index("run_id")
    assert list(configs.index) == ["1m-8-0,1m-8-1,1m-8-2", "1m-16-0,1m-16-1", "0.3m-8-0"]  # the failed seed is out
    r8 = configs.loc["1m-8-0,1m-8-1,1m-8-2"]
    for score, values in (("score", [50, 52, 57]), ("text_score", [70, 72])):  # a seed without text_score: 2 values
        expected = mean_interval(values)
        assert (r8[score], r8[score + "_ci_low"], r8[score + "_ci_high"]) == pytest.approx(
            (expected.value, expected.low, expected.high))
    assert r8["seeds"] == 3 and r8["gpu_hours"] == pytest.approx(1.1) and r8["dollars"] == pytest.approx(1.1 * 13.63)
    assert r8["run_name"] == "1m r8" and "seed" not in configs and r8["lora_rank"] == 8
    one = configs.loc["0.3m-8-0"]  # one seed keeps its evaluation's (Wilson) interval
    assert (one["score"], one["score_ci_low"], one["score_ci_high"], one["seeds"]) == (40.0, 34.5, 45.4, 1)


def test_tables_show_mean_and_interval_when_a_study_has_several_seeds():
    from tracking.intervals import mean_interval

    df = seeds_study()
    table = tables.by_size_method(df).set_index(["model_size", "lora_rank"])
    assert list(table.columns[:8]) == ["method", "trials", "seeds", "score_best", "score_best_ci_low",
                                       "score_best_ci_high", "score_mean", "score_mean_ci_low"]
    r16 = table.loc[("1m", 16)]
    expected = mean_interval([60, 64])
    assert (r16["score_best"], r16["score_best_ci_low"], r16["score_best_ci_high"]) == pytest.approx(
        (expected.value, expected.low, expected.high))  # the best configuration's mean, not its luckiest seed
    effects = tables.factor_effects(df)
    one_m = effects[(effects["factor"] == "model_size") & (effects["level"] == "1m")].iloc[0]
    expected = mean_interval([50, 52, 57, 60, 64])  # the level's mean over its trials
    assert (one_m["trials"], one_m["seeds"], one_m["score_mean"], one_m["score_mean_ci_low"]) == pytest.approx(
        (5, 3, expected.value, expected.low))
    assert one_m["score_best"] == pytest.approx(62.0)
    # one seed: the tables as before, no interval columns
    single = df[df["seed"] == 0]
    assert not any("_ci_" in c for c in tables.by_size_method(single).columns) and "seeds" not in \
        tables.factor_effects(single)


def test_frontier_plot_draws_intervals_and_the_significantly_dominated_hollow():
    from matplotlib.collections import LineCollection, PathCollection

    df = pd.DataFrame({"run_id": list("abcd"), "status": "FINISHED", "method": "lora", "model_size": "1m",
                       "score": [30.0, 50.0, 60.0, 40.0], "score_ci_low": [20.0, 45.0, 57.0, 38.0],
                       "score_ci_high": [40.0, 55.0, 63.0, 42.0], "gpu_hours": [0.5, 1.0, 1.0, 3.0]})
    front = frontier(df)
    assert front.trials.set_index("run_id")["contender"].to_dict() == {"a": True, "b": False, "c": True, "d": False}
    fig = plots.frontier_plot(front)
    fig.savefig(io.BytesIO(), format="png")
    ax = fig.axes[0]
    (bars,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert sorted(tuple(np.round(seg[:, 1], 6)) for seg in bars.get_segments()) == sorted(
        zip(df["score_ci_low"], df["score_ci_high"]))  # one bar per point, from its interval's low to its high
    hollow = [c for c in ax.collections if isinstance(c, PathCollection) and len(c.get_offsets())
              and len(c.get_facecolor()) == 0]
    points = {tuple(p) for c in hollow if c.get_sizes()[0] < 100 for p in c.get_offsets()}
    assert points == {(1.0, 50.0), (3.0, 40.0)}  # b and d, drawn hollow
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "significantly dominated" in legend and "95% interval" in legend
    plain = plots.frontier_plot(frontier(df.drop(columns=["score_ci_low", "score_ci_high"]))).axes[0]
    assert not [c for c in plain.collections if isinstance(c, LineCollection)]
    assert "significantly dominated" not in [t.get_text() for t in plain.get_legend().get_texts()]


def test_frontier_report_of_a_seeded_study_lists_configurations_and_contenders(tmp_path):
    from analysis.frontier import write_report

    write_report(seeds_study(), tmp_path)
    csv = pd.read_csv(tmp_path / "frontier.csv")
    assert list(csv["run_id"]) == ["1m-8-0,1m-8-1,1m-8-2", "1m-16-0,1m-16-1", "0.3m-8-0", "failed"]
    assert list(csv.columns[:5]) == ["run_id", "status", "experiment", "run_name", "seeds"]
    assert csv["seeds"].tolist()[:3] == [3, 2, 1] and csv["excluded"].tolist()[-1] == "failed"
    text = (tmp_path / "table.md").read_text()
    assert "considered as 3 configurations (means over 1-3 seeds)" in text and "| contender |" in text
    assert "| 1m | lora | 8 | 3 | 3 | 53.0 |" in text  # the size table counts trials (and seeds), not configurations
