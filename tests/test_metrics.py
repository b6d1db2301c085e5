"""One table of metrics: the worker can log only what it names, and the README carries it as it is."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tracking import metrics
from tracking.trial_log import TrialLog

REPO = Path(__file__).parent.parent


def test_the_readme_carries_the_table_as_generated():
    readme = (REPO / "README.md").read_text()
    assert metrics.markdown() in readme, "README's 'What MLflow holds' table differs from tracking/metrics.py"


def test_every_metric_has_a_unit_a_direction_a_stage_and_a_description():
    for m in metrics.METRICS.values():
        assert m.unit and m.description and m.label, m.name
        assert m.direction in (metrics.MAX, metrics.MIN, metrics.NEITHER) and m.stage in metrics.STAGES, m.name
    assert metrics.direction("score") == "max" and metrics.direction("gpu_hours") == "min"


def test_a_trial_cannot_log_a_metric_the_table_does_not_name(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.create_run(client.create_experiment("m")).info.run_id
    log = TrialLog(client, run)
    with pytest.raises(metrics.UnknownMetric, match="unknown metric 'scroe'"):
        log.finish({"score": 50.0, "scroe": 50.0}, tags={})
    with pytest.raises(ValueError, match="score is logged once per trial"):
        log.metric("score", 1.0, step=0)
    log.metric("train_loss", 2.0, step=0)
    log.finish({"score": 50.0}, tags={"device": "cpu"})
    assert client.get_run(run).data.metrics == {"score": 50.0, "train_loss": 2.0}
