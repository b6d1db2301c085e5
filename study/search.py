"""The search's bookkeeping: Optuna told the truth about every trial, a budget kept, stopped trials marked.

`StudySearch` is Ray Tune's OptunaSearch (single- or multi-objective: TPE, NSGA-II, a grid)
with four changes:
- a trial's outcome is its last result that carries metrics: a function trainable's return
  reaches Tune as a bare `done` result, which Tune passes to `on_trial_complete` in its place,
  so OptunaSearch told every trial of a study PRUNED and TPE never learned from one;
- a trial that ended without its final result (an early-stopping scheduler stopped it: Tune
  then reports it complete with its last interim result) is told to Optuna as PRUNED, never
  COMPLETE with partial metrics; an errored one as FAIL. OptunaSearch itself tells COMPLETE
  whenever the result holds the metric, and for several objectives a list with holes.
- interim results are not reported to Optuna (its pruners do not take several objectives;
  stopping is the scheduler's job, ASHA on `interim_score`).
- with a budget (GPU-hours per node), a trial is launched only while the cost already spent
  plus the forecast of the running trials is within it: so the study stops launching when the
  money is spent and overshoots by at most one trial's cost. A stopped or failed trial's
  cost counts (the last cost it reported); a repeat (see study.study.study_trial) costs nothing.
- with `seeds` > 1 (a space file's SEEDS), each configuration Optuna suggests runs as that many
  Tune trials, at seeds seed, seed + 1, ... (data order, LoRA init, dropout), and Optuna is told
  the configuration once, when its last seed ends: the mean of each objective over the seeds if
  every seed finished, else PRUNED (a seed stopped early) or FAIL (every seed errored). Ray's
  `Repeater` does this for one metric only, forgets its groups on restore and hides the seeds'
  results from the scheduler, so it is done here.
Its state (Optuna's study, the budget's spent and running, the seed groups) is saved and restored
with Tune's, so `--resume` counts what was spent before.

`StoppedTrials` is a Tune callback that closes the MLflow run of a trial stopped early as
KILLED, tagged `stopped_early` with the step it reached, with the cost it spent.
"""

from __future__ import annotations

from ray.tune.callback import Callback
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

FINAL = "score"        # only a trial's final result holds it
REPEAT = "repeat_of"   # a result answered from an identical earlier trial carries its run id


class StudySearch(OptunaSearch):
    def __init__(self, *args, budget_gpu_hours: float | None = None, forecast=None, seeds: int = 1, **kwargs):
        """OptunaSearch's arguments, plus a budget in GPU-hours per node (None: none), `forecast(config)`
        -> GPU-hours per node of a Tune config (study.forecast.Forecaster.gpu_hours_of), and the seeds each
        configuration runs at."""
        super().__init__(*args, **kwargs)
        self.seeds = seeds
        self.group_of: dict[str, str] = {}    # trial id -> the trial id Optuna knows its configuration by
        self.open_group: tuple[str, dict, int] | None = None  # (that id, its config, seeds launched) while short
        self.outcomes: dict[str, list] = {}   # Optuna's trial id -> each ended seed's values or TrialState
        self.pruned_trials: set[str] = set()  # Tune trials told PRUNED (stopped early), seed by seed
        self.budget_gpu_hours, self.forecast = budget_gpu_hours, forecast
        self.spent = 0.0                      # GPU-hours per node of ended trials
        self.running: dict[str, float] = {}   # trial id -> its forecast, while it runs
        self.last_cost: dict[str, float] = {}  # trial id -> the cost its last result reported
        self.last_result: dict[str, dict] = {}  # trial id -> its last result with metrics
        self.budget_exhausted = False

    def committed(self) -> float:
        return self.spent + sum(self.running.values())

    def suggest(self, trial_id: str):
        if self.budget_gpu_hours is not None and self.committed() >= self.budget_gpu_hours:
            if self.running:
                return None  # ask again when a running trial ends: its forecast may have been too high
            self.budget_exhausted = True
            return Searcher.FINISHED
        config = self._next_seed(trial_id) or super().suggest(trial_id)
        if config is None or config is Searcher.FINISHED:
            return config
        if trial_id not in self.group_of:  # Optuna's new configuration: its first seed
            self.group_of[trial_id] = trial_id
            self.open_group = (trial_id, dict(config), 1) if self.seeds > 1 else None
        if self.forecast is not None:
            self.running[trial_id] = self.forecast(config)
        return config

    def _next_seed(self, trial_id: str) -> dict | None:
        """The open configuration at its next seed, or None when Optuna should suggest a new one."""
        if self.open_group is None:
            return None
        first, config, launched = self.open_group
        self.open_group = (first, config, launched + 1) if launched + 1 < self.seeds else None
        self.group_of[trial_id] = first
        return {**config, "seed": int(config.get("seed", 0)) + launched}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if FINAL in result or "interim_score" in result or REPEAT in result:
            self.last_result[trial_id] = result
        if "gpu_hours" in result:
            self.last_cost[trial_id] = float(result["gpu_hours"])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        from optuna.trial import TrialState

        if trial_id in self._completed_trials:
            return
        if not result or not (FINAL in result or "interim_score" in result or REPEAT in result):
            # A function trainable's return reaches Tune as a bare `done` result, which Tune hands on here in
            # place of the last one that carried metrics (OptunaSearch then told every trial PRUNED).
            result = self.last_result.get(trial_id, result)
        self.running.pop(trial_id, None)
        if result and "gpu_hours" in result:
            self.last_cost[trial_id] = float(result["gpu_hours"])
        if not (result and result.get(REPEAT)):
            self.spent += self.last_cost.get(trial_id, 0.0)
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if result and FINAL in result and all(result.get(m) is not None for m in metrics):
            outcome = [float(result[m]) for m in metrics]
        else:
            outcome = TrialState.FAIL if error else TrialState.PRUNED
            if not error:
                self.pruned_trials.add(trial_id)
        self._completed_trials.add(trial_id)
        first = self.group_of.get(trial_id, trial_id)
        outcomes = self.outcomes.setdefault(first, [])
        outcomes.append(outcome)
        if len(outcomes) < self.seeds:
            return  # Optuna hears of the configuration when its last seed ends
        values = [o for o in outcomes if isinstance(o, list)]
        ot_trial = self._ot_trials[first]
        if len(values) == len(outcomes):
            means = [sum(v[i] for v in values) / len(values) for i in range(len(metrics))]
            self._tell(ot_trial, means if isinstance(self.metric, list) else means[0])
        else:
            every_error = all(o == TrialState.FAIL for o in outcomes)
            self._tell(ot_trial, state=TrialState.FAIL if every_error else TrialState.PRUNED)

    def _tell(self, ot_trial, *args, **kwargs) -> None:
        try:
            self._ot_study.tell(ot_trial, *args, **kwargs)
        except RuntimeError as e:
            # Optuna's GridSampler.after_trial calls study.stop() once the last grid point ends, which raises
            # outside study.optimize(); the trial is stored by then (optuna/study/_tell.py, in a `finally`),
            # and the grid's end reaches Tune as suggest() returning FINISHED.
            if "Study.stop" not in str(e):
                raise

    def pruned(self) -> int:
        """Tune trials stopped early (with seeds, each seed counts)."""
        return len(self.pruned_trials)


class StoppedTrials(Callback):
    """Closes the MLflow run of a trial an early-stopping scheduler stopped: KILLED, tag `stopped_early`
    (the stage-2 step it reached), and the cost it spent (`gpu_hours`, `dollars` of its last report).
    Registered after the MLflow callback, which has just closed the run FINISHED."""

    def __init__(self, tracking_uri: str, experiment_id: str):
        self.tracking_uri, self.experiment_id = tracking_uri, experiment_id

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        result = trial.last_result or {}
        if FINAL in result or REPEAT in result or "stage2_step" not in result:
            return
        from mlflow.tracking import MlflowClient

        from tracking.store import find_trial_run

        client = MlflowClient(self.tracking_uri)
        run = find_trial_run(client, self.experiment_id, trial.trial_id)
        if run is None:
            return
        step = int(result["stage2_step"])
        client.set_tag(run.info.run_id, "stopped_early", str(step))  # the workers read it and end (trainables.worker)
        if "failure_reason" in run.data.tags:  # its workers died when Tune stopped it: not a failure of the trial
            client.delete_tag(run.info.run_id, "failure_reason")
        client.set_tag(run.info.run_id, "killed_reason", f"stopped early by the scheduler at stage-2 step {step} "
                                                          f"(interim_score {result.get('interim_score', 0):.1f})")
        for key in ("gpu_hours", "dollars"):
            if key in result:
                client.log_metric(run.info.run_id, key, float(result[key]), step=step)
        client.set_terminated(run.info.run_id, status="KILLED")
