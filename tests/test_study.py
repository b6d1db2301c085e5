"""The main command end to end: real local Ray, Ray Train workers, DeepSpeed, PEFT and MLflow on SQLite."""

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).parent.parent
TRIAL_PARAMS = ("method", "model_size", "lr", "lora_rank", "lora_alpha", "image_size", "mix_ratio", "batch_size",
                "stage1_steps", "stage2_steps", "num_workers", "zero_stage", "seed")
TRIAL_METRICS = ("score", "gpu_hours", "dollars", "trainable_params", "peak_mem_gb", "samples_per_s",
                 "stage1_gpu_hours", "stage2_gpu_hours", "stage1_trainable_params", "stage2_trainable_params")

pytestmark = pytest.mark.slow


def study(space: Path, cwd: Path, *flags: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "study.run", str(space), "--smoke", *flags], cwd=cwd,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def runs_of(cwd: Path, experiment: str):
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, trials


def test_smoke_lora_study(tmp_path):
    r = study(REPO / "search_spaces" / "lora.py", tmp_path, "--num-samples", "3")
    client, parents, trials = runs_of(tmp_path, "lora")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == 3
    for run in trials:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["device"] == "cpu"
        assert set(TRIAL_PARAMS) <= set(run.data.params)
        assert set(TRIAL_METRICS) <= set(run.data.metrics)
        assert 0 <= run.data.metrics["score"] <= 100
        assert run.data.metrics["dollars"] == pytest.approx(run.data.metrics["gpu_hours"] * 13.63)
        assert run.data.metrics["trainable_params"] > run.data.metrics["stage1_trainable_params"] > 0
        steps = int(run.data.params["stage2_steps"])
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted(m.step for m in history) == list(range(steps))
        files = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "adapter")}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    # the study's run carries the frontier plot and table
    frontier = {Path(f.path).name for f in client.list_artifacts(parents[0].info.run_id, "frontier")}
    assert {"frontier.png", "frontier.csv", "table.md"} <= frontier
    assert "Frontier (score vs gpu_hours)" in r.stdout
    # the table, the tracking URI and how to open the UI on loopback
    assert "score" in r.stdout and "gpu_hours" in r.stdout and "trainable_params" in r.stdout
    assert f"sqlite:///{tmp_path}/mlflow.db" in r.stdout and "--host 127.0.0.1" in r.stdout

    # a trial's adapter/ loads with stock transformers + peft onto its base path and gives the same answers
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    best = max(trials, key=lambda t: t.data.metrics["score"])
    adapter = Path(client.download_artifacts(best.info.run_id, "adapter", str(tmp_path / "dl")))
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_path == best.data.tags["stage1_checkpoint"]
    base = LlavaForConditionalGeneration.from_pretrained(base_path)
    model = PeftModel.from_pretrained(base, adapter).eval()
    processor = AutoProcessor.from_pretrained(base_path)
    assert sum(p.abs().sum() for n, p in model.named_parameters() if "lora_B" in n) > 0
    with torch.no_grad():
        ids = processor.tokenizer("USER: What number comes after two? ASSISTANT:", return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > ids.input_ids.shape[1]


def test_two_worker_trial_is_data_parallel(tmp_path):
    space = tmp_path / "two_workers.py"
    space.write_text(
        "from study.space import choice\n"
        "NAME = 'dp'\n"
        "FIXED = {'method': 'lora', 'model_size': '0.3m', 'num_workers': 2}\n"
        "SPACE = {'lora_rank': choice([8])}\n"
        "SMOKE = {'stage1_steps': 4, 'stage2_steps': 6, 'batch_size': 8, 'eval_samples': 16}\n")
    study(space, tmp_path, "--num-samples", "1")
    client, parents, trials = runs_of(tmp_path, "dp")
    (run,) = trials
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2" and run.data.params["num_workers"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 6
