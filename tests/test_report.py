"""analysis.report on hand-made trials whose effects are known: each number is the paired t interval of the
scores written here where every trial has its twin at the same seed (else Welch's), each verdict the one the scores
call for; and the CLI on a small store, refusals included."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from analysis import report
from tracking.intervals import difference, paired_difference

# The paper's LoRA recipe at 1m (alpha = 2 x rank, the highest lora lr); every other group differs in one factor.
BASE = dict(status="FINISHED", method="lora", model_size="1m", lora_rank=8, lora_alpha=16.0, lr=2e-4, image_size=32,
            mix_ratio=0.0, trainable_params=1000.0, gpu_hours=1.0)
LORA, LORA_TEXT = [50, 51, 52], [30, 31, 32]
SMALL = [40, 41, 42]            # 0.3m: 10 points lower, tight -> (1) holds
HIGH_RES = [50, 54, 50]         # 48 px: +0.3 on average, wide -> (2) not resolved
FULL = [60, 61, 62]             # full fine-tuning 10 points above LoRA -> (3) does not hold
LOW_LR = [45, 46, 47]           # lr 10x lower: 5 points lower -> (4) holds
MIXED, MIXED_TEXT = [50, 51, 52], [40, 41, 42]  # mix 0.2: text_score +10, score unchanged -> (6) holds
MMA = [50, 51, 52]              # mma level with LoRA at 1/20 of its parameters -> (7) holds
NO_TWIN = [90, 91, 92]          # lora 1m at lr 1e-4: no 0.3m twin, so (1) leaves it out


def group(scores, text=None, **changes) -> list[dict]:
    """One configuration (BASE with `changes`) at seeds 0, 1, 2, ... with these scores."""
    rows = []
    for seed, score in enumerate(scores):
        row = {**BASE, **changes, "seed": seed, "score": float(score)}
        if text is not None:
            row["text_score"] = float(text[seed])
        rows.append(row)
    return rows


NOT_LORA = dict(lora_rank=None, lora_alpha=None)


def study(*extra) -> pd.DataFrame:
    rows = (group(LORA, LORA_TEXT) + group(SMALL, model_size="0.3m", gpu_hours=0.5) + group(HIGH_RES, image_size=48)
            + group(FULL, method="full", lr=1e-5, trainable_params=1e5, **NOT_LORA) + group(LOW_LR, lr=2e-5)
            + group(MIXED, MIXED_TEXT, mix_ratio=0.2) + group(NO_TWIN, lr=1e-4)
            + group(MMA, method="mma", lr=1e-3, trainable_params=50.0, **NOT_LORA) + [r for g in extra for r in g])
    df = pd.DataFrame(rows)
    df["run_id"] = [f"r{i}" for i in range(len(df))]
    df["experiment"] = "hand"
    return df


def by_number(effects: pd.DataFrame) -> dict[int, pd.Series]:
    return {int(r["direction"]): r for _, r in effects.iterrows()}


def assert_effect(row, a, b, paired=False):
    expected = paired_difference(a, b) if paired else difference(a, b)
    assert (row["effect"], row["effect_ci_low"], row["effect_ci_high"]) == pytest.approx(
        (expected.value, expected.low, expected.high))
    assert (row["n_a"], row["n_b"]) == (len(a), len(b))


def test_each_direction_is_the_paired_interval_of_the_matched_twins_with_its_verdict():
    d = by_number(report.assess(study()))
    assert_effect(d[1], LORA, SMALL)  # NO_TWIN (1m, no 0.3m at its lr) is left out: matched on every other param
    assert_effect(d[2], HIGH_RES, LORA, paired=True)  # twins at one seed whose differences vary are paired
    assert_effect(d[3], LORA, FULL)  # every seed's difference alike: no spread to pair, Welch's over the trials
    assert_effect(d[4], LOW_LR, LORA)
    assert_effect(d[6], MIXED_TEXT, LORA_TEXT)
    assert_effect(d[7], MMA, LORA)
    assert {n: r["verdict"] for n, r in d.items()} == {
        1: "holds", 2: "not resolved", 3: "does not hold", 4: "holds", 5: "not measured", 6: "holds", 7: "holds"}
    assert {n: r["matched_on"] for n, r in d.items() if n != 5} == {  # "paired by seed" only where it was
        **{n: "every other param" for n in (1, 3, 4, 6, 7)}, 2: "every other param, paired by seed (3 seeds)"}
    assert pd.isna(d[5]["effect"]) and d[5]["note"] == "qlora: 0 trials (needs 2)"
    assert d[6]["note"] == f"score: {paired_difference(MIXED, LORA)}"  # the multimodal score beside the text skill
    assert d[7]["note"] == "trainable params mma / lora: 1m 0.05 (needs < 0.1 at each size)"
    assert d[3]["compared"] == "lora r8 a16 lr0.0002 - full" and d[1]["compared"] == "lora 1m - lora 0.3m"
    assert d[7]["compared"] == "mma - lora r8 a=2r"


def test_matching_falls_back_to_the_same_model_sizes():
    # full fine-tuning was run at another image size (an unmatched recipe): LoRA vs full compares model sizes only
    df = study()
    df.loc[df["method"] == "full", "image_size"] = 40
    row = by_number(report.assess(df))[3]
    # three lora trials at each (size, seed): no twins, Welch's over the seeds' means (they share the seed's data)
    assert row["matched_on"] == "model_size, over seeds' means"
    lora_by_seed = [(x + y + z) / 3 for x, y, z in zip(LORA, HIGH_RES, MIXED)]  # the paper's LoRA at 1m, any size
    expected = difference(lora_by_seed, FULL)
    assert (row["effect"], row["effect_ci_low"], row["effect_ci_high"]) == pytest.approx(
        (expected.value, expected.low, expected.high))
    assert (row["n_a"], row["n_b"]) == (9, 3)
    per_trial = difference(LORA + HIGH_RES + MIXED, FULL)  # what counting each trial as independent would give
    assert per_trial.high - per_trial.low < expected.high - expected.low


@pytest.mark.parametrize("qlora, verdict", [
    ([50.8, 51.0, 51.2], "holds"),              # the interval lies within [-1, 1]
    ([48.0, 51.0, 54.0], "not resolved"),       # mean 0, but the interval reaches past +-1
    ([47.0, 47.1, 47.2], "does not hold"),      # 3.9 points below
])
def test_qlora_within_one_point(qlora, verdict):
    lora = [50.9, 51.0, 51.1]
    df = pd.DataFrame(group(lora) + group(qlora, method="qlora")).assign(experiment="hand")
    d = by_number(report.assess(df))
    assert_effect(d[5], qlora, lora, paired=True)
    assert d[5]["verdict"] == verdict
    # nothing else was run: every other direction says what is missing
    assert d[3]["note"] == "full: 0 trials (needs 2)" and d[1]["note"] == "lora trials at 1 model_size level (1m)"
    assert d[6]["verdict"] == "not measured" and "text_score" in d[6]["note"]


def test_a_bound_counts_as_the_paper_words_it():
    # no spread: the interval is the point. "Higher" excludes a tie; "within 2 points" includes exactly 2 below.
    df = pd.DataFrame(group([50, 50]) + group([50, 50], model_size="0.3m")
                      + group([52, 52], method="full", lr=1e-5, **NOT_LORA)).assign(experiment="hand")
    d = by_number(report.assess(df))
    assert (d[1]["effect"], d[1]["effect_ci_low"], d[1]["verdict"]) == (0, 0, "does not hold")
    assert (d[3]["effect"], d[3]["effect_ci_high"], d[3]["verdict"]) == (-2, -2, "holds")


def test_mma_meets_the_papers_lora_at_the_rank_it_has_a_twin_at():
    # a larger rank run only at another resolution is no like-for-like for MMA, whose twin is rank 8
    mma = [49, 52, 51]
    df = pd.DataFrame(group(LORA) + group([70, 71, 72], lora_rank=32, lora_alpha=64.0, image_size=48)
                      + group(mma, method="mma", lr=1e-3, trainable_params=50.0, **NOT_LORA)).assign(experiment="hand")
    row = by_number(report.assess(df))[7]
    assert row["compared"] == "mma - lora r8 a=2r" and row["matched_on"] == "every other param, paired by seed (3 seeds)"
    assert_effect(row, mma, LORA, paired=True)


def test_mma_without_stage1_twins_the_lora_trials_and_needs_a_tenth_of_the_parameters_at_every_size():
    """MMA logs stage1_steps 0 (LaVIN has no stage 1): it still twins LoRA on every other param, not only on model
    size (which would pool LoRA runs of other ranks and mixes). Its parameter share holds at 1m (0.05) but not at
    0.3m (0.2): the direction does not hold."""
    lora_small, mma_small, mma_1m = [40, 42, 41], [41, 42, 41], [49, 52, 51]
    df = pd.DataFrame(group(LORA, stage1_steps=150) + group(lora_small, model_size="0.3m", stage1_steps=150,
                                                            trainable_params=500.0)
                      + group([70, 71, 72], lora_rank=32, lora_alpha=64.0, mix_ratio=0.2, stage1_steps=150)
                      + group(mma_1m, method="mma", lr=1e-3, trainable_params=50.0, stage1_steps=0, **NOT_LORA)
                      + group(mma_small, method="mma", lr=1e-3, model_size="0.3m", trainable_params=100.0,
                              stage1_steps=0, **NOT_LORA)).assign(experiment="hand")
    row = by_number(report.assess(df))[7]
    assert row["compared"] == "mma - lora r8 a=2r" and row["matched_on"] == "every other param, paired by seed (3 seeds)"
    per_seed = paired_difference([(x + y) / 2 for x, y in zip(mma_1m, mma_small)],
                                 [(x + y) / 2 for x, y in zip(LORA, lora_small)])
    assert (row["effect"], row["effect_ci_low"], row["effect_ci_high"]) == pytest.approx(
        (per_seed.value, per_seed.low, per_seed.high))
    assert row["note"] == "trainable params mma / lora: 0.3m 0.2, 1m 0.05 (needs < 0.1 at each size)"
    assert row["verdict"] == "does not hold"


def test_mma_with_a_fifth_of_the_parameters_does_not_hold_however_close_its_score():
    df = study()
    df.loc[df["method"] == "mma", "trainable_params"] = 200.0
    row = by_number(report.assess(df))[7]
    assert_effect(row, MMA, LORA)  # the score alone would hold
    assert row["verdict"] == "does not hold" and "1m 0.2 (needs < 0.1 at each size)" in row["note"]


def test_a_low_alpha_counts_like_a_low_lr_and_one_trial_is_not_enough():
    low_alpha = [44, 45, 46]
    d = by_number(report.assess(study(group(low_alpha, lora_alpha=2.0))))  # alpha = rank / 4
    # both low configurations twin LoRA at each seed (lr and alpha are the factor): one cell per seed, their mean;
    # every seed's difference is -5.5, so Welch's over the seeds' means
    expected = difference([(x + y) / 2 for x, y in zip(LOW_LR, low_alpha)], LORA)
    assert (d[4]["effect"], d[4]["effect_ci_low"], d[4]["effect_ci_high"]) == pytest.approx(
        (expected.value, expected.low, expected.high))
    assert expected.value == pytest.approx(-5.5) and d[4]["verdict"] == "holds"
    one_full = study()
    one_full = one_full.drop(one_full.index[(one_full["method"] == "full")][1:])
    assert by_number(report.assess(one_full))[3]["note"] == "full: 1 trial (needs 2)"


# --- the command line ---

PARAMS = ["method", "model_size", "lora_rank", "lora_alpha", "lr", "image_size", "mix_ratio", "seed"]
METRICS = ["score", "text_score", "trainable_params", "gpu_hours"]


def write_store(root, experiments: dict[str, pd.DataFrame], smoke: frozenset = frozenset()) -> str:
    """A sqlite store with one study run per experiment and its trials nested under it, as a study logs them
    (the study run's `smoke` param True for the experiments in `smoke`, as study.plan logs a `--smoke` study)."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    for name, trials in experiments.items():
        exp_id = client.create_experiment(name)
        parent = client.create_run(exp_id).info.run_id
        client.log_param(parent, "smoke", name in smoke)
        for row in trials.to_dict("records"):
            run_id = client.create_run(exp_id, tags={MLFLOW_PARENT_RUN_ID: parent}).info.run_id
            for k in PARAMS:
                if pd.notna(row.get(k)):
                    client.log_param(run_id, k, row[k])
            for k in METRICS:
                if pd.notna(row.get(k)):
                    client.log_metric(run_id, k, float(row[k]))
            client.set_terminated(run_id, row["status"])
        client.set_terminated(parent, "FINISHED")
    return uri


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    df = study()
    table4 = df["method"].isin(["full", "mma"]) | (df["model_size"] == "0.3m")
    return write_store(root, {"table4": df[table4], "table3": df[~table4], "empty": df.iloc[0:0]})


def test_cli_writes_the_report_from_both_experiments(store, tmp_path, capsys):
    argv = ["--experiment", "table4", "--experiment", "table3", "--tracking-uri", store, "--out", str(tmp_path)]
    assert report.main(argv) == 0
    printed = capsys.readouterr().out
    assert "does not hold" in printed and "not resolved" in printed and "+10.0" in printed
    text = (tmp_path / "REPORT.md").read_text()
    assert f"`python -m analysis.report --experiment table4 --experiment table3 --tracking-uri {store}" in text
    assert "| table4 | 9 | 9 | 3 | 3 | 3 |" in text and "| table3 | 15 | 15 | 5 | 3 | 3 |" in text
    expected = difference(LORA, FULL)  # the directions pool both experiments: LoRA in table3, full in table4
    assert f"| {expected.value:+.1f} | {expected.low:+.1f} | {expected.high:+.1f} | >= -2 | does not hold |" in text
    assert "(report-directions.png)" in text and "(report-frontier-table4.png)" in text and "Smoke" not in text
    for png in ("report-directions.png", "report-frontier-table4.png", "report-frontier-table3.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    assert report.main(argv) == 0  # what it wrote itself it replaces
    notes = tmp_path.parent / f"{tmp_path.name}-notes.md"
    notes.write_text("Direction 2 was tried at three shape sizes.\n")
    assert report.main(argv + ["--notes", str(notes)]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    assert "## Notes\n\nDirection 2 was tried at three shape sizes.\n" in text and f"--notes {notes}`" in text
    assert text.index("## Notes") < text.index("## Sources")


def test_a_smoke_study_is_marked_as_a_check_not_a_result(tmp_path):
    df = study()
    table4 = df["method"].isin(["full", "mma"]) | (df["model_size"] == "0.3m")
    uri = write_store(tmp_path, {"table4": df[table4], "table3_smoke": df[~table4]}, smoke=frozenset({"table3_smoke"}))
    out = tmp_path / "report"
    assert report.main(["--experiment", "table4", "--experiment", "table3_smoke", "--tracking-uri", uri,
                        "--out", str(out)]) == 0
    text = (out / "REPORT.md").read_text()
    assert "**Smoke checks: table3_smoke** ran with `--smoke`" in text
    assert "| table4 | 9 | 9 | 3 | 3 | 3 |  |" in text and "| table3_smoke | 15 | 15 | 5 | 3 | 3 | yes |" in text


@pytest.mark.parametrize("argv, culprit", [
    (["--experiment", "nope"], "'nope'"),
    (["--experiment", "empty"], "no finished trials with a score in 'empty'"),
    (["--experiment", "table3", "--bogus"], "--bogus"),
    (["--experiment", "table3", "--notes", "no-such-notes.md"], "--notes no-such-notes.md: no such file"),
    (["--experiment", "table3", "--notes", "tests"], "--notes tests: is a directory"),
    ([], "--experiment"),
])
def test_cli_bad_input_is_one_error_line(store, tmp_path, capsys, argv, culprit):
    rc = report.main(argv + ["--tracking-uri", store, "--out", str(tmp_path / "docs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and culprit in err[0]
    assert not (tmp_path / "docs").exists()


def test_cli_never_replaces_a_report_it_did_not_write(store, tmp_path, capsys):
    argv = ["--experiment", "table3", "--tracking-uri", store, "--out", str(tmp_path)]
    (tmp_path / "REPORT.md").write_text("my notes")
    assert report.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out") and "REPORT.md" in err and "analysis.report" in err and "--force" in err
    assert (tmp_path / "REPORT.md").read_text() == "my notes" and not (tmp_path / "report-directions.png").exists()
    assert report.main(argv + ["--force"]) == 0 and (tmp_path / "REPORT.md").read_text() != "my notes"


def test_seeds_that_tie_do_not_make_a_certain_effect():
    """Every seed of QLoRA and of LoRA scoring the same is no proof of a tie: the questions' noise remains
    (Newcombe's interval over their score_n questions), so 'within 1 point' is not resolved, not held."""
    tie = dict(lora_rank=64, lora_alpha=128.0, lr=3e-3, score_n=300)
    rows = group([60, 60, 60], **tie) + group([60, 60, 60], method="qlora", **tie)
    df = pd.DataFrame(rows).assign(run_id=lambda d: [f"t{i}" for i in range(len(d))], experiment="tie")
    qlora = by_number(report.assess(df))[5]
    expected = difference([60.0] * 3, [60.0] * 3, questions=(300, 300))
    assert (qlora["effect_ci_low"], qlora["effect_ci_high"]) == pytest.approx((expected.low, expected.high))
    assert qlora["effect_ci_low"] < -7 and qlora["verdict"] == report.NOT_RESOLVED


def test_cli_goes_back_to_a_folder_it_wrote_with_other_experiments(store, tmp_path, capsys):
    """Each run's record kept what the earlier ones wrote: a report over table4 alone, then table3, then
    table4 again, all into one folder (the third was refused: its plot 'was not written by analysis.report')."""
    for experiments in (["table4"], ["table3"], ["table4"]):
        argv = [a for e in experiments for a in ("--experiment", e)] + ["--tracking-uri", store, "--out",
                                                                       str(tmp_path)]
        assert report.main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "report-frontier-table3.png").is_file() and (tmp_path / "report-frontier-table4.png").is_file()


def test_cli_refuses_an_out_folder_under_a_file(store, tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    argv = ["--experiment", "table3", "--tracking-uri", store, "--out", str(tmp_path / "afile" / "sub")]
    assert report.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "afile is a file" in err[0]


def test_the_readme_quotes_the_committed_report():
    """README's "Findings" table carries docs/REPORT.md's effects, intervals and verdicts as the report wrote them."""
    from pathlib import Path

    repo = Path(__file__).parent.parent
    lines = (repo / "docs" / "REPORT.md").read_text().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| direction | finding |"))
    columns = [c.strip() for c in lines[head].strip("|").split("|")]
    readme = (repo / "README.md").read_text()
    findings = readme[readme.index("## Findings"):readme.index("## Figures")]
    rows = [dict(zip(columns, (c.strip() for c in line.strip("|").split("|")))) for line in lines[head + 2:head + 9]]
    assert [r["direction"] for r in rows] == [str(n) for n in range(1, 8)]
    for r in rows:
        quoted = f"{r['effect']} [{r['effect_ci_low']}, {r['effect_ci_high']}]"
        line = next(x for x in findings.splitlines() if x.startswith(f"| {r['direction']}. "))
        assert quoted in line and line.rstrip(" |").endswith(r["verdict"]), (quoted, r["verdict"], line)


def test_an_estimate_against_the_claim_with_an_interval_that_reaches_it_is_not_resolved():
    from tracking.intervals import Interval

    larger = report.DIRECTIONS[0]  # "> 0"
    assert report.verdict(larger, Interval(-9.4, -92.3, 73.6, 2)) == report.NOT_RESOLVED  # a smoke study's noise
    assert report.verdict(larger, Interval(-4.3, -7.9, -0.7, 12)) == report.DOES_NOT_HOLD
    assert report.verdict(larger, Interval(-1.0, -2.0, 0.0, 12)) == report.DOES_NOT_HOLD  # 0 itself is not "> 0"
    assert report.verdict(larger, Interval(2.6, 0.1, 5.6, 12)) == report.HOLDS


def test_twins_at_one_seed_are_paired_and_a_trial_without_its_twin_is_left_out():
    """The seed moves QLoRA and LoRA alike (a good and a bad seed): Welch's interval over the groups takes that
    spread as noise and cannot tell them apart within a point; the pairs' differences (0.1, 0.3, 0.2) can.
    Without seed 2's LoRA trial, seed 2's QLoRA trial has no twin and is left out: paired over seeds 0 and 1
    (1 degree of freedom), never Welch's over the trials as if the seeds' spread were noise. With one seed
    left, nothing pairs: Welch's over the trials."""
    lora, qlora = [45.0, 55.0, 50.0], [45.1, 55.3, 50.2]
    df = pd.DataFrame(group(lora) + group(qlora, method="qlora")).assign(experiment="hand")
    row = by_number(report.assess(df))[5]
    assert_effect(row, qlora, lora, paired=True)
    assert row["matched_on"] == "every other param, paired by seed (3 seeds)" and row["verdict"] == "holds"
    assert paired_difference(qlora, lora).value == pytest.approx(0.2)
    assert difference(qlora, lora).low < -1 and row["effect_ci_low"] > -1  # Welch's: not resolved
    lone = df.drop(df.index[(df["method"] == "lora") & (df["seed"] == 2)])
    row = by_number(report.assess(lone))[5]
    two = paired_difference(qlora[:2], lora[:2])
    assert (row["effect"], row["effect_ci_low"], row["effect_ci_high"]) == pytest.approx((two.value, two.low, two.high))
    assert (row["n_a"], row["n_b"]) == (3, 2) and row["verdict"] == "not resolved"
    assert row["matched_on"] == "every other param, paired by seed (2 seeds)"
    one_seed = pd.DataFrame(group([45.0, 45.2]) + group([45.1, 45.4], method="qlora")).assign(seed=0, experiment="h")
    row = by_number(report.assess(one_seed))[5]
    assert_effect(row, [45.1, 45.4], [45.0, 45.2])
    assert row["matched_on"] == "every other param"


def test_seeds_are_compared_like_for_like_when_studies_ran_different_numbers_of_seeds():
    """1m at seeds 0-4 and 0.3m at seeds 0-2 (a 5-seed study pooled with a 3-seed one): seeds 3 and 4 would be
    the mean of one configuration and seeds 0-2 of two, so the balanced subset is kept, the larger of both sizes
    at seeds 0-2 (6 cells) and 1m alone at all 5 (5 cells)."""
    lora_1m, qlora_1m = [50.0, 52.0, 51.0, 53.0, 49.0], [50.5, 51.0, 52.0, 43.0, 39.0]
    lora_s, qlora_s = [40.0, 42.0, 41.0], [40.3, 41.2, 42.4]
    df = pd.DataFrame(group(lora_1m) + group(qlora_1m, method="qlora") + group(lora_s, model_size="0.3m")
                      + group(qlora_s, method="qlora", model_size="0.3m")).assign(experiment="hand")
    row = by_number(report.assess(df))[5]
    expected = paired_difference([(x + y) / 2 for x, y in zip(qlora_1m, qlora_s)],
                                 [(x + y) / 2 for x, y in zip(lora_1m, lora_s)])
    assert (row["effect"], row["effect_ci_low"], row["effect_ci_high"]) == pytest.approx(
        (expected.value, expected.low, expected.high))
    assert row["matched_on"] == "every other param, paired by seed (3 seeds)" and (row["n_a"], row["n_b"]) == (8, 8)
    only_1m = df[df["model_size"] == "1m"]
    assert by_number(report.assess(only_1m))[5]["matched_on"] == "every other param, paired by seed (5 seeds)"


def test_a_trial_without_a_seed_is_never_paired_and_a_seed_given_as_text_pairs():
    lora, qlora = [45.0, 55.0, 50.0], [45.1, 55.3, 50.2]
    df = pd.DataFrame(group(lora) + group(qlora, method="qlora")).assign(experiment="hand")
    texts = df.assign(seed=df["seed"].astype(str).where(df["method"] == "lora", df["seed"]))
    assert by_number(report.assess(texts))[5]["matched_on"] == "every other param, paired by seed (3 seeds)"
    unseeded = df.assign(seed=df["seed"].where(df.index != 0))  # lora's seed-0 trial lost its seed
    row = by_number(report.assess(unseeded))[5]
    assert_effect(row, qlora, lora)  # Welch's over the trials: no seed to pair or average it by
    assert row["matched_on"] == "every other param"


def test_size_and_resolution_say_which_question_types_they_move():
    """Directions 1 and 2 note the effect per question type (score/<type>), paired like the score: here the finer
    tower gains about 10 points on colour questions (8, 12, 10 by seed) and nothing on counts (+1, -1, 0)."""
    rows = []
    for seed, (color_gain, count_gain) in enumerate(((8.0, 1.0), (12.0, -1.0), (10.0, 0.0))):
        for size, on in ((32, 0.0), (48, 1.0)):
            rows.append({**BASE, "seed": seed, "image_size": size, "score": 50.0 + on * (color_gain + count_gain) / 2
                         + seed, "score/color": 40.0 + on * color_gain + seed, "score/count": 90.0 + on * count_gain})
    row = by_number(report.assess(pd.DataFrame(rows).assign(experiment="hand")))[2]
    color = paired_difference([48.0, 53.0, 52.0], [40.0, 41.0, 42.0])
    count = paired_difference([91.0, 89.0, 90.0], [90.0, 90.0, 90.0])
    assert (color.value, count.value) == pytest.approx((10.0, 0.0))
    assert row["note"] == f"per type: color {color}, count {count}"
    assert color.low > 0 and count.low < 0 < count.high
    assert row["verdict"] == "holds" and row["matched_on"] == "every other param, paired by seed (3 seeds)"


def test_configurations_sharing_a_seed_are_averaged_per_seed_and_a_configuration_run_twice_is_one_cell():
    """Two model sizes at seeds 0-2: a seed's data order moves both sizes' QLoRA - LoRA differences alike, so the
    six differences are three independent ones, the interval is over the seeds' means (2 degrees of freedom, not
    5). The 1m LoRA trial at seed 0 was run twice (two experiments); its cell is their mean, and the pairing
    stays."""
    lora = {"1m": [50.0, 52.0, 51.0], "0.3m": [40.0, 42.0, 41.0]}
    qlora = {"1m": [50.5, 51.0, 52.0], "0.3m": [40.3, 41.2, 42.4]}
    rows = [r for size in lora for method, scores in (("lora", lora), ("qlora", qlora))
            for r in group(scores[size], method=method, model_size=size)]
    rows.append({**rows[0], "score": 52.0})  # 1m lora seed 0 again: the cell's mean is 51.0
    df = pd.DataFrame(rows).assign(experiment="hand")
    row = by_number(report.assess(df))[5]
    per_seed_q = [(50.5 + 40.3) / 2, (51.0 + 41.2) / 2, (52.0 + 42.4) / 2]
    per_seed_l = [(51.0 + 40.0) / 2, (52.0 + 42.0) / 2, (51.0 + 41.0) / 2]
    expected = paired_difference(per_seed_q, per_seed_l)
    assert (row["effect"], row["effect_ci_low"], row["effect_ci_high"]) == pytest.approx(
        (expected.value, expected.low, expected.high))
    assert row["matched_on"] == "every other param, paired by seed (3 seeds)" and (row["n_a"], row["n_b"]) == (6, 7)
    six = paired_difference([50.5, 51.0, 52.0, 40.3, 41.2, 42.4], [51.0, 52.0, 51.0, 40.0, 42.0, 41.0])
    assert row["effect_ci_high"] - row["effect_ci_low"] > six.high - six.low  # the seeds, not the trials, count


def test_a_question_type_every_seed_scored_alike_gets_its_questions_noise():
    """A per-type effect reads its question count from `score_n/<type>` (what evaluation logs): where every seed
    scores the same on that type, the interval is Newcombe's over those questions, never a zero-width point."""
    rows = []
    for seed in range(3):
        for size, color in ((32, 40.0), (48, 50.0)):
            rows.append({**BASE, "seed": seed, "image_size": size, "score": 50.0 + seed + size / 48,
                         "score/color": color, "score_n/color": 20.0})
    note = by_number(report.assess(pd.DataFrame(rows).assign(experiment="hand")))[2]["note"]
    expected = difference([50.0] * 3, [40.0] * 3, (20.0, 20.0))
    assert note == f"per type: color {expected}" and expected.low < 10 < expected.high
