"""MLflow, as DESIGN.md's contract says: one parent run per study, one nested run per trial.

Driver side, `NestedMLflowCallback` (a small subclass of Ray's MLflowLoggerCallback,
which does not nest) opens each trial's run under the study's parent, logs the flat
trial config as params once, and closes the run when the trial ends: FINISHED, or
FAILED with a `failure_reason` tag and the traceback as `error/traceback.txt`. Worker
side, rank 0 attaches to its trial's run through `TrialLog` (found by the trial-id tag)
and logs per-step loss, the final metrics and the artifacts itself, before it reports.

A resumed study (`--resume`) keeps every run: its parent is reopened (tag `resumes`),
a trial Tune continues finds its run by the trial-id tag and goes on in it (tag
`restarts`), and a run whose trial will not run again is closed KILLED with a
`killed_reason` tag (`close_orphans`), so no run is left RUNNING and none is doubled.
(A trial an early-stopping scheduler stopped is then turned KILLED with a `stopped_early`
tag, the stage-2 step it reached, by study.search.StoppedTrials.)

How a study reads in the MLflow UI (`finish_study_run` at its end, again on each resume):
trials are named by what the study varies (`1m r8 a32 lr3.5e-3`) and tagged
`on_frontier`; the study's run holds the frontier table in its description
(`mlflow.note.content`) and the summary metrics (best score, frontier size, trials
finished / failed / pruned, GPU-hours and dollars spent); the experiment's description
says what was searched and how to read it; a saved view of the runs table (an experiment
tag `mlflow.sharedViewState.<key>`, MLflow's own format) shows the columns that matter,
and `ui_link` is the deep link to it.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
import zlib
from collections import Counter
from typing import Sequence

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from ray.air.integrations.mlflow import MLflowLoggerCallback

from tracking.store import PARENT_TAG, SETTLED, STUDY_TAG, TRIAL_TAG, find_trial_run, params_of, trial_runs
from tracking.trial_log import failure_from_text, record_failure
from trainables.config import trial_config

ON_FRONTIER = "on_frontier"  # "true" / "false" on every trial run of a study that has a frontier
STOPPED_EARLY = "stopped_early"  # the stage-2 step an early-stopping scheduler stopped the trial at (study.search)
SPACE_PREFIX = "space."  # the study run's params that name the searched keys (study.plan.Plan.settings)
SEARCHED_TAG = "mmscale.searched"  # on the study's run: the searched keys in the space's order (JSON)
VIEW_PREFIX = "mlflow.sharedViewState."  # MLflow's saved views of the runs table, one experiment tag each
MAX_NOTE_CHARS = 8000  # MLflow's limit on a run tag's value (mlflow.utils.validation.MAX_TAG_VAL_LENGTH)
MAX_EXPERIMENT_NOTE_CHARS = 20000  # ... on an experiment tag's (MAX_EXPERIMENT_TAG_VAL_LENGTH)
NOTE_COSTS = ("gpu_hours", "dollars", "trainable_params")  # the study run's frontier table, beside the scores
# The runs table's columns that matter, after the searched params, where some trial logged them.
VIEW_METRICS = ("score", "score_ci_low", "score_ci_high", "text_score", "gpu_hours", "dollars", "trainable_params")


def start_study_run(client: MlflowClient, experiment_id: str, study: str, params: dict) -> str:
    """The study's own run, with its settings as params; the experiment's description and the runs
    table's view are written from them (`space.<key>` params: what the study searches)."""
    run = client.create_run(experiment_id, run_name=study, tags={STUDY_TAG: study, "mlflow.runName": study})
    parent = run.info.run_id
    client.log_batch(parent, params=params_of(params))
    client.set_tag(parent, MLFLOW_RUN_NOTE, f"Study `{study}` is running: when it ends, this description holds "
                   "its cost-performance frontier (and the Artifacts tab its plot, `frontier/frontier.png`).")
    searched = searched_keys(params)
    client.set_tag(parent, SEARCHED_TAG, json.dumps(searched))
    client.set_experiment_tag(experiment_id, MLFLOW_RUN_NOTE,
                              experiment_note(study, params, searched)[:MAX_EXPERIMENT_NOTE_CHARS])
    # before any trial ran: the usual metrics (finish_study_run keeps those some trial logged)
    save_view(client, experiment_id, parent, study, searched, [m for m in VIEW_METRICS if "_ci_" not in m], tags=())
    return parent


# --- names: a trial reads as what the study varies ---

# How a searched setting reads in a trial's name, in the field's usual short form: "1m r8 a32 lr3.5e-3".
# A method's own settings take their prefix from its label (trainables.methods); any other reads key=value.
NAME_FORMS = {"model_size": "", "method": "", "vision_tower": "", "lora_rank": "r", "lora_alpha": "a",
              "alpha_per_rank": "a/r", "lr": "lr", "projector_lr": "plr", "image_size": "px", "mix_ratio": "mix",
              "batch_size": "b", "stage1_steps": "s1:", "stage2_steps": "s2:", "seed": "seed"}
SUFFIXED = {"image_size"}  # 48px reads better than px48


def _forms() -> dict[str, str]:
    from trainables.methods import METHODS

    own = {key: fmt.split("{")[0] for m in METHODS.values() for key, fmt in m.label_fields}
    return {**own, **NAME_FORMS}


def short_value(value, digits: int = 2) -> str:
    """A setting's value, short: 3.5e-3, 0.2, 32 (32.0), 1m; a hub id by its last part (vicuna-7b-v1.5)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value).rstrip("/").rsplit("/", 1)[-1]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if float(value).is_integer() and abs(value) < 1e5:
        return str(int(value))
    if abs(value) < 1e-2 or abs(value) >= 1e5:
        mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".") if "." in mantissa else mantissa
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.{digits}g}"


def trial_name(params: dict, keys: Sequence[str], taken: set[str] | frozenset = frozenset()) -> str:
    """The trial's name from the settings that vary (`keys`, in the space's order; the ones the trial's
    method does not have are left out), unique against `taken`: more digits first, then " #2", " #3".

    `params` is the trial's logged params (TrialConfig.logged_params). With no keys, its method and size.
    """
    keys = [k for k in keys if k in params] or [k for k in ("method", "model_size") if k in params]
    forms = _forms()

    def name(digits: int) -> str:
        parts = []
        for key in keys:
            value, form = short_value(params[key], digits), forms.get(key)
            parts.append(f"{key}={value}" if form is None else f"{value}{form}" if key in SUFFIXED
                         else f"{form}{value}")
        return " ".join(parts)

    base = name(2)
    for digits in (2, 3, 4):
        if name(digits) not in taken:
            return name(digits)
    n = 2
    while f"{base} #{n}" in taken:
        n += 1
    return f"{base} #{n}"


def searched_keys(params: dict) -> list[str]:
    """The keys a study searches, in its space's order, from its settings (`space.<key>` params)."""
    return [k[len(SPACE_PREFIX):] for k in params if k.startswith(SPACE_PREFIX)]


def searched_of(run) -> list[str]:
    """The keys a study searched, in its space's order, from its run (MLflow does not keep params' order)."""
    try:
        keys = json.loads(run.data.tags.get(SEARCHED_TAG, "null"))
    except ValueError:
        keys = None
    return keys if isinstance(keys, list) else sorted(searched_keys(run.data.params))


# --- the study's run, its experiment and the runs table's view ---

_SPEC = [(re.compile(r"^Choice\(values=\((.*?),?\)\)$"), "one of {}"),
         (re.compile(r"^Float\(low=(\S+), high=(\S+), log=True\)$"), "log-uniform in [{}, {}]"),
         (re.compile(r"^Float\(low=(\S+), high=(\S+), log=False\)$"), "uniform in [{}, {}]"),
         (re.compile(r"^Int\(low=(\S+), high=(\S+), log=\w+\)$"), "an integer in [{}, {}]"),
         (re.compile(r"^AlphaPerRank\(multiplier=Choice\(values=\((.*?),?\)\)\)$"), "lora_rank x one of {}")]


def _spec(text: str) -> str:
    """A space entry as the study run logged it (study.space's repr) in words: 'one of 8, 16, 32'."""
    for pattern, words in _SPEC:
        match = pattern.match(text)
        if match:
            return words.format(*(g.replace("'", "") for g in match.groups()))
    return f"`{text}`"


def experiment_note(study: str, params: dict, searched: list[str]) -> str:
    """The experiment's description (Markdown): what the study searched and how to read it in the UI."""
    space = "\n".join(f"- `{k}`: {_spec(str(params[SPACE_PREFIX + k]))}" for k in searched) or "- (nothing)"
    fixed = f"Fixed for every trial: `{params['constants']}`.\n\n" if "constants" in params else ""
    where = f" from `{params['space_file']}`" if "space_file" in params else ""
    size = f"{params['num_samples']} configurations" if "num_samples" in params else "trials"
    if "seeds" in params:
        size += f" x {params['seeds']} seeds (the trials' param `seed`; compare a configuration's seeds for its noise)"
    smoke = " (a `--smoke` check: the smallest budget, not a result)" if str(params.get("smoke")) == "True" else ""
    return (f"**Study `{study}`**{where}: {size}{smoke} of LLaVA-style visual instruction tuning, each scored on "
            f"held-out questions (`score`, 0-100) and costed (`gpu_hours`: GPU-hours per node; `dollars`).\n\n"
            f"Searched:\n{space}\n\n{fixed}"
            "**How to read it.** The study's own run (named after the study) holds the cost-performance frontier "
            "in its description and its plot under Artifacts -> `frontier/frontier.png`; it also logs "
            "`best_score`, `frontier_size`, the trials finished / failed / pruned and the GPU-hours and dollars "
            "spent. Each trial is a run nested under it, named by what varies (`1m r8 a32 lr3.5e-3`: model size, "
            "LoRA rank r, alpha a, learning rate). Tag `on_frontier` is `true` on the trials no other trial beats "
            "on both score and GPU-hours (filter `tags.on_frontier = 'true'`); `stopped_early` marks trials an "
            "early-stopping scheduler stopped (kept off the frontier). The view in the Views menu shows these "
            "columns, sorted by score.")


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"


def save_view(client: MlflowClient, experiment_id: str, parent: str, study: str, params: Sequence[str],
              metrics: Sequence[str], tags: Sequence[str]) -> str:
    """The runs table's view of a study, saved in the experiment as MLflow's own "Views" menu does (a tag
    `mlflow.sharedViewState.<key>`: a name and the page state, zlib-compressed and base64-encoded after
    `deflate;`): every run, the study's trials expanded under its run, sorted by score, with the searched
    params, `metrics` and `tags` as columns. Returns the key (`ui_link` opens it); saving again replaces it.
    The format is MLflow's UI's (3.x), not a documented API: tests/test_mlflow_server.py checks it in a browser.
    """
    key = f"mmscale-{parent}"
    columns = ([_column("params", p) for p in params] + [_column("metrics", m) for m in metrics]
               + [_column("tags", t) for t in tags])
    state = {"searchFilter": "", "orderByKey": _column("metrics", "score"), "orderByAsc": False, "startTime": "ALL",
             "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
             "selectedColumns": columns, "columnOrder": columns, "runsExpanded": {parent: True},
             "columnWidths": {c: 96 for c in columns},  # narrower than MLflow's default: on_frontier stays in sight
             "runsPinned": [], "runsHidden": [], "runsVisibilityMap": {}, "runsHiddenMode": "SHOW_ALL",
             "viewMaximized": False, "runListHidden": False, "isAccordionReordered": False,
             "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "groupBy": None, "groupsExpanded": {}}
    encoded = "deflate;" + base64.b64encode(zlib.compress(json.dumps(state).encode())).decode()
    tag = VIEW_PREFIX + key
    old = client.get_experiment(experiment_id).tags.get(tag)
    now = int(time.time() * 1000)
    created = json.loads(old).get("createdAt", now) if old else now
    view = {"name": f"{study}: trials by score ({parent[:8]})", "createdAt": created, "updatedAt": now,
            "state": encoded}
    client.set_experiment_tag(experiment_id, tag, json.dumps(view))
    return key


def ui_link(base_url: str, experiment_id: str, view_key: str | None = None) -> str:
    """The runs table of an experiment in the MLflow UI at `base_url`, in model-training mode (MLflow 3 opens
    an experiment on its GenAI pages otherwise), with a saved view when given."""
    view = f"&viewStateShareKey={view_key}" if view_key else ""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning{view}"


def run_link(experiment_id: str, run_id: str) -> str:
    """A run's page, as a link inside the UI (relative: it works on any host)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def study_note(study: str, experiment_id: str, summary: dict, table, trials_total: int) -> str:
    """The study run's description (Markdown, within MLflow's 8,000 characters): what was spent and found,
    and the frontier table with each trial's name linked to its run."""
    from analysis.runs import formatted, scores_of
    from analysis.tables import run_ids_of

    spent = (f"{summary['total_gpu_hours']:.3g} GPU-hours per node, ${summary['total_dollars']:,.4g}"
             if "total_gpu_hours" in summary else "no cost logged")
    counts = (f"{trials_total} trials: {summary['trials_finished']} finished, {summary['trials_failed']} failed, "
              f"{summary['trials_pruned']} stopped early")
    head = f"**Study `{study}`**: {counts}; spent {spent}."
    if table is None or table.empty:
        return head + "\n\nNo frontier: no trial finished with a score and a cost."
    best = f" Best score {summary['best_score']:.1f}." if "best_score" in summary else ""
    head += (f"{best} **{len(table)} on the frontier** of score vs GPU-hours per node (no other trial scores "
             "higher for less; cheapest first; tag `on_frontier`):\n\n")
    foot = ("\n\nPlot: Artifacts -> `frontier/frontier.png`; every trial with `on_frontier` and why any was left "
            "out: `frontier/frontier.csv`; tables by model size, method and factor: `frontier/table.md`.")
    if "run_name" in table:  # the name says what varies: the scores and costs beside it, narrow enough to read
        keep = ["run_name", "score", *scores_of(table), *NOTE_COSTS]
        table = table[[c for c in keep if c in table] + ["run_id"]]
    view = formatted(table.drop(columns=["run_id"]))
    header = "| " + " | ".join(view.columns) + " |\n|" + "|".join("---" for _ in view.columns) + "|\n"
    rows = []
    for (_, row), run_id in zip(view.iterrows(), table["run_id"]):
        cells = [_cell(v) for v in row]
        if "run_name" in view.columns:
            at = list(view.columns).index("run_name")
            seeds = run_ids_of(run_id)  # a configuration's seeds: linked to the first, counted
            cells[at] = f"[{cells[at]}]({run_link(experiment_id, seeds[0])})" + \
                (f" ({len(seeds)} seeds)" if len(seeds) > 1 else "")
        rows.append("| " + " | ".join(cells) + " |\n")
    body, shown = header, 0
    for line in rows:
        more = f"\n({len(rows) - shown} more rows in `frontier/table.md`)"
        if len(head) + len(body) + len(line) + len(more) + len(foot) > MAX_NOTE_CHARS:
            body += more
            break
        body, shown = body + line, shown + 1
    return head + body + foot


def summary_metrics(runs: list, front) -> dict[str, float]:
    """The study's summary (tracking.metrics, stage "study"): the best score and the frontier's size (when
    there is a frontier), trials finished / failed / pruned (stopped early), and the GPU-hours and dollars
    every trial spent, finished or not."""
    out = {"trials_finished": sum(r.info.status == "FINISHED" and STOPPED_EARLY not in r.data.tags for r in runs),
           "trials_failed": sum(r.info.status == "FAILED" for r in runs),
           "trials_pruned": sum(STOPPED_EARLY in r.data.tags for r in runs)}
    for total, metric in (("total_gpu_hours", "gpu_hours"), ("total_dollars", "dollars")):
        # a repeat (study.study_trial answered it from an identical earlier trial) spent nothing itself
        values = [r.data.metrics[metric] for r in runs if metric in r.data.metrics and "repeat_of" not in r.data.tags]
        if values:
            out[total] = float(sum(values))
    if front is not None:
        out["frontier_size"] = int(front.trials["on_frontier"].sum())
        considered = front.considered
        if "score" in considered and considered["score"].notna().any():
            out["best_score"] = float(considered["score"].max())
    return out


def finish_study_run(client: MlflowClient, experiment_id: str, parent: str, study: str, front) -> str:
    """At a study's end (and again after each --resume): the summary metrics and the description on its
    run, `on_frontier` on every trial run ("true" / "false"; none when there is no frontier), and the runs
    table's view with the columns the trials logged. `front` is analysis' Frontier of the study's trials, or
    None. Returns the view's key (for `ui_link`)."""
    from analysis.frontier import frontier_table
    from analysis.tables import run_ids_of

    runs = trial_runs(client, experiment_id, parent)
    summary = summary_metrics(runs, front)
    now = int(time.time() * 1000)
    client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in summary.items()])
    if front is not None:
        # a configuration run at several seeds is one frontier row whose run_id joins its seeds' runs
        on = {run_id for ids in front.trials.loc[front.trials["on_frontier"].astype(bool), "run_id"]
              for run_id in run_ids_of(ids)}
        for run in runs:
            client.set_tag(run.info.run_id, ON_FRONTIER, "true" if run.info.run_id in on else "false")
    table = frontier_table(front) if front is not None else None
    client.set_tag(parent, MLFLOW_RUN_NOTE, study_note(study, experiment_id, summary, table, len(runs)))
    logged = {m for r in runs for m in r.data.metrics}
    searched = searched_of(client.get_run(parent))
    tags = [ON_FRONTIER] * (front is not None) + [STOPPED_EARLY] * (summary["trials_pruned"] > 0)
    return save_view(client, experiment_id, parent, study, searched,
                     [m for m in VIEW_METRICS if m in logged], tags)


def reopen(client: MlflowClient, run, counter: str) -> int:
    """A run goes on after an interruption: RUNNING again, `counter` tag + 1 (returned)."""
    count = int(run.data.tags.get(counter, 0)) + 1
    client.set_tag(run.info.run_id, counter, str(count))
    if "killed_reason" in run.data.tags:  # closed when the study stopped; no longer so
        client.delete_tag(run.info.run_id, "killed_reason")
    client.update_run(run.info.run_id, status="RUNNING")
    return count


def close_orphans(client: MlflowClient, experiment_id: str, parent_run_id: str, reason: str) -> int:
    """Close the study's trial runs left RUNNING (their trial will not run in this session) as KILLED."""
    orphans = [r for r in trial_runs(client, experiment_id, parent_run_id) if r.info.status == "RUNNING"]
    for run in orphans:
        client.set_tag(run.info.run_id, "killed_reason", reason)
        client.set_terminated(run.info.run_id, status="KILLED")
    return len(orphans)


def outcome(runs: list) -> tuple[list, list, list]:
    """(finished, failed, other) trial runs of a study."""
    return ([r for r in runs if r.info.status == "FINISHED"], [r for r in runs if r.info.status == "FAILED"],
            [r for r in runs if r.info.status not in SETTLED])


def failure_counts(failed: list) -> str:
    """`FloatingPointError x2, MemoryError x1`: the failed runs' exception types, most common first."""
    kinds = Counter(r.data.tags.get("failure_reason", "unknown").split(":")[0] for r in failed)
    return ", ".join(f"{kind} x{n}" for kind, n in kinds.most_common())


class NestedMLflowCallback(MLflowLoggerCallback):
    """Trial runs nested under the study's parent run, named by what the study varies; metrics come from
    the workers.

    `searched`: the space's searched keys, in its order (study.space.Space.space); by default read from
    the study's run (start_study_run records them).
    """

    def __init__(self, tracking_uri: str, experiment_name: str, parent_run_id: str, study: str,
                 searched: Sequence[str] | None = None):
        super().__init__(tracking_uri=tracking_uri, experiment_name=experiment_name, save_artifact=False)
        self.parent_run_id, self.study = parent_run_id, study
        self.searched = list(searched) if searched is not None else None

    def setup(self, *args, **kwargs):
        super().setup(*args, **kwargs)
        self._settled: set[str] = set()  # runs whose outcome was logged before the study was resumed
        self._names: set[str] | None = None  # the study's trial names (read from its runs when first needed)

    def _name_for(self, client: MlflowClient, exp_id: str, params: dict) -> str:
        if self._names is None:  # a resumed study: the names its trials already have
            self._names = {r.info.run_name for r in trial_runs(client, exp_id, self.parent_run_id)}
        searched = getattr(self, "searched", None)  # absent in a callback pickled before it had one
        if searched is None:
            searched = self.searched = searched_of(client.get_run(self.parent_run_id))
        name = trial_name(params, searched, self._names)
        self._names.add(name)
        return name

    def log_trial_start(self, trial) -> None:
        if trial in self._trial_runs:
            return
        client = self.mlflow_util._get_client()
        exp_id = client.get_experiment_by_name(self.experiment_name).experiment_id
        existing = find_trial_run(client, exp_id, trial.trial_id)
        if existing is not None:  # a resumed study: the trial goes on in its own run
            self._trial_runs[trial] = existing.info.run_id
            if existing.info.status in SETTLED:  # ended before Tune saved that it had (study.study_trial)
                self._settled.add(existing.info.run_id)
            else:  # interrupted (RUNNING, or KILLED when the study was stopped): it restarts here
                reopen(client, existing, "restarts")
            return
        tags = {PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial.trial_id, STUDY_TAG: self.study,
                "trial_name": str(trial)}
        params = trial_config(trial.config).logged_params()
        run = self.mlflow_util.start_run(tags=tags, run_name=self._name_for(client, exp_id, params))
        self._trial_runs[trial] = run.info.run_id
        client.log_batch(run.info.run_id, params=params_of(params))

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        pass  # rank 0 logs metrics straight to the run (per step, and the finals before reporting)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        run_id = self._trial_runs.get(trial)
        if run_id is None or run_id in self._settled:
            return
        client = self.mlflow_util._get_client()
        if failed and "failure_reason" not in client.get_run(run_id).data.tags:
            # the trial died before it could say why itself (study.study_trial): Tune's text of the error
            record_failure(client, run_id, *failure_from_text(trial.error_file))
        self.mlflow_util.end_run(run_id=run_id, status="FAILED" if failed else "FINISHED")
