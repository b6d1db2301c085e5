"""A study across two Ray nodes: two raylets on this machine (`ray start`, bound to 127.0.0.1), the study
connected with --address, a trial whose two workers must land on different nodes (STRICT_SPREAD), and the
storage shared by path, as on a cluster with NFS."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).parent.parent
pytestmark = pytest.mark.slow

SPACE = """
from study.space import choice
NAME = "spread"
FIXED = {"method": "lora", "model_size": "0.3m", "num_workers": 2, "placement_strategy": "STRICT_SPREAD"}
SPACE = {"lora_rank": choice([8])}
SMOKE = {"stage1_steps": 2, "stage2_steps": 4, "batch_size": 4, "eval_samples": 8, "checkpoint_every": 0}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Two raylets in one process tree (ray.cluster_utils.Cluster): `ray start` refuses a second node in Ray's
# single-machine address mode, which is what keeps a node's servers on 127.0.0.1.
CLUSTER = """
import sys
from ray.cluster_utils import Cluster
args = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
cluster = Cluster(initialize_head=True, head_node_args={**args, "include_dashboard": True,
                                                        "dashboard_host": "127.0.0.1", "dashboard_port": int(sys.argv[1])})
cluster.add_node(**args)
cluster.wait_for_nodes()
print(cluster.address, flush=True)
sys.stdin.read()  # until the test closes it
cluster.shutdown()
"""


@pytest.fixture
def two_nodes(tmp_path):
    """A head node and a worker node, one CPU each, both on 127.0.0.1 (Ray's single-machine address mode)."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    holder = subprocess.Popen([sys.executable, "-c", CLUSTER, str(free_port())], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        address = holder.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), address
        yield address, env
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            holder.kill()


def test_a_trial_spans_two_nodes(two_nodes, tmp_path):
    address, env = two_nodes
    space = tmp_path / "spread.py"
    space.write_text(SPACE)
    r = subprocess.run([sys.executable, "-m", "study.run", str(space), "--smoke", "--num-samples", "1", "--address",
                        address, "--storage", str(tmp_path / "shared")], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "1 trials, 1 at a time, 2 cpu worker(s) per trial" in r.stdout, "concurrency from the cluster's 2 CPUs"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("spread").experiment_id])
    (trial,) = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert trial.info.status == "FINISHED" and trial.data.tags["world_size"] == "2"
    nodes = trial.data.tags["nodes"].split(",")
    listed = subprocess.run([sys.executable, "-c", "import json, ray; ray.init(address=%r, logging_level='ERROR'); "
                             "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))" % address],
                            env=env, capture_output=True, text=True, timeout=120)
    alive = set(json.loads(listed.stdout.strip().splitlines()[-1]))
    assert len(nodes) == 2 and len(set(nodes)) == 2 and set(nodes) == alive, (nodes, alive)
