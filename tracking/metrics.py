"""The one table of the metrics a study logs: name, unit, direction, what it means, which stage makes it.

    python -m tracking.metrics        # the table as Markdown (the README's "What MLflow holds" carries it)

`trainables.worker` writes exactly these (`TrialLog` refuses a name that is not here),
`analysis/` reads them for labels, number formats, axes and frontier directions, and a
test holds the README's table against this one. Directions: "max" (higher is better),
"min" (lower is better, every cost) or "" (neither: a count or a diagnostic).
The cost convention is the scaling paper's (Lu et al. 2023, Table 4): GPU-hours per node
= device-hours / devices per node (8 A100s), priced at $13.63 per node-hour.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX, MIN, NEITHER = "max", "min", ""
# Stages: "stage1" (projector alignment), "stage2" (visual instruction tuning), "eval"
# (held-out generation), "trial" (the whole trial), "study" (the study's own run).
STAGES = ("stage1", "stage2", "eval", "trial", "study")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    unit: str
    direction: str      # MAX, MIN or NEITHER
    stage: str          # one of STAGES
    description: str
    label: str          # axis label
    fmt: str = "{:g}"   # how a table shows one value
    per_step: bool = False  # logged at every optimizer step (a curve), not once at the end
    reported: bool = True   # in the trial's final result to Ray Tune too (what METRIC / OBJECTIVES may name), not
                            # only in MLflow (the forecast, logged before the trial; the phase timings, after it)


_SPECS = [
    MetricSpec("score", "0-100", MAX, "eval", "accuracy on the held-out multimodal split (greedy decoding; exact "
               "match, or the option letter for multiple-choice questions)", "score (0-100, higher is better)",
               "{:.1f}"),
    MetricSpec("text_score", "0-100", MAX, "eval", "accuracy on the language-only held-out split (text.json's "
               "text_eval.json): the text skill that visual tuning keeps (the paper's data-mixing question)",
               "text-only score (0-100)", "{:.1f}"),
    *(spec for score in ("score", "text_score") for spec in (
        MetricSpec(f"{score}_n", "questions", NEITHER, "eval", f"questions `{score}` is over (a score over zero "
                   "questions is never logged: the trial fails and says why)", f"questions ({score})", "{:.0f}"),
        MetricSpec(f"{score}_ci_low", "0-100", MAX, "eval", f"lower end of `{score}`'s 95% Wilson score interval "
                   f"over its `{score}_n` questions (tracking.intervals)", f"{score} 95% interval, low", "{:.1f}"),
        MetricSpec(f"{score}_ci_high", "0-100", MAX, "eval", f"upper end of `{score}`'s 95% Wilson score interval",
                   f"{score} 95% interval, high", "{:.1f}"))),
    MetricSpec("multiple_choice", "questions", NEITHER, "eval", "held-out questions that list lettered options "
               "(scored by the letter)", "multiple-choice questions", "{:.0f}"),
    MetricSpec("unparsed", "questions", MIN, "eval", "multiple-choice answers that named no option (counted "
               "wrong, never guessed)", "unparsed answers", "{:.0f}"),
    MetricSpec("gpu_hours", "GPU-hours per node", MIN, "trial", "stage-1 + stage-2 training wall time x devices / "
               "devices per node (a cached stage 1 is charged to every trial that uses it)", "GPU-hours per node",
               "{:.2e}"),
    MetricSpec("dollars", "$", MIN, "trial", "gpu_hours x price per node-hour (default $13.63)", "cost ($)",
               "{:.4f}"),
    MetricSpec("forecast_gpu_hours", "GPU-hours per node", MIN, "trial", "the cost forecast before the trial ran "
               "(training FLOPs / the device's sustained FLOP/s; study.forecast), beside the measured gpu_hours",
               "forecast GPU-hours per node", "{:.2e}", reported=False),
    MetricSpec("forecast_dollars", "$", MIN, "trial", "forecast_gpu_hours x price per node-hour", "forecast cost ($)",
               "{:.4f}", reported=False),
    MetricSpec("stage1_gpu_hours", "GPU-hours per node", MIN, "stage1", "stage 1's share of gpu_hours",
               "stage-1 GPU-hours per node", "{:.2e}"),
    MetricSpec("stage2_gpu_hours", "GPU-hours per node", MIN, "stage2", "stage 2's share of gpu_hours",
               "stage-2 GPU-hours per node", "{:.2e}"),
    MetricSpec("trainable_params", "parameters", MIN, "stage2", "parameters stage 2 trains (adapters, and the "
               "projector where the method trains it; every LLM weight for full)", "trainable parameters",
               "{:,.0f}"),
    MetricSpec("stage1_trainable_params", "parameters", MIN, "stage1", "parameters stage 1 trains (the projector; "
               "0 when the trial has no stage 1)", "stage-1 trainable parameters", "{:,.0f}"),
    MetricSpec("peak_mem_gb", "GB", MIN, "trial", "peak memory of a worker: accelerator allocation on GPU, the "
               "process's resident set on CPU (tag peak_mem_source says which)", "peak memory (GB)", "{:.2f}"),
    MetricSpec("artifact_mb", "MB", MIN, "trial", "size of what the trial saved (adapter, MM-Adapters or model)",
               "artifact size (MB)", "{:.2f}"),
    MetricSpec("samples_per_s", "samples/s", MAX, "stage2", "stage-2 training throughput (global batch x steps / "
               "stage-2 seconds)", "throughput (samples/s)", "{:.0f}"),
    MetricSpec("final_train_loss", "nats per token", MIN, "stage2", "mean stage-2 loss over the last tenth of the "
               "steps", "final training loss", "{:.3f}"),
    MetricSpec("mix_ratio_used", "fraction", NEITHER, "stage2", "share of language-only samples in stage 2's "
               "data as trained (mix_ratio, less when text.json has too few records)", "language-only share",
               "{:.2f}"),
    MetricSpec("train_loss", "nats per token", MIN, "stage2", "stage-2 loss at each step (rank-averaged)",
               "training loss", "{:.3f}", per_step=True),
    MetricSpec("interim_score", "0-100", MAX, "eval", "accuracy on a small fixed eval subset every "
               "`interim_every` stage-2 steps (what an early-stopping scheduler judges trials by)",
               "interim score (0-100)", "{:.1f}", per_step=True),
    MetricSpec("stage1_loss", "nats per token", MIN, "stage1", "stage-1 loss at each step, when the trial "
               "computed stage 1 (not when it came from the cache)", "stage-1 loss", "{:.3f}", per_step=True),
    MetricSpec("skipped_records", "records", NEITHER, "study", "records --skip-invalid dropped (the study's run; "
               "ids and reasons in its artifact data/skipped.json)", "skipped records", "{:.0f}"),
    MetricSpec("best_score", "0-100", MAX, "study", "the highest score of the study's finished trials (of its "
               "configurations' means over seeds where it ran several; the study's run, logged when it ends; its "
               "description holds the frontier table)", "best score (0-100)", "{:.1f}"),
    MetricSpec("frontier_size", "trials", NEITHER, "study", "trials on the frontier of score vs gpu_hours (tag "
               "on_frontier = true on their runs)", "trials on the frontier", "{:.0f}"),
    MetricSpec("trials_finished", "trials", NEITHER, "study", "trials that ran to their final evaluation",
               "finished trials", "{:.0f}"),
    MetricSpec("trials_failed", "trials", NEITHER, "study", "trials that failed (tag failure_reason on their runs)",
               "failed trials", "{:.0f}"),
    MetricSpec("trials_pruned", "trials", NEITHER, "study", "trials an early-stopping scheduler stopped (Optuna's "
               "PRUNED; tag stopped_early on their runs)", "pruned trials", "{:.0f}"),
    MetricSpec("total_gpu_hours", "GPU-hours per node", MIN, "study", "gpu_hours summed over the study's trials: "
               "finished, failed or stopped early (not repeats answered from an earlier trial)",
               "GPU-hours per node spent", "{:.2e}"),
    MetricSpec("total_dollars", "$", MIN, "study", "dollars summed over the same trials", "cost spent ($)", "{:.4f}"),
]
# A trial's wall time by phase (trainables.timing), in the order a trial passes them.
PHASES = {
    "startup": "from the trial's run starting until its worker's loop runs: Tune's trial actor, the TorchTrainer, "
               "Ray's worker group and process group, the worker's imports (a trial's first attempt only)",
    "imports": "the worker loop's own imports (Ray Train, MLflow) and attaching to the trial's run",
    "model_load": "tokenizer and processor, the stage-1 checkpoint loaded with the method applied",
    "stage1_cache_read": "finding (or waiting for) the stage-1 checkpoint another trial computed (model_load reads it)",
    "stage1_build": "assembling the stage-1 model and saving its checkpoint (its training is stage1_training)",
    "stage1_training": "stage-1 steps, when this trial computed them",
    "data_load": "opening the stage-2 data (memory-mapped shards)",
    "ds_init": "importing DeepSpeed (the first time) and deepspeed.initialize: the engine and ZeRO's partitions",
    "stage2_training": "stage-2 steps, waits for data included",
    "interim_evaluation": "interim evaluations during stage 2",
    "checkpoint": "stage-2 checkpoints for a restarted worker group",
    "evaluation": "the final evaluation (score and text_score)",
    "artifact_save": "writing the method's artifact (adapter, or the model)",
    "mlflow_log": "the model card, the artifact upload and the final metrics to MLflow",
}
WORK = ("stage1_training", "stage2_training", "interim_evaluation", "evaluation")  # what a trial is for


def phase_metric(phase: str) -> str:
    return f"time_{phase}_s"


_SPECS += [MetricSpec(phase_metric(p), "s", MIN, "trial", f"wall seconds of rank 0 in this phase: {what}",
                      f"{p.replace('_', ' ')} (s)", "{:.1f}", reported=False) for p, what in PHASES.items()]
_SPECS.append(MetricSpec("time_overhead_s", "s", MIN, "trial", "wall seconds of the trial outside its work "
                         f"({', '.join(WORK)}): the sum of the other phases (bench.overhead)",
                         "trial overhead (s)", "{:.1f}", reported=False))
METRICS: dict[str, MetricSpec] = {m.name: m for m in _SPECS}


# Logged per question type too: `<metric>/<category>` for each of these (`score/color`, `score_n/color`, ...).
CATEGORY_METRICS = tuple(f"{score}{part}" for score in ("score", "text_score") for part in ("", "_n", "_ci_low",
                                                                                            "_ci_high"))


def category_name(category: str) -> str:
    """A question type as a metric name's part: the characters MLflow does not take in a name replaced by "_"
    (trainables.data.records makes sure one is a letter, digit or underscore, so it is never "." or "..")."""
    return re.sub(r"[^\w\-. ]", "_", category)


def category_metric(metric: str, category: str) -> str:
    """`metric` over one question type: `<metric>/<category>`."""
    return f"{metric}/{category_name(category)}"


def _per_category(name: str) -> MetricSpec | None:
    """The spec of a per-category metric (`score/color`, `score_n/color`, ...), from its metric's."""
    metric, _, category = name.partition("/")
    if metric not in CATEGORY_METRICS or not category:
        return None
    base = METRICS[metric]
    return MetricSpec(name, base.unit, base.direction, base.stage, f"{base.description}; questions of type "
                      f"{category!r} only", f"{base.label}, {category}", base.fmt)


def finals() -> list[str]:
    """The metrics a trial reports to Ray Tune at its end, sorted: what a study's METRIC and OBJECTIVES may name."""
    return sorted(m.name for m in METRICS.values() if m.reported and not m.per_step and m.stage != "study")


class UnknownMetric(KeyError):
    """A metric name that is not in METRICS; the message names it and the known ones."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def spec(name: str) -> MetricSpec:
    found = METRICS.get(name) or _per_category(name)
    if found is None:
        raise UnknownMetric(f"unknown metric {name!r} (known: {', '.join(sorted(METRICS))})")
    return found


def direction(name: str) -> str:
    """'max' for a metric where higher is better, else 'min' (every cost; also what the frontier assumes
    of a column that is not a metric, e.g. a param)."""
    return MAX if name in METRICS and METRICS[name].direction == MAX else MIN


def markdown() -> str:
    """The table as the README shows it."""
    lines = ["| metric | unit | better | stage | what it is |", "|---|---|---|---|---|"]
    for m in _SPECS:
        better = {MAX: "higher", MIN: "lower", NEITHER: "-"}[m.direction]
        name = f"`{m.name}`" + (" (per step)" if m.per_step else "")
        lines.append(f"| {name} | {m.unit} | {better} | {m.stage} | {m.description} |")
        if m.name == "text_score_ci_high":  # the per-category scores, after the scores they break down
            lines.append("| `score/<category>`, and `score_n/`, `score_ci_low/`, `score_ci_high/<category>` "
                         "(`text_score` alike) | 0-100 (`score_n/`: questions) | higher | eval | the score over the "
                         "held-out questions of one type, where they fall into two types or more by their records' `category` (the "
                         "world's: color, shape, count, where; records without one: uncategorized) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
