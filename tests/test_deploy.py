"""A scheduled deployment against a real local Prefect server: each run only does the new shards."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest

from shardlight.training.synthetic import write_shards

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BIN = Path(sys.executable).parent
CONFIG = "clip: {model: shapes-clip}\nlabels: {kind: vit, model: shapes-vit}\nray: {num_cpus: 2, num_actors: 1}\n"


def _candidate_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_prefect_server(root: Path, port: int):
    """Start `prefect server start` on `port`; (process, env) once healthy, None if it exited (port taken)."""
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "COLUMNS": "200"}
    proc = subprocess.Popen([BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                if r.read() == b"true" and proc.poll() is None:
                    return proc, env
        except OSError:
            pass
        time.sleep(1)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("prefect server did not become healthy in 180 s")
    return None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    # The server cannot report a port it chose itself, so a port found free may be taken again before it
    # binds: then it exits at once and we try another.
    for _ in range(3):
        started = _start_prefect_server(root, _candidate_port())
        if started:
            break
    else:
        pytest.fail("prefect server exited at start three times (ports taken?)")
    proc, env = started
    yield root, env
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


def run(env, *args, timeout=600):
    result = subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


LAST_RUN = """
import json
from prefect import get_client
from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, FlowRunFilterState,
                                            FlowRunFilterStateType, LogFilter, LogFilterFlowRunId)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
with get_client(sync_client=True) as client:
    done = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED])))
    run = client.read_flow_runs(flow_run_filter=done, sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    summary = [a.data for a in artifacts if a.key == "shardlight-run-summary"]
    print(json.dumps({"logs": [entry.message for entry in logs], "artifact": summary[0] if summary else ""}))
"""


def _last_run_logs_and_artifact(env) -> tuple[list[str], str]:
    """The latest completed flow run's log lines and its run-summary artifact, as the Prefect UI shows them
    (scheduled runs not yet started have no start time and would sort first)."""
    found = json.loads(run(env, sys.executable, "-c", LAST_RUN).stdout.strip().splitlines()[-1])
    return found["logs"], found["artifact"]


def test_cron_deployment_runs_incrementally(server):
    root, env = server
    data, out = root / "data", root / "out"
    write_shards(root / "all", shards=3, samples_per_shard=20, seed=51)
    data.mkdir()
    for name in ("00000.tar", "00001.tar"):
        shutil.copy(root / "all" / name, data / name)
    (root / "cfg.yaml").write_text(CONFIG)
    # Hourly, at the minute half an hour from now: the schedule must not fire while the test triggers runs
    # by hand (a run at the top of the hour once overwrote run.json mid-test).
    cron = f"{(datetime.now().minute + 30) % 60} * * * *"
    run(env, BIN / "shardlight", "deploy", root / "cfg.yaml", "--name", "hourly", "--cron", cron,
        "-i", data, "-o", out)
    worker = subprocess.Popen([BIN / "shardlight", "worker"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        schedule = run(env, BIN / "prefect", "deployment", "inspect", "shardlight-pipeline/hourly").stdout
        assert cron in schedule
        run(env, BIN / "prefect", "deployment", "run", "shardlight-pipeline/hourly", "--watch")
        first = json.loads((out / "run.json").read_text())["summary"]
        assert first["processed"] == 2 and first["index"]["count"] == 40
        kept = (out / "embeddings" / "00000.parquet").stat().st_mtime_ns

        shutil.copy(root / "all" / "00002.tar", data / "00002.tar")
        run(env, BIN / "prefect", "deployment", "run", "shardlight-pipeline/hourly", "--watch")
        second = json.loads((out / "run.json").read_text())["summary"]
        assert second["processed"] == 1 and second["skipped"] == 2
        assert second["index"]["count"] == first["index"]["count"] + 20
        assert (out / "embeddings" / "00000.parquet").stat().st_mtime_ns == kept
        logs, artifact = _last_run_logs_and_artifact(env)
        assert any("1 to process" in line for line in logs), logs  # shardlight's lines, run by the worker
        # the artifact of the run that updated the index shows the speed measured by that update
        assert f"{second['index']['count']:,} vectors" in artifact and "(measured after index-update)" in artifact
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:  # the Prefect worker can take longer to drain
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=30)
