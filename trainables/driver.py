"""The driver of one trial: a Ray Tune function trainable that runs a Ray Train TorchTrainer.

Train V2 pattern: Tune no longer takes a trainer; each trial builds its own
`TorchTrainer` with `TuneReportCallback`, which forwards rank 0's reported
metrics to Tune (and so to the searcher). The trainer's name comes from the
trial id (no timestamp), so a restored trial finds its own storage again.

Worker failures are Ray Train's to handle: the trainer restarts its worker group up
to `max_worker_failures` times, and the new workers resume stage 2 from the latest
checkpoint (trainables.checkpoint); an error of the trial itself (a diverging loss)
is raised again at once instead. Tune only sees the trial's final result.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from trainables.config import trial_config
from trainables.data.check import DataPlan


@dataclass(frozen=True)
class StudyContext:
    """What every trial of a study shares; not part of the trial's config or params."""
    tracking_uri: str
    experiment_id: str
    storage: str        # the study's storage: stage-1 cache, Ray Train runs (shared by path across nodes)
    data: DataPlan      # the checked data: shards per tokenizer and split (trainables.data.check)
    cpus_per_worker: int = 1
    local_ray: bool = False  # the study's own Ray on this machine, not a cluster: ranks meet through a file
    session_start_ms: int = 0  # when this driver started the study (or resumed it): runs older are not live


def tune_report_callback():
    """A `TuneReportCallback` that forwards to Tune what Tune judges a trial by: interim evaluations
    (`interim_score` at `stage2_step`, what an early-stopping scheduler reads) and the final result (`score`).

    A checkpoint-only report stays with Ray Train (it restores workers from it); one that also carries an
    interim evaluation goes to Tune without its checkpoint, which Tune has no use for.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class ResultCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            # `metrics`: one dict per worker (rank 0's first); ranks report the same keys
            if metrics and ("score" in metrics[0] or "interim_score" in metrics[0]):
                super().after_report(run_context, metrics, None)

    return ResultCallback()


def run_trial(config: dict, study: StudyContext) -> None:
    import ray.tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainables import rendezvous
    from trainables.worker import train_loop

    cfg = trial_config(config)
    trial_id = ray.tune.get_context().get_trial_id()
    name, storage = f"trial-{trial_id}", Path(study.storage) / "train"
    trainer = TorchTrainer(
        train_loop_per_worker=train_loop,
        train_loop_config={"trial": cfg.to_dict(), "trial_id": trial_id, "tracking_uri": study.tracking_uri,
                           "experiment_id": study.experiment_id, "threads": study.cpus_per_worker,
                           "run_dir": str(storage / name), "data": study.data, "storage": study.storage},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=None if cfg.use_gpu else {"CPU": study.cpus_per_worker},
                                     placement_strategy=cfg.placement_strategy),
        torch_config=rendezvous.torch_config(cfg.use_gpu, storage / name, local=study.local_ray),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             callbacks=[tune_report_callback()],
                             failure_config=FailureConfig(max_failures=cfg.max_worker_failures),
                             # Ray Train registers a checkpoint once every rank's shard is in, so the latest is whole.
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    trainer.fit()
    # The trial is done and its results are in MLflow: its stage-2 checkpoints (for `full`, the whole
    # LLM and its optimizer state) only served a restart, so they go. A failed trial keeps them.
    for done in (storage / name).glob("checkpoint_*"):
        if done.is_dir():  # not Ray Train's checkpoint_manager_snapshot.json, its record of them
            shutil.rmtree(done, ignore_errors=True)
