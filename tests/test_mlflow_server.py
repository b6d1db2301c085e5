"""A real `mlflow server` over a study's sqlite store serves the nested trial runs, their metrics
and the parent's frontier artifact through its REST API (what the MLflow UI and remote clients read)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from test_analysis_store import STUDY, TRIALS, shared_store

START_TIMEOUT_S = 180  # ~15 s on an idle laptop; minutes when a study shares the 2 cores


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return shared_store(tmp_path_factory)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    """The server on a free loopback port; its whole process group is stopped at the end."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    # The study's experiments carry absolute file artifact locations, which the server reads directly;
    # --default-artifact-root only matters for experiments created through the server.
    cmd = [str(mlflow_cli), "server", "--backend-store-uri", store.uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1", "--serve-artifacts",
           "--default-artifact-root", (store.root / "served").as_uri()]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner processes to start
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(f"{base}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not up after {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its worker processes
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def api(base: str, method: str, endpoint: str, **kwargs) -> dict:
    response = requests.request(method, f"{base}/api/2.0/mlflow/{endpoint}", timeout=30, **kwargs)
    assert response.ok, f"{endpoint}: {response.status_code} {response.text[:500]}"
    return response.json()


def test_server_serves_the_nested_runs_metrics_and_frontier(server, store):
    exp = api(server, "GET", "experiments/get-by-name", params={"experiment_name": STUDY})["experiment"]
    found = api(server, "POST", "runs/search", json={
        "experiment_ids": [exp["experiment_id"]], "max_results": 100,
        "filter": f"tags.`mlflow.parentRunId` = '{store.parent}'"})["runs"]
    assert {r["info"]["run_id"] for r in found} == set(store.run_ids)
    for run in found:
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["mlflow.parentRunId"] == store.parent
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert {"method", "model_size", "lr", "lora_rank", "lora_alpha", "image_size", "mix_ratio"} <= set(params)
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert "gpu_hours" in metrics and ("score" in metrics) == (run["info"]["status"] == "FINISHED")
    assert sorted(r["info"]["status"] for r in found) == sorted(t[-1] for t in TRIALS)

    history = api(server, "GET", "metrics/get-history",
                  params={"run_id": store.run_ids[0], "metric_key": "train_loss"})["metrics"]
    assert [m["step"] for m in sorted(history, key=lambda m: m["step"])] == list(range(10))

    listed = api(server, "GET", "artifacts/list", params={"run_id": store.parent, "path": "frontier"})
    assert {f["path"] for f in listed["files"]} == {"frontier/frontier.png", "frontier/frontier.csv",
                                                     "frontier/table.md"}
    csv = requests.get(f"{server}/get-artifact", params={"run_uuid": store.parent, "path": "frontier/frontier.csv"},
                       timeout=30)
    assert csv.ok and csv.text.startswith("run_id,") and all(r in csv.text for r in store.run_ids)
