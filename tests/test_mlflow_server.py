"""A real smoke study writes its runs through a real `mlflow server` on 127.0.0.1 (an http tracking URI), and
what a researcher must see is there: read back through the server's REST API (what the UI and remote clients
read), and in a real browser (Debian's headless Chromium, when installed) opening the link the study prints.

    MMSCALE_SCREENSHOTS=docs python -m pytest tests/test_mlflow_server.py   # also writes the README's screenshots
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

REPO = Path(__file__).parent.parent
STUDY = "ui-check"
SEARCHED = ("model_size", "lora_rank", "lora_alpha", "lr")  # search_spaces/lora.py's SPACE, in its order
START_TIMEOUT_S = 180  # ~15 s on an idle laptop; minutes when a study shares the 2 cores
CHROMIUM = shutil.which("chromium")

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on a free loopback port over a fresh SQLite store, serving artifacts itself (the study
    uploads through it); its whole process group is stopped at the end."""
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    log = root / "server.log"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_cli), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--serve-artifacts",
           "--artifacts-destination", str(root / "artifacts")]
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


def by_key(entries: list) -> dict:
    return {e["key"]: e["value"] for e in entries or []}


@pytest.fixture(scope="module")
def study(server, tmp_path_factory):
    """A `--smoke --num-samples 2` LoRA study against the server; its output, experiment and runs as the
    server gives them back."""
    work = tmp_path_factory.mktemp("study")
    done = subprocess.run([sys.executable, "-m", "study.run", str(REPO / "search_spaces" / "lora.py"), "--smoke",
                           "--num-samples", "2", "--experiment", STUDY, "--tracking-uri", server,
                           "--storage", str(work / "studies")], cwd=work, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    exp = api(server, "GET", "experiments/get-by-name", params={"experiment_name": STUDY})["experiment"]
    runs = api(server, "POST", "runs/search", json={"experiment_ids": [exp["experiment_id"]],
                                                     "max_results": 100})["runs"]
    parents = [r for r in runs if "mlflow.parentRunId" not in by_key(r["data"].get("tags"))]
    assert len(parents) == 1, [r["info"]["run_name"] for r in runs]
    trials = [r for r in runs if r not in parents]
    return SimpleNamespace(stdout=done.stdout, exp=exp, parent=parents[0], trials=trials, base=server)


def dominated(trial, others) -> bool:
    """Another trial at least as good on score and GPU-hours, and better on one (the frontier's definition)."""
    s, h = trial["score"], trial["gpu_hours"]
    return any(o["score"] >= s and o["gpu_hours"] <= h and (o["score"] > s or o["gpu_hours"] < h) for o in others)


def expected_name(params: dict, digits: int = 2) -> str:
    """What the study varies, short, in the space's order: `1m r8 a32 lr3.5e-3`."""
    mantissa, exponent = f"{float(params['lr']):.{digits - 1}e}".split("e")
    lr = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{params['model_size']} r{params['lora_rank']} a{float(params['lora_alpha']):g} lr{lr}"


def test_the_study_reads_at_a_glance_through_the_server(study):
    metrics = {r["info"]["run_id"]: by_key(r["data"].get("metrics")) for r in study.trials}
    parent_id, exp_id = study.parent["info"]["run_id"], study.exp["experiment_id"]
    assert len(study.trials) == 2 and all(r["info"]["status"] == "FINISHED" for r in study.trials)

    # trials are named by what varies, uniquely, and the frontier is tagged on every one
    names = {r["info"]["run_id"]: r["info"]["run_name"] for r in study.trials}
    params = {r["info"]["run_id"]: by_key(r["data"]["params"]) for r in study.trials}
    short = {rid: expected_name(p) for rid, p in params.items()}
    if len(set(short.values())) == len(short):
        assert names == short
    else:  # the same short name: the later trial takes more digits (or " #2": the same configuration twice)
        first, later = sorted(study.trials, key=lambda r: r["info"]["start_time"])
        assert names[first["info"]["run_id"]] == short[first["info"]["run_id"]]
        rid = later["info"]["run_id"]
        assert names[rid] in (expected_name(params[rid], 3), expected_name(params[rid], 4), short[rid] + " #2")
    for run in study.trials:
        tags = by_key(run["data"]["tags"])
        assert tags["mlflow.parentRunId"] == parent_id
        others = [m for rid, m in metrics.items() if rid != run["info"]["run_id"]]
        assert tags["on_frontier"] == ("false" if dominated(metrics[run["info"]["run_id"]], others) else "true")
    on = [rid for rid in names if not dominated(metrics[rid], [m for r, m in metrics.items() if r != rid])]

    # the study's run: summary metrics that match its trials
    summary = by_key(study.parent["data"]["metrics"])
    scores = [m["score"] for m in metrics.values()]
    assert summary["best_score"] == max(scores) and summary["frontier_size"] == len(on)
    assert (summary["trials_finished"], summary["trials_failed"], summary["trials_pruned"]) == (2, 0, 0)
    assert math.isclose(summary["total_gpu_hours"], sum(m["gpu_hours"] for m in metrics.values()), rel_tol=1e-9)
    assert math.isclose(summary["total_dollars"], sum(m["dollars"] for m in metrics.values()), rel_tol=1e-9)

    # ... and a description with the frontier table (each trial's name linked to its run) and the plot
    note = by_key(study.parent["data"]["tags"])["mlflow.note.content"]
    assert f"{len(on)} on the frontier" in note and "frontier/frontier.png" in note
    for rid, name in names.items():
        linked = f"[{name}](#/experiments/{exp_id}/runs/{rid}?workflowType=machine_learning)"
        assert (linked in note) == (rid in on), (name, note)
    assert f"{max(scores):.1f}" in note

    # the experiment says what was searched and how to read it; its saved view shows the columns that matter
    exp_tags = by_key(study.exp.get("tags"))
    described = exp_tags["mlflow.note.content"]
    assert all(f"`{key}`" in described for key in SEARCHED) and "tags.on_frontier = 'true'" in described
    view = json.loads(exp_tags[f"mlflow.sharedViewState.mmscale-{parent_id}"])
    state = json.loads(zlib.decompress(base64.b64decode(view["state"].removeprefix("deflate;"))))
    assert state["selectedColumns"][:4] == [f"params.`{k}`" for k in SEARCHED]
    assert {"metrics.`score`", "metrics.`gpu_hours`", "metrics.`dollars`", "tags.`on_frontier`"} \
        <= set(state["selectedColumns"])
    assert state["orderByKey"] == "metrics.`score`" and state["runsExpanded"] == {parent_id: True}

    # the study printed the deep link to that view, in model-training mode, and nothing to open a local UI
    link = f"{study.base}/#/experiments/{exp_id}/runs?workflowType=machine_learning&viewStateShareKey=mmscale-{parent_id}"
    assert link in study.stdout and "mlflow ui --backend-store-uri" not in study.stdout

    # artifacts through the server: the frontier files, and the trials' loss curves
    listed = api(study.base, "GET", "artifacts/list", params={"run_id": parent_id, "path": "frontier"})
    assert {f["path"] for f in listed["files"]} == {"frontier/frontier.png", "frontier/frontier.csv",
                                                     "frontier/table.md"}
    csv = requests.get(f"{study.base}/get-artifact", params={"run_uuid": parent_id, "path": "frontier/frontier.csv"},
                       timeout=30)
    assert csv.ok and csv.text.startswith("run_id,") and all(rid in csv.text for rid in names)
    first = study.trials[0]["info"]["run_id"]
    history = api(study.base, "GET", "metrics/get-history", params={"run_id": first, "metric_key": "train_loss"})
    steps = int(by_key(study.trials[0]["data"]["params"])["stage2_steps"])
    assert sorted(m["step"] for m in history["metrics"]) == list(range(steps))


# --- the same in a real browser: a small Chrome DevTools Protocol client over aiohttp (a dependency of
# Ray's dashboard); written by hand because no browser driver (Playwright, Selenium) is a dependency here ---

class Page:
    def __init__(self, ws):
        self.ws, self.calls = ws, 0

    async def call(self, method: str, **params) -> dict:
        self.calls += 1
        await self.ws.send_json({"id": self.calls, "method": method, "params": params})
        async for message in self.ws:
            data = json.loads(message.data)
            if data.get("id") == self.calls:
                assert "error" not in data, data["error"]
                return data.get("result", {})
        raise ConnectionError("the browser closed its DevTools connection")

    async def text(self) -> str:
        result = await self.call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                                 returnByValue=True)
        return result.get("result", {}).get("value") or ""

    async def open(self, url: str, expect: list[str], timeout_s: float = 90) -> str:
        """Load `url` and wait until the page's text holds every string of `expect`; the text then."""
        await self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout_s
        while True:
            text = await self.text()
            if all(e in text for e in expect) or time.monotonic() > deadline:
                return text
            await asyncio.sleep(0.5)

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))


async def browse(visits: list[tuple[str, list[str]]], shots: Path) -> list[str]:
    """Headless Chromium (flags: the machine notes' "known to work") at each (url, expected text); the pages'
    text, and a screenshot of each in `shots` (page-0.png, ...)."""
    import aiohttp

    profile = tempfile.mkdtemp()
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                             "--disable-background-networking", "--disable-component-update", "--disable-sync",
                             f"--user-data-dir={profile}", "--window-size=1600,900", "--remote-debugging-port=0",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
            await asyncio.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            targets = await (await http.get(f"http://127.0.0.1:{port}/json")).json()
            target = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                await page.call("Page.enable")
                texts = []
                for i, (url, expect) in enumerate(visits):
                    await page.open(url, expect)
                    # MLflow 3.17 opens its Assistant panel on a browser's first visit, over a third of the page:
                    # closed as a user would, so that the screenshot shows the table (it changes no text asserted)
                    await page.call("Runtime.evaluate",
                                    expression="localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false')")
                    await page.call("Page.navigate", url="about:blank")
                    texts.append(await page.open(url, expect))
                    # a long description shows its first lines and a "Show more" button (drawn once the text is
                    # measured): opened, for the screenshot
                    for _ in range(10):
                        clicked = await page.call("Runtime.evaluate", returnByValue=True, expression=(
                            "[...document.querySelectorAll('button')].filter(e => e.textContent.trim() === "
                            "'Show more').map(e => e.click()).length"))
                        if clicked.get("result", {}).get("value"):
                            break
                        await asyncio.sleep(0.5)
                    await asyncio.sleep(1.0)  # the table's last layout pass
                    await page.screenshot(shots / f"page-{i}.png")
                return texts
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (Debian's package `chromium`) on this machine")
def test_a_browser_opens_the_printed_link_on_the_runs_table(study, tmp_path):
    parent_id, exp_id = study.parent["info"]["run_id"], study.exp["experiment_id"]
    link = f"{study.base}/#/experiments/{exp_id}/runs?workflowType=machine_learning&viewStateShareKey=mmscale-{parent_id}"
    assert link in study.stdout  # the one the study printed
    names = [r["info"]["run_name"] for r in study.trials]
    on = [r["info"]["run_name"] for r in study.trials if by_key(r["data"]["tags"])["on_frontier"] == "true"]
    study_page = f"{study.base}/#/experiments/{exp_id}/runs/{parent_id}?workflowType=machine_learning"
    runs_text, study_text = asyncio.run(browse([(link, names + ["on_frontier"]), (study_page, on)], tmp_path))

    # the runs table, without choosing a column: model-training mode, the trials by name, the searched
    # params, score and cost, and which trials are on the frontier
    assert "Model registry" in runs_text and "Judges" not in runs_text  # the sidebar of model training, not GenAI
    assert f"Study {STUDY}" in runs_text  # the experiment's description
    assert all(name in runs_text for name in names)
    assert all(column in runs_text for column in SEARCHED + ("score", "gpu_hours", "dollars", "on_frontier"))
    assert "true" in runs_text.split("on_frontier", 1)[1]
    # the study's run: its description opens with what was spent and found, then the frontier's trials
    assert f"{len(on)} on the frontier" in study_text and all(name in study_text for name in on)
    assert "best_score" in study_text and "total_gpu_hours" in study_text
    shots = os.environ.get("MMSCALE_SCREENSHOTS")
    if shots:  # how the README's screenshots were made
        shutil.copy(tmp_path / "page-0.png", Path(shots) / "mlflow-runs.png")
        shutil.copy(tmp_path / "page-1.png", Path(shots) / "mlflow-study-run.png")
