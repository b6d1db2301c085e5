"""The local Ray a study starts (study.local_ray): every listener of every Ray process on loopback, every
one but the metrics endpoints refusing a client without the token; and credentials hidden in printed URIs.

The Ray runs in a child process (its environment changes stay there); this process, which never has the
token in its environment, is the unauthenticated client. Run with -s to see the listener table.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from study import local_ray
from study.local_ray import mask_credentials

ROOT = Path(__file__).resolve().parents[1]
PROBE_ENV = {"MMSCALE_PROBE": "workers-see-this"}

# One read-only method per Ray gRPC service that has listeners: a server without the service answers
# UNIMPLEMENTED before any token check, the one with it UNAUTHENTICATED (no token) or OK (the token).
GRPC_METHODS = (
    "/ray.rpc.NodeInfoGcsService/GetClusterId",  # GCS
    "/ray.rpc.NodeManagerService/GetNodeStats",  # raylet
    "/ray.rpc.ObjectManagerService/Pull",  # raylet's object manager (an empty pull: no objects)
    "/ray.rpc.CoreWorkerService/GetCoreWorkerStats",  # the driver's and every worker's core worker
    "/ray.rpc.ReporterService/HealthCheck",  # dashboard agent
)


# --- the child: a local Ray started as the study starts it ---------------------------------------------

def _child() -> None:
    import ray  # before init, as in the study (study.space imports Ray Tune)
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    from ray.util.state import list_placement_groups

    local_ray.init(None, dict(PROBE_ENV))

    @ray.remote
    def task():
        return os.getpid(), os.environ.get("MMSCALE_PROBE"), ray.util.get_node_ip_address()

    @ray.remote(num_cpus=0.1)
    class Actor:
        def ping(self):
            return os.getpid(), os.environ.get("MMSCALE_PROBE")

    pg = placement_group([{"CPU": 0.2}, {"CPU": 0.2}])  # a trial's worker group, as Ray Train asks for it
    ray.get(pg.ready(), timeout=60)
    members = [Actor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote() for i in (0, 1)]
    actors = [Actor.remote(), *members]
    node = ray._private.worker._global_node
    gcs = node.gcs_address
    info = {
        "driver": os.getpid(),
        "task": ray.get(task.remote(), timeout=60),
        "actors": ray.get([a.ping.remote() for a in actors], timeout=60),
        # the state API, through the dashboard, is what the study uses to free stopped trials' groups
        "state_api_pgs": [p.state for p in list_placement_groups(address=gcs)],
        "gcs": gcs,
        "dashboard": node.webui_url,
        "ports": {"gcs": int(gcs.rsplit(":", 1)[1]), "raylet": node.node_manager_port,
                  "object_manager": ray.nodes()[0]["ObjectManagerPort"],
                  "agent_grpc": node.metrics_agent_port, "agent_http": node.dashboard_agent_listen_port,
                  "runtime_env_agent": node.runtime_env_agent_port,
                  "dashboard": int(node.webui_url.rsplit(":", 1)[1])},
        "metrics_ports": [node.metrics_export_port, 44217, 44227],  # Prometheus: agent, autoscaler, dashboard
        "token_path": local_ray.token_path(),
        "auth_mode": os.environ.get("RAY_AUTH_MODE"),
    }
    print("READY " + json.dumps(info), flush=True)
    sys.stdin.readline()  # the parent probes the listeners meanwhile


# --- the unauthenticated (or authenticated) client -----------------------------------------------------

def _host(address: str) -> str:
    """Where a client reaches a listener: a wildcard one answers on 127.0.0.1 too."""
    if address in ("*", "0.0.0.0", "::"):
        return "127.0.0.1"
    return address.removeprefix("::ffff:")


def _http(address: str, port: int, token: str | None) -> int | None:
    """The HTTP status of GET /api/version, None when the port does not speak HTTP/1."""
    host = _host(address)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"http://{'[::1]' if host == '::1' else host}:{port}/api/version"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, http.client.HTTPException, OSError):
        return None


def _grpc(address: str, port: int, token: str | None) -> set[str]:
    """The status codes of GRPC_METHODS on the port, called with `token` (or none)."""
    import grpc

    host = _host(address)
    metadata = [("authorization", f"Bearer {token}")] if token else None
    codes = set()
    with grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}") as channel:
        for method in GRPC_METHODS:
            try:
                channel.unary_unary(method)(b"", timeout=5, metadata=metadata)
                codes.add("OK")
            except grpc.RpcError as e:
                codes.add(e.code().name)
    return codes


def probe(address: str, port: int, token: str | None) -> tuple[str, str]:
    """(protocol, verdict) for a client holding `token`: verdict "refused" (401/403, UNAUTHENTICATED),
    "served" (any other HTTP answer, or an OK), or the gRPC codes seen (e.g. "UNAVAILABLE": no answer)."""
    status = _http(address, port, token)
    if status is not None:
        return "http", "refused" if status in (401, 403) else "served"
    codes = _grpc(address, port, token)
    return "grpc", "refused" if "UNAUTHENTICATED" in codes else "served" if "OK" in codes else ",".join(sorted(codes))


# --- tests ----------------------------------------------------------------------------------------------

@pytest.fixture
def local_cluster(tmp_path):
    """A child process that started a local Ray through local_ray.init and keeps it up: (popen, info)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    # HOME: where Ray would write its default token (~/.ray/auth_token), had init not provided one
    env.update(HOME=str(home), PYTHONPATH=str(ROOT), RAY_DEDUP_LOGS="0")
    err = open(tmp_path / "child.err", "w")
    child = subprocess.Popen([sys.executable, __file__, "--child"], cwd=ROOT, env=env, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    try:
        line = ""
        while not line.startswith("READY "):
            line = child.stdout.readline()
            if not line and child.poll() is not None:
                err.flush()
                pytest.fail(f"the child exited {child.returncode}:\n{(tmp_path / 'child.err').read_text()[-4000:]}")
        info = json.loads(line[len("READY "):])
        info["home"] = str(home)
        yield child, info
    finally:
        if child.poll() is None:
            child.stdin.write("\n")
            child.stdin.flush()
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        err.close()


def test_local_ray_listens_on_loopback_and_wants_the_token(local_cluster):
    child, info = local_cluster
    token_path = Path(info["token_path"])
    token = token_path.read_text().strip()
    pids = local_ray.descendants(child.pid)
    found = local_ray.listeners(pids)

    rows, problems = [], []
    for lst in found:
        protocol, without = probe(lst.address, lst.port, None)
        _, wrong = probe(lst.address, lst.port, "0" * 64)
        _, right = probe(lst.address, lst.port, token)
        if without == "UNAVAILABLE" and lst not in local_ray.listeners(pids):
            continue  # an idle worker the raylet let go meanwhile
        metrics = lst.port in info["metrics_ports"]
        rows.append((lst, protocol, without, wrong, right, metrics))
        if not lst.loopback:
            problems.append(f"{lst} is not on loopback")
        if not metrics and (without, wrong, right) != ("refused", "refused", "served"):
            problems.append(f"{lst}: no token {without}, a wrong one {wrong}, the token {right}")

    print(f"\nlisteners of the local Ray (driver pid {info['driver']}; GCS {info['gcs']}):")
    print(f"  {'process':24} {'address':18} {'port':>5}  {'proto':5} {'no token':9} {'wrong':9} token")
    for lst, protocol, without, wrong, right, metrics in rows:
        print(f"  {lst.process:24} {lst.address:18} {lst.port:5}  {protocol:5} {without:9} {wrong:9} {right}"
              + ("  (metrics: loopback only)" if metrics else ""))

    assert not problems, "\n".join(problems)
    seen_ports = {lst.port for lst, *_ in rows}
    # (the dashboard agent's HTTP port is a fixed 52365: -1, not started, while another Ray holds it)
    missing = {name: port for name, port in info["ports"].items() if port not in seen_ports
               and not (name == "agent_http" and port == -1)}
    assert not missing, f"listeners not found among Ray's: {missing}"
    guarded_pids = {lst.pid for lst, _, without, *_ in rows if without == "refused"}
    workers = {info["driver"], *(pid for pid, _ in info["actors"])}  # and the task's, unless let go since
    workers |= {info["task"][0]} & {lst.pid for lst in local_ray.listeners(pids)}
    assert workers <= guarded_pids, f"core workers without a guarded listener: {workers - guarded_pids}"

    # what the study relies on still works, with the token only in the study's processes
    assert info["task"][1:] == [PROBE_ENV["MMSCALE_PROBE"], "127.0.0.1"]
    assert [env for _, env in info["actors"]] == [PROBE_ENV["MMSCALE_PROBE"]] * 3
    assert info["state_api_pgs"] == ["CREATED"]
    assert info["dashboard"].startswith("127.0.0.1:")
    assert info["auth_mode"] == "token"
    # the token: private, not Ray's shared default file, gone with the study
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_path.parent.stat().st_mode) == 0o700
    assert not (Path(info["home"]) / ".ray" / "auth_token").exists()
    child.stdin.write("\n")
    child.stdin.flush()
    assert child.wait(timeout=60) == 0
    assert not token_path.parent.exists()
    assert not local_ray.listeners(pids), "Ray's processes still listen after the study exited"


def test_listeners_tell_loopback_from_every_interface():
    with socket.socket() as lo, socket.socket() as anywhere:
        lo.bind(("127.0.0.1", 0))
        anywhere.bind(("0.0.0.0", 0))
        lo.listen()
        anywhere.listen()
        mine = {lst.port: lst for lst in local_ray.listeners([os.getpid()])}
        assert mine[lo.getsockname()[1]].loopback
        assert mine[lo.getsockname()[1]].pid == os.getpid()
        assert not mine[anywhere.getsockname()[1]].loopback


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1", True), ("::1", True), ("::ffff:127.0.0.1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("*", False), ("192.0.2.2", False), ("::ffff:192.0.2.2", False),
])
def test_loopback(address, loopback):
    assert local_ray._is_loopback(address) is loopback


def test_an_address_is_used_as_given(monkeypatch):
    """--address (or $RAY_ADDRESS): Ray connects there; nothing of the local hardening is applied."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert local_ray.starts_local(None) and local_ray.starts_local("local")
    assert not local_ray.starts_local("10.0.0.5:6379")
    local_ray.init("10.0.0.5:6379", {"A": "1"})
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    # RAY_ADDRESS alone means a cluster too: the study then keeps Ray Train's TCP rendezvous across nodes
    assert not local_ray.starts_local(None)
    local_ray.init(None, {"A": "1"})
    assert [c["address"] for c in calls] == ["10.0.0.5:6379", "auto"]
    for c in calls:
        assert c["runtime_env"] == {"env_vars": {"A": "1"}}
        assert not {"_node_ip_address", "include_dashboard", "dashboard_host"} & set(c)
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        assert var not in os.environ


@pytest.mark.parametrize("uri, shown", [
    ("http://user:pass@host:5000", "http://user:***@host:5000"),
    ("https://alice:s3cr%40t@mlflow.example.com/path?x=1", "https://alice:***@mlflow.example.com/path?x=1"),
    ("https://TOKEN123@mlflow.example.com", "https://***@mlflow.example.com"),
    ("postgresql://mlflow:hunter2@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
    ("postgresql+psycopg2://u:p@db/mlflow?sslmode=require", "postgresql+psycopg2://u:***@db/mlflow?sslmode=require"),
    ("mysql://root:toor@127.0.0.1:3306/mlflow", "mysql://root:***@127.0.0.1:3306/mlflow"),
    ("mysql+pymysql://u:p@w@db/m", "mysql+pymysql://u:***@db/m"),  # an unescaped @ in the password
    ("databricks://token:dapi0123@workspace", "databricks://token:***@workspace"),
    ("postgresql://db/mlflow?user=u&password=secret&sslmode=require",
     "postgresql://db/mlflow?user=u&password=***&sslmode=require"),
    ("http://host:5000/?token=abc", "http://host:5000/?token=***"),
    # nothing to hide: unchanged
    ("databricks", "databricks"),
    ("databricks://my-profile", "databricks://my-profile"),
    ("databricks://scope:prefix", "databricks://scope:prefix"),
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
    ("file:///tmp/mlruns", "file:///tmp/mlruns"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("/work/mlruns", "/work/mlruns"),
])
def test_mask_credentials(uri, shown):
    assert mask_credentials(uri) == shown


if __name__ == "__main__" and sys.argv[1:] == ["--child"]:
    _child()
