"""A trial's wall time by phase (trainables.timing): exclusive phases that add up, with a clock we control."""

import pytest

from tracking.metrics import METRICS, PHASES, WORK
from trainables import timing


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(timing.time, "perf_counter", c)
    return c


def test_a_nested_phase_pauses_its_parent_and_the_phases_add_up(clock):
    phases = timing.Phases()
    with phases("stage2_training"):
        clock.now += 10
        with phases("interim_evaluation"):
            clock.now += 3
            with phases("checkpoint"):
                clock.now += 0.5
            clock.now += 1
        clock.now += 6
    with phases("stage2_training"):  # a phase entered twice accumulates
        clock.now += 2
    with phases("artifact_save"):
        clock.now += 0.25
    clock.now += 100  # outside every phase: charged to none
    assert phases.seconds == {"stage2_training": 18.0, "interim_evaluation": 4.0, "checkpoint": 0.5,
                              "artifact_save": 0.25}
    m = phases.metrics()
    assert m["time_stage2_training_s"] == 18.0 and m["time_interim_evaluation_s"] == 4.0
    assert m["time_overhead_s"] == 0.75  # checkpoint + artifact_save: training and evaluation are the work


def test_a_phase_that_raises_is_still_charged(clock):
    phases = timing.Phases()
    with pytest.raises(RuntimeError):
        with phases("ds_init"):
            clock.now += 2
            raise RuntimeError("boom")
    with phases("evaluation"):
        clock.now += 1
    assert phases.seconds == {"ds_init": 2.0, "evaluation": 1.0}


def test_added_seconds_and_unknown_phases():
    phases = timing.Phases()
    phases.add("startup", 7.5)
    phases.add("startup", 0.5)
    assert phases.metrics() == {"time_startup_s": 8.0, "time_overhead_s": 8.0}
    with pytest.raises(KeyError, match="unknown phase 'trainig'"):
        with phases("trainig"):
            pass
    with pytest.raises(KeyError):
        phases.add("nap", 1)


def test_every_phase_is_a_metric_with_a_description():
    assert set(WORK) <= set(PHASES)
    for phase in PHASES:
        spec = METRICS[timing.metric(phase)]
        assert spec.unit == "s" and PHASES[phase] in spec.description
    assert "time_overhead_s" in METRICS


def test_only_a_trials_first_attempt_counts_its_startup(tmp_path):
    from trainables.checkpoint import first_attempt

    run_dir = tmp_path / "train" / "trial-1"
    assert first_attempt(run_dir)  # made on first use
    assert not first_attempt(run_dir), "a restarted worker group or a resumed trial is not a first attempt"
    assert first_attempt(tmp_path / "train" / "trial-2")
