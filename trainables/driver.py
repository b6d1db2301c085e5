"""The driver of one trial: a Ray Tune function trainable that runs a Ray Train TorchTrainer.

Train V2 pattern: Tune no longer takes a trainer; each trial builds its own
`TorchTrainer` with `TuneReportCallback`, which forwards rank 0's reported
metrics to Tune (and so to the searcher). The trainer's name comes from the
trial id (no timestamp), so a restored trial finds its own storage again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from study.space import trial_config


@dataclass(frozen=True)
class StudyContext:
    """What every trial of a study shares; not part of the trial's config or params."""
    tracking_uri: str
    experiment_id: str
    storage: str
    cpus_per_worker: int = 1


def run_trial(config: dict, study: StudyContext) -> None:
    import ray.tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainables.worker import train_loop

    cfg = trial_config(config)
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        train_loop_per_worker=train_loop,
        train_loop_config={"trial": cfg.to_dict(), "trial_id": trial_id, "tracking_uri": study.tracking_uri,
                           "experiment_id": study.experiment_id, "threads": study.cpus_per_worker},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=None if cfg.use_gpu else {"CPU": study.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(name=f"trial-{trial_id}", storage_path=str(Path(study.storage) / "train"),
                             callbacks=[TuneReportCallback()]),
    )
    trainer.fit()
